"""DICOM in and out: header index, volumes, study store, outputs (SEG/SR), de-identification.

Importing this package imports pydicom without the HTTP client and the progress bar that
pydicom's test-file downloader (``pydicom.data.download``) imports when they are installed:
``requests`` and ``tqdm`` cost a ``medai run`` 15 MB resident and about 0.04 s, for a
downloader medai never calls (the downloader itself falls back to ``urllib``, and the
egress guard refuses any destination that was not configured). A library that imports
them later (the UI's streamlit) gets them as usual: they are refused only while pydicom
is first imported, and only in a process that has one thread then (a command-line run):
``sys.modules`` is shared, and another thread's ``import requests`` in that window would
fail, so a server process imports pydicom as it comes.
"""

from __future__ import annotations

import sys
import threading


def _import_pydicom_without_downloader_extras() -> None:
    if "pydicom" in sys.modules or threading.active_count() > 1:
        return
    refused = [name for name in ("requests", "tqdm") if name not in sys.modules]
    for name in refused:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises ImportError
    try:
        import pydicom  # noqa: F401
    finally:
        for name in refused:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


_import_pydicom_without_downloader_extras()
