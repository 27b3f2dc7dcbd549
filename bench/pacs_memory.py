"""Peak memory of ``medai pacs listen`` receiving large instances over parallel associations.

Issue 18's criterion: 16 associations each sending a 1 GiB instance, the
listener's peak RSS (VmHWM) under 300 MB, every instance stored intact.

    .venv/bin/python bench/pacs_memory.py [--associations 16] [--size 1G] [--sender stream|storescu]

Senders: ``stream`` (default) is a minimal DICOM requestor in this script
that streams each instance's pixel data as it generates it (deterministic,
incompressible bytes), so 16 GiB need no source files and no sender memory;
``storescu`` is dcmtk's, sending files written beforehand (it holds each file
in memory: 16 x 1 GiB of sender memory, and the files double the disk use).
The listener runs as its own process (``--no-worker``) with fsync before
success; the pixel data of every stored file is hashed afterwards and
compared with what was sent. Prints: peak RSS, seconds, MB/s, instances intact.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pacs_peers import (
    DCMTK_ENV,
    Listener,
    fill_chunks,
    large_instance_header,
    peak_rss_bytes,
    stored_files,
    tail_sha256,
    write_large_instance,
)

from medai.config import parse_size
from medai.pacs import pdu

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            part = sock.recv(n - len(out))
            if not part:
                raise ConnectionError("peer closed")
            out += part
        return bytes(out)

    pdu_type, _, length = struct.unpack(">BBI", exactly(6))
    return pdu_type, exactly(length)


def stream_store(port: int, pixel_bytes: int, seed: int, results: dict[str, str]) -> None:
    """One association, one C-STORE whose dataset is generated while it is sent."""
    header, sop = large_instance_header(pixel_bytes)
    # The dataset is what follows the file meta group (the 132-byte preamble, then group 0002).
    (meta_length,) = struct.unpack_from("<I", header, 132 + 8)
    dataset_head = header[132 + 12 + meta_length:]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(pdu.encode_associate_rq("STREAM", "MEDAI", [(1, MR_IMAGE_STORAGE, [EXPLICIT_LE])],
                                             max_pdu=16384))
        pdu_type, body = _recv_pdu(sock)
        if pdu_type != pdu.A_ASSOCIATE_AC:
            raise RuntimeError(f"association not accepted (PDU type {pdu_type})")
        command = pdu.encode_command([
            (0x0002, pdu.uid_value(MR_IMAGE_STORAGE)), (0x0100, struct.pack("<H", pdu.C_STORE_RQ)),
            (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)), (0x0800, struct.pack("<H", 0)),
            (0x1000, pdu.uid_value(sop))])
        sock.sendall(pdu.encode_pdata(1, command, command=True, peer_max_pdu=0))
        piece = 1024 * 1024 - 6  # PDVs of 1 MiB (the listener advertises no maximum)
        digest = hashlib.sha256()
        pending = bytearray(dataset_head)
        total = len(dataset_head) + pixel_bytes
        sent = 0
        chunks = fill_chunks(pixel_bytes, seed)
        while sent < total:
            while len(pending) < piece and (chunk := next(chunks, None)) is not None:
                digest.update(chunk)
                pending += chunk
            data = bytes(pending[:piece])
            del pending[:piece]
            sent += len(data)
            flags = 0x02 if sent == total else 0x00
            sock.sendall(pdu.pdu(pdu.P_DATA_TF, struct.pack(">IBB", len(data) + 2, 1, flags) + data))
        pdu_type, body = _recv_pdu(sock)
        status = pdu.command_us(pdu.parse_command(body[6:]), 0x0900)
        if status != 0:
            raise RuntimeError(f"C-STORE answered 0x{status:04X}")
        sock.sendall(pdu.pdu(pdu.A_RELEASE_RQ, b"\x00" * 4))
        _recv_pdu(sock)
    results[sop] = digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument("--size", default="1G", help="pixel data bytes per instance (multiple of 128 KiB)")
    parser.add_argument("--sender", choices=("stream", "storescu"), default="stream")
    parser.add_argument("--dir", default=None, help="where the listener's MEDAI_HOME goes (needs n x size free)")
    args = parser.parse_args()
    size = parse_size(args.size)
    n = args.associations
    with tempfile.TemporaryDirectory(prefix="pacs-memory-", dir=args.dir) as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        sent: dict[str, str] = {}
        files = []
        if args.sender == "storescu":
            for i in range(n):
                sop, digest = write_large_instance(Path(tmp) / f"big{i}.dcm", size, seed=i)
                sent[sop] = digest
                files.append(Path(tmp) / f"big{i}.dcm")
        lst = Listener(home, "--no-worker", env={"MEDAI_PACS_MAX_INSTANCE_SIZE": str(2 * size + 2**20),
                                                  "MEDAI_PACS_MAX_ASSOCIATIONS": str(max(16, n))}).start()
        assert lst.proc is not None
        idle = peak_rss_bytes(lst.proc.pid)
        start = time.perf_counter()
        errors: list[BaseException] = []
        try:
            if args.sender == "storescu":
                procs = [subprocess.Popen(["/usr/bin/storescu", "-aec", "MEDAI", "-aet", f"BIG{i}", "127.0.0.1",
                                           str(lst.port), str(f)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE) for i, f in enumerate(files)]
                for proc in procs:
                    _, err = proc.communicate()
                    if proc.returncode:
                        errors.append(RuntimeError(err.decode(errors="replace")[-400:]))
            else:
                def one(i: int) -> None:
                    try:
                        stream_store(lst.port, size, i, sent)
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)

                threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            seconds = time.perf_counter() - start
            peak = peak_rss_bytes(lst.proc.pid)
        finally:
            lst.terminate()
        if errors:
            print(f"sender errors: {errors[:3]}", file=sys.stderr)
        stored = stored_files(home)
        intact = sum(1 for sop, digest in sent.items() if sop in stored and tail_sha256(stored[sop], size) == digest)
    total = n * size
    print(f"{n} associations x {size / 2**20:.0f} MiB ({args.sender} sender): {seconds:.1f} s, "
          f"{total / seconds / 1e6:.0f} MB/s into the store (fsync before success)")
    print(f"listener peak RSS (VmHWM): {peak / 2**20:.0f} MiB (idle after start: {idle / 2**20:.0f} MiB); "
          f"bound 300 MB: {'met' if peak < 300e6 else 'NOT met'}")
    print(f"instances stored intact (sha256 of pixel data): {intact}/{n}")
    return 0 if intact == n and peak < 300e6 and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
