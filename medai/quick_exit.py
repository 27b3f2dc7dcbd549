"""Ending a one-shot process (``medai ...``, a PACS run job) without the interpreter's teardown.

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
import os
import sys
import threading
from typing import NoReturn


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


__all__ = ["leave"]
