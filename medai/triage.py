"""Batch triage: many studies in, one ranked worklist out.

The graph, in order::

    folders ──► index (headers only; unreadable files traced back to their series)
            ──► per study: the routing decision every surface uses (medai.routing.decide)
            ──► jobs the results store cannot answer yet ──► how many at once (planner × memory budget)
            ──► executor (in-process, a local process pool, or a Dask cluster) ──► one run per job
            ──► results store (one row per finished job, committed at once, by this process)
            ──► worklist rows (one per study) ──► ranking (medai.results.reader_order) ──► CSV / JSON / table

Resumable and shared: every finished job is committed to the results store
(``MEDAI_HOME/results``, :mod:`medai.results`) before the next result is looked at,
so Ctrl-C or SIGKILL loses at most the jobs in flight. A job is answered from the
store, whichever surface ran it (the UI, the PACS hook, ``medai run``, an earlier
triage), when the same model version already ran on the same series content and its
files are still there; that reuse is an audit event. ``force`` runs again. Failed
jobs are remembered too and retried only with ``retry_failed`` (a broken study fails
the same way again).

Robust: a job never raises for a bad study; a worker process that dies (a crash
in native code, the OOM killer) is replaced and the jobs it held are retried
once, then marked failed. Models whose card says ``accepts_prompt`` need a person
to draw a prompt and are not run by triage.

Privacy: logs and the state database hold the pseudonymous study key only.
Accession number and patient ID appear in the worklist file alone, because the
person who asked for the worklist needs them to open the studies.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from medai.errors import ConfigError, MedaiError
from medai.results import (STATUS_DONE, STATUS_FAILED, Request, ResultsStore, StoredRun, execute, failed_run,
                           qc_state, reader_order)

log = logging.getLogger("medai.triage")

LEVEL_RANK = {"routine": 0, "review": 1, "urgent": 2}
STATUS_NO_MATCH = "no matching series"
STATUS_NOT_RUN = "not run"
#: Index skip kinds that mean "this was meant to be an instance of some series".
_BROKEN_KINDS = frozenset({"truncated", "unreadable", "unsafe", "incomplete"})
#: A job whose worker process died this many times is marked failed.
MAX_CRASHES = 2


# --------------------------------------------------------------------------- values

@dataclass(frozen=True)
class Job:
    """One model on one series of one study. Plain data, so it crosses process and
    cluster boundaries."""

    study_key: str
    study_uid: str
    model_id: str
    model_version: str
    series_uid: str
    files: tuple[str, ...]
    #: The results store's folder: runs are written under it (the coordinator records them).
    out_dir: str
    max_memory: int | None = None
    threads: int | None = None
    #: (frames, rows, columns) from the headers, for the planner.
    shape: tuple[int, int, int] = (0, 0, 0)
    #: SHA-256 over the series' SOP Instance UIDs: a changed series is not "done".
    inputs_digest: str = ""
    modality: str = ""
    study_date: str = ""
    #: Pseudonymous key of the series, made by the coordinator (see Request).
    series_key: str = ""

    def request(self) -> Request:
        return Request(self.model_id, self.model_version, self.series_uid, self.study_uid, self.files,
                       self.inputs_digest, "triage", self.study_key, self.series_key, self.modality,
                       self.study_date)


@dataclass(frozen=True)
class Outcome:
    """What a job produced: status plus the result summary the worklist needs."""

    study_key: str
    model_id: str
    model_version: str
    status: str
    reason: str = ""
    series_uid: str = ""
    volumes_ml: Mapping[str, float] = field(default_factory=dict)
    measurements: Sequence[Mapping[str, Any]] = ()
    findings: Sequence[str] = ()
    qc: Mapping[str, Any] = field(default_factory=dict)
    priority: Mapping[str, Any] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    inputs_digest: str = ""
    #: Audit records made on a cluster worker, replayed into the coordinator's trail.
    audit: Sequence[Mapping[str, Any]] = ()
    #: The run as the results store records it (written by the coordinator).
    run: StoredRun | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("audit")
        data.pop("run")
        return data

    @classmethod
    def failed(cls, job: Job, reason: str, seconds: float = 0.0,
               audit: Sequence[Mapping[str, Any]] = ()) -> "Outcome":
        return cls(job.study_key, job.model_id, job.model_version, STATUS_FAILED, reason, job.series_uid,
                   seconds=seconds, inputs_digest=job.inputs_digest, audit=tuple(audit))

    @classmethod
    def from_run(cls, run: StoredRun, study_key: str, series_uid: str, audit: Sequence[Mapping[str, Any]] = (),
                 seconds: float = 0.0) -> "Outcome":
        s = run.summary
        return cls(study_key, run.model_id, run.model_version, run.status, run.reason, series_uid,
                   volumes_ml=dict(s.get("volumes_ml") or {}), measurements=list(s.get("measurements") or []),
                   findings=list(s.get("findings") or []), qc=dict(s.get("qc") or {}),
                   priority={"level": run.priority_level or "routine", "score": run.priority_score,
                             "reasons": list(s.get("reasons") or [])},
                   outputs={k: str(run.folder / n) for k, n in run.outputs.items() if not k.startswith("extra:")},
                   seconds=seconds or float(s.get("seconds") or 0.0), inputs_digest=run.content_digest,
                   audit=tuple(audit), run=run)


@dataclass
class StudyRow:
    """One line of the worklist."""

    study_key: str
    accession_number: str
    patient_id: str
    study_date: str
    modalities: str
    status: str
    models: list[str] = field(default_factory=list)
    priority: str = ""
    score: float = 0.0
    qc: str = ""
    measurements: str = ""
    findings: str = ""
    reasons: str = ""
    results: str = ""

    @property
    def qc_failed(self) -> bool:
        return self.qc == "fail"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- planning

@dataclass
class StudyPlan:
    study_uid: str
    study_key: str
    jobs: list[Job]
    #: model id → why it has no job for this study (no matching series).
    skipped: dict[str, str]
    accession_number: str = ""
    patient_id: str = ""
    study_date: str = ""
    modalities: str = ""
    #: model id → why its job cannot start (the chosen series has unreadable files).
    blocked: dict[str, str] = field(default_factory=dict)


def select_bundles(models: Sequence[str] | None) -> list[Any]:
    """The bundles to run: the named ones, or every installed model that runs without a
    prompt. A named prompt-only model is a usage error (it needs a person's box)."""
    from medai.inference import registry

    if models:
        bundles = [registry.get_bundle(m) for m in models]
        prompted = [b.id for b in bundles if b.card.accepts_prompt]
        if prompted:
            raise ConfigError(f"model {', '.join(prompted)} needs a prompt drawn by a person; triage runs "
                              "automatic models only (use `medai run` or the UI for it)")
    else:
        bundles = [b for b in registry.list_bundles() if not b.card.accepts_prompt]
    if not bundles:
        raise ConfigError("no automatic model installed; see `medai models list`")
    return bundles


def _study_key(study_uid: str) -> str:
    from medai.compliance import pseudonym

    return pseudonym(study_uid)


def _accession(files: Sequence[Path]) -> str:
    """Accession number of a study (not in the index), for the worklist file only."""
    import pydicom

    for path in files[:3]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
        except Exception:  # noqa: BLE001 - the index already accepted this file; be tolerant here
            continue
        return str(ds.get("AccessionNumber", "") or "")
    return ""


def _uids_of_broken(path: Path) -> tuple[str, str] | None:
    """(study UID, series UID) of a file the index could not accept, read from its first
    64 KiB only (it may be truncated or hostile); None when even that fails."""
    import warnings

    import pydicom
    from pydicom.filebase import DicomBytesIO

    from medai.dicom.safety import check_uid

    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(DicomBytesIO(head), force=True, stop_before_pixels=True,
                                 specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
            return (check_uid(str(ds.StudyInstanceUID), path, "Study Instance UID"),
                    check_uid(str(ds.SeriesInstanceUID), path, "Series Instance UID"))
    except Exception:  # noqa: BLE001 - best effort: unattributed files are only counted
        return None


@dataclass(frozen=True)
class BrokenFiles:
    """Files the index skipped as damaged, traced back to their series where the header allows."""

    by_series: Mapping[str, tuple[tuple[str, str], ...]]
    #: Studies none of whose files could be read: study UID → (path, reason) pairs.
    orphan_studies: Mapping[str, tuple[tuple[str, str], ...]]
    unattributed: int


def broken_files(index: Any) -> BrokenFiles:
    by_series: dict[str, list[tuple[str, str]]] = {}
    orphans: dict[str, list[tuple[str, str]]] = {}
    unattributed = 0
    for skip in index.skipped:
        if skip.kind not in _BROKEN_KINDS:
            continue
        uids = _uids_of_broken(Path(skip.path))
        if uids is None:
            unattributed += 1
        elif uids[0] in index.studies:
            by_series.setdefault(uids[1], []).append((str(skip.path), skip.reason))
        else:
            orphans.setdefault(uids[0], []).append((str(skip.path), skip.reason))
    return BrokenFiles({k: tuple(v) for k, v in by_series.items()},
                       {k: tuple(v) for k, v in orphans.items()}, unattributed)


def _shape(entry: Any) -> tuple[int, int, int]:
    first = entry.instances[0] if entry.instances else None
    return (max(entry.frame_count, 1), (first.rows or 0) if first else 0, (first.columns or 0) if first else 0)


def plan_studies(index: Any, bundles: Sequence[Any], results_dir: Path, *,
                 broken: BrokenFiles | None = None) -> list[StudyPlan]:
    """One :class:`StudyPlan` per study in ``index`` (plus one per study known only from
    unreadable files): a job for each model the routing decision gives one of the study's
    series (the same decision as every other surface). Budgets and threads are set later."""
    from medai.routing import decide

    broken = broken or BrokenFiles({}, {}, 0)
    plans = []
    for study_uid, study in sorted(index.studies.items()):
        series = index.series_of_study(study_uid)
        key = _study_key(study_uid)
        jobs: list[Job] = []
        blocked: dict[str, str] = {}
        chosen, skipped = decide(series, bundles=bundles)
        for decision in chosen:
            best = decision.series
            bad = broken.by_series.get(best.series_instance_uid)
            if bad:
                blocked[decision.model_id] = (f"series incomplete: {len(bad)} file(s) unreadable, "
                                              f"first {bad[0][0]}: {bad[0][1]}")
                continue
            jobs.append(Job(key, study_uid, decision.model_id, decision.model_version, best.series_instance_uid,
                            tuple(str(p) for p in best.files), str(results_dir), shape=_shape(best),
                            inputs_digest=best.content_digest, modality=best.modality,
                            study_date=study.study_date, series_key=_study_key(best.series_instance_uid)))
        image_files = [p for s in series if s.is_image for p in s.files] or [p for s in series for p in s.files]
        patient = index.patients.get(study.patient_key)
        plans.append(StudyPlan(study_uid, key, jobs, skipped, _accession(image_files),
                               patient.patient_id if patient else "", study.study_date,
                               "/".join(sorted({s.modality for s in series if s.modality})), blocked))
    for study_uid, bad in sorted(broken.orphan_studies.items()):
        reason = f"no readable instance: {len(bad)} file(s) unreadable, first {bad[0][0]}: {bad[0][1]}"
        plans.append(StudyPlan(study_uid, _study_key(study_uid), [], {}, blocked={"*": reason}))
    return plans


# --------------------------------------------------------------------------- running one job

_WORKER: dict[str, Any] = {"ready": False}


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when the coordinator dies (SIGKILL
    included), so no orphan keeps computing a result nobody will record."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _worker_setup(threads: int | None = None, allow: tuple[str, int] | None = None,
                  pool_worker: bool = False) -> None:
    """Once per worker process: egress guard (telemetry off) before any model library
    loads. In the coordinator the entry point's guard is already on and stays as is."""
    from medai.compliance import egress

    if allow is not None:
        egress.allow(*allow)  # the Dask scheduler this worker must keep talking to
    if _WORKER["ready"]:
        return
    if pool_worker:
        import signal

        _die_with_parent()
        # Ctrl-C reaches the whole process group: the coordinator stops the workers itself
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not egress.installed():
        egress.install_for_entry_point("triage-worker")
    if threads:
        os.environ["MEDAI_THREADS"] = str(threads)
    _WORKER["ready"] = True


def run_job(job: Job, *, capture_audit: bool = False, allow: tuple[str, int] | None = None) -> Outcome:
    """Run one job; never raises for a bad study (the outcome says what went wrong).

    With ``capture_audit`` (cluster workers) the audit records are returned in the
    outcome instead of written here, and the coordinator writes them to its trail.
    """
    _worker_setup(job.threads, allow)
    from contextlib import nullcontext

    from medai.compliance import audit

    from medai.quick_exit import cycle_collection_paused

    t0 = time.perf_counter()
    captured: list[dict[str, Any]] = []
    with (audit.capture(captured) if capture_audit else nullcontext()):
        try:
            # One job at a time per worker: no cyclic-GC passes inside it (medai.quick_exit);
            # the one put off runs after it, between jobs.
            with cycle_collection_paused():
                run = execute(job.request(), Path(job.out_dir), max_memory=job.max_memory, threads=job.threads)
        except MedaiError as exc:
            if type(exc).__name__ == "AuditWriteError":
                raise  # fail closed: the whole batch stops, nothing more is processed
            return Outcome.failed(job, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0,
                                  _tag_worker(captured))
        except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
            log.error("study %s model %s: unexpected %s", job.study_key, job.model_id, type(exc).__name__,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return Outcome.failed(job, f"internal error ({type(exc).__name__})", time.perf_counter() - t0,
                                  _tag_worker(captured))
    _tag_worker(captured)
    return Outcome.from_run(run, job.study_key, job.series_uid, captured, time.perf_counter() - t0)


def _tag_worker(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Say in each captured record which cluster worker made it (the coordinator writes it)."""
    if captured:
        try:
            from distributed import get_worker

            where = get_worker().address
        except (ImportError, ValueError):
            where = "unknown"
        for call in captured:
            call["detail"] = {**(call.get("detail") or {}), "cluster_worker": where}
    return captured


# --------------------------------------------------------------------------- executors

Executor = Callable[[Sequence[Job]], Iterator[Outcome]]


def run_inline(jobs: Sequence[Job]) -> Iterator[Outcome]:
    for job in jobs:
        yield run_job(job)


def run_pool(workers: int) -> Executor:
    """A local process pool (spawned processes: onnxruntime's threads do not survive fork).

    At most ``workers`` jobs are submitted at a time, so an interruption loses at most
    those. A dead worker (native crash, OOM killer) breaks the whole pool in
    ``concurrent.futures``: the pool is rebuilt and the jobs it held are run again one
    at a time; a job whose worker dies :data:`MAX_CRASHES` times while it runs alone
    is marked failed, the bystanders finish."""
    import multiprocessing

    def execute(jobs: Sequence[Job]) -> Iterator[Outcome]:
        ctx = multiprocessing.get_context("spawn")
        threads = jobs[0].threads if jobs else None
        queue = list(jobs)
        suspects: set[int] = set()
        crashes: dict[int, int] = {}
        while queue:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_setup,
                                       initargs=(threads, None, True))
            pending: dict[Future[Outcome], Job] = {}
            held: list[Job] = []
            broken = finished = False
            try:
                while (queue or pending) and not broken:
                    alone = any(id(j) in suspects for j in [*queue[:1], *pending.values()])
                    while queue and len(pending) < (1 if alone else workers) and not broken:
                        job = queue.pop(0)
                        try:
                            pending[pool.submit(run_job, job)] = job
                        except BrokenProcessPool:  # a worker died while idle
                            queue.insert(0, job)
                            broken = True
                        alone = alone or id(job) in suspects
                    if not pending:
                        continue
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = pending.pop(fut)
                        try:
                            outcome = fut.result()
                        except BrokenProcessPool:
                            held.append(job)
                            broken = True
                            continue
                        yield outcome
                held += pending.values()
                pending.clear()
                finished = True
            finally:
                if not finished:  # interrupted: the jobs in flight are lost, stop their workers
                    for proc in list(getattr(pool, "_processes", {}).values()):
                        proc.terminate()
                pool.shutdown(wait=finished, cancel_futures=True)
            if held:
                log.warning("a triage worker process died; rerunning the %d job(s) it may have hit, "
                            "one at a time", len(held))
            if len(held) == 1:  # alone in its worker: this job is the likely cause
                crashes[id(held[0])] = crashes.get(id(held[0]), 0) + 1
                if crashes[id(held[0])] >= MAX_CRASHES:
                    yield Outcome.failed(held[0], f"worker process died {MAX_CRASHES} times while running it "
                                                  "(crash or out of memory)")
                    held = []
            suspects.update(id(j) for j in held)
            queue[:0] = held

    return execute


def run_dask(address: str, workers: int) -> Executor:
    """Jobs on a Dask cluster: ``local`` starts one on this machine (loopback only, no
    dashboard); ``dask://host:port`` or ``tcp://host:port`` joins an existing scheduler,
    which becomes an allowed egress destination (of this process and of the workers).
    Workers run :func:`run_job` with audit capture; the coordinator writes their records
    to its own trail. The files must be reachable at the same paths on the workers."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("cluster mode needs Dask: pip install 'medai[cluster]'") from None

    def execute(jobs: Sequence[Job]) -> Iterator[Outcome]:
        cluster = None
        allow: tuple[str, int] | None = None
        if address == "local":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None, scheduler_port=0)
            client = Client(cluster)
        else:
            target = address.replace("dask://", "tcp://", 1)
            host, _, port = target.split("://", 1)[-1].rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--cluster {address!r}: expected local or dask://host:port")
            from medai.compliance import egress

            allow = (host.strip("[]"), int(port))
            egress.allow(*allow)
            client = Client(target)
        futures = []
        try:
            futures = [client.submit(run_job, job, capture_audit=True, allow=allow, pure=False) for job in jobs]
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()
            client.close()
            if cluster is not None:
                cluster.close()

    return execute


# --------------------------------------------------------------------------- the batch

@dataclass
class TriageReport:
    rows: list[StudyRow]
    ran: int
    skipped_done: int
    failed: int
    seconds: float
    workers: int = 1
    #: Damaged files that could not be traced to any study (counted, not listed).
    unattributed_files: int = 0

    @property
    def exit_code(self) -> int:
        """0 all done (or nothing matched alongside done ones), 3 some studies failed,
        1 nothing could run (no study, every study failed, or nothing matched)."""
        failed = [r for r in self.rows if r.status.startswith(STATUS_FAILED)]
        if failed:
            return 1 if len(failed) == len(self.rows) else 3
        return 0 if any(r.status == STATUS_DONE for r in self.rows) else 1

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            kind = STATUS_FAILED if row.status.startswith(STATUS_FAILED) else row.status
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def concurrency(jobs: Sequence[Job], bundles: Sequence[Any], requested: int,
                budget: int | None) -> tuple[int, int]:
    """How many jobs may run at once, and the largest predicted peak (bytes) of any job.

    The request, capped by the number of jobs and by the memory budget (``budget``,
    else 80 % of the memory available now) divided by the planner's largest prediction;
    never below one (a single job that does not fit is the planner's to refuse)."""
    from medai.inference import planner

    by_id = {b.id: b for b in bundles}
    worst = 0
    for job in jobs:
        try:
            # the jobs run in pool workers: the coordinator's own resident memory is not theirs
            worst = max(worst, planner.plan(by_id[job.model_id], job.shape, None,
                                            in_this_process=False).predicted_bytes)
        except (MedaiError, KeyError):
            continue
    n = max(1, min(requested, len(jobs)))
    if worst > 0:
        n = max(1, min(n, (budget or _available_memory()) // worst))
    return n, worst


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return 4 * 1024**3


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def triage(paths: Sequence[Path], *, models: Sequence[str] | None = None, workers: int = 1,
           max_memory: int | None = None, force: bool = False, retry_failed: bool = False,
           cluster: str | None = None, store: ResultsStore | None = None,
           progress: Callable[[int, int], None] | None = None) -> TriageReport:
    """Run the batch and return the ranked worklist rows (see the module docstring).

    ``max_memory`` is the budget for all jobs running at once; each job gets an equal
    share. ``progress(done, total)`` counts studies with work to do in this run."""
    from dataclasses import replace

    from medai.compliance import audit
    from medai.dicom.index import scan

    t0 = time.perf_counter()
    bundles = select_bundles(models)
    index = scan(list(paths))
    broken = broken_files(index)
    audit.record("query", detail={"purpose": "triage", "studies": len(index.studies),
                                  "series": len(index.series), "skipped_files": len(index.skipped)})
    store = store or ResultsStore()
    plans = plan_studies(index, bundles, store.root, broken=broken)
    cards = {b.id: b.card_sha256 for b in bundles}
    outcomes: dict[tuple[str, str], Outcome] = {}
    todo: list[Job] = []
    skipped_done = 0
    for plan in plans:
        for job in plan.jobs:
            prior = None if force else _answer(store, job, cards[job.model_id], retry_failed=retry_failed)
            if prior is not None:
                outcomes[(job.study_key, job.model_id)] = prior
                skipped_done += 1
            else:
                todo.append(job)
    n, worst = concurrency(todo, bundles, workers, max_memory)
    share = max_memory // n if max_memory else None
    local = cluster in (None, "local")
    threads = max(1, _cpus() // n) if local and (n > 1 or cluster) else None
    todo = [replace(j, max_memory=share, threads=threads) for j in todo]
    log.info("triage: %d studies, %d jobs to run (%d already done), %d at once (largest predicted peak %d MB)",
             len(plans), len(todo), skipped_done, n, worst // 2**20)
    if cluster:
        execute = run_dask(cluster, n)
    elif n > 1:
        execute = run_pool(n)
    else:
        execute = run_inline
    by_key = {(j.study_key, j.model_id): j for j in todo}
    remaining = {p.study_key: sum(1 for j in todo if j.study_key == p.study_key) for p in plans}
    total_studies = sum(1 for v in remaining.values() if v)
    studies_done = ran = failed = 0
    if progress:
        progress(0, total_studies)
    for outcome in execute(todo):
        for body in outcome.audit:
            audit.record(**body)  # a cluster worker's records, written by the coordinator
        outcome = _record(store, outcome, by_key[(outcome.study_key, outcome.model_id)],
                          cards.get(outcome.model_id, ""))
        outcomes[(outcome.study_key, outcome.model_id)] = outcome
        ran += 1
        if outcome.status != STATUS_DONE:
            failed += 1
            log.warning("study %s model %s failed: %s", outcome.study_key, outcome.model_id, outcome.reason)
        remaining[outcome.study_key] -= 1
        if remaining[outcome.study_key] == 0:
            studies_done += 1
            if progress:
                progress(studies_done, total_studies)
    rows = rank([_row(plan, outcomes) for plan in plans])
    return TriageReport(rows, ran, skipped_done, failed, time.perf_counter() - t0, n, broken.unattributed)


def _answer(store: ResultsStore, job: Job, card_sha256: str, *, retry_failed: bool) -> Outcome | None:
    """The stored outcome that answers ``job`` (any surface's run of the same model version on
    the same series content, files present; a failure unless retrying failures), or None."""
    from medai.results import reuse

    prior = store.find(job.series_key, job.inputs_digest, job.model_id, job.model_version, card_sha256,
                       include_failed=True)
    if prior is None or (not prior.done and retry_failed):
        return None
    if prior.done:
        prior = reuse(store, job.request(), card_sha256=card_sha256)
        if prior is None:
            return None
    return Outcome.from_run(prior, job.study_key, job.series_uid)


def _record(store: ResultsStore, outcome: Outcome, job: Job, card_sha256: str) -> Outcome:
    """Commit one finished job to the results store (its folder moved into place first);
    returns the outcome with the stored file paths."""
    if outcome.run is not None and outcome.run.done:
        committed = store.commit(outcome.run, written=outcome.run.folder)
        return Outcome.from_run(committed, outcome.study_key, outcome.series_uid, seconds=outcome.seconds)
    store.commit(failed_run(job.request(), outcome.reason, card_sha256=card_sha256))
    return outcome


def _row(plan: StudyPlan, outcomes: Mapping[tuple[str, str], Outcome]) -> StudyRow:
    row = StudyRow(plan.study_key, plan.accession_number, plan.patient_id, plan.study_date, plan.modalities,
                   STATUS_NO_MATCH)
    results = [outcomes[(plan.study_key, j.model_id)] for j in plan.jobs if (plan.study_key, j.model_id) in outcomes]
    failures = [f"{m}: {why}" if m != "*" else why for m, why in sorted(plan.blocked.items())]
    failures += [f"{o.model_id}: {o.reason}" for o in results if o.status != STATUS_DONE]
    done = [o for o in results if o.status == STATUS_DONE]
    row.models = [o.model_id for o in results]
    if failures:
        row.status = f"{STATUS_FAILED}: " + "; ".join(failures)
    elif done:
        row.status = STATUS_DONE
    elif plan.jobs:
        row.status = STATUS_NOT_RUN
    if not done:
        row.reasons = "; ".join(f"{m}: {why}" for m, why in sorted(plan.skipped.items()))
        return row
    best = max(done, key=lambda o: (float(o.priority.get("score", 0.0)),
                                    LEVEL_RANK.get(o.priority.get("level", "routine"), 0)))
    row.priority = best.priority.get("level", "routine")
    row.score = float(best.priority.get("score", 0.0))
    qc_states = [qc_state(o.qc) for o in done]
    row.qc = "fail" if "fail" in qc_states else "warn" if "warn" in qc_states else "pass" if "pass" in qc_states else ""
    parts = []
    for o in done:
        parts += [f"{o.model_id}:{name}={value:g} mL" for name, value in o.volumes_ml.items()]
        parts += [f"{o.model_id}:{m['name']}={float(m['value']):g} {m['unit']}" for m in o.measurements]
    row.measurements = "; ".join(parts)
    row.findings = "; ".join(f for o in done for f in o.findings)
    row.reasons = "; ".join(r for o in done for r in o.priority.get("reasons", []))
    row.results = "; ".join(str(Path(o.outputs["result"]).parent) for o in done if "result" in o.outputs)
    return row


def _no_result_order(status: str) -> int:
    if status.startswith(STATUS_FAILED):
        return 0  # someone has to look at why
    return 1 if status == STATUS_NOT_RUN else 2


def rank(rows: Iterable[StudyRow]) -> list[StudyRow]:
    """Reader order: QC failures, then by the card-defined priority (score, level), then
    studies without a result (failed, not run, no match); ties by study key so the
    order is reproducible."""
    def key(row: StudyRow) -> tuple[Any, ...]:
        has_result = bool(row.priority)
        return reader_order(row.qc, has_result, row.score, row.priority,
                            (row.status != STATUS_DONE) + (0 if has_result else _no_result_order(row.status)),
                            row.study_key)

    return sorted(rows, key=key)


# --------------------------------------------------------------------------- output

COLUMNS = ["rank", "study_key", "accession_number", "patient_id", "study_date", "modalities", "status",
           "priority", "score", "qc", "models", "measurements", "findings", "reasons", "results"]


def worklist_records(rows: Sequence[StudyRow]) -> list[dict[str, Any]]:
    return [{"rank": i + 1, **r.to_json(), "models": ",".join(r.models)} for i, r in enumerate(rows)]


def write_worklist(rows: Sequence[StudyRow], path: Path, fmt: str | None = None) -> Path:
    """Write the worklist atomically as CSV or JSON (by ``fmt`` or the file suffix)."""
    fmt = (fmt or path.suffix.lstrip(".") or "csv").lower()
    if fmt not in {"csv", "json"}:
        raise ConfigError(f"{path}: worklist format must be csv or json, not {fmt!r}")
    records = worklist_records(rows)
    if fmt == "json":
        text = json.dumps({"not_for_diagnostic_use": True, "studies": records}, indent=2)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        text = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path
