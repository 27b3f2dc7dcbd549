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


def test_cycle_collection_is_paused_inside_a_run_and_restored_after() -> None:
    """No cyclic-GC pass inside the block (a cycle made there survives it), the collector's
    state is restored after it, an error included, and left off where it was off."""
    import gc
    import weakref

    from medai.quick_exit import cycle_collection_paused

    class Node:
        pass

    assert gc.isenabled()
    with cycle_collection_paused():
        assert not gc.isenabled()
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        alive = weakref.ref(a)
        del a, b
        for _ in range(100_000):  # far past the thresholds that would start a pass
            [[]]
        assert alive() is not None
    assert gc.isenabled()
    gc.collect()
    assert alive() is None
    try:
        with cycle_collection_paused():
            raise ValueError("run failed")
    except ValueError:
        pass
    assert gc.isenabled()
    gc.disable()
    try:
        with cycle_collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_process_that_ends_with_leave_keeps_the_collector_off_after_the_run() -> None:
    """Console entry points (ends_with_leave): no deferred full pass between the run and the
    exit; a command running several blocks collects between them itself."""
    child = r"""
import gc, sys
from medai.quick_exit import cycle_collection_paused, ends_with_leave, leave
ends_with_leave()
with cycle_collection_paused():
    junk = [[] for _ in range(1000)]
sys.stdout.write(f"enabled={gc.isenabled()}\n")
leave(0)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "enabled=False"
