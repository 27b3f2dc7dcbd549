"""Soak: 4 concurrent dcmtk ``storescu`` senders x 10,000 instances into
``medai pacs listen``, the listener SIGKILLed mid-run and restarted, the
senders then retrying everything.

Checked and printed: every instance a sender saw acknowledged before the kill
is on disk intact (lost: 0); after the retry every instance is stored exactly
once, with its pixel data intact, and registered once in the queue database
(duplicate outputs: 0); no temporary file is left behind. The CI-sized
version (4 senders, ~2,000 instances, the model round trip on top) is
``tests/test_pacs_robustness.py``.

    .venv/bin/python bench/pacs_soak.py [--per-sender 10000] [--kill-at 0.4]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pacs_peers import (
    DCMTK_ENV,
    Listener,
    acknowledged,
    make_copies,
    medai_json,
    stored_files,
    wait_until,
)


def _send(port: int, folders: list[Path], logs: Path) -> list[tuple[subprocess.Popen[str], Path]]:
    """One storescu per folder; their -v logs go to files (10,000 instances of
    log would fill a pipe nobody reads until the kill, and stall the senders)."""
    logs.mkdir(parents=True, exist_ok=True)
    out = []
    for i, folder in enumerate(folders):
        log = logs / f"sender{i}.log"
        with open(log, "w") as f:
            out.append((subprocess.Popen(["/usr/bin/storescu", "-v", "+sd", "-aec", "MEDAI", "-aet", f"SOAK{i}",
                                          "127.0.0.1", str(port), str(folder)], env=DCMTK_ENV, stdout=f,
                                         stderr=subprocess.STDOUT, text=True), log))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--per-sender", type=int, default=10_000)
    parser.add_argument("--kill-at", type=float, default=0.4, help="fraction stored when the listener is killed")
    args = parser.parse_args()
    import pydicom

    total = args.senders * args.per_sender
    with tempfile.TemporaryDirectory(prefix="pacs-soak-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        folders, expected, by_path = [], {}, {}
        for i in range(args.senders):
            copies = make_copies(work / f"sender{i}", args.per_sender, per_study=500)
            folders.append(work / f"sender{i}")
            for sop, (path, sha) in copies.items():
                expected[sop] = sha
                by_path[str(path)] = sop
        print(f"{total} instances made in {time.monotonic() - started:.0f} s", file=sys.stderr)
        home = work / "home"
        home.mkdir()
        lst = Listener(home, "--no-worker").start()
        port = lst.port
        started = time.monotonic()
        senders = _send(port, folders, work / "logs-1")
        try:
            wait_until(lambda: len(stored_files(home)) >= args.kill_at * total, timeout=3600, interval=0.1,
                       what="the kill point")
            lst.kill()
            for p, _ in senders:
                p.wait(timeout=300)
            outputs = [log.read_text(errors="replace") for _, log in senders]
            acked = [by_path[f] for out in outputs for f in acknowledged(out) if f in by_path]
            stored = stored_files(home)
            lost = [sop for sop in acked if sop not in stored
                    or hashlib.sha256(pydicom.dcmread(stored[sop]).PixelData).hexdigest() != expected[sop]]
            print(f"killed with {len(stored)} stored, {len(acked)} acknowledged; acknowledged but lost or "
                  f"damaged: {len(lost)}", file=sys.stderr)
            lst = Listener(home, "--no-worker", port=port).start()
            senders = _send(port, folders, work / "logs-2")
            failed = [code for p, _ in senders if (code := p.wait(timeout=7200)) != 0]
            seconds = time.monotonic() - started
            stored = stored_files(home)
            damaged = [sop for sop, sha in expected.items() if sop not in stored
                       or hashlib.sha256(pydicom.dcmread(stored[sop]).PixelData).hexdigest() != sha]
            files = list((home / "store" / "studies").glob("*/*/*.dcm"))
            status = medai_json(home, "pacs", "status")
            leftovers = list((home / "store" / ".incoming").iterdir())
        finally:
            for p, _ in senders:
                if p.poll() is None:
                    p.kill()
            if lst.alive():
                lst.terminate()
    duplicates = len(files) - len(set(p.stem for p in files)) + max(0, status["instances"] - len(expected))
    print(f"{args.senders} senders x {args.per_sender} instances, listener SIGKILLed at "
          f"{args.kill_at:.0%} and restarted: {seconds:.0f} s in all")
    print(f"lost (acknowledged before the kill, missing or damaged): {len(lost)}")
    print(f"missing or damaged after the retry: {len(damaged)} of {len(expected)}")
    print(f"duplicate outputs (files or database rows): {duplicates}; database instances: {status['instances']}; "
          f"failed stores: {status['failed_stores']}; temporary files left: {len(leftovers)}; "
          f"sender exit codes after the retry: {failed or 'all 0'}")
    return 0 if not lost and not damaged and not duplicates and not failed and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
