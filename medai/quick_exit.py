"""One-shot processes (``medai run``, a PACS run job): no cyclic-GC passes inside a run, and an
end without the interpreter's teardown.

:func:`cycle_collection_paused` holds Python's cyclic garbage collector off for the span of one
run. A run allocates hundreds of thousands of long-lived container objects (the series' pydicom
headers, highdicom's 22 MB standard table, the SEG's per-frame items), and each time those grow
by a quarter the collector walks all of them again: on the demo brain extraction, four to five
full passes of 0.02-0.13 s that found nothing, 0.35-0.48 s in all. Memory freed by reference
counting (nearly all of it) is freed as before; what only the cycle collector would free waits
until the run is over, and the peak resident memory of the run was unchanged (measured).
Used around each run of a one-shot command, not in servers, whose threads share the switch.

After a ``medai run`` has written everything, finalising ~1000 modules and the native
libraries' global state (ITK's thread pool, onnxruntime, OpenVINO) took 0.9-1.9 s more on a
2-core machine: time the user (or the PACS queue) waits for nothing. :func:`leave` does what
the interpreter would do at exit that matters, in its order: threading's exit hooks (which stop
concurrent.futures' worker threads) and the wait for every non-daemon thread, then the
``atexit`` handlers (logging's flush, multiprocessing's pool shutdown), then the standard
streams' buffers; and ends the process with ``os._exit``. Only for ``__main__`` entry points:
tests call the functions below them in-process.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from typing import Iterator, NoReturn


#: Set by :func:`ends_with_leave`: this process ends through :func:`leave` (a console entry point).
_ends_with_leave = False


def ends_with_leave() -> None:
    """Say that this process ends through :func:`leave` (the one-shot entry points do, first)."""
    global _ends_with_leave
    _ends_with_leave = True


@contextlib.contextmanager
def cycle_collection_paused() -> Iterator[None]:
    """The cyclic garbage collector off inside the block, back as it was after it; except in a
    process that ends through :func:`leave`, where it stays off: switched back on, the first
    allocations after the block start the full pass the block put off (0.09 s after a brain
    extraction), for a process about to end. A caller that runs several blocks in such a process
    collects between them (``gc.collect()``), so memory stays bounded by one run's cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled and not _ends_with_leave:
            gc.enable()


def leave(code: int) -> NoReturn:
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to deliver
                pass
        os._exit(code)


__all__ = ["cycle_collection_paused", "ends_with_leave", "leave"]
