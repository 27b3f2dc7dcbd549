"""medai.quick_exit.leave: a one-shot process ends without the interpreter's teardown, but
with everything the teardown would have delivered (real child processes)."""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import atexit, logging, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from medai.quick_exit import leave

logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(lambda: print("atexit ran", flush=False))
worker = threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=False)))
worker.start()
pool = ThreadPoolExecutor(max_workers=2)  # never shut down: its idle workers wait on their queue
pool.submit(time.sleep, 0.1)
logging.getLogger("t").info("logged before leaving")
sys.stdout.write("x" * 200_000)  # more than a pipe holds: buffered, must still arrive
leave(3)
"""


def test_leave_delivers_output_threads_atexit_and_the_exit_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "child.log"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    out = proc.stdout
    assert out.startswith("x" * 200_000) and out[200_000] != "x"
    assert out.index("thread done") < out.index("atexit ran")  # threads are waited for first, as at exit
    assert "logged before leaving" in log.read_text()


def test_medai_console_entry_exits_with_mains_code() -> None:
    ok = subprocess.run([sys.executable, "-m", "medai", "--version"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("medai ")
    bad = subprocess.run([sys.executable, "-m", "medai", "no-such-command"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "No such command" in bad.stderr
