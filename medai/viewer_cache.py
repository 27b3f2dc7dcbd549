"""The viewport's series cache: a series' display NIfTI kept on disk, so opening it
again (in this session, another one, after a restart) shows the first image without
reading its DICOM files.

Why: reading and decoding a few hundred DICOM files is most of the wait between
"Open" and the first image (about 10 s for 179 small CT slices on a loaded 2-core
machine), while the gzipped display NIfTI of the same series reads in milliseconds.

What is written, and what is not:

* ``MEDAI_HOME/cache/viewer/<name>.nii.gz`` (the volume on :func:`medai.viewer.ras_grid`'s
  grid, geometry-only header) and ``<name>.json`` (what the page needs before the
  series is in memory: default window, window presets, unit, slice thickness, shape,
  and the NIfTI's SHA-256, checked on every read);
* ``<name>`` is the install's keyed pseudonym of the series' *content*: the SOP Instance
  UIDs with each file's size and modification time, so a file rewritten in place is a
  new entry, and a name can neither be reversed nor recomputed without the install's
  key. No UID, path, patient or study field is written.
* Files are mode 0600, written whole (temporary file, then rename), and the folder is
  bounded (:data:`MAX_ENTRIES`, :data:`MAX_BYTES`; least recently used go first).

Reading a cached series is access to patient data like reading its DICOM files: the
viewer page records *Instances Accessed* before it asks for an entry, and a prefetch
records its own *Instances Accessed* (action ``prefetch``) before it reads a file; if
the trail cannot be written, nothing is read (fail closed).

The prefetch: when the clinician selects a study, its first image series are read in
one background thread (:func:`prefetch`), into this cache and into memory, so that
"Open" finds them ready; :func:`display` hands the page a prefetched series (waiting
for one under way) instead of reading it a second time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medai.dicom.index import SeriesEntry
    from medai.viewer import DisplayVolume

#: Bump when what is written changes; older entries are then ignored and evicted.
FORMAT = 1
MAX_ENTRIES = 24
MAX_BYTES = 2 << 30
#: Image series of a selected study read ahead (in listing order), and display volumes
#: kept in memory by the prefetch (each is the size of its series, twice).
PREFETCH_SERIES = 2
KEEP_IN_MEMORY = 2


@dataclass(frozen=True)
class CachedSeries:
    """One cached series as the viewport needs it before the series is in memory."""

    volume_nifti: bytes  # gzipped NIfTI on the RAS grid (medai.viewer.nifti_gz)
    window: tuple[float, float]  # default (width, level)
    presets: tuple[Mapping[str, Any], ...]  # the number keys' windows (medai.imaging.preset_keys et al.)
    unit: str  # "HU" or "intensity"
    thickness_mm: float
    shape: tuple[int, int, int]  # display (z, y, x)
    previews: tuple[bytes, ...] = ()  # PNG of the middle axial, coronal, sagittal slices


def build(display: DisplayVolume) -> CachedSeries:
    """The cache entry of a display volume (medai.viewer does the imaging)."""
    from medai import viewer

    volume = display.volume
    window = viewer.default_window(volume)
    return CachedSeries(viewer.nifti_gz(viewer.ras_grid(display), window=window), (window.width, window.level),
                        tuple(viewer.viewport_presets(volume)), "HU" if volume.modality.upper() == "CT" else "intensity",
                        viewer.slice_thickness_mm(volume), display.shape, viewer.preview_pngs(display, window))


def content_key(instances: Iterable[tuple[str, str | os.PathLike[str]]]) -> str:
    """The pseudonymous name of a series' content: ``instances`` are (SOP Instance UID,
    file path) pairs; each file's size and modification time join its UID so that a
    file changed in place is not served from an old entry."""
    from medai.compliance import pseudonym

    parts = []
    for uid, path in instances:
        st = os.stat(path)
        parts.append(f"{uid}\0{st.st_size}\0{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()
    return pseudonym(f"viewer-cache:{FORMAT}:{digest}")


def _folder() -> Path:
    from medai import home

    return home.cache_dir("viewer")


def read(key: str) -> CachedSeries | None:
    """The cached series named ``key``, or None when absent, of another format, or
    damaged (a damaged entry is removed)."""
    folder = _folder()
    meta_path, data_path = folder / f"{key}.json", folder / f"{key}.nii.gz"
    try:
        meta = json.loads(meta_path.read_text())
        data = data_path.read_bytes()
    except (OSError, ValueError):
        return None
    try:
        if meta.get("format") != FORMAT:
            return None
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("checksum")
        entry = CachedSeries(data, (float(meta["window"][0]), float(meta["window"][1])),
                             tuple(dict(p) for p in meta["presets"]), str(meta["unit"]),
                             float(meta["thickness_mm"]), tuple(int(v) for v in meta["shape"]),  # type: ignore[arg-type]
                             tuple(base64.b64decode(p) for p in meta["previews"]))
    except (KeyError, TypeError, ValueError, IndexError):
        for path in (meta_path, data_path):
            path.unlink(missing_ok=True)
        return None
    os.utime(meta_path)  # recently used: evicted last
    return entry


def write(key: str, entry: CachedSeries) -> None:
    """Store ``entry`` as ``key`` (whole files only), then trim the folder to its bounds."""
    folder = _folder()
    meta = {"format": FORMAT, "sha256": hashlib.sha256(entry.volume_nifti).hexdigest(),
            "window": list(entry.window), "presets": [dict(p) for p in entry.presets], "unit": entry.unit,
            "thickness_mm": entry.thickness_mm, "shape": list(entry.shape),
            "previews": [base64.b64encode(p).decode() for p in entry.previews]}
    # the data first, the meta last: an entry is readable only when both are whole
    with _write_lock:
        _atomic(folder / f"{key}.nii.gz", entry.volume_nifti)
        _atomic(folder / f"{key}.json", json.dumps(meta).encode())
        trim()


def _atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_write_lock = threading.Lock()


def trim(max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> int:
    """Remove the least recently used entries beyond the bounds; returns how many."""
    folder = _folder()
    entries = []
    for meta in folder.glob("*.json"):
        data = meta.with_suffix("").with_suffix(".nii.gz")
        try:
            used = meta.stat().st_mtime
            size = meta.stat().st_size + (data.stat().st_size if data.exists() else 0)
        except OSError:
            continue
        entries.append((used, size, meta, data))
    entries.sort(key=lambda e: e[0], reverse=True)
    kept = removed = total = 0
    for _used, size, meta, data in entries:
        if kept < max_entries and total + size <= max_bytes:
            kept += 1
            total += size
            continue
        meta.unlink(missing_ok=True)
        data.unlink(missing_ok=True)
        removed += 1
    for orphan in folder.glob("*.nii.gz"):  # data whose meta never landed (a crash between the two)
        try:
            stale = orphan.stat().st_mtime < time.time() - 600
        except OSError:
            continue
        if stale and not orphan.with_suffix("").with_suffix(".json").exists():
            orphan.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------- series in memory, read ahead

# One daemon thread reads ahead, one series at a time (at most one core, and a server
# stopping with Ctrl-C does not wait for a read nobody will look at).
_queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
_worker: threading.Thread | None = None
_jobs_lock = threading.Lock()
_jobs: OrderedDict[tuple[str, tuple[str, ...]], Future[DisplayVolume]] = OrderedDict()


def _work() -> None:
    while True:
        job, fn = _queue.get()
        if not job.set_running_or_notify_cancel():
            continue
        try:
            job.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - kept in the future, raised where it is waited for
            job.set_exception(exc)


def _submit(fn: Callable[[], Any]) -> Future[Any]:
    global _worker
    if _worker is None or not _worker.is_alive():
        _worker = threading.Thread(target=_work, name="medai-viewer-prefetch", daemon=True)
        _worker.start()
    job: Future[Any] = Future()
    _queue.put((job, fn))
    return job


def series_key(series: SeriesEntry) -> str:
    """:func:`content_key` of an indexed series."""
    return content_key((i.sop_instance_uid, i.path) for i in series.instances)


def _read_display(series_uid: str, files: tuple[str, ...]) -> DisplayVolume:
    from medai import viewer
    from medai.dicom.volume import load_series

    return viewer.to_display(load_series([Path(f) for f in files], series_uid=series_uid))


def display(series_uid: str, files: tuple[str, ...]) -> DisplayVolume:
    """The series as a display volume: a prefetched one (waiting for a prefetch under
    way), else read here. A failed prefetch is read again here, so its error is raised
    in the caller's thread with the file's name."""
    with _jobs_lock:
        job = _jobs.get((series_uid, files))
        if job is not None and job.cancel():  # still queued behind another: read it here, now
            del _jobs[(series_uid, files)]
            job = None
    if job is not None:
        try:
            return job.result()
        except Exception:  # noqa: BLE001, S110 - read again below: the error surfaces where it is shown
            pass
    return _read_display(series_uid, files)


def entry(series: SeriesEntry, load: Callable[[], DisplayVolume] | None = None) -> CachedSeries:
    """The viewport's entry for ``series``: from the cache, else built and stored from
    ``load()`` (the caller's cached loader; default :func:`display`)."""
    key = series_key(series)
    found = read(key)
    if found is not None:
        return found
    shown = load() if load is not None else display(series.series_uid, tuple(str(f) for f in series.files))
    found = read(key)  # a prefetch may have stored it meanwhile
    if found is not None:
        return found
    made = build(shown)
    write(key, made)
    return made


class _Abandoned(Exception):
    """The install this read-ahead was asked for is no longer the current one."""


def _prefetch_one(study: Any, series: SeriesEntry, files: tuple[str, ...], home: Path) -> DisplayVolume:
    from medai import config, workstation

    if config.home() != home:  # MEDAI_HOME changed since (a test harness): its trail is not ours to write
        raise _Abandoned(str(home))
    workstation.audit("instances_accessed", study=study, series=series, detail={"action": "prefetch"})
    shown = _read_display(series.series_uid, files)
    key = series_key(series)
    if read(key) is None:
        write(key, build(shown))
    return shown


def prefetch(study: Any, series: Sequence[SeriesEntry]) -> list[Future[DisplayVolume]]:
    """Read the first :data:`PREFETCH_SERIES` image series of ``series`` ahead, one at a
    time in a background thread; reads still queued for another study are dropped."""
    from medai import config

    home = config.home()
    wanted = [s for s in series if s.is_image][:PREFETCH_SERIES]
    keys = {(s.series_uid, tuple(str(f) for f in s.files)) for s in wanted}
    out = []
    with _jobs_lock:
        for key, job in list(_jobs.items()):
            if key not in keys and job.cancel():
                del _jobs[key]
        for s in wanted:
            key = (s.series_uid, tuple(str(f) for f in s.files))
            job = _jobs.get(key)
            if job is None or job.cancelled() or (job.done() and job.exception() is not None):
                job = _submit(functools.partial(_prefetch_one, study, s, key[1], home))
                _jobs[key] = job
            _jobs.move_to_end(key)
            out.append(job)
        done = [k for k, j in _jobs.items() if j.done()]
        for key in done[:max(0, len(done) - KEEP_IN_MEMORY)]:
            del _jobs[key]
    return out


__all__ = [
    "FORMAT",
    "KEEP_IN_MEMORY",
    "MAX_BYTES",
    "MAX_ENTRIES",
    "PREFETCH_SERIES",
    "CachedSeries",
    "build",
    "content_key",
    "display",
    "entry",
    "prefetch",
    "read",
    "series_key",
    "trim",
    "write",
]
