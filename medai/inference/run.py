"""Run a model on a series and write its results: the one entry point for CLI, UI, PACS and triage.

The graph, in order (each arrow is visible below, in :func:`run_on_volume`)::

    bundle (verified) → series selection → Volume → plan (memory) → pipeline
      (steps recorded, ONNX sessions via backends) → labels on the source grid
      → seg.dcm + mask.nii.gz + result.json (+ sr.dcm: measurements, or a refusal's "not measurable")

Audit: ``instances_accessed`` when a series is loaded for a model, ``model_run``
when it finished (or failed), both naming the study/series/instances. When the
trail cannot be written the run does not happen (``AuditWriteError`` propagates).

Output folder layout for :func:`run_model`: files directly in ``out_dir``. The surfaces
(``medai run``, the UI, the PACS hook, triage) run through :mod:`medai.results`, which
calls :func:`run_on_volume` into a run folder of the one results store.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from medai import __version__, config
from medai.assist import caveats
from medai.errors import DicomInputError, MedaiError, ModelIntegrityError, PromptError
from medai.compliance import audit as _audit
from medai.inference import backends, planner, registry, tune
from medai.inference.bundle import Bundle
from medai.inference.pipeline import (Finding, Measurement, Pipeline, PipelineContext, PipelineOutput, Priority,
                                      Prompt)
from medai.inference.steps import StepRunner

if TYPE_CHECKING:  # pragma: no cover - the DICOM reader (pydicom) is imported where a series is read
    from medai.dicom.volume import Volume

log = logging.getLogger("medai.inference")


@dataclass(frozen=True)
class RunResult:
    """What one model run on one series produced (all paths inside ``out_dir``)."""

    model_id: str
    model_version: str
    series_uid: str
    study_uid: str
    out_dir: Path
    result_path: Path
    mask_path: Path
    seg_path: Path | None
    sr_path: Path | None
    #: Label name → volume in mL.
    volumes_ml: Mapping[str, float]
    measurements: tuple[Measurement, ...]
    findings: tuple[Finding, ...]
    qc: Mapping[str, Any]
    priority: Priority
    provider: str
    timings: Mapping[str, float]
    memory: Mapping[str, Any] = field(default_factory=dict)
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    #: Precision(s) the provider(s) really computed in (fp32, bf16, fp16, int8).
    precision: str = "fp32"

    def summary(self) -> dict[str, Any]:
        return {"model": self.model_id, "version": self.model_version, "series_uid": self.series_uid,
                "out_dir": str(self.out_dir), "seg": str(self.seg_path) if self.seg_path else None,
                "mask": str(self.mask_path), "result": str(self.result_path),
                "sr": str(self.sr_path) if self.sr_path else None, "volumes_ml": dict(self.volumes_ml),
                "priority": self.priority.level, "provider": self.provider, "precision": self.precision,
                "seconds": round(self.timings.get("total", 0.0), 2)}


def load_pipeline(bundle: Bundle) -> Pipeline:
    """Import ``medai.inference.pipelines.<card pipeline>`` and ``create(bundle)``."""
    name = bundle.card.pipeline
    try:
        module = importlib.import_module(f"medai.inference.pipelines.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"medai.inference.pipelines.{name}":
            raise ModelIntegrityError(f"model {bundle.id}: pipeline {name!r} is not part of this medai "
                                      "(upgrade medai or fix the card)") from None
        raise
    pipeline = module.create(bundle)
    if not isinstance(pipeline, Pipeline):
        raise ModelIntegrityError(f"pipeline {name!r} does not implement medai.inference.pipeline.Pipeline")
    return pipeline


Patient = tuple[str | None, str | None]  # clear (PatientID, PatientName), only for the audit trail


def _load_volume(source: Path, series_uid: str | None, bundle: Bundle,
                 allow_unsigned: bool | None = None) -> tuple[Volume, Patient]:
    """A Volume from a NIfTI/NRRD file or a DICOM file/folder (series chosen by the card)."""
    lower = source.name.lower()
    if source.is_file() and lower.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(source), sitk.sitkFloat32)
        except RuntimeError as exc:
            raise DicomInputError(source, f"cannot read image ({exc})") from None
        if image.GetDimension() == 4:
            image = image[:, :, :, 0]
        from medai.dicom.volume import Volume

        return Volume.from_sitk(image, modality=""), (None, None)
    from medai.dicom.volume import load_series
    from medai.results import request_from_source

    req, patient = request_from_source(source, bundle.id, "cli", series_uid=series_uid,
                                       allow_unsigned=allow_unsigned)
    return load_series(req.entry, series_uid=req.series_uid), patient


def _apply_rules(bundle: Bundle, measurements: tuple[Measurement, ...], volumes: Mapping[str, float]) -> Priority:
    values = {m.name: m.value for m in measurements}
    values.update({f"volume_ml:{k}": v for k, v in volumes.items()})
    rank = {"routine": 0, "review": 1, "urgent": 2}
    level, reasons = "routine", []
    for rule in bundle.card.priority_rules:
        if rule.measurement in values and rule.matches(values[rule.measurement]):
            reasons.append(rule.reason or f"{rule.measurement} {rule.op} {rule.value:g}")
            if rank[rule.level] > rank[level]:
                level = rule.level
    return Priority(level, {"routine": 0.0, "review": 0.5, "urgent": 1.0}[level], tuple(reasons))  # type: ignore[arg-type]


def _audit_ids(volume: Volume, patient: Patient) -> dict[str, Any]:
    return {"patient_id": patient[0], "patient_name": patient[1],
            "study_uid": volume.study_instance_uid or None, "series_uid": volume.series_instance_uid or None,
            "instance_uids": tuple(s.sop_instance_uid for s in volume.sources)}


def write_mask(volume: Volume, labels: np.ndarray, path: Path) -> None:
    from medai.dicom.outputs.nifti import write_nifti

    write_nifti(labels, volume.geometry, path)


def prepare(bundle: Bundle, *, device: str | None = None, threads: int | None = None,
            precision: str | None = None) -> None:
    """Start, in the background, what a run of ``bundle`` needs that does not depend on the
    series: its graphs' sessions (:func:`medai.inference.backends.prepare_sessions`). Called
    before the series is read, so that the two overlap. Not when this run is to tune the
    machine first (``tune_on_first_use = "upfront"`` on an untuned machine): the tuning
    decides which sessions the run makes. Raises AuditWriteError first, in either case, when
    the audit trail cannot be written: the series is not read either."""
    _audit.announce()  # a trail that cannot be written stops the run before anything starts
    auto = all(str(config.get(k, v) or "auto").lower() == "auto" for k, v in (("device", device),
                                                                           ("precision", precision)))
    if auto and str(config.get("tune_on_first_use") or "background").lower() == "upfront" and tune.untuned(bundle):
        return
    backends.prepare_sessions(bundle, device=device, threads=threads, precision=precision)


def run_on_volume(bundle: Bundle, volume: Volume, out_dir: str | Path, *, device: str | None = None,
                  max_memory: int | str | None = None, prompt: Prompt | Mapping[str, Any] | None = None,
                  threads: int | None = None, patient: Patient = (None, None),
                  precision: str | None = None, load_seconds: float | None = None) -> RunResult:
    """Run ``bundle`` on an already loaded ``volume`` and write the outputs to ``out_dir``.

    ``patient``: the clear (PatientID, PatientName) of the series when the caller knows
    them (from the DICOM index); they go to the audit trail only, which pseudonymises them.
    ``load_seconds``: how long the caller took to load ``volume`` (recorded in the timings).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _audit_ids(volume, patient)
    t0 = time.perf_counter()
    _audit.record("instances_accessed", **ids, detail={"purpose": "model_run", "model": bundle.id})
    t_audit = time.perf_counter() - t0
    budget = config.get("max_memory", max_memory)
    budget = config.parse_size(budget) if budget is not None else None
    plan = planner.plan(bundle, volume.shape, budget, device=device)
    pipeline = load_pipeline(bundle)
    if prompt is not None and not isinstance(prompt, Prompt):
        try:
            prompt = Prompt.from_dict(prompt)
        except ValueError as exc:
            raise PromptError(f"model {bundle.id}: {exc}") from None
    if prompt is not None and not pipeline.accepts_prompt:
        raise PromptError(f"model {bundle.id} does not take prompts (--plane/--slice/--box)")
    sessions: dict[tuple[str, str], backends.Session] = {}
    # Tuning on first use only where this machine's choice is asked for (no explicit device/precision).
    auto = all(str(config.get(k, v) or "auto").lower() == "auto" for k, v in (("device", device),
                                                                           ("precision", precision)))
    first_use = tune.on_first_use(bundle, "before", threads=threads) if auto else None

    def session_for(b: Bundle, key: str) -> backends.Session:
        """Sessions for this bundle and for bundles a pipeline builds on (e.g. a mask model),
        all with the run's device/threads and all reported in the result's provider list."""
        if (b.id, key) not in sessions:
            t0 = time.perf_counter()
            sessions[(b.id, key)] = backends.get_session(b, key, device=device, threads=threads,
                                                         precision=precision)
            label = key if b.id == bundle.id else f"{b.id}:{key}"
            ctx.timings[f"session_{label}"] = time.perf_counter() - t0
        return sessions[(b.id, key)]

    def session(key: str) -> backends.Session:
        return session_for(bundle, key)

    ctx = PipelineContext(bundle=bundle, session=session, plan=plan, steps=StepRunner(bundle.card), prompt=prompt,
                          session_for=session_for)
    ctx.steps.bind(ctx)
    if load_seconds is not None:
        ctx.timings["load"] = load_seconds
    planner.reset_peak_rss()
    t0 = time.perf_counter()
    try:
        output: PipelineOutput = pipeline.run(volume, ctx)
    except Exception as exc:  # every failed run is in the trail, whatever failed
        _audit.record("model_run", outcome="serious_failure" if isinstance(exc, MedaiError) else "major_failure",
                      **ids, detail={"model": bundle.id, "version": bundle.version, "error": type(exc).__name__})
        raise
    ctx.timings["pipeline"] = time.perf_counter() - t0
    if output.labels.shape != volume.shape:
        raise ModelIntegrityError(f"pipeline {bundle.card.pipeline} returned labels of shape "
                                  f"{output.labels.shape}, not the volume's {volume.shape}")
    peak = planner.peak_rss_bytes()
    voxel_ml = volume.voxel_volume_ml
    counts = np.bincount(output.labels.ravel(), minlength=max((s.value for s in output.segments), default=0) + 1)
    volumes = {s.name: round(float(counts[s.value]) * voxel_ml, 3) for s in output.segments}
    priority = output.priority or _apply_rules(bundle, output.measurements, volumes)

    t0 = time.perf_counter()
    mask_path = out / "mask.nii.gz"
    write_mask(volume, output.labels, mask_path)
    ctx.timings["write_nifti"] = time.perf_counter() - t0
    seg_path = sr_path = None
    if volume.sources:
        from medai.dicom.outputs.seg import write_seg

        t1 = time.perf_counter()
        seg_path = write_seg(volume, output.labels, output.segments, bundle, out / "seg.dcm")
        ctx.timings["write_seg"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        from medai.dicom.outputs import sr

        # write_sr decides: measurements, or a refused result's "not measurable" statement.
        sr_path = sr.write_sr(volume, output, bundle, out / "sr.dcm", seg_path=seg_path)
        ctx.timings["write_sr"] = time.perf_counter() - t1
    # Pipeline-specific files (e.g. the volumetry one-page summary), named in result.json.
    write_extras = getattr(pipeline, "write_extras", None)
    extras = [Path(p) for p in write_extras(out, volume, output)] if callable(write_extras) else []
    ctx.timings["write"] = time.perf_counter() - t0
    ctx.timings["audit"] = t_audit
    if auto and first_use is None:
        first_use = tune.on_first_use(bundle, "after", threads=threads)
    ctx.timings["total"] = time.perf_counter() - t_start
    provider = ", ".join(sorted({s.provider for s in sessions.values()})) or "none"
    fallbacks = sorted({s.fallback_reason for s in sessions.values() if s.fallback_reason})
    memory = {**plan.as_dict(), "measured_peak_rss_mb": round(peak / planner.MB, 1)}
    result = {
        "medai_version": __version__,
        "model": bundle.provenance(),
        "series": {"study_uid": volume.study_instance_uid, "series_uid": volume.series_instance_uid,
                   "modality": volume.modality, "shape_kji": list(volume.shape),
                   "spacing_mm": list(volume.geometry.spacing), "n_instances": len(volume.sources)},
        "volumes_ml": volumes,
        "measurements": [m.__dict__ for m in output.measurements],
        "findings": [f.__dict__ for f in output.findings],
        "qc": dict(output.qc),
        # What a reader must know beside the numbers (e.g. a template-space series), for every surface.
        "caveats": caveats.for_result(bundle.card.postprocessing, volume.shape, volume.geometry.spacing,
                                      output.qc.get("caveats")),
        "priority": {"level": priority.level, "score": priority.score, "reasons": list(priority.reasons)},
        "prompt": prompt.as_dict() if isinstance(prompt, Prompt) else None,
        "preprocessing": ctx.recorded,
        "backend": {"provider": provider, "fallback": fallbacks,
                    "precision": ", ".join(sorted({s.precision for s in sessions.values()})) or "none",
                    "sessions": [{**s.describe(), "graph": f"{b}:{k}" if b != bundle.id else k}
                                 for (b, k), s in sessions.items()],
                    "threads": sorted({s.threads for s in sessions.values()}),
                    "onnxruntime": backends.ort_version(), "machine": platform.machine(),
                    **({"tuning": first_use} if first_use else {})},
        "timings_s": {k: round(v, 3) for k, v in ctx.timings.items()},
        "memory": memory,
        "outputs": {"mask": mask_path.name, "seg": seg_path.name if seg_path else None,
                    "sr": sr_path.name if sr_path else None,
                    "extra": [p.name for p in extras]},
        "intended_use": "Research/assistive output. Not for diagnostic use.",
    }
    result_path = out / "result.json"
    tmp = result_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default))
    os.replace(tmp, result_path)
    t0 = time.perf_counter()
    _audit.record("model_run", **ids, detail={"model": bundle.id, "version": bundle.version,
                                              "card_sha256": bundle.card_sha256, "provider": provider,
                                              "precision": result["backend"]["precision"],
                                              "seconds": round(ctx.timings["total"], 2)})
    # result.json is written before this record (as before); its "audit" time is the first record's.
    ctx.timings["audit"] += time.perf_counter() - t0
    return RunResult(bundle.id, bundle.version, volume.series_instance_uid, volume.study_instance_uid, out,
                     result_path, mask_path, seg_path, sr_path, volumes, output.measurements, output.findings,
                     dict(output.qc), priority, provider, dict(ctx.timings), memory, output.labels,
                     precision=result["backend"]["precision"])


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    return str(value)


def run_model(model_id: str, source: Path | str | Volume, out_dir: str | Path, *, series_uid: str | None = None,
              device: str | None = None, max_memory: int | str | None = None,
              prompt: Prompt | Mapping[str, Any] | None = None, allow_unsigned: bool | None = None,
              threads: int | None = None, precision: str | None = None) -> RunResult:
    """Run model ``model_id`` on one series of ``source`` and write results to ``out_dir``.

    ``source`` is a Volume, a DICOM file/folder (the best series by the card's rules
    unless ``series_uid`` is given) or a NIfTI/NRRD/MHA file (mask and result only,
    no SEG: there are no source instances to reference).
    """
    bundle = registry.get_bundle(model_id, allow_unsigned=allow_unsigned)
    prepare(bundle, device=device, threads=threads, precision=precision)
    t0 = time.perf_counter()
    given = not isinstance(source, (str, os.PathLike))  # a Volume
    if given:
        volume, patient = source, (None, None)
    else:
        volume, patient = _load_volume(Path(source), series_uid, bundle, allow_unsigned)
    return run_on_volume(bundle, volume, out_dir, device=device, max_memory=max_memory, prompt=prompt,
                         threads=threads, patient=patient, precision=precision,
                         load_seconds=None if given else time.perf_counter() - t0)
