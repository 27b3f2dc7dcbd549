"""The local study store: received DICOM instances as Part 10 files under
``MEDAI_HOME/store``.

Each folder and file is named by the keyed pseudonym of a UID (16 hex digits of
an HMAC under the install's pseudonym key), never by the UID itself: DICOM's
de-identification profile treats UIDs as identifying (they embed dates and
link a study across systems), and a file name ends up in backups, `ls` output
and bug reports. A UID is validated (digits and dots) before it is hashed, so
a hostile value is refused rather than stored. The UIDs themselves are read
back from each file's header when they are needed (reconciliation). Every
file is written atomically (temporary file, fsync, rename, directory fsync): a
file that exists under its final name is complete, even after SIGKILL or power
loss, which is what lets the C-STORE SCP answer "success" only once the
instance is safe. Disk encryption is the operating system's job.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medai import config
from medai.compliance import is_pseudonym, pseudonym
from medai.dicom.safety import check_uid
from medai.durable import fsync_dir
from medai.errors import DicomInputError, UnsafeInputError

log = logging.getLogger("medai.pacs")

#: errno values that mean "this machine is out of room", answered with 0xA700.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a UID string fit to be a path component, or raise
    :class:`UnsafeInputError` (the rule is :func:`medai.dicom.safety.check_uid`;
    the message here never repeats the attacker-controlled value)."""
    try:
        return check_uid(value, None, what)
    except DicomInputError:
        raise UnsafeInputError(None, f"{what} is missing or not a valid DICOM UID") from None


class DirSync:
    """Directory fsyncs shared between threads (group commit).

    One fsync of a directory makes durable every entry change made in it
    before that fsync *started*. Concurrent associations renaming files into
    the same series directory therefore need not each pay for their own: a
    caller whose rename precedes an fsync already under way waits for the next
    one (started once the current one ends, covering everything renamed so
    far) or returns as soon as one that began after its rename has finished.
    A lone caller pays exactly one fsync, as before."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: per directory: [tickets issued, highest ticket made durable, sync running]
        self._state: dict[Path, list[Any]] = {}

    def after_change(self, directory: Path) -> None:
        """Return once a change already made in ``directory`` is durable."""
        with self._cond:
            state = self._state.setdefault(directory, [0, 0, False])
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    self._cond.wait()
                    continue
                state[2] = True
                target = state[0]
                self._cond.release()
                try:
                    fsync_dir(directory)
                except BaseException:
                    self._cond.acquire()
                    state[2] = False
                    self._cond.notify_all()
                    raise
                self._cond.acquire()
                state[1], state[2] = target, False
                self._cond.notify_all()
            if state[0] == state[1] and not state[2]:
                self._state.pop(directory, None)  # nothing pending: keep the map small


def write_atomic(path: Path, data: bytes, *, tmp_dir: Path | None = None, dir_sync: DirSync | None = None) -> None:
    """Write ``data`` to ``path`` so the final name only ever holds complete
    content: temporary file in ``tmp_dir`` (same filesystem), fsync, rename,
    fsync of the directory (shared with concurrent writers through
    ``dir_sync``)."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{secrets.token_hex(8)}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if dir_sync is not None:
        dir_sync.after_change(path.parent)
    else:
        fsync_dir(path.parent)


@dataclass(frozen=True)
class StoredInstance:
    """Where one received instance landed, and whether it was new."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int
    sha256: str
    #: "new", "duplicate" (identical bytes already stored) or "replaced".
    outcome: str


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in bounded pieces (instances can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_WRITE_BUFFER * 4):
            digest.update(piece)
    return digest.hexdigest()


#: Bytes gathered before a write system call: most instances take one write.
_WRITE_BUFFER = 256 * 1024
#: Bytes of each incoming file kept in memory (where the header fields are read from).
HEAD_BYTES = 64 * 1024


class IncomingFile:
    """One instance being received, written to a temporary file in the store
    as it arrives; its memory is a write buffer and the file's first
    :data:`HEAD_BYTES`, whatever the instance size.

    :meth:`commit` makes it durable under its final name (fsync, rename,
    directory fsync: the guarantees of :func:`write_atomic`); :meth:`discard`
    removes it, and is harmless after a commit."""

    def __init__(self, store: "StudyStore", prefix: bytes = b"") -> None:
        self._store = store
        self.tmp = store.tmp_dir / f".{secrets.token_hex(8)}.part"
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._done = False
        self.size = 0
        self.head = bytearray()
        if prefix:
            self.write(prefix)

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
        if len(self._buffer) + len(data) <= _WRITE_BUFFER:
            self._buffer += data
            return
        self.flush()
        if len(data) >= _WRITE_BUFFER:
            self._write_all(data)
        else:
            self._buffer += data

    def _write_all(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def flush(self) -> None:
        """Write what is buffered (the file is then complete so far, not yet durable)."""
        if self._buffer:
            self._write_all(self._buffer)
            self._buffer.clear()

    def commit(self, study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
        """Keep the instance under its final name (validated UIDs only)."""
        if self._done:
            raise RuntimeError("incoming instance already committed or discarded")
        self.flush()
        digest = self._hash.hexdigest()
        stored = self._store._commit(self.tmp, self._fd, self.size, digest, study_uid, series_uid, sop_uid)
        if stored is None:
            self.discard()
            return StoredInstance(self._store.path_for(study_uid, series_uid, sop_uid), study_uid, series_uid,
                                  sop_uid, self.size, digest, "duplicate")
        self._done = True
        os.close(self._fd)
        return stored

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        os.close(self._fd)
        self.tmp.unlink(missing_ok=True)


class StudyStore:
    """Part 10 files laid out as ``studies/<study>/<series>/<sop>.dcm``, each
    name the keyed pseudonym of that UID (:meth:`name_for`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.home() / "store"
        self.studies_dir = self.root / "studies"
        self.tmp_dir = self.root / ".incoming"
        self._dir_sync = DirSync()
        for folder in (self.root, self.studies_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._rename_clear_layout()

    @staticmethod
    def name_for(uid: str, what: str = "UID") -> str:
        """The file-system name of a validated UID: its keyed pseudonym."""
        return pseudonym(validate_uid(uid, what))

    def _rename_clear_layout(self) -> None:
        """Move instances an older version stored under clear UIDs
        (``studies/<Study UID>/<Series UID>/<SOP UID>.dcm``) to their
        pseudonymous names. Each file is one atomic rename, so a crash midway
        leaves every instance under one name or the other, and the next start
        finishes the move."""
        moved = False
        for study in list(self.studies_dir.iterdir()):
            if not study.is_dir() or is_pseudonym(study.name):
                continue
            moved = True
            for series in list(study.iterdir()):
                if not series.is_dir():
                    continue
                for f in list(series.iterdir()):
                    if f.suffix != ".dcm" or f.name.startswith("."):
                        continue
                    try:
                        target = self.path_for(study.name, series.name, f.stem)
                    except UnsafeInputError:
                        log.warning("stored file with an unexpected name left in place")
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.replace(f, target)
                    fsync_dir(target.parent)
                fsync_dir(series)
                _remove_if_empty(series)
            _remove_if_empty(study)
        if moved:
            fsync_dir(self.studies_dir)

    def clean_partial(self) -> int:
        """Remove temporary files left by a killed process (never complete
        instances: those were renamed into place)."""
        removed = 0
        for entry in self.tmp_dir.glob(".*.part"):
            entry.unlink(missing_ok=True)
            removed += 1
        for entry in self.studies_dir.glob("*/*/.*.part"):
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def study_dir(self, study_uid: str) -> Path:
        return self.studies_dir / self.name_for(study_uid, "Study Instance UID")

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.study_dir(study_uid) / self.name_for(series_uid, "Series Instance UID")

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(study_uid, series_uid) / f"{self.name_for(sop_uid, 'SOP Instance UID')}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def put(self, data: bytes, study_uid: str, series_uid: str, sop_uid: str) -> StoredInstance:
        """Store one encoded Part 10 instance held in memory (see :meth:`incoming`)."""
        incoming = self.incoming()
        try:
            incoming.write(data)
            return incoming.commit(study_uid, series_uid, sop_uid)
        finally:
            incoming.discard()

    def incoming(self, prefix: bytes = b"") -> "IncomingFile":
        """A new instance written as it arrives (after ``prefix``), kept by
        :meth:`IncomingFile.commit`; idempotent for identical bytes.

        A different instance arriving under a SOP Instance UID already stored
        replaces it atomically (a modality re-sending a corrected image)."""
        return IncomingFile(self, prefix)

    def _commit(self, tmp: Path, fd: int, size: int, digest: str, study_uid: str, series_uid: str,
                sop_uid: str) -> StoredInstance | None:
        """Make ``tmp`` the instance's file (None: identical bytes already stored, ``tmp`` untouched)."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        outcome = "new"
        try:
            if path.stat().st_size == size:
                if file_sha256(path) == digest:
                    return None
            outcome = "replaced"
        except FileNotFoundError:
            pass
        os.fsync(fd)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fsync_dir(path.parent.parent)
            fsync_dir(path.parent.parent.parent)
        os.replace(tmp, path)
        self._dir_sync.after_change(path.parent)
        return StoredInstance(path, study_uid, series_uid, sop_uid, size, digest, outcome)

    def iter_study_files(self, study_uid: str) -> Iterator[Path]:
        folder = self.study_dir(study_uid)
        if folder.is_dir():
            yield from sorted(folder.glob("*/*.dcm"))

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance's file (named by pseudonyms: the UIDs are in its header)."""
        for study in sorted(self.studies_dir.iterdir()):
            if not study.is_dir():
                continue
            for series in sorted(study.iterdir()):
                if not series.is_dir():
                    continue
                for f in series.iterdir():
                    if f.suffix == ".dcm" and not f.name.startswith("."):
                        yield f


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
