"""The audit trail on disk: ``MEDAI_HOME/audit/trail.jsonl`` and its checkpoints.

Several processes write at once (UI, PACS listener, triage workers). Each append
opens the file with ``O_APPEND``, takes an exclusive ``flock``, reads the current
head (last seq and hash), writes its sealed lines with one ``write``, ``fsync``s and
unlocks, so records never interleave and the chain stays linear. Any failure is an
``AuditWriteError`` and a partly written tail is cut back, so the caller can fail
closed and the file stays valid.

Checkpoints (``audit/checkpoints.jsonl``) are signed ``(count, head)`` statements,
written every ``CHECKPOINT_EVERY`` records, at application stop and on demand. The
newest one is also copied to ``MEDAI_HOME/audit-anchor.json``, outside the audit
directory; ``medai audit checkpoint --export FILE`` writes one anywhere you like.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from medai import home
from medai.compliance import chain, keys
from medai.errors import AuditWriteError

TRAIL = "trail.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
#: A signed checkpoint is written at least every this many records...
CHECKPOINT_EVERY = 1000
#: ...and with the first record written after the newest checkpoint got this old (seconds),
#: so a long-running server's trail is never long without one.
CHECKPOINT_AGE = 600.0

TornHandler = Callable[[int, str], Mapping[str, Any]]


def audit_dir() -> Path:
    return keys.medai_home() / home.AUDIT


def trail_path() -> Path:
    return audit_dir() / TRAIL


def checkpoints_path() -> Path:
    return audit_dir() / CHECKPOINTS


def anchor_path() -> Path:
    return keys.medai_home() / home.AUDIT_ANCHOR


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class _HeadCache:
    """Head of the trail as this process last left it, valid while the file is unchanged."""

    ident: tuple[int, int, int] = (-1, -1, -1)  # dev, inode, size
    count: int = 0
    head: str = chain.GENESIS
    cp_ident: tuple[int, int, int] = (-1, -1, -1)
    cp_count: int = 0
    cp_time: float = 0.0  # POSIX time of the newest checkpoint


_cache = _HeadCache()


def _fail(path: Path, action: str, exc: OSError) -> AuditWriteError:
    reason = exc.strerror or str(exc)
    return AuditWriteError(f"{path}: cannot {action} the audit trail ({reason}); "
                           "the operation was not performed")


def _last_line(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line ending at ``size`` and the offset where it starts."""
    end = size
    chunk = 8192
    while True:
        start = max(0, end - chunk)
        data = os.pread(fd, size - start, start)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or start == 0:
            begin = start + cut + 1
            return data[cut + 1:], begin
        chunk *= 4


def _open_locked(path: Path, flags: int, lock: int) -> int:
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, lock)
    except OSError:
        os.close(fd)
        raise
    return fd


def _head(fd: int, on_torn: TornHandler | None) -> tuple[int, str, int, list[bytes]]:
    """(count, head hash, size, repair lines) of the locked trail. A torn last line
    (a crash mid-write) is cut off; ``on_torn`` supplies a record describing it."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino, st.st_size)
    if ident == _cache.ident:
        return _cache.count, _cache.head, st.st_size, []
    size = st.st_size
    if size == 0:
        return 0, chain.GENESIS, 0, []
    tail, begin = _last_line(fd, size)
    repair: list[Mapping[str, Any]] = []
    if not tail.endswith(b"\n"):
        torn = tail
        os.ftruncate(fd, begin)
        size = begin
        if on_torn is not None:
            repair.append(on_torn(len(torn), hashlib.sha256(torn).hexdigest()))
        if size == 0:
            count, head = 0, chain.GENESIS
        else:
            tail, _ = _last_line(fd, size)
            entry = chain.open_line(tail, -1)
            count, head = entry.seq + 1, entry.hash
    else:
        entry = chain.open_line(tail, -1)
        count, head = entry.seq + 1, entry.hash
    lines = []
    for body in repair:
        line, head = chain.seal(body, seq=count, prev=head)
        count += 1
        lines.append(line)
    return count, head, size, lines


def _open_trail() -> tuple[Path, int]:
    """The trail file, created if missing, opened for append under an exclusive lock
    (writers in other processes wait). Raises AuditWriteError when it cannot be opened."""
    directory = audit_dir()
    path = directory / TRAIL
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path, _open_locked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, fcntl.LOCK_EX)
    except OSError as exc:
        raise _fail(path, "open", exc) from exc


def append(bodies: Sequence[Mapping[str, Any]], *, on_torn: TornHandler | None = None,
           checkpoint: bool = False) -> list[str]:
    """Seal and durably append ``bodies`` in order; return their hashes.

    Raises AuditWriteError (and leaves the file as it was) when anything fails."""
    keys.ensure()  # first record: create the install keys; later: a missing key fails closed
    path, fd = _open_trail()
    try:
        try:
            count, head, size, lines = _head(fd, on_torn)
        except chain.ChainError as exc:
            raise AuditWriteError(f"{path}: last record is damaged ({exc.reason}); run "
                                  "'medai audit verify' — nothing was written") from exc
        except OSError as exc:
            raise _fail(path, "read", exc) from exc
        hashes = []
        for body in bodies:
            line, head = chain.seal(body, seq=count, prev=head)
            count += 1
            lines.append(line)
            hashes.append(head)
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            _cache.ident = (-1, -1, -1)
            raise _fail(path, "write", exc) from exc
        st = os.fstat(fd)
        _cache.ident, _cache.count, _cache.head = (st.st_dev, st.st_ino, st.st_size), count, head
        if size == 0:
            _fsync_dir(path.parent)
        cp_count, cp_time = _last_checkpoint()
        if checkpoint or count - cp_count >= CHECKPOINT_EVERY or time.time() - cp_time >= CHECKPOINT_AGE:
            _write_checkpoint(count, head)
        return hashes
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _last_checkpoint() -> tuple[int, float]:
    """(count, POSIX time) of the newest checkpoint; (0, 0.0) when there is none."""
    path = checkpoints_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0, 0.0
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size)
        if ident != _cache.cp_ident:
            count, when = 0, 0.0
            if st.st_size:
                line, _ = _last_line(fd, st.st_size)
                try:
                    data = json.loads(line)
                    count = int(data["count"])
                    when = _dt.datetime.fromisoformat(str(data["time"]).replace("Z", "+00:00")).timestamp()
                except (ValueError, KeyError, TypeError):
                    count, when = 0, 0.0
            _cache.cp_ident, _cache.cp_count, _cache.cp_time = ident, count, when
        return _cache.cp_count, _cache.cp_time
    finally:
        os.close(fd)


def _write_checkpoint(count: int, head: str) -> chain.Checkpoint:
    """Sign and store a checkpoint; caller holds the trail lock."""
    cp = chain.sign_checkpoint(keys.signing_key(), count=count, head=head, time=utc_now(),
                               host=socket.gethostname())
    line = json.dumps(cp.to_json(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path = checkpoints_path()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        keys.write_secret(anchor_path(), json.dumps(cp.to_json(), indent=2).encode() + b"\n")
    except OSError as exc:
        raise _fail(path, "checkpoint", exc) from exc
    return cp


def checkpoint() -> chain.Checkpoint:
    """Sign a checkpoint of the trail as it stands now (an empty trail gives count 0)."""
    path, fd = _open_trail()
    try:
        count, head, _, _ = _head(fd, None)
        return _write_checkpoint(count, head)
    except OSError as exc:
        raise _fail(path, "checkpoint", exc) from exc
    finally:
        os.close(fd)


def snapshot_size() -> int:
    """Size of the trail at a record boundary (taken under the lock), 0 if absent."""
    try:
        fd = _open_locked(trail_path(), os.O_RDONLY, fcntl.LOCK_SH)
    except FileNotFoundError:
        return 0
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def iter_lines(path: Path | None = None, *, limit: int | None = None) -> Iterator[bytes]:
    """Raw lines of the trail up to a consistent snapshot (no lock held while reading)."""
    path = path or trail_path()
    end = snapshot_size() if limit is None and path == trail_path() else limit
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return
    with fh:
        done = 0
        for line in fh:
            if end is not None and done + len(line) > end:
                if done < end:
                    yield line[: end - done]
                return
            done += len(line)
            yield line


def read_checkpoints(path: Path | None = None) -> list[chain.Checkpoint]:
    """Every checkpoint in ``checkpoints.jsonl`` (or in a file of one JSON object)."""
    path = path or checkpoints_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        whole = json.loads(text)  # an exported anchor: one (pretty-printed) object
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        return [chain.Checkpoint.from_json(whole)]
    return [chain.Checkpoint.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]
