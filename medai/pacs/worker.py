"""The worker: stable studies become jobs, jobs become results, results get sent.

It runs beside the listener (a thread of ``medai pacs listen``) or on its own
(``medai pacs worker``) and shares nothing with reception but the queue
database, so reception never waits on inference. Routing is the one decision
every surface uses (:func:`medai.routing.decide`). Each model run is a child
process (:mod:`medai.pacs.runjob`) that lands its outputs in the results store
(:mod:`medai.results`, an atomic rename, so a killed run leaves no half result)
or reuses a stored run of the same model on the same series content.

``pacs.send_policy`` decides when results leave: ``after-review`` (the default)
keeps them until a clinician accepts them in the Worklist (:mod:`medai.review`),
``immediate`` queues their transfer as soon as the model ran.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from medai import config
from medai.errors import AuditWriteError, ConfigError, MedaiError, PacsError
from medai.pacs import _audit, runjob
from medai.pacs.queue import Job, PacsDB, RouteTarget
from medai.pacs.sender import Destination, parse_destination, send_audited
from medai.pacs.store import StudyStore, validate_uid
from medai.results import ResultsStore
from medai.routing import Route, parse_routes

SEND_POLICIES = ("after-review", "immediate")

log = logging.getLogger("medai.pacs")


@dataclass(frozen=True)
class WorkerConfig:
    stable_seconds: float = 60.0
    #: "AE@host:port" or a folder; None: results stay in MEDAI_HOME only.
    destination: str | None = None
    routes: tuple[Route, ...] = ()
    max_attempts: int = 5
    retry_base: float = 5.0
    job_timeout: float = 1800.0
    poll_seconds: float = 0.5
    send_policy: str = "after-review"

    def __post_init__(self) -> None:
        if self.send_policy not in SEND_POLICIES:
            raise ConfigError(f"pacs.send_policy: {self.send_policy!r} is not one of {', '.join(SEND_POLICIES)}")

    @classmethod
    def from_config(cls, **overrides: object) -> "WorkerConfig":
        values: dict[str, object] = {
            "stable_seconds": float(config.get("pacs.stable_seconds")),
            "destination": config.get("pacs.destination") or None,
            "routes": parse_routes(config.get("pacs.routes")),
            "max_attempts": int(config.get("pacs.max_attempts")),
            "retry_base": float(config.get("pacs.retry_seconds")),
            "job_timeout": float(config.get("pacs.job_timeout")),
            "send_policy": str(config.get("pacs.send_policy")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


class Worker:
    def __init__(self, cfg: WorkerConfig, *, store: StudyStore | None = None, db: PacsDB | None = None) -> None:
        self.cfg = cfg
        self.store = store or StudyStore()
        self.db = db or PacsDB()
        self._stop = threading.Event()
        self._child: subprocess.Popen[bytes] | None = None
        self._destinations: dict[str, Destination] = {}
        if cfg.destination:
            # Parse now: a malformed destination is a startup error, and a
            # DICOM destination is registered with the egress guard here.
            self._destinations[cfg.destination] = parse_destination(cfg.destination)

    # -- lifecycle ----------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()

    def run(self) -> None:
        with ResultsStore() as store:
            store.clean_partial()  # outputs of a run killed with the last service
        jobs, transfers = self.db.recover()
        if jobs or transfers:
            log.info("recovered after restart jobs=%d transfers=%d", jobs, transfers)
        while not self._stop.is_set():
            busy = False
            try:
                busy |= self.promote() > 0
                busy |= self.run_one_job()
                busy |= self.send_one()
            except Exception:  # noqa: BLE001 - the worker must keep serving other studies
                log.exception("worker step failed")
            if not busy:
                self._stop.wait(self.cfg.poll_seconds)

    # -- stability ------------------------------------------------------------
    def destination_for(self, study_uid: str) -> str | None:
        return "orthanc" if self.db.study_source(study_uid) == "orthanc" else self.cfg.destination

    def stabilise(self, study_uid: str) -> list[int]:
        """Route a complete study and queue its jobs (idempotent)."""
        from medai.dicom.index import scan
        from medai.routing import decide

        try:
            index = scan([self.store.study_dir(study_uid)], workers=1)
            chosen, _why = decide(list(index.series.values()), routes=self.cfg.routes)
            targets = [RouteTarget(d.model_id, d.model_version, d.series.series_instance_uid) for d in chosen]
        except MedaiError as exc:
            log.error("routing failed study=%s: %s", _audit.key(study_uid), exc)
            targets = []
        queued = self.db.mark_stable(study_uid, targets, destination=self.destination_for(study_uid))
        log.info("study stable study=%s models=%s queued=%d", _audit.key(study_uid),
                 ",".join(t.model_id for t in targets) or "-", len(queued))
        return queued

    def promote(self) -> int:
        studies = self.db.quiet_studies(self.cfg.stable_seconds)
        for study_uid in studies:
            self.stabilise(study_uid)
        return len(studies)

    # -- jobs -----------------------------------------------------------------
    def run_one_job(self) -> bool:
        job = self.db.claim_job()
        if job is None:
            return False
        try:
            out_dir, run_id = self._execute(job)
        except _Stopped:
            self.db.release_job(job)
            return False
        except (MedaiError, OSError, subprocess.SubprocessError) as exc:
            final = self.db.fail_job(job, str(exc), max_attempts=self.cfg.max_attempts)
            log.error("job failed study=%s model=%s attempt=%d final=%s: %s", _audit.key(job.study_uid),
                      job.model_id, job.attempts, final, exc)
            return True
        outputs = []
        for path in sorted(out_dir.glob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            outputs.append((path, validate_uid(ds.SOPInstanceUID, "SOP Instance UID")))
        immediate = self.cfg.send_policy == "immediate"
        destination = job.destination if (job.destination and immediate) else None
        self.db.finish_job(job, out_dir, outputs, destination)
        if job.destination and not immediate:
            with ResultsStore() as store:  # sent there once a clinician accepts it
                store.set_destination(run_id, job.destination)
        log.info("job done study=%s model=%s run=%s outputs=%d sent=%s", _audit.key(job.study_uid), job.model_id,
                 run_id, len(outputs), "now" if destination else "after review")
        return True

    def _execute(self, job: Job) -> tuple[Path, str]:
        """Run the job's model in a child process; returns the stored run's folder and id."""
        source = (self.store.series_dir(job.study_uid, job.series_uid) if job.series_uid
                  else self.store.study_dir(job.study_uid))
        cmd = [sys.executable, "-m", "medai.pacs.runjob", "--model", job.model_id, "--source", str(source)]
        env = os.environ.copy()
        # the Series UID goes by environment, which only this user can read, not on the
        # command line, which every user of the machine sees in `ps`
        env.pop(runjob.SERIES_ENV, None)
        if job.series_uid:
            env[runjob.SERIES_ENV] = validate_uid(job.series_uid, "Series Instance UID")
        log.info("job start study=%s model=%s attempt=%d", _audit.key(job.study_uid), job.model_id, job.attempts)
        try:
            self._child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            try:
                _out, err = self._child.communicate(timeout=self.cfg.job_timeout)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.communicate()
                raise PacsError(f"model {job.model_id} ran longer than pacs.job_timeout "
                                f"({self.cfg.job_timeout:.0f} s)") from None
            code = self._child.returncode
        finally:
            self._child = None
        if self._stop.is_set():
            raise _Stopped()
        if code != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit code {code}"]
            raise PacsError(f"model {job.model_id} failed: {tail[0][:300]}")
        try:
            done = json.loads(_out.decode().strip().splitlines()[-1])
            return Path(done["folder"]), str(done["run_id"])
        except (ValueError, KeyError, IndexError):
            raise PacsError(f"model {job.model_id}: the run reported no result") from None

    # -- transfers --------------------------------------------------------------
    def _destination(self, name: str) -> Destination | None:
        if name in self._destinations:
            return self._destinations[name]
        if name == "orthanc" and config.get("pacs.orthanc_url"):
            self._destinations[name] = parse_destination("orthanc")
            return self._destinations[name]
        return None

    def send_one(self) -> bool:
        transfer = self.db.claim_transfer()
        if transfer is None:
            return False
        dest = self._destination(transfer.destination)
        if dest is None:
            # Never contact something that is not configured now.
            self.db.fail_transfer(transfer, "destination no longer configured", max_attempts=0, backoff_base=1)
            log.error("transfer dropped: destination is not configured")
            return True
        run_id = transfer.path.parent.name  # a results-store run folder is named by its run id
        try:
            send_audited(dest, [transfer.path], study_uid=transfer.study_uid)
        except (PacsError, AuditWriteError, OSError) as exc:
            final = self.db.fail_transfer(transfer, str(exc), max_attempts=self.cfg.max_attempts,
                                          backoff_base=self.cfg.retry_base)
            log.warning("transfer failed destination=%s attempt=%d final=%s: %s", dest.describe(),
                        transfer.attempts, final, exc)
            if final:
                self._mark_sent(run_id, "send_failed", str(exc))
            return True
        self.db.finish_transfer(transfer)
        self._mark_sent(run_id, "sent")
        return True

    def _mark_sent(self, run_id: str, state: str, error: str = "") -> None:
        with ResultsStore() as store:
            try:
                store.get(run_id)
            except MedaiError:
                return  # a transfer queued before the results store existed
            store.set_review(run_id, state, send_error=error)


class _Stopped(Exception):
    """The service is shutting down; the job goes back to the queue."""


def run_pending(cfg: WorkerConfig, *, until_idle: bool = True, timeout: float = 600.0,
                store: StudyStore | None = None, db: PacsDB | None = None) -> None:
    """Drive the worker in the calling thread until nothing is left (for
    ``medai pacs worker --once`` and tests)."""
    worker = Worker(cfg, store=store, db=db)
    worker.db.recover()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = worker.promote() > 0
        busy |= worker.run_one_job()
        busy |= worker.send_one()
        if not busy and until_idle:
            return


__all__ = ["Worker", "WorkerConfig", "run_pending", "SEND_POLICIES"]
