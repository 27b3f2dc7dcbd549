"""Batch triage: many studies in, one ranked worklist out.

The graph, in order::

    folders ──► index (headers only) ──► per study × model: series selection (card rules)
            ──► jobs not yet done (state database) ──► executor (in-process, a local
                process pool, or an existing Dask cluster) ──► run_on_volume per job
            ──► state database (one row per finished job, committed at once)
            ──► worklist rows (one per study) ──► ranking ──► CSV / JSON / table

Resumable: every finished job is committed to ``MEDAI_HOME/triage/state.sqlite``
(keyed by pseudonymous study key, model id and model version) before the next
result is looked at, so Ctrl-C or SIGKILL loses at most the jobs in flight; a
rerun skips what is done unless ``force``. Failed jobs are remembered too and
retried only with ``retry_failed`` (a broken study fails the same way again).

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
import sqlite3
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from medai import config
from medai.errors import ConfigError, MedaiError

log = logging.getLogger("medai.triage")

LEVEL_RANK = {"routine": 0, "review": 1, "urgent": 2}
STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_NO_MATCH = "no matching series"


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
    out_dir: str
    max_memory: int | None = None
    threads: int | None = None


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
    #: Audit records made on a cluster worker, replayed into the coordinator's trail.
    audit: Sequence[Mapping[str, Any]] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("audit")
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Outcome":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "audit"}
        return cls(**known)


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


# --------------------------------------------------------------------------- state

class StateDB:
    """Finished jobs, one row per (study key, model id, model version)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or (config.home() / "triage" / "state.sqlite")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (study_key TEXT NOT NULL, model_id TEXT NOT NULL, "
            "model_version TEXT NOT NULL, status TEXT NOT NULL, outcome TEXT NOT NULL, finished REAL NOT NULL, "
            "PRIMARY KEY (study_key, model_id, model_version))")

    def get(self, study_key: str, model_id: str, model_version: str) -> Outcome | None:
        row = self._db.execute("SELECT outcome FROM jobs WHERE study_key=? AND model_id=? AND model_version=?",
                               (study_key, model_id, model_version)).fetchone()
        return Outcome.from_json(json.loads(row[0])) if row else None

    def put(self, outcome: Outcome) -> None:
        self._db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                         (outcome.study_key, outcome.model_id, outcome.model_version, outcome.status,
                          json.dumps(outcome.to_json(), default=str), time.time()))

    def close(self) -> None:
        self._db.close()


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


def _study_key(study_uid: str) -> str:
    from medai.compliance import pseudonym

    return pseudonym(study_uid)


def _first_header(files: Sequence[Path]) -> tuple[str, str]:
    """Accession number and patient ID of a study, for the worklist file only."""
    import pydicom

    for path in files[:3]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber", "PatientID"])
        except Exception:  # noqa: BLE001 - the index already accepted this file; be tolerant here
            continue
        return str(ds.get("AccessionNumber", "") or ""), str(ds.get("PatientID", "") or "")
    return "", ""


def plan_studies(index: Any, bundles: Sequence[Any], results_dir: Path, *,
                 max_memory: int | None = None, threads: int | None = None) -> list[StudyPlan]:
    """One :class:`StudyPlan` per study in ``index``: a job for each model whose card
    accepts one of the study's series (the best one by the card's ordering)."""
    from medai.inference.select import matching_series, series_matches

    plans = []
    for study_uid, study in sorted(index.studies.items()):
        series = index.series_of_study(study_uid)
        key = _study_key(study_uid)
        jobs: list[Job] = []
        skipped: dict[str, str] = {}
        for bundle in bundles:
            hits = matching_series(bundle.card, series)
            if not hits:
                reasons = sorted({series_matches(bundle.card, s)[1] for s in series})
                skipped[bundle.id] = "; ".join(reasons) or "no image series"
                continue
            best = hits[0]
            jobs.append(Job(key, study_uid, bundle.id, bundle.version, best.series_instance_uid,
                            tuple(str(p) for p in best.files), str(results_dir / key / bundle.id),
                            max_memory, threads))
        image_files = [p for s in series if s.is_image for p in s.files] or [p for s in series for p in s.files]
        accession, patient_id = _first_header(image_files)
        plans.append(StudyPlan(study_uid, key, jobs, skipped, accession, patient_id, study.study_date,
                               "/".join(sorted({s.modality for s in series if s.modality}))))
    return plans


# --------------------------------------------------------------------------- running one job

_WORKER_READY = False


def _worker_setup(threads: int | None = None) -> None:
    """Once per worker process: egress guard and telemetry off before any model library loads."""
    global _WORKER_READY
    if _WORKER_READY:
        return
    from medai.compliance import egress

    egress.install_for_entry_point("triage-worker")
    if threads:
        os.environ["MEDAI_THREADS"] = str(threads)
    _WORKER_READY = True


def run_job(job: Job, *, capture_audit: bool = False) -> Outcome:
    """Run one job; never raises for a bad study (the outcome says what went wrong).

    With ``capture_audit`` (cluster workers) the audit records are returned in the
    outcome instead of written here, and the coordinator writes them to its trail.
    """
    _worker_setup(job.threads)
    from medai.compliance import audit

    t0 = time.perf_counter()
    captured: list[Mapping[str, Any]] = []
    with (audit.capture(captured) if capture_audit else _nullcontext()):
        try:
            from medai.dicom.volume import load_series
            from medai.inference import registry
            from medai.inference.run import run_on_volume

            bundle = registry.get_bundle(job.model_id)
            if bundle.version != job.model_version:
                raise MedaiError(f"model {job.model_id} is now version {bundle.version}, "
                                 f"planned {job.model_version}; rerun triage")
            volume = load_series([Path(p) for p in job.files], series_uid=job.series_uid)
            result = run_on_volume(bundle, volume, job.out_dir, max_memory=job.max_memory, threads=job.threads)
        except MedaiError as exc:
            if type(exc).__name__ == "AuditWriteError":
                raise  # fail closed: the whole batch stops, nothing more is processed
            return Outcome(job.study_key, job.model_id, job.model_version, STATUS_FAILED,
                           f"{type(exc).__name__}: {exc}", job.series_uid,
                           seconds=time.perf_counter() - t0, audit=tuple(captured))
        except Exception as exc:  # noqa: BLE001 - one bad study never stops the batch
            log.exception("study %s model %s: unexpected error", job.study_key, job.model_id)
            return Outcome(job.study_key, job.model_id, job.model_version, STATUS_FAILED,
                           f"internal error ({type(exc).__name__})", job.series_uid,
                           seconds=time.perf_counter() - t0, audit=tuple(captured))
    outputs = {name: str(p) for name, p in (("result", result.result_path), ("mask", result.mask_path),
                                            ("seg", result.seg_path), ("sr", result.sr_path)) if p}
    return Outcome(
        job.study_key, job.model_id, job.model_version, STATUS_DONE, "", job.series_uid,
        volumes_ml=dict(result.volumes_ml),
        measurements=[{"name": m.name, "value": m.value, "unit": m.unit} for m in result.measurements],
        findings=[f.text for f in result.findings],
        qc=_plain(result.qc),
        priority={"level": result.priority.level, "score": result.priority.score,
                  "reasons": list(result.priority.reasons)},
        outputs=outputs, seconds=time.perf_counter() - t0, audit=tuple(captured))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars and tuples become plain values)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# --------------------------------------------------------------------------- executors

Executor = Callable[[Sequence[Job]], Iterator[Outcome]]


def run_inline(jobs: Sequence[Job]) -> Iterator[Outcome]:
    for job in jobs:
        yield run_job(job)


def run_pool(workers: int) -> Executor:
    """A local process pool (spawned processes: onnxruntime's threads do not survive fork)."""
    import multiprocessing

    def execute(jobs: Sequence[Job]) -> Iterator[Outcome]:
        ctx = multiprocessing.get_context("spawn")
        threads = jobs[0].threads if jobs else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_setup,
                                 initargs=(threads,)) as pool:
            pending: set[Future[Outcome]] = set()
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < workers:
                    pending.add(pool.submit(run_job, queue.pop(0)))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()

    return execute


def run_dask(address: str, workers: int) -> Executor:
    """Jobs on a Dask cluster: ``local`` starts one on this machine (loopback only, no
    dashboard); ``dask://host:port`` or ``tcp://host:port`` joins an existing scheduler,
    which must be a configured egress destination. Workers run :func:`run_job` with
    audit capture; the coordinator writes their records to its own trail."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError("cluster mode needs Dask: pip install 'medai[cluster]'") from None

    def execute(jobs: Sequence[Job]) -> Iterator[Outcome]:
        cluster = None
        if address == "local":
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   host="127.0.0.1", dashboard_address=None)
            client = Client(cluster)
        else:
            target = address.replace("dask://", "tcp://", 1)
            host_port = target.split("://", 1)[-1]
            host, _, port = host_port.rpartition(":")
            from medai.compliance import egress

            egress.allow(host, int(port))
            client = Client(target)
        try:
            futures = [client.submit(run_job, job, capture_audit=True, pure=False) for job in jobs]
            for fut in as_completed(futures):
                yield fut.result()
        finally:
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

    @property
    def exit_code(self) -> int:
        if not self.rows:
            return 1
        if all(r.status.startswith(STATUS_FAILED) for r in self.rows) or (
                self.ran == 0 and self.skipped_done == 0 and self.failed == 0):
            return 1
        return 3 if any(r.status.startswith(STATUS_FAILED) for r in self.rows) else 0


def concurrency(bundles: Sequence[Any], index: Any, requested: int, budget: int | None) -> int:
    """How many jobs may run at once: the request, capped by the memory budget divided by
    the largest predicted peak (planner) of any job, never below one."""
    if requested <= 1:
        return 1
    from medai.inference import planner

    budget = budget or _available_memory()
    worst = 0
    for entry in index.image_series:
        first = entry.instances[0] if entry.instances else None
        shape = (max(entry.frame_count, 1), (first.rows or 256) if first else 256, (first.columns or 256) if first else 256)
        for bundle in bundles:
            try:
                worst = max(worst, planner.plan(bundle, shape, None).predicted_bytes)
            except MedaiError:
                continue
    if worst <= 0:
        return requested
    return max(1, min(requested, budget // worst))


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        pass
    return 4 * 1024**3


def triage(paths: Sequence[Path], *, models: Sequence[str] | None = None, results_dir: Path,
           workers: int = 1, max_memory: int | None = None, force: bool = False, retry_failed: bool = False,
           cluster: str | None = None, state: StateDB | None = None,
           progress: Callable[[int, int], None] | None = None) -> TriageReport:
    """Run the batch and return the ranked worklist rows (see the module docstring)."""
    from medai.compliance import audit
    from medai.dicom.index import scan
    from medai.inference import registry

    t0 = time.perf_counter()
    bundles = [registry.get_bundle(m) for m in models] if models else registry.list_bundles()
    if not bundles:
        raise ConfigError("no model installed; see `medai models list`")
    index = scan(list(paths))
    audit.record("query", detail={"purpose": "triage", "studies": len(index.studies),
                                  "series": len(index.series), "skipped_files": len(index.skipped)})
    n = concurrency(bundles, index, workers, max_memory)
    threads = max(1, (os.cpu_count() or 1) // n) if n > 1 else None
    plans = plan_studies(index, bundles, results_dir, max_memory=max_memory, threads=threads)
    state = state or StateDB()
    outcomes: dict[tuple[str, str], Outcome] = {}
    todo: list[Job] = []
    skipped_done = 0
    for plan in plans:
        for job in plan.jobs:
            prior = None if force else state.get(job.study_key, job.model_id, job.model_version)
            if prior is not None and (prior.status == STATUS_DONE or not retry_failed):
                outcomes[(job.study_key, job.model_id)] = prior
                skipped_done += 1
            else:
                todo.append(job)
    log.info("triage: %d studies, %d jobs to run, %d already done, %d at once",
             len(plans), len(todo), skipped_done, n)
    if cluster:
        execute = run_dask(cluster, n)
    elif n > 1 and len(todo) > 1:
        execute = run_pool(n)
    else:
        execute = run_inline
    ran = failed = 0
    if progress:
        progress(0, len(todo))
    for outcome in execute(todo):
        for body in outcome.audit:
            audit.record(**body)  # a cluster worker's records, written by the coordinator
        state.put(outcome)
        outcomes[(outcome.study_key, outcome.model_id)] = outcome
        ran += 1
        failed += outcome.status != STATUS_DONE
        if outcome.status != STATUS_DONE:
            log.warning("study %s model %s failed: %s", outcome.study_key, outcome.model_id, outcome.reason)
        if progress:
            progress(ran, len(todo))
    rows = rank([_row(plan, outcomes, results_dir) for plan in plans])
    return TriageReport(rows, ran, skipped_done, failed, time.perf_counter() - t0)


def _row(plan: StudyPlan, outcomes: Mapping[tuple[str, str], Outcome], results_dir: Path) -> StudyRow:
    row = StudyRow(plan.study_key, plan.accession_number, plan.patient_id, plan.study_date, plan.modalities,
                   STATUS_NO_MATCH)
    results = [outcomes[(plan.study_key, j.model_id)] for j in plan.jobs if (plan.study_key, j.model_id) in outcomes]
    if not results:
        if plan.jobs:
            row.status = "not run"
        row.reasons = "; ".join(f"{m}: {why}" for m, why in sorted(plan.skipped.items()))
        return row
    failed = [o for o in results if o.status != STATUS_DONE]
    done = [o for o in results if o.status == STATUS_DONE]
    row.models = [o.model_id for o in results]
    row.status = (f"{STATUS_FAILED}: " + "; ".join(f"{o.model_id}: {o.reason}" for o in failed)) if failed else STATUS_DONE
    best = max(done, key=lambda o: (float(o.priority.get("score", 0.0)),
                                    LEVEL_RANK.get(o.priority.get("level", "routine"), 0)), default=None)
    if best is not None:
        row.priority = best.priority.get("level", "routine")
        row.score = float(best.priority.get("score", 0.0))
    qc_states = [_qc_state(o.qc) for o in done]
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


def _qc_state(qc: Mapping[str, Any]) -> str:
    """``fail``/``warn``/``pass`` from a pipeline's QC mapping, or '' when it has no verdict."""
    verdict = qc.get("status") or qc.get("verdict")
    if isinstance(verdict, str) and verdict.lower() in {"fail", "warn", "pass"}:
        return verdict.lower()
    if qc.get("passed") is False:
        return "fail"
    if qc.get("passed") is True:
        return "pass"
    return ""


def rank(rows: Iterable[StudyRow]) -> list[StudyRow]:
    """Reader order: QC failures, then by priority (score, level), then studies without a
    result (failed, not run, no match); ties by study key so the order is reproducible."""
    def key(row: StudyRow) -> tuple[Any, ...]:
        has_result = bool(row.priority)
        return (0 if row.qc_failed else 1, 0 if has_result else 1, -row.score,
                -LEVEL_RANK.get(row.priority, 0), row.status != STATUS_DONE, row.study_key)

    return sorted(rows, key=key)


# --------------------------------------------------------------------------- output

COLUMNS = ["rank", "study_key", "accession_number", "patient_id", "study_date", "modalities", "status",
           "priority", "score", "qc", "models", "measurements", "findings", "reasons", "results"]


def write_worklist(rows: Sequence[StudyRow], path: Path, fmt: str | None = None) -> Path:
    """Write the worklist atomically as CSV or JSON (by ``fmt`` or the file suffix)."""
    fmt = (fmt or path.suffix.lstrip(".") or "csv").lower()
    if fmt not in {"csv", "json"}:
        raise ConfigError(f"{path}: worklist format must be csv or json, not {fmt!r}")
    records = [{"rank": i + 1, **r.to_json(), "models": ",".join(r.models)} for i, r in enumerate(rows)]
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
