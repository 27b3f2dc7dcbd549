"""The results store: every model run from every surface, in one place with one index.

``medai run``, the UI, the PACS hook and triage all land their runs here::

    MEDAI_HOME/results/index.sqlite      one row per run (this module)
    MEDAI_HOME/results/<run id>/         seg.dcm, sr.dcm, mask.nii.gz, result.json, extras

A run id is random; the index holds pseudonymous study and series keys (keyed HMAC
of the UIDs), never clear UIDs or patient identifiers. A run of the same model
version (and card) on the same series content (digest of its SOP Instance UIDs) is
found again by :meth:`ResultsStore.find` and reused by every surface instead of
repeated (:func:`obtain`). A run's review state follows the clinician:
``new`` → ``accepted`` or ``rejected``; an accepted run goes out (``sent``, or
``send_failed`` with a retry). Reviews and reuses are audit events.

The data path reads one way: index → study model (:mod:`medai.dicom.index`) →
routing (:mod:`medai.routing`) → run (:mod:`medai.inference.run`) → this store →
outputs and destinations (:mod:`medai.dicom.outputs`, :mod:`medai.pacs.sender`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medai import home
from medai.durable import fsync_dir, pid_alive
from medai.errors import ConfigError, MedaiError

log = logging.getLogger("medai.results")

#: Where a run was asked for.
SURFACES = ("cli", "ui", "pacs", "triage")
#: Review states, in the order a result moves through them.
REVIEW_STATES = ("new", "accepted", "rejected", "sent", "send_failed")
STATUS_DONE = "done"
STATUS_FAILED = "failed"
LEVEL_RANK = {"routine": 0, "review": 1, "urgent": 2}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    series_key TEXT NOT NULL,
    content_digest TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    card_sha256 TEXT NOT NULL,
    surface TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    priority_level TEXT NOT NULL DEFAULT '',
    priority_score REAL NOT NULL DEFAULT 0,
    qc TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '{}',
    folder TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '{}',
    sources TEXT NOT NULL DEFAULT '[]',
    prompted INTEGER NOT NULL DEFAULT 0,
    review TEXT NOT NULL DEFAULT 'new',
    reviewer TEXT NOT NULL DEFAULT '',
    review_comment TEXT NOT NULL DEFAULT '',
    reviewed_at REAL,
    send_error TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_series ON runs(series_key, model_id, model_version);
CREATE INDEX IF NOT EXISTS runs_study ON runs(study_key);
"""
#: Columns added after the first release of the store, added to an older index on open.
_ADDED_COLUMNS = {"destination": "TEXT NOT NULL DEFAULT ''"}


@dataclass(frozen=True)
class StoredRun:
    """One model run as the store knows it (a value; the store is the only writer)."""

    run_id: str
    study_key: str
    series_key: str
    content_digest: str
    model_id: str
    model_version: str
    card_sha256: str
    surface: str
    status: str
    created: float
    folder: Path
    reason: str = ""
    modality: str = ""
    study_date: str = ""
    priority_level: str = ""
    priority_score: float = 0.0
    qc: str = ""
    #: volumes_ml, measurements, findings, qc, priority reasons, backend: what a worklist shows.
    summary: Mapping[str, Any] = field(default_factory=dict)
    #: kind (result, mask, seg, sr, extra names) → file name inside ``folder``.
    outputs: Mapping[str, str] = field(default_factory=dict)
    #: The source instance files (to reopen the series in the viewer).
    sources: tuple[str, ...] = ()
    prompted: bool = False
    review: str = "new"
    reviewer: str = ""
    review_comment: str = ""
    reviewed_at: float | None = None
    send_error: str = ""
    #: Where an accepted result goes when it is not pacs.destination (e.g. the Orthanc it came from).
    destination: str = ""

    @property
    def done(self) -> bool:
        return self.status == STATUS_DONE

    def path(self, kind: str) -> Path | None:
        """The output file of that kind (``seg``, ``sr``, ``mask``, ``result``), if the run wrote it."""
        name = self.outputs.get(kind)
        return self.folder / name if name else None

    def files_present(self) -> bool:
        return self.folder.is_dir() and all((self.folder / n).is_file() for n in self.outputs.values() if n)

    def to_json(self) -> dict[str, Any]:
        """Everything but the source paths (which may name the patient's folders)."""
        return {"run_id": self.run_id, "study_key": self.study_key, "series_key": self.series_key,
                "content_digest": self.content_digest, "model": self.model_id, "version": self.model_version,
                "card_sha256": self.card_sha256, "surface": self.surface, "status": self.status,
                "reason": self.reason, "created": _iso(self.created), "modality": self.modality,
                "study_date": self.study_date, "priority": self.priority_level, "score": self.priority_score,
                "qc": self.qc, "summary": dict(self.summary), "folder": str(self.folder),
                "outputs": dict(self.outputs), "prompted": self.prompted, "review": self.review,
                "reviewer": self.reviewer, "review_comment": self.review_comment,
                "reviewed_at": _iso(self.reviewed_at) if self.reviewed_at else None,
                "send_error": self.send_error, "destination": self.destination}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


_COLUMNS = ("run_id", "study_key", "series_key", "content_digest", "model_id", "model_version", "card_sha256",
            "surface", "status", "reason", "created", "modality", "study_date", "priority_level", "priority_score",
            "qc", "summary", "folder", "outputs", "sources", "prompted", "review", "reviewer", "review_comment",
            "reviewed_at", "send_error", "destination")


def _to_row(run: StoredRun) -> tuple[Any, ...]:
    values = {**{c: getattr(run, c, None) for c in _COLUMNS},
              "summary": json.dumps(dict(run.summary), default=str, sort_keys=True),
              "outputs": json.dumps(dict(run.outputs), sort_keys=True),
              "sources": json.dumps(list(run.sources)), "folder": str(run.folder), "prompted": int(run.prompted)}
    return tuple(values[c] for c in _COLUMNS)


def _from_row(row: Sequence[Any]) -> StoredRun:
    v = dict(zip(_COLUMNS, row))
    v["summary"] = json.loads(v["summary"] or "{}")
    v["outputs"] = json.loads(v["outputs"] or "{}")
    v["sources"] = tuple(json.loads(v["sources"] or "[]"))
    v["folder"] = Path(v["folder"])
    v["prompted"] = bool(v["prompted"])
    return StoredRun(**v)


class ResultsStore:
    """The index of every run (SQLite, WAL, each write durable when it returns).

    Several processes may share it (the UI, ``medai pacs listen``, triage): SQLite's
    locking serialises writers."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else home.results_index()
        self.root = self.path.parent
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self, *, create: bool) -> sqlite3.Connection | None:
        """The connection; reading a store that does not exist yet creates nothing (an install
        whose audit trail refuses every operation writes no file at all)."""
        if self._conn is None:
            if not create and not self.path.exists():
                return None
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            have = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
            for column, decl in _ADDED_COLUMNS.items():
                if column not in have:
                    conn.execute(f"ALTER TABLE runs ADD COLUMN {column} {decl}")
            self._conn = conn
        return self._conn

    def _write(self, sql: str, args: Sequence[Any]) -> None:
        with self._lock:
            db = self._db(create=True)
            assert db is not None
            db.execute(sql, tuple(args))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading --------------------------------------------------------------
    def _select(self, where: str = "", args: Sequence[Any] = (), order: str = "created DESC",
                limit: int | None = None) -> list[StoredRun]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM runs"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order}"
        if limit:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            db = self._db(create=False)
            rows = db.execute(sql, tuple(args)).fetchall() if db is not None else []
        return [_from_row(r) for r in rows]

    def get(self, run_id: str) -> StoredRun:
        found = self._select("run_id=?", (run_id,))
        if not found:
            raise MedaiError(f"no run {run_id!r} in the results store ({self.path})")
        return found[0]

    def find(self, series_key: str, content_digest: str, model_id: str, model_version: str,
             card_sha256: str | None = None, *, include_failed: bool = False) -> StoredRun | None:
        """The newest unprompted run of this model version on this series content (done only,
        unless ``include_failed``) whose files are still there, or None."""
        where = ("series_key=? AND content_digest=? AND model_id=? AND model_version=? AND prompted=0")
        args: list[Any] = [series_key, content_digest, model_id, model_version]
        if card_sha256:
            where += " AND card_sha256=?"
            args.append(card_sha256)
        if not include_failed:
            where += " AND status=?"
            args.append(STATUS_DONE)
        for run in self._select(where, args):
            if not run.done or run.files_present():
                return run
        return None

    def runs(self, *, study_key: str | None = None, series_key: str | None = None, model_id: str | None = None,
             status: str | None = None, review: str | None = None, surface: str | None = None,
             latest_only: bool = True, limit: int | None = None) -> list[StoredRun]:
        """Runs, newest first; with ``latest_only`` one per (series, model) (the newest)."""
        clauses, args = [], []
        for column, value in (("study_key", study_key), ("series_key", series_key), ("model_id", model_id),
                              ("status", status), ("review", review), ("surface", surface)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        found = self._select(" AND ".join(clauses), args)
        if latest_only:
            seen: set[tuple[str, str]] = set()
            unique = []
            for run in found:
                if (run.series_key, run.model_id) not in seen:
                    seen.add((run.series_key, run.model_id))
                    unique.append(run)
            found = unique
        return found[:limit] if limit else found

    # -- writing --------------------------------------------------------------
    def commit(self, run: StoredRun, written: Path | None = None) -> StoredRun:
        """Record a run; ``written`` (its temporary folder) is renamed to the run's folder first,
        so a run in the index always has its files (a crash leaves only a hidden ``.part``)."""
        if run.surface not in SURFACES:
            raise ConfigError(f"unknown surface {run.surface!r}")
        if written is not None:
            final = self.root / run.run_id
            os.replace(written, final)
            fsync_dir(self.root)
            run = replace(run, folder=final)
        self._write(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES "
                    f"({', '.join('?' * len(_COLUMNS))})", _to_row(run))
        return run

    def set_review(self, run_id: str, state: str, *, reviewer: str = "", comment: str = "",
                   send_error: str = "") -> StoredRun:
        if state not in REVIEW_STATES:
            raise ConfigError(f"unknown review state {state!r}; one of {', '.join(REVIEW_STATES)}")
        if reviewer or state in ("accepted", "rejected"):
            self._write("UPDATE runs SET review=?, reviewer=?, review_comment=?, reviewed_at=?, send_error=? "
                        "WHERE run_id=?", (state, reviewer, comment, time.time(), send_error, run_id))
        else:
            self._write("UPDATE runs SET review=?, send_error=? WHERE run_id=?", (state, send_error, run_id))
        return self.get(run_id)

    def set_destination(self, run_id: str, destination: str) -> None:
        """Where this run goes once accepted (the PACS hook names the sender it came from)."""
        self._write("UPDATE runs SET destination=? WHERE run_id=?", (destination, run_id))

    def clean_partial(self) -> int:
        """Remove folders of runs whose process died before they were recorded (each
        ``.part`` folder names its writer's process id; a live writer's is left alone)."""
        removed = 0
        for part in self.root.glob(".*.part"):
            pid = part.name[:-len(".part")].rpartition("-p")[2]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            shutil.rmtree(part, ignore_errors=True)
            removed += 1
        return removed




# --------------------------------------------------------------------------- keys

def key(uid: str) -> str:
    """The pseudonymous key of a Study/Series Instance UID (keyed HMAC of this install)."""
    from medai.compliance import pseudonym

    return pseudonym(uid)


def qc_state(qc: Mapping[str, Any]) -> str:
    """``fail``/``warn``/``pass`` from a pipeline's QC mapping (its own ``status``/``verdict``/
    ``passed``, or the worst of its sections' verdicts), or '' when it has none."""
    verdict = qc.get("status") or qc.get("verdict")
    if isinstance(verdict, str) and verdict.lower() in {"fail", "warn", "pass"}:
        return verdict.lower()
    if qc.get("passed") is False:
        return "fail"
    if qc.get("passed") is True:
        return "pass"
    nested = {qc_state(v) for v in qc.values() if isinstance(v, Mapping)}
    return next((s for s in ("fail", "warn", "pass") if s in nested), "")


def reader_order(qc: str, has_result: bool, score: float, level: str, status_rank: int, tie: str) -> tuple[Any, ...]:
    """The one ranking of studies for a reader, used by triage and the worklist: QC failures
    first, then results by the card-defined priority (score, level), then studies without a
    result (``status_rank``: failed 0, not run 1, no match 2); ties by a stable key."""
    return (0 if qc == "fail" else 1, 0 if has_result else 1, -score, -LEVEL_RANK.get(level, 0),
            status_rank, tie)


# --------------------------------------------------------------------------- running

Patient = tuple[str | None, str | None]


@dataclass(frozen=True)
class Request:
    """One model on one series, as any surface asks for it. Plain data, so a triage job can
    carry it to another process or cluster worker."""

    model_id: str
    model_version: str
    series_uid: str
    study_uid: str
    files: tuple[str, ...]
    content_digest: str
    surface: str
    #: Pseudonymous keys, made by the requesting process with this install's key (a cluster
    #: worker may have other keys or none).
    study_key: str
    series_key: str
    modality: str = ""
    study_date: str = ""
    #: The index entry the request was made from, when this process has it: the loader then
    #: reads the headers once (not carried to other processes' requests, where it is None).
    entry: Any = field(default=None, compare=False, repr=False)


def request_for(series: Any, model_id: str, model_version: str, surface: str, *, study_date: str = "") -> Request:
    """A :class:`Request` for one :class:`~medai.dicom.index.SeriesEntry`."""
    return Request(model_id, model_version, series.series_instance_uid, series.study_instance_uid,
                   tuple(str(Path(p).absolute()) for p in series.files), series.content_digest, surface,
                   key(series.study_instance_uid), key(series.series_instance_uid), series.modality, study_date,
                   series)


def request_from_source(source: Path, model_id: str, surface: str, *, series_uid: str | None = None,
                        allow_unsigned: bool | None = None) -> tuple[Request, Patient]:
    """Index a DICOM file or folder (headers only) and pick the series ``model_id`` reads:
    ``series_uid`` when given, else the one the routing decision picks. Returns the request and
    the series' clear (PatientID, PatientName), for the audit trail only."""
    from medai.dicom.index import scan
    from medai.errors import DicomInputError
    from medai.inference import registry
    from medai.routing import decide

    bundle = registry.get_bundle(model_id, allow_unsigned=allow_unsigned)
    index = scan([source])
    if series_uid is None:
        chosen, why = decide(list(index.series.values()), bundles=[bundle], automatic_only=False)
        if not chosen:
            raise DicomInputError(source, f"no series matches model {bundle.id} "
                                          f"({why.get(bundle.id) or 'no DICOM image series found'}); use --series UID")
        entry = chosen[0].series
    elif series_uid in index.series:
        entry = index.series[series_uid]
    else:
        raise DicomInputError(source, f"series {series_uid} not found")
    study = index.studies[entry.study_instance_uid]
    person = index.patients.get(entry.patient_key)
    patient = (person.patient_id or None, person.patient_name or None) if person else (None, None)
    return request_for(entry, bundle.id, str(bundle.version), surface, study_date=study.study_date), patient


def source_identity(path: str | Path) -> dict[str, str | None]:
    """Study/series UIDs and clear patient identifiers from one source header, for the audit
    trail (which pseudonymises them) and a page's display only; never for logs or file names."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID"])
    return {"patient_id": str(ds.get("PatientID", "") or "") or None,
            "patient_name": str(ds.get("PatientName", "") or "") or None,
            "study_uid": str(ds.get("StudyInstanceUID", "") or "") or None,
            "series_uid": str(ds.get("SeriesInstanceUID", "") or "") or None}


def _patient(req: Request, patient: Patient) -> Patient:
    if patient != (None, None) or not req.files:
        return patient
    ids = source_identity(req.files[0])
    return ids["patient_id"], ids["patient_name"]


def new_run_id() -> str:
    """A run id: UTC time (sortable) and 32 random bits; never derived from a UID."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def reuse(store: ResultsStore, req: Request, *, card_sha256: str | None = None, patient: Patient = (None, None)) -> StoredRun | None:
    """A stored run answering ``req`` (same model version and card, same series content, files
    present), recorded in the audit trail as reused; None when there is none."""
    prior = store.find(req.series_key, req.content_digest, req.model_id, req.model_version, card_sha256)
    if prior is None:
        return None
    from medai.compliance import audit

    patient = _patient(req, patient)
    audit.record("result_reused", patient_id=patient[0], patient_name=patient[1], study_uid=req.study_uid,
                 series_uid=req.series_uid,
                 detail={"model": req.model_id, "version": req.model_version, "run": prior.run_id,
                         "surface": req.surface, "first_surface": prior.surface})
    return prior


def execute(req: Request, store_root: Path, *, volume: Any = None, patient: Patient = (None, None),
            prompt: Any = None, device: str | None = None, threads: int | None = None,
            max_memory: int | str | None = None, allow_unsigned: bool | None = None,
            precision: str | None = None, bundle: Any = None) -> StoredRun:
    """Run the model into a new run folder under ``store_root`` and return the run, not yet
    recorded (the caller commits it: on a cluster, the coordinator does). Raises on failure
    after the run's audit record is written (by the runner)."""
    from medai.inference import registry
    from medai.inference.run import prepare, run_on_volume

    bundle = bundle or registry.get_bundle(req.model_id, allow_unsigned=allow_unsigned)
    if bundle.version != req.model_version:
        raise MedaiError(f"model {req.model_id} is now version {bundle.version}, asked for {req.model_version}")
    prepare(bundle, device=device, threads=threads, precision=precision)  # sessions while the series is read
    patient = _patient(req, patient)
    load_seconds = None
    if volume is None:
        from medai.dicom.volume import load_series

        t0 = time.perf_counter()
        volume = load_series(req.entry if req.entry is not None else [Path(p) for p in req.files],
                             series_uid=req.series_uid)
        load_seconds = time.perf_counter() - t0
    run_id = new_run_id()
    tmp = store_root / f".{run_id}-p{os.getpid()}.part"
    tmp.mkdir(mode=0o700, parents=True)
    try:
        result = run_on_volume(bundle, volume, tmp, device=device, max_memory=max_memory, prompt=prompt,
                               threads=threads, patient=patient, precision=precision, load_seconds=load_seconds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    outputs = {kind: p.name for kind, p in (("result", result.result_path), ("mask", result.mask_path),
                                            ("seg", result.seg_path), ("sr", result.sr_path)) if p}
    data = json.loads(result.result_path.read_text(encoding="utf-8"))
    for extra in (data.get("outputs") or {}).get("extra") or []:
        outputs[f"extra:{extra}"] = extra
    summary = {"volumes_ml": dict(result.volumes_ml),
               "measurements": [{"name": m.name, "value": m.value, "unit": m.unit} for m in result.measurements],
               "findings": [f.text for f in result.findings], "qc": data.get("qc") or {},
               "reasons": list(result.priority.reasons), "provider": result.provider,
               "precision": result.precision,
               "caveats": list(data.get("caveats") or []), "seconds": round(result.timings.get("total", 0.0), 2)}
    return StoredRun(run_id=run_id, study_key=req.study_key, series_key=req.series_key,
                     content_digest=req.content_digest, model_id=bundle.id, model_version=bundle.version,
                     card_sha256=bundle.card_sha256, surface=req.surface, status=STATUS_DONE, created=time.time(),
                     folder=tmp, modality=req.modality or volume.modality, study_date=req.study_date,
                     priority_level=result.priority.level, priority_score=float(result.priority.score),
                     qc=qc_state(data.get("qc") or {}), summary=summary, outputs=outputs, sources=req.files,
                     prompted=prompt is not None)


def failed_run(req: Request, reason: str, *, card_sha256: str = "") -> StoredRun:
    """The record of a run that failed (kept so triage does not retry a broken study unasked)."""
    return StoredRun(run_id=new_run_id(),
                     study_key=req.study_key, series_key=req.series_key,
                     content_digest=req.content_digest, model_id=req.model_id, model_version=req.model_version,
                     card_sha256=card_sha256, surface=req.surface, status=STATUS_FAILED, created=time.time(),
                     folder=Path(), reason=reason[:500], modality=req.modality, study_date=req.study_date,
                     sources=req.files)


def obtain(req: Request, *, store: ResultsStore | None = None, volume: Any = None, patient: Patient = (None, None),
           prompt: Any = None, force: bool = False, **run_kwargs: Any) -> tuple[StoredRun, bool]:
    """The result of ``req``: a stored one when the same model version already ran on the same
    series content (audited as reused), else a new run, recorded. Returns (run, reused).
    Prompted runs are never reused (the prompt is the clinician's), nor is anything when the
    caller names a device or precision (it asked for that run, not for any result)."""
    own = store is None
    store = store or ResultsStore()
    explicit = any(run_kwargs.get(k) not in (None, "", "auto") for k in ("device", "precision"))
    try:
        from medai.inference import registry

        # verified once here, for the reuse check and the run alike
        bundle = registry.get_bundle(req.model_id, allow_unsigned=run_kwargs.get("allow_unsigned"))
        if prompt is None and not force and not explicit:
            prior = reuse(store, req, card_sha256=bundle.card_sha256, patient=patient)
            if prior is not None:
                return prior, True
        run = execute(req, store.root, volume=volume, patient=patient, prompt=prompt, bundle=bundle, **run_kwargs)
        return store.commit(run, written=run.folder), False
    finally:
        if own:
            store.close()


def copy_outputs(run: StoredRun, folder: Path) -> Path:
    """Copy a run's files into ``folder`` (``medai run --out``): the store keeps its own copy."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in run.outputs.values():
        shutil.copyfile(run.folder / name, folder / name)
    return folder


def rank(runs: Iterable[StoredRun]) -> list[StoredRun]:
    """Runs in reader order (:func:`reader_order`)."""
    return sorted(runs, key=lambda r: reader_order(r.qc, r.done, r.priority_score, r.priority_level,
                                                   0 if not r.done else 1, r.study_key + r.run_id))


__all__ = ["ResultsStore", "StoredRun", "Request", "request_for", "request_from_source", "obtain", "execute", "reuse", "failed_run",
           "copy_outputs", "rank", "qc_state", "reader_order", "key", "SURFACES", "REVIEW_STATES"]
