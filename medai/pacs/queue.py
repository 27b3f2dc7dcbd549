"""The persistent state of the PACS hook: received instances, study stability,
jobs and result transfers, in one SQLite database (WAL) under ``MEDAI_HOME``.

Why SQLite: it survives SIGKILL and restart, several processes (listener,
worker, ``medai pacs status``) can read and write it at once, and it ships with
Python. Delivery is at-least-once: a job or transfer that was running when the
process died goes back to pending on restart. Outputs are idempotent because a
job is keyed by (study, model id, model version) and only re-runs when the
study's set of instances changed since the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from medai import home
from medai.durable import pid_alive

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    source TEXT NOT NULL DEFAULT 'scp',
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'receiving',
    digest TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    series_uid TEXT,
    input_digest TEXT NOT NULL,
    destination TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    error TEXT,
    out_dir TEXT,
    owner TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE(study_uid, model_id, model_version)
);
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    error TEXT,
    owner TEXT,
    updated_at REAL NOT NULL,
    UNIQUE(job_id, path, destination)
);
CREATE TABLE IF NOT EXISTS outputs (
    sop_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    model_id: str
    model_version: str
    series_uid: str | None
    input_digest: str
    destination: str | None
    attempts: int


@dataclass(frozen=True)
class Transfer:
    id: int
    job_id: int
    path: Path
    destination: str
    attempts: int
    study_uid: str


@dataclass(frozen=True)
class SeriesInfo:
    """A received series' header fields as the queue database records them at reception
    (``medai pacs status`` and reconciliation read them). Routing does not: it reads the
    stored study through the index (:class:`medai.dicom.index.SeriesEntry`), like every
    other surface."""

    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    description: str
    sop_class_uid: str


@dataclass(frozen=True)
class InstanceRow:
    """One stored instance to register (see :meth:`PacsDB.record_instances`)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    size: int
    sha256: str
    series: SeriesInfo | None
    source: str
    #: When it was received (epoch seconds): the study's quiet period counts from here.
    received: float


@dataclass(frozen=True)
class RouteTarget:
    """A model chosen for a study (and the series it should read, if known)."""

    model_id: str
    model_version: str
    series_uid: str | None = None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return ""


#: Who claimed a job or transfer: host, boot and process id (a pid from an
#: earlier boot, reused by another program, must not look alive).
_OWNER = f"{socket.gethostname()}|{_boot_id()}|{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
    """Whether the process that claimed the work still runs. Work of another
    host is assumed alive; work of this very process is not (a recovering
    worker cannot be running anything yet)."""
    parts = (owner or "").split("|")
    if len(parts) != 3 or not parts[2].isdigit():
        return False
    host, boot, pid = parts[0], parts[1], int(parts[2])
    if host != socket.gethostname():
        return True
    if boot != _boot_id() or pid == os.getpid():
        return False
    return pid_alive(pid)


def default_path() -> Path:
    return home.pacs_dir() / "queue.sqlite3"


def backoff_seconds(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential backoff after ``attempts`` failures: base, 2*base, ... capped."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


class PacsDB:
    """Thread-safe access to the queue database (one connection per thread)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self._local = threading.local()
        # Writers of this process queue here: SQLite's own busy handler makes a
        # thread that finds the database locked sleep in steps of milliseconds,
        # which with several associations cost more than the writes themselves.
        # Other processes still meet SQLite's lock (busy_timeout).
        self._write_lock = threading.RLock()
        self._conn().executescript(SCHEMA)

    # -- plumbing ---------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives a killed process; after a
            # power cut the last commits may be lost, which at-least-once
            # recovery and the store reconciliation make good.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection, lock: "threading.RLock") -> None:
            self.conn, self.lock = conn, lock

        def __enter__(self) -> sqlite3.Connection:
            self.lock.acquire()
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.lock.release()
                raise
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            try:
                self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.lock.release()

    def _tx(self) -> "PacsDB._Tx":
        return PacsDB._Tx(self._conn(), self._write_lock)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- key/value --------------------------------------------------------
    def set_value(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                       (key, json.dumps(value)))

    def get_value(self, key: str, default: Any = None) -> Any:
        row = self._conn().execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def bump(self, key: str, by: int = 1) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO kv(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                       "value=CAST(value AS INTEGER)+?", (key, str(by), by))

    # -- reception ----------------------------------------------------------
    def record_instance(self, *, sop_uid: str, study_uid: str, series_uid: str, sop_class_uid: str,
                        size: int, sha256: str, series: SeriesInfo | None, source: str = "scp",
                        now: float | None = None) -> bool:
        """Register a stored instance; returns True when it changed the study
        (new or different bytes), which restarts the study's quiet period."""
        row = InstanceRow(sop_uid, study_uid, series_uid, sop_class_uid, size, sha256, series, source,
                          time.time() if now is None else now)
        return self.record_instances([row])[0]

    def record_instances(self, rows: Sequence[InstanceRow]) -> list[bool]:
        """Register several stored instances in one transaction (the listener's
        reconciliation at start); one "changed" flag per row, as :meth:`record_instance`."""
        changed: list[bool] = []
        with self._tx() as db:
            for row in rows:
                changed.append(self._record(db, row))
        return changed

    @staticmethod
    def _record(db: sqlite3.Connection, r: InstanceRow) -> bool:
        if db.execute("SELECT 1 FROM outputs WHERE sop_uid=?", (r.sop_uid,)).fetchone() is not None:
            # One of our own results coming back (a PACS forwarding it, or
            # Orthanc listing it): never part of a study's input.
            return False
        known = db.execute("SELECT sha256 FROM instances WHERE sop_uid=?", (r.sop_uid,)).fetchone()
        changed = known is None or known["sha256"] != r.sha256
        if changed:
            db.execute("INSERT OR REPLACE INTO instances VALUES(?,?,?,?,?,?,?)",
                       (r.sop_uid, r.study_uid, r.series_uid, r.sop_class_uid, r.size, r.sha256, r.received))
        # Any instance, even a duplicate, restarts the quiet period: a sender
        # re-sending a study after an interruption is still sending it.
        db.execute(
            "INSERT INTO studies(study_uid, source, first_received, last_received, state) "
            "VALUES(?,?,?,?,'receiving') ON CONFLICT(study_uid) DO UPDATE SET "
            "last_received=excluded.last_received, state='receiving'",
            (r.study_uid, r.source, r.received, r.received))
        if r.series is not None:
            db.execute("INSERT OR IGNORE INTO series VALUES(?,?,?,?,?,?)",
                       (r.series.series_uid, r.series.study_uid, r.series.modality, r.series.body_part,
                        r.series.description, r.series.sop_class_uid))
        db.execute("INSERT INTO kv(key, value) VALUES('last_received', ?) ON CONFLICT(key) "
                   "DO UPDATE SET value=excluded.value",
                   (json.dumps(r.received),))
        return changed

    def restart_quiet_periods(self, now: float | None = None) -> int:
        """After a restart: studies still receiving get a full quiet period
        again, because nothing could arrive while we were down (the senders
        are probably about to retry)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            return db.execute("UPDATE studies SET last_received=? WHERE state='receiving'", (now,)).rowcount

    def has_instance(self, sop_uid: str) -> bool:
        return self._conn().execute("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone() is not None

    def known_sops(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT sop_uid FROM instances")}

    def study_series(self, study_uid: str) -> list[SeriesInfo]:
        rows = self._conn().execute("SELECT * FROM series WHERE study_uid=? ORDER BY series_uid", (study_uid,))
        return [SeriesInfo(r["study_uid"], r["series_uid"], r["modality"], r["body_part"], r["description"],
                           r["sop_class_uid"]) for r in rows]

    def study_digest(self, study_uid: str) -> str:
        """Hash of the study's instance set (UIDs and content): the job input key."""
        h = hashlib.sha256()
        for row in self._conn().execute("SELECT sop_uid, sha256 FROM instances WHERE study_uid=? ORDER BY sop_uid",
                                        (study_uid,)):
            h.update(f"{row[0]}={row[1]}\n".encode())
        return h.hexdigest()

    def study_source(self, study_uid: str) -> str | None:
        row = self._conn().execute("SELECT source FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return None if row is None else str(row["source"])

    # -- stability ----------------------------------------------------------
    def quiet_studies(self, stable_seconds: float, now: float | None = None) -> list[str]:
        """Studies with no new instance for ``stable_seconds``."""
        now = time.time() if now is None else now
        rows = self._conn().execute(
            "SELECT study_uid FROM studies WHERE state='receiving' AND last_received <= ? ORDER BY last_received",
            (now - stable_seconds,))
        return [r[0] for r in rows]

    def mark_stable(self, study_uid: str, targets: Iterable[RouteTarget], *, destination: str | None,
                    now: float | None = None) -> list[int]:
        """Mark a quiet study stable and enqueue one job per target.

        A job that already exists for the same (study, model, version) is left
        alone when its input is unchanged (idempotent) and re-armed when the
        study gained or changed instances since it ran."""
        now = time.time() if now is None else now
        digest = self.study_digest(study_uid)
        queued: list[int] = []
        with self._tx() as db:
            row = db.execute("SELECT last_received, state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            if row is None:
                return []
            for t in targets:
                existing = db.execute("SELECT id, input_digest FROM jobs WHERE study_uid=? AND model_id=? AND "
                                      "model_version=?", (study_uid, t.model_id, t.model_version)).fetchone()
                if existing is None:
                    cur = db.execute(
                        "INSERT INTO jobs(study_uid, model_id, model_version, series_uid, input_digest, destination, "
                        "state, created_at, updated_at) VALUES(?,?,?,?,?,?,'pending',?,?)",
                        (study_uid, t.model_id, t.model_version, t.series_uid, digest, destination, now, now))
                    queued.append(int(cur.lastrowid or 0))
                elif existing["input_digest"] != digest:
                    db.execute("UPDATE jobs SET state='pending', input_digest=?, series_uid=?, destination=?, "
                               "attempts=0, next_attempt_at=0, error=NULL, updated_at=? WHERE id=?",
                               (digest, t.series_uid, destination, now, existing["id"]))
                    queued.append(int(existing["id"]))
            db.execute("UPDATE studies SET state='stable', digest=? WHERE study_uid=?", (digest, study_uid))
        return queued

    # -- jobs ---------------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """After a restart: work whose process is gone goes back to pending.

        Work claimed by a process that is still alive (a listener and an
        Orthanc follower sharing one ``MEDAI_HOME``) is left alone, or it would
        run twice."""
        now = time.time()
        counts = []
        with self._tx() as db:
            for table, busy in (("jobs", "running"), ("transfers", "sending")):
                orphans = [r["id"] for r in db.execute(f"SELECT id, owner FROM {table} WHERE state=?", (busy,))
                           if not _owner_alive(r["owner"])]
                db.executemany(f"UPDATE {table} SET state='pending', owner=NULL, updated_at=? WHERE id=?",
                               [(now, i) for i in orphans])
                counts.append(len(orphans))
        return counts[0], counts[1]

    def claim_job(self, now: float | None = None) -> Job | None:
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='pending' AND next_attempt_at <= ? ORDER BY id LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='running', attempts=attempts+1, owner=?, updated_at=? WHERE id=?",
                       (_OWNER, now, row["id"]))
        return Job(row["id"], row["study_uid"], row["model_id"], row["model_version"], row["series_uid"],
                   row["input_digest"], row["destination"], row["attempts"] + 1)

    def is_output(self, sop_uid: str) -> bool:
        return self._conn().execute("SELECT 1 FROM outputs WHERE sop_uid=?", (sop_uid,)).fetchone() is not None

    def finish_job(self, job: Job, out_dir: Path, outputs: Iterable[tuple[Path, str]], destination: str | None) -> None:
        """Record a finished job, its output instances (path, SOP Instance UID)
        and, in the same transaction, their transfers."""
        now = time.time()
        outputs = list(outputs)
        with self._tx() as db:
            for _path, sop_uid in outputs:
                db.execute("INSERT OR REPLACE INTO outputs(sop_uid, job_id) VALUES(?, ?)", (sop_uid, job.id))
            db.execute("UPDATE jobs SET state='done', out_dir=?, error=NULL, updated_at=? WHERE id=?",
                       (str(out_dir), now, job.id))
            if destination:
                for path, _sop in outputs:
                    db.execute("INSERT INTO transfers(job_id, path, destination, state, updated_at) "
                               "VALUES(?,?,?,'pending',?) ON CONFLICT(job_id, path, destination) DO UPDATE SET "
                               "state='pending', attempts=0, next_attempt_at=0, error=NULL, updated_at=excluded.updated_at",
                               (job.id, str(path), destination, now))

    def fail_job(self, job: Job, error: str, *, max_attempts: int) -> bool:
        """Record a failed attempt; returns True when the job gave up for good."""
        now = time.time()
        final = job.attempts >= max_attempts
        with self._tx() as db:
            db.execute("UPDATE jobs SET state=?, error=?, next_attempt_at=?, updated_at=? WHERE id=?",
                       ("failed" if final else "pending", error[:500], now + backoff_seconds(job.attempts),
                        now, job.id))
        return final

    def release_job(self, job: Job) -> None:
        """Put a job back untouched (shutdown while it ran)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state='pending', attempts=MAX(0, attempts-1), updated_at=? WHERE id=?",
                       (time.time(), job.id))

    # -- transfers ------------------------------------------------------------
    def claim_transfer(self, now: float | None = None) -> Transfer | None:
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute("SELECT t.*, j.study_uid FROM transfers t JOIN jobs j ON j.id=t.job_id WHERE "
                             "t.state='pending' AND t.next_attempt_at <= ? ORDER BY t.id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE transfers SET state='sending', attempts=attempts+1, owner=?, updated_at=? WHERE id=?",
                       (_OWNER, now, row["id"]))
        return Transfer(row["id"], row["job_id"], Path(row["path"]), row["destination"], row["attempts"] + 1,
                        row["study_uid"])

    def finish_transfer(self, transfer: Transfer) -> None:
        with self._tx() as db:
            db.execute("UPDATE transfers SET state='sent', error=NULL, updated_at=? WHERE id=?",
                       (time.time(), transfer.id))

    def fail_transfer(self, transfer: Transfer, error: str, *, max_attempts: int, backoff_base: float) -> bool:
        now = time.time()
        final = transfer.attempts >= max_attempts
        with self._tx() as db:
            db.execute("UPDATE transfers SET state=?, error=?, next_attempt_at=?, updated_at=? WHERE id=?",
                       ("failed" if final else "pending", error[:500],
                        now + backoff_seconds(transfer.attempts, base=backoff_base), now, transfer.id))
        return final

    def release_transfer(self, transfer: Transfer) -> None:
        with self._tx() as db:
            db.execute("UPDATE transfers SET state='pending', attempts=MAX(0, attempts-1), updated_at=? WHERE id=?",
                       (time.time(), transfer.id))

    # -- reporting ------------------------------------------------------------
    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> Iterator[sqlite3.Row]:
        yield from self._conn().execute(sql, params)

    def status(self) -> dict[str, Any]:
        """Counts for ``medai pacs status`` (no patient data: UIDs and counts)."""
        c = self._conn()

        def counts(table: str) -> dict[str, int]:
            return {r[0]: r[1] for r in c.execute(f"SELECT state, COUNT(*) FROM {table} GROUP BY state")}

        jobs = counts("jobs")
        transfers = counts("transfers")
        studies = counts("studies")
        failures = [dict(r) for r in c.execute(
            "SELECT 'job' AS kind, id, model_id AS what, error, updated_at FROM jobs WHERE state='failed' UNION ALL "
            "SELECT 'transfer', id, destination, error, updated_at FROM transfers WHERE state='failed' "
            "ORDER BY updated_at DESC LIMIT 10")]
        return {
            "instances": c.execute("SELECT COUNT(*) FROM instances").fetchone()[0],
            "studies": studies,
            "queue_depth": jobs.get("pending", 0) + jobs.get("running", 0) + transfers.get("pending", 0)
            + transfers.get("sending", 0),
            "jobs": jobs,
            "transfers": transfers,
            "last_received": self.get_value("last_received"),
            "rejected_associations": int(self.get_value("rejected_associations", 0)),
            "failed_stores": int(self.get_value("failed_stores", 0)),
            "recent_failures": failures,
        }
