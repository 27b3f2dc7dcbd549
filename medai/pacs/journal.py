"""The ingest journal: how a received instance is durable before it is answered.

Answering a C-STORE with Success promises the sender it may forget the
instance. The direct way to keep that promise -- write the file, fsync it,
rename it, fsync its directory -- costs two filesystem journal commits per
instance, paid serially by a sender that waits for each answer, and was the
largest remaining cost of ``medai pacs listen`` after its network layer. This
journal keeps the promise with one ``fdatasync`` of blocks that already exist:

1. The received instance is appended to a preallocated, zero-filled segment
   file (``store/journal/NNNNNNNN.wal``) and ``fdatasync``ed. Overwriting
   allocated blocks changes no metadata, so the sync is a data flush, and
   concurrent associations share it (group commit).
2. The file is then written into the store under its final name the usual way
   (temporary file, rename) but without syncs, and registered in the queue
   database. Readers on this machine see a complete file at once.
3. A background syncer makes the store durable in bulk (``syncfs`` of the
   store's filesystem, or ``os.sync``) and only then moves the durable
   checkpoint past those records, so their journal space can be reused.

After a crash or power cut, :meth:`IngestJournal.open` replays every valid
record after the checkpoint into the store with the fully synced write, before
anything reads the store: a file whose write was lost or torn is rewritten
from its journal copy. A record is valid when its header checksum, sequence
number (one more than the previous record's) and payload SHA-256 all match, so
a torn append -- never acknowledged -- ends the replay, and stale records of a
reused segment can never be mistaken for new ones.

One process owns a journal at a time (an exclusive ``flock`` on its
directory): the listener, or a ``medai pacs worker`` that starts while no
listener runs and replays what a dead listener left.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

log = logging.getLogger("medai.pacs")

MAGIC = b"MJ01"
#: magic, meta length, data length, sequence, SHA-256 of the data, CRC-32 of the
#: fields before it and of the meta (JSON) that follows the header
_HEADER = struct.Struct("<4sIQQ32sI")
SEGMENT_BYTES = 16 * 1024 * 1024
#: How long the syncer lets written files wait for their bulk sync (seconds).
SYNC_INTERVAL = 0.5
_ZEROS = bytes(1024 * 1024)
#: Longest a flush waits for appenders already under way to join it (seconds).
BATCH_WAIT = 0.001


class JournalBusy(Exception):
    """Another live process owns this journal."""


@dataclass(frozen=True)
class JournalRecord:
    """One received instance as journaled: where it goes, and its Part 10 bytes."""

    sequence: int
    meta: dict[str, str]
    data: bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush every dirty file and directory entry of ``path``'s filesystem to
    stable storage (Linux ``syncfs``; elsewhere ``os.sync``)."""
    fn = getattr(_libc(), "syncfs", None) if _libc() is not None else None
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if fn(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


_LIBC: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _header(sequence: int, meta_raw: bytes, data_length: int, digest: bytes) -> bytes:
    fields = struct.pack("<4sIQQ32s", MAGIC, len(meta_raw), data_length, sequence, digest)
    return fields + struct.pack("<I", zlib.crc32(meta_raw, zlib.crc32(fields)))


class IngestJournal:
    """Segments under ``directory``; see the module docstring."""

    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES,
                 sync_interval: float = SYNC_INTERVAL) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self._lock = threading.Lock()          # append order, segment roll, bookkeeping
        self._cond = threading.Condition(self._lock)  # group commit of fdatasync
        self._lock_fd: int | None = None
        self._fd = -1
        self._segment = 0
        self._offset = 0
        self._next_sequence = 1
        self._written = 0                      # highest sequence written to a segment
        self._durable = 0                      # highest sequence known flushed
        self._covering = 0                     # highest sequence a flush under way will cover
        self._flushes = 0                      # flushes under way
        self._arriving = 0                     # announced appenders yet to write
        self._error: OSError | None = None
        #: sequence -> (segment, end offset) of records not yet behind the checkpoint
        self._ends: dict[int, tuple[int, int]] = {}
        self._pending: set[int] = set()        # appended, file not yet in the store
        self._checkpoint = (0, 0, 1)           # (segment, offset, next sequence)
        #: zero-filled or fully checkpointed segment files, ready to become the next segment
        self._spares: list[Path] = []
        self._retired: list[tuple[int, int]] = []  # (segment, fd) rolled away from
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._sync_root: Path | None = None

    # -- opening and recovery ----------------------------------------------------------------
    def open(self, replay: Callable[[JournalRecord], None], *, sync_root: Path) -> int:
        """Own the journal, replay what the checkpoint has not covered (through
        ``replay``, which must store durably), then start the syncer.
        Returns the number of records replayed. Raises :class:`JournalBusy`
        when another live process owns it."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JournalBusy(f"{self.directory}: owned by another process") from None
            raise
        self._lock_fd = fd
        try:
            replayed = self._recover(replay, sync_root)
        except BaseException:
            os.close(fd)
            self._lock_fd = None
            raise
        self._syncer = threading.Thread(target=self._sync_loop, name="medai-journal-sync", daemon=True)
        self._syncer.start()
        return replayed

    def _recover(self, replay: Callable[[JournalRecord], None], sync_root: Path) -> int:
        self._sync_root = sync_root
        segment, offset, sequence = self._read_checkpoint()
        replayed = 0
        for record, (seg, end) in self._scan(segment, offset, sequence):
            replay(record)
            replayed += 1
            segment, offset, sequence = seg, end, record.sequence + 1
        if replayed:
            sync_filesystem(sync_root)
            log.info("replayed %d journaled instances into the store", replayed)
        self._write_checkpoint(segment, offset, sequence)
        self._checkpoint = (segment, offset, sequence)
        self._next_sequence = sequence
        self._written = self._durable = self._covering = sequence - 1
        self._segment, self._offset = segment, offset
        existing = self._segments()
        if segment not in existing:
            self._create_segment(self._path(segment))
        self._spares = [self._path(n) for n in existing if n != segment]
        self._spares += sorted(self.directory.glob("spare-*.wal"))
        for leftover in self.directory.glob(".*.new"):
            leftover.unlink()
        self._keep_a_spare()  # the first roll renames instead of zero-filling in an appender's way
        self._fd = os.open(self._path(segment), os.O_RDWR)
        return replayed

    def close(self) -> None:
        """Sync the store, move the checkpoint to the end, release the journal."""
        if self._lock_fd is None:
            return
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(60)
        try:
            self._sync_once()
        except OSError as exc:
            log.error("journal: final sync failed, records stay for replay: %s", exc.strerror)
        for _seg, fd in self._retired:
            os.close(fd)
        self._retired.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        os.close(self._lock_fd)
        self._lock_fd = None

    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:08d}.wal"

    def _segments(self) -> list[int]:
        out = []
        for p in self.directory.glob("*.wal"):
            if p.stem.isdigit():
                out.append(int(p.stem))
        return sorted(out)

    def _create_segment(self, path: Path) -> None:
        """A zero-filled, fsynced segment: later appends overwrite allocated blocks."""
        tmp = path.with_name(f".{path.name}.new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            remaining = self.segment_bytes
            while remaining:
                remaining -= os.write(fd, _ZEROS[:min(remaining, len(_ZEROS))])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    def _read_checkpoint(self) -> tuple[int, int, int]:
        path = self.directory / "checkpoint.json"
        try:
            state = json.loads(path.read_text())
            return int(state["segment"]), int(state["offset"]), int(state["sequence"])
        except FileNotFoundError:
            return 0, 0, 1
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically, so this is damage from outside: refuse rather than guess.
            raise OSError(errno.EIO, f"journal checkpoint unreadable ({type(exc).__name__})", str(path)) from None

    def _write_checkpoint(self, segment: int, offset: int, sequence: int) -> None:
        path = self.directory / "checkpoint.json"
        tmp = self.directory / ".checkpoint.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"segment": segment, "offset": offset, "sequence": sequence}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(self.directory)

    def _scan(self, segment: int, offset: int, sequence: int) -> Iterator[tuple[JournalRecord, tuple[int, int]]]:
        """Valid records from the checkpoint on, with where each ends."""
        existing = set(self._segments())
        while segment in existing:
            with open(self._path(segment), "rb") as f:
                while (found := _read_record(f, offset, sequence)) is not None:
                    record, offset = found
                    yield record, (segment, offset)
                    sequence += 1
            # This segment ends here; the next record, if any, starts the next segment.
            segment, offset = segment + 1, 0
            if segment not in existing:
                return
            with open(self._path(segment), "rb") as f:
                if _read_record(f, 0, sequence) is None:
                    return

    # -- appending -----------------------------------------------------------------------------
    def fits(self, data: bytes) -> bool:
        """Whether an instance this large goes through the journal (else: the direct durable write)."""
        return _HEADER.size + 4096 + len(data) <= self.segment_bytes

    def announce(self) -> None:
        """An appender is on its way (a dataset received, its record not yet
        written): a flush about to start waits a moment for it to join. Each
        call is matched by one :meth:`write` or :meth:`withdraw`."""
        with self._lock:
            self._arriving += 1

    def withdraw(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def write(self, meta: dict[str, str], data: bytes, digest: bytes, *, announced: bool = False) -> int:
        """Append one instance (``digest``: SHA-256 of ``data``), not yet
        flushed; returns its sequence number. Call :meth:`wait` before
        acknowledging it and :meth:`done` once the store holds its file (or
        gave up on it). ``announced``: :meth:`announce` was called for it."""
        meta_raw = json.dumps(meta, separators=(",", ":")).encode()
        total = _HEADER.size + len(meta_raw) + len(data)
        with self._cond:
            if announced:
                self._arriving -= 1
                self._cond.notify_all()
            if self._error is not None or self._fd < 0:
                raise OSError(errno.EIO, f"ingest journal unusable: {self._error or 'not open'}")
            if self._offset + total > self.segment_bytes:
                self._roll()
            sequence = self._next_sequence
            written = os.pwritev(self._fd, [_header(sequence, meta_raw, len(data), digest), meta_raw, data],
                                 self._offset)
            if written != total:
                raise OSError(errno.EIO, "short write to the ingest journal")
            self._next_sequence += 1
            self._offset += total
            self._written = sequence
            self._ends[sequence] = (self._segment, self._offset)
            self._pending.add(sequence)
        return sequence

    def wait(self, sequence: int) -> None:
        """Return once record ``sequence`` is on stable storage. A flush already
        under way that began after the record was written covers it; otherwise
        this call flushes, covering every record written so far (group commit:
        concurrent appenders share flushes, and none waits for a flush that
        cannot cover it; a lone appender pays one flush, no thread hand-off)."""
        batched = False
        with self._cond:
            while self._durable < sequence:
                if self._error is not None:
                    raise OSError(errno.EIO, f"ingest journal flush failed: {self._error}")
                if self._covering >= sequence:
                    self._cond.wait()
                    continue
                if self._arriving > 0 and not batched:
                    # Other associations have a dataset in hand: let them write first so
                    # that one flush covers them too (what ext4's journal does for fsync).
                    batched = True
                    self._cond.wait_for(lambda: self._arriving <= 0, BATCH_WAIT)
                    continue
                fd, target = self._fd, self._written
                self._covering = max(self._covering, target)
                self._flushes += 1
                self._cond.release()
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    # After a failed flush the kernel may have dropped the data: nothing
                    # more is acknowledged from this journal (the listener answers 0xA700).
                    log.error("ingest journal flush failed: %s", exc.strerror or exc)
                    self._error = exc
                    raise
                finally:
                    self._cond.acquire()
                    self._flushes -= 1
                    self._cond.notify_all()
                self._durable = max(self._durable, target)

    def done(self, sequence: int) -> None:
        """The store holds (or will never hold) this record's file."""
        with self._lock:
            self._pending.discard(sequence)

    def _roll(self) -> None:
        """Continue in the next segment (under the lock). The old one is
        flushed first, so everything written so far is durable."""
        os.fdatasync(self._fd)
        self._durable = max(self._durable, self._written)
        self._cond.notify_all()
        # Not closed yet: an appender may be flushing it outside the lock.
        self._retired.append((self._segment, self._fd))
        nxt = self._segment + 1
        if self._path(nxt) in self._spares:
            self._spares.remove(self._path(nxt))
        elif self._spares:
            os.replace(self._spares.pop(0), self._path(nxt))
            _fsync_dir(self.directory)
        else:
            self._create_segment(self._path(nxt))
        self._segment, self._offset = nxt, 0
        self._fd = os.open(self._path(nxt), os.O_RDWR)

    # -- bulk sync of the store and the checkpoint ---------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self._sync_once()
                self._keep_a_spare()
            except OSError as exc:
                # Records stay behind the old checkpoint and are replayed at the next start.
                log.error("journal: store sync failed: %s", exc.strerror or exc)

    def _keep_a_spare(self) -> None:
        """Zero-fill the next segment ahead of time, so that a roll only renames."""
        with self._lock:
            if self._spares:
                return
        path = self.directory / f"spare-{os.urandom(6).hex()}.wal"
        self._create_segment(path)
        with self._lock:
            self._spares.append(path)

    def _sync_once(self) -> None:
        """Make the store durable, then move the checkpoint past every record
        whose file was in the store before the sync began."""
        with self._lock:
            oldest_pending = min(self._pending) if self._pending else None
            covered = [s for s in self._ends if oldest_pending is None or s < oldest_pending]
            if not covered:
                return
            last = max(covered)
        assert self._sync_root is not None
        sync_filesystem(self._sync_root)
        with self._lock:
            segment, offset = self._ends[last]
        self._write_checkpoint(segment, offset, last + 1)
        with self._lock:
            self._checkpoint = (segment, offset, last + 1)
            for s in covered:
                del self._ends[s]
            if not self._flushes:  # no appender is flushing a retired descriptor
                for seg, fd in [r for r in self._retired if r[0] < segment]:
                    os.close(fd)
                    self._retired.remove((seg, fd))
                    self._spares.append(self._path(seg))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"unsynced": len(self._ends), "segments": len(self._spares) + 1 + len(self._retired),
                    "checkpoint_sequence": self._checkpoint[2]}


def _read_record(f: BinaryIO, offset: int, sequence: int) -> tuple[JournalRecord, int] | None:
    """The record at ``offset`` when it is valid and numbered ``sequence``, with its end."""
    f.seek(offset)
    header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        return None
    magic, meta_length, data_length, seq, digest, crc = _HEADER.unpack(header)
    if magic != MAGIC or seq != sequence or meta_length > 1 << 16:
        return None
    meta_raw = f.read(meta_length)
    if len(meta_raw) != meta_length or zlib.crc32(meta_raw, zlib.crc32(header[:-4])) != crc:
        return None
    data = f.read(data_length)
    if len(data) != data_length or hashlib.sha256(data).digest() != digest:
        return None
    return JournalRecord(seq, json.loads(meta_raw), data), offset + _HEADER.size + meta_length + data_length
