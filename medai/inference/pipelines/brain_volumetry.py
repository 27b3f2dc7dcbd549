"""Brain volumetry with normative context and image-quality checks (diagnostic assist).

The graph, in order::

    T1 volume ─► brain mask (the signed ``brain-extraction`` model, run through its own
    pipeline) ─► QC (medai.assist.qc; a failed check stops here: no volumes reported)
    ─► CSF/GM/WM classification inside the mask (medai.assist.tissue)
    ─► physiological plausibility (medai.assist.plausibility; an impossible result is
    "not measurable on this series": no tissue numbers, QC-failure priority)
    ─► measurements in mL + brain parenchymal fraction ─► normative z/percentile when the
    header has age and sex (medai.assist.normative) ─► assistive findings ─► triage priority

Every threshold, parameter, normative figure and triage rule comes from the card
(``[postprocessing]``, ``[normative]``); every step is recorded in ``result.json``.
Besides ``seg.dcm`` (tissue labels) and ``sr.dcm`` (TID 1500, written by the runner
through :mod:`medai.dicom.outputs.sr`), :meth:`BrainVolumetry.write_extras` renders
``summary.png`` (and ``summary.pdf``) for the reader.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medai.assist import caveats, normative, plausibility, qc as qcmod, tissue
from medai.dicom.volume import Volume
from medai.errors import DicomInputError, ModelIntegrityError
from medai.inference.bundle import Bundle
from medai.inference.pipeline import (Finding, Measurement, PipelineContext, PipelineOutput, Priority,
                                      segments_from_card)

log = logging.getLogger("medai.inference")

#: SR concepts of the measurements (scheme, code, meaning); BPF has no standard code.
CONCEPTS: dict[str, tuple[str, str, str]] = {
    "intracranial_volume_ml": ("SCT", "1101003", "Cranial Cavity"),
    "parenchyma_volume_ml": ("SCT", "12738006", "Brain"),
    "gm_volume_ml": ("SCT", "389081007", "Gray Matter"),
    "wm_volume_ml": ("SCT", "389080008", "White Matter"),
    "csf_volume_ml": ("SCT", "65216001", "Cerebrospinal Fluid"),
    "brain_parenchymal_fraction": ("99MEDAI", "BPF", "Brain parenchymal fraction"),
    "brain_parenchymal_fraction_percentile": ("99MEDAI", "BPFPCT", "Brain parenchymal fraction percentile"),
}


class BrainVolumetry:
    accepts_prompt = False

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        post: Mapping[str, Any] = bundle.card.postprocessing
        try:
            self.tissue_params = tissue.TissueParams.from_mapping(dict(post.get("tissue", {})))
            self.thresholds = qcmod.QcThresholds.from_mapping(dict(post.get("qc", {})))
            self.measures = normative.load_measures(bundle.card.raw.get("normative"))
            self.limits = plausibility.PlausibilityLimits.from_mapping(post.get("plausibility"))
            self.caveat_rules = caveats.rules_from_card(post)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"model {bundle.id}: invalid card parameters ({exc})") from exc
        self.mask_model = str(post.get("mask_model", "brain-extraction"))
        self.triage: Mapping[str, Any] = dict(post.get("triage", {}))
        self.extreme_percentiles = tuple(float(p) for p in post.get("normal_percentiles", [5.0, 95.0]))

    # ----------------------------------------------------------------- brain mask
    def brain_mask(self, volume: Volume, ctx: PipelineContext) -> np.ndarray:
        """The brain (intracranial) mask from the signed brain-extraction bundle.

        Runs that model's own pipeline with its own card steps and sessions, so the mask
        is exactly what ``medai run --model brain-extraction`` gives; its recorded steps
        are nested in ours.
        """
        from medai.inference import backends, registry
        from medai.inference.run import load_pipeline
        from medai.inference.steps import StepRunner

        mask_bundle = registry.get_bundle(self.mask_model)
        pipeline = load_pipeline(mask_bundle)

        def session(key: str) -> backends.Session:
            if ctx.session_for is not None:
                return ctx.session_for(mask_bundle, key)
            return backends.get_session(mask_bundle, key)

        sub = PipelineContext(bundle=mask_bundle, session=session, plan=ctx.plan, steps=StepRunner(mask_bundle.card))
        sub.steps.bind(sub)
        out = pipeline.run(volume, sub)
        ctx.record("brain_mask", model=mask_bundle.id, version=mask_bundle.version,
                   card_sha256=mask_bundle.card_sha256, steps=sub.recorded)
        for k, v in sub.timings.items():
            ctx.timings[f"mask_{k}"] = v
        return out.labels > 0

    # ----------------------------------------------------------------- main
    def run(self, volume: Volume, ctx: PipelineContext) -> PipelineOutput:
        if volume.modality and volume.modality.upper() not in ("MR", ""):
            raise DicomInputError(None, f"series {volume.series_instance_uid or '(file)'}: modality "
                                        f"{volume.modality} is not MR; brain volumetry needs a T1-weighted MRI")
        t0 = time.perf_counter()
        mask = self.brain_mask(volume, ctx)
        ctx.timings["brain_mask"] = time.perf_counter() - t0
        return self.measure(volume, mask, ctx)

    def measure(self, volume: Volume, mask: np.ndarray, ctx: PipelineContext) -> PipelineOutput:
        """QC, tissue classification and reporting for a given brain mask."""
        spacing = tuple(float(s) for s in volume.geometry.spacing)
        image = np.nan_to_num(volume.array.astype(np.float32, copy=False))
        attributes = dict(volume.attributes)
        attributes.setdefault("InPlanePhaseEncodingDirection", _phase_direction(volume))

        t0 = time.perf_counter()
        report = qcmod.run_qc(image, mask, spacing, self.thresholds, attributes=attributes)  # type: ignore[arg-type]
        ctx.timings["qc"] = time.perf_counter() - t0
        ctx.record("qc", status=report.status, checks={c.name: c.status for c in report.checks})
        segments = segments_from_card(self.bundle.card)
        findings: list[Finding] = []
        for check in report.checks:
            if check.status in ("warn", "fail"):
                findings.append(Finding(f"Image quality ({check.name.replace('_', ' ')}): {check.message}.",
                                        "review", None))
        qc_out: dict[str, Any] = {"image_quality": report.as_dict(), "caveats": self._caveats(volume)}
        if report.blocked:
            failed = "; ".join(c.message for c in report.checks if c.status == "fail")
            return self._not_measurable(volume, report, findings, qc_out, f"image quality: {failed}")

        t0 = time.perf_counter()
        try:
            seg = tissue.classify_tissue(image, mask, spacing, self.tissue_params)  # type: ignore[arg-type]
        except ValueError as exc:
            raise DicomInputError(None, f"series {volume.series_instance_uid or '(file)'}: tissue "
                                        f"classification impossible ({exc})") from None
        ctx.timings["tissue"] = time.perf_counter() - t0
        ctx.record("tissue_classification", method="3-class Gaussian mixture + partial-volume classes, "
                   "mean-field Potts MRF, EM; N4 bias correction", **seg.params.as_dict(),
                   iterations=seg.iterations, converged=seg.converged,
                   class_means=[round(m, 3) for m in seg.means], fitted_on_grid_mm=seg.working_grid_mm,
                   **({"denoising": seg.denoising} if seg.denoising is not None else {}))

        icv = seg.mask_ml
        csf, gm, wm = (seg.volumes_ml[n] for n in tissue.CLASS_NAMES)
        age = normative.parse_age(volume.attributes.get("PatientAge"))
        sex = normative.parse_sex(volume.attributes.get("PatientSex"))
        gate = plausibility.check(seg.volumes_ml, icv, sex, self.limits)
        ctx.record("plausibility", status="pass" if gate.plausible else "fail",
                   checks={c.name: c.status for c in gate.checks})
        qc_out["plausibility"] = gate.as_dict()
        if not gate.plausible:
            qc_out["tissue"] = {"iterations": seg.iterations, "converged": seg.converged}
            return self._not_measurable(volume, report, findings, qc_out,
                                        f"implausible tissue result: {gate.reason}")
        parenchyma = gm + wm
        bpf = parenchyma / icv if icv > 0 else float("nan")
        values = {"intracranial_volume_ml": icv, "parenchyma_volume_ml": parenchyma, "gm_volume_ml": gm,
                  "wm_volume_ml": wm, "csf_volume_ml": csf, "brain_parenchymal_fraction": bpf}
        units = {k: ("mL" if k.endswith("_ml") else "1") for k in values}
        labels_for = {"gm_volume_ml": tissue.GM, "wm_volume_ml": tissue.WM, "csf_volume_ml": tissue.CSF}

        comparisons = []
        for name in ("brain_parenchymal_fraction", "intracranial_volume_ml"):
            if name in self.measures:
                comparisons.append(normative.compare(self.measures[name], values[name], age, sex))
        by_name = {c.measure: c for c in comparisons}
        measurements = []
        for name, value in values.items():
            comp = by_name.get(name)
            note = ""
            if comp is not None:
                note = (f"z={comp.z:+.2f}, percentile {comp.percentile:.0f} for age {age:.0f} {sex}"
                        if comp.compared else comp.note)
            measurements.append(Measurement(name, round(float(value), 4 if units[name] == "1" else 2), units[name],
                                            label=labels_for.get(name), concept=CONCEPTS[name], note=note))

        bpf_cmp = by_name.get("brain_parenchymal_fraction")
        if bpf_cmp is not None and bpf_cmp.compared:
            # Also a measurement, so PACS viewers of the SR show it next to the BPF.
            measurements.append(Measurement("brain_parenchymal_fraction_percentile", round(bpf_cmp.percentile, 1), "%",  # type: ignore[arg-type]
                                            concept=CONCEPTS["brain_parenchymal_fraction_percentile"],
                                            note=f"for age {age:.0f}, sex {sex}; {bpf_cmp.source}"))
        low_p, high_p = self.extreme_percentiles
        out_of_range: list[str] = []
        if bpf_cmp is not None and bpf_cmp.compared:
            if bpf_cmp.percentile < low_p:  # type: ignore[operator]
                text = (f"Brain parenchymal fraction {bpf:.3f} is below the {low_p:g}th percentile for age "
                        f"{age:.0f} and sex {sex} (percentile {bpf_cmp.percentile:.1f}): review for atrophy.")
                findings.insert(0, Finding(text, "review", "brain_parenchymal_fraction"))
                out_of_range.append(text)
            elif bpf_cmp.percentile > high_p:  # type: ignore[operator]
                findings.append(Finding(f"Brain parenchymal fraction {bpf:.3f} is above the {high_p:g}th percentile "
                                        f"for age {age:.0f} and sex {sex}: no atrophy suggested.", "info",
                                        "brain_parenchymal_fraction"))
            else:
                findings.append(Finding(f"Brain parenchymal fraction {bpf:.3f} is within the reference range for "
                                        f"age {age:.0f} and sex {sex} (percentile {bpf_cmp.percentile:.0f}).", "info",
                                        "brain_parenchymal_fraction"))
        elif bpf_cmp is not None:
            findings.append(Finding(f"Brain parenchymal fraction {bpf:.3f}; {bpf_cmp.note}.", "info",
                                    "brain_parenchymal_fraction"))
        icv_cmp = by_name.get("intracranial_volume_ml")
        if icv_cmp is not None and icv_cmp.compared and not low_p <= icv_cmp.percentile <= high_p:  # type: ignore[operator]
            text = (f"Intracranial volume {icv:.0f} mL is outside the {low_p:g}th-{high_p:g}th percentile range for "
                    f"sex {sex} (percentile {icv_cmp.percentile:.1f}): check the brain mask on the images.")
            findings.append(Finding(text, "review", "intracranial_volume_ml"))
            out_of_range.append(text)

        qc_out["normative"] = [c.as_dict() for c in comparisons]
        qc_out["tissue"] = {"class_means": [round(m, 3) for m in seg.means],
                            "class_sd": [round(s, 3) for s in seg.stds], "iterations": seg.iterations,
                            "converged": seg.converged}
        qc_out["age_years"] = None if age is None else round(age, 1)
        qc_out["sex"] = sex
        qc_out["measurable"] = True
        qc_out["not_measurable_reason"] = None
        for caveat in qc_out["caveats"]:
            findings.append(Finding(f"Caveat: {caveat}", "info", "intracranial_volume_ml"))
        return PipelineOutput(labels=seg.labels, segments=segments, measurements=tuple(measurements),
                              findings=tuple(findings), qc=qc_out,
                              priority=self._priority(report, out_of_range, blocked=False))

    def _not_measurable(self, volume: Volume, report: qcmod.QcReport, findings: list[Finding],
                        qc_out: dict[str, Any], reason: str) -> PipelineOutput:
        """The one shape of a refused result: no labels, no measurements, no normative
        comparison; ``qc.status`` "fail" so every surface ranks it as a QC failure."""
        text = f"Volumetry {plausibility.NOT_MEASURABLE}: {reason}. Review the series; no volumes are reported."
        findings.insert(0, Finding(text, "review"))
        qc_out.update(status="fail", measurable=False, not_measurable_reason=f"{plausibility.NOT_MEASURABLE}: {reason}",
                      normative=[])
        qc_out.setdefault("tissue", None)
        # No segments either: the runner's label-map volumes (result.json volumes_ml, the UI's
        # legend) would otherwise read "0.0 mL" per tissue, a number that was never measured.
        return PipelineOutput(labels=np.zeros(volume.shape, dtype=np.uint8), segments=(),
                              findings=tuple(findings), qc=qc_out,
                              priority=self._priority(report, [], blocked=True, reason=reason))

    def _caveats(self, volume: Volume) -> list[str]:
        """The card's caveats whose grid rule matches this series (medai.assist.caveats; e.g.
        the MNI152 1 mm grid of the demo study), shown beside the volumes."""
        return caveats.caveats_for(volume.shape, volume.geometry.spacing, self.caveat_rules)

    # ----------------------------------------------------------------- triage
    def _priority(self, report: qcmod.QcReport, out_of_range: list[str], *, blocked: bool,
                  reason: str = "") -> Priority:
        """The card's ``[postprocessing.triage]``: QC failures, then out-of-range findings first."""

        def rule(name: str, level: str, score: float) -> tuple[str, float]:
            spec = self.triage.get(name, {})
            return str(spec.get("level", level)), float(spec.get("score", score))

        reasons: list[str] = []
        candidates: list[tuple[str, float]] = [rule("normal", "routine", 0.0)]
        if blocked:
            candidates.append(rule("qc_fail", "review", 0.9))
            failed = [f"QC failed: {c.name}" for c in report.checks if c.status == "fail"]
            reasons += failed or [f"QC failed: {plausibility.NOT_MEASURABLE} ({reason})"]
        if out_of_range:
            candidates.append(rule("out_of_range", "review", 0.8))
            reasons += out_of_range
        if report.status == "warn":
            candidates.append(rule("qc_warn", "routine", 0.3))
            reasons += [f"QC warning: {c.name}" for c in report.checks if c.status == "warn"]
        rank = {"routine": 0, "review": 1, "urgent": 2}
        level, score = max(candidates, key=lambda c: (rank.get(c[0], 0), c[1]))
        return Priority(level, score, tuple(reasons))  # type: ignore[arg-type]

    # ----------------------------------------------------------------- outputs
    def write_extras(self, out_dir: str | Path, volume: Volume, output: PipelineOutput) -> list[Path]:
        """Render the one-page summary (``summary.png`` and ``summary.pdf``) into ``out_dir``."""
        from medai.assist.report import render_summary

        return render_summary(volume, output, self.bundle.card, Path(out_dir))


def _phase_direction(volume: Volume) -> str | None:
    """InPlanePhaseEncodingDirection from the first source header (not in Volume.attributes)."""
    if not volume.sources or volume.sources[0].path is None:
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(volume.sources[0].path, stop_before_pixels=True,
                             specific_tags=["InPlanePhaseEncodingDirection"])
        return str(ds.get("InPlanePhaseEncodingDirection", "")) or None
    except Exception:  # noqa: BLE001 - an unreadable optional tag only disables the ghosting check
        return None


def create(bundle: Bundle) -> BrainVolumetry:
    return BrainVolumetry(bundle)


__all__ = ["BrainVolumetry", "CONCEPTS", "create"]
