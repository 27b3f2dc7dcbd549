"""Image-quality checks that run before brain volumetry and can block or qualify it.

Each check measures one number, compares it with thresholds from the model card and
says ``pass``, ``warn`` (the report is produced, qualified by the message) or ``fail``
(no measurements are reported). The checks are deliberately simple and explainable:

* **t1_contrast** — a T1-weighted brain has bright white matter deep inside and darker
  grey matter and CSF at its surface; on PD/T2 it is the other way round. The value is
  the median intensity of the deep core of the brain mask divided by that of its outer
  shell (no classification needed, so it cannot be fooled by one).
* **field_of_view** — the brain mask touching the edge of the volume means part of the
  brain was not imaged; the value is the mask's contact area with the volume faces, mm².
* **voxel_size** — the largest voxel dimension, mm (thick slices smear tissue boundaries).
* **snr** — median core intensity over the noise sigma, estimated robustly (median
  absolute deviation) from the difference between each voxel and its six neighbours.
* **ghosting** — mean background intensity in the band where phase-encode ghosts of the
  head fall, relative to the brain signal (needs background air in the volume).
* **mask_plausibility** — intracranial (mask) volume within an adult range, and the mask
  in one piece.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from medai.assist import reject_unknown

Status = Literal["pass", "warn", "fail", "not_assessed"]
_ORDER = {"pass": 0, "not_assessed": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class QcThresholds:
    """Thresholds of every check (the card's ``[postprocessing.qc]`` table)."""

    t1_contrast_fail: float = 1.05
    t1_contrast_warn: float = 1.15
    shell_mm: float = 3.0
    core_mm: float = 15.0
    fov_contact_warn_mm2: float = 300.0
    fov_contact_fail_mm2: float = 1500.0
    voxel_max_warn_mm: float = 1.5
    voxel_max_fail_mm: float = 3.0
    snr_warn: float = 12.0
    snr_fail: float = 6.0
    ghost_warn: float = 0.05
    ghost_fail: float = 0.15
    head_margin_mm: float = 25.0
    icv_min_ml: float = 900.0
    icv_max_ml: float = 2300.0
    mask_largest_component_min: float = 0.98

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "QcThresholds":
        if not data:
            return cls()
        reject_unknown(cls, data, "QC thresholds")
        return cls(**{k: float(v) for k, v in data.items()})


@dataclass(frozen=True)
class QcCheck:
    """One check: what was measured, against what, and what it means for the report."""

    name: str
    status: Status
    value: float | None
    unit: str
    threshold: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status,
                "value": None if self.value is None else round(float(self.value), 4),
                "unit": self.unit, "threshold": self.threshold, "message": self.message}


@dataclass(frozen=True)
class QcReport:
    checks: tuple[QcCheck, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        worst = max((_ORDER[c.status] for c in self.checks), default=0)
        return ("pass", "warn", "fail")[worst]  # type: ignore[return-value]

    @property
    def blocked(self) -> bool:
        """True when a check failed: the volumes must not be reported."""
        return self.status == "fail"

    def __getitem__(self, name: str) -> QcCheck:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "blocked": self.blocked,
                "checks": [c.as_dict() for c in self.checks], **dict(self.extra)}


def _grade_low(value: float, warn: float, fail: float) -> Status:
    return "fail" if value < fail else "warn" if value < warn else "pass"


def _grade_high(value: float, warn: float, fail: float) -> Status:
    return "fail" if value > fail else "warn" if value > warn else "pass"


def _depth_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from each voxel inside ``mask`` to the nearest voxel outside."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    dist = sitk.SignedMaurerDistanceMap(img, insideIsPositive=True, squaredDistance=False,
                                        useImageSpacing=True)
    return sitk.GetArrayFromImage(dist).astype(np.float32)


def core_and_shell(mask: np.ndarray, spacing: tuple[float, float, float], t: QcThresholds
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean core (deep) and shell (surface) regions of a brain mask.

    The core is at least ``core_mm`` deep; where the brain is too thin for that (few slices,
    small FOV) it falls back to the deepest quarter of the mask.
    """
    depth = _depth_mm(mask, spacing)
    inside = mask > 0
    shell = inside & (depth <= t.shell_mm + 0.5 * min(spacing))
    core = inside & (depth >= t.core_mm)
    if core.sum() < 0.05 * inside.sum():
        cut = np.percentile(depth[inside], 75)
        core = inside & (depth >= cut)
    return core, shell


def check_t1_contrast(image: np.ndarray, core: np.ndarray, shell: np.ndarray, t: QcThresholds) -> QcCheck:
    c, s = float(np.median(image[core])), float(np.median(image[shell]))
    if s <= 0:
        return QcCheck("t1_contrast", "not_assessed", None, "ratio", f">= {t.t1_contrast_warn}",
                       "brain surface has no signal; contrast not assessed")
    ratio = c / s
    status = _grade_low(ratio, t.t1_contrast_warn, t.t1_contrast_fail)
    msg = {"pass": "deep white matter brighter than the brain surface, as on T1-weighted images",
           "warn": "weak T1 contrast (deep brain barely brighter than its surface): check sequence",
           "fail": "not T1-weighted: deep white matter is not brighter than grey matter/CSF at the "
                   "surface (PD/T2/FLAIR-like contrast); tissue volumes would be wrong"}[status]
    return QcCheck("t1_contrast", status, ratio, "core/shell median ratio",
                   f"warn < {t.t1_contrast_warn}, fail < {t.t1_contrast_fail}", msg)


def check_field_of_view(mask: np.ndarray, spacing: tuple[float, float, float], t: QcThresholds) -> QcCheck:
    sx, sy, sz = spacing
    inside = mask > 0
    # Faces of [k, j, i]: k-faces have area sx*sy per voxel, j-faces sx*sz, i-faces sy*sz.
    area = (inside[0].sum() + inside[-1].sum()) * sx * sy \
        + (inside[:, 0].sum() + inside[:, -1].sum()) * sx * sz \
        + (inside[:, :, 0].sum() + inside[:, :, -1].sum()) * sy * sz
    area = float(area)
    status = _grade_high(area, t.fov_contact_warn_mm2, t.fov_contact_fail_mm2)
    msg = {"pass": "whole brain inside the field of view",
           "warn": "brain mask reaches the edge of the volume: part of the brain may be cut off",
           "fail": "brain cut off by the field of view: intracranial and tissue volumes incomplete"}[status]
    return QcCheck("field_of_view", status, area, "mm² of mask on the volume border",
                   f"warn > {t.fov_contact_warn_mm2:g}, fail > {t.fov_contact_fail_mm2:g}", msg)


def check_voxel_size(spacing: tuple[float, float, float], t: QcThresholds) -> QcCheck:
    largest = float(max(spacing))
    status = _grade_high(largest, t.voxel_max_warn_mm, t.voxel_max_fail_mm)
    msg = {"pass": "voxel size adequate for volumetry",
           "warn": "coarse voxels: partial-volume effects make tissue volumes less precise",
           "fail": "voxels too coarse for volumetry (thick slices): use a 3-D T1 of about 1 mm"}[status]
    return QcCheck("voxel_size", status, largest, "mm (largest dimension)",
                   f"warn > {t.voxel_max_warn_mm:g}, fail > {t.voxel_max_fail_mm:g}", msg)


def face_shifts(shape: tuple[int, ...]) -> Iterator[tuple[int, int, np.ndarray]]:
    """The six face neighbours as ``np.roll`` shifts: ``(axis, shift, valid)``, where
    ``valid`` is False on the face the roll wrapped around (no neighbour there)."""
    for axis in range(len(shape)):
        for shift in (1, -1):
            valid = np.ones(shape, dtype=bool)
            edge = [slice(None)] * len(shape)
            edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)
            valid[tuple(edge)] = False
            yield axis, shift, valid


def noise_sigma(image: np.ndarray, region: np.ndarray) -> float:
    """Robust noise standard deviation inside ``region``.

    For white noise of variance σ², the voxel minus the mean of its six neighbours has
    variance σ²(1 + 1/6); anatomy is smooth at that scale, so the MAD of that residual
    estimates σ while edges (a minority of voxels) barely move the median.
    """
    img = image.astype(np.float32)
    nb = np.zeros_like(img)
    count = np.zeros_like(img)
    for axis, shift, valid in face_shifts(img.shape):
        nb += np.roll(img, shift, axis=axis) * valid
        count += valid
    resid = img - nb / np.maximum(count, 1)
    r = resid[region]
    mad = float(np.median(np.abs(r - np.median(r))))
    return 1.4826 * mad / np.sqrt(1 + 1 / 6)


def check_snr(image: np.ndarray, mask: np.ndarray, core: np.ndarray, t: QcThresholds) -> QcCheck:
    sigma = noise_sigma(image, mask > 0)
    signal = float(np.median(image[core]))
    if sigma <= 0:
        return QcCheck("snr", "not_assessed", None, "ratio", f">= {t.snr_warn:g}",
                       "no measurable noise (synthetic or heavily filtered image)")
    snr = signal / sigma
    status = _grade_low(snr, t.snr_warn, t.snr_fail)
    msg = {"pass": "signal-to-noise adequate",
           "warn": "noisy image: tissue volumes less precise",
           "fail": "too noisy to separate grey and white matter reliably"}[status]
    return QcCheck("snr", status, snr, "ratio", f"warn < {t.snr_warn:g}, fail < {t.snr_fail:g}", msg)


def check_ghosting(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                   phase_axis: int | None, signal: float, t: QcThresholds) -> QcCheck:
    """Ghost-to-signal ratio: background in the phase-encode direction (where Nyquist
    and motion ghosts of the head land) minus background in the readout direction."""
    if phase_axis is None:
        return QcCheck("ghosting", "not_assessed", None, "ratio", f"warn > {t.ghost_warn:g}",
                       "phase-encoding direction unknown")
    import SimpleITK as sitk

    # The head is the brain mask grown by the scalp's thickness (from the mask, not from
    # thresholding, so a strong ghost cannot make itself part of the "head").
    img = sitk.GetImageFromArray((mask > 0).astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    outside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
    dilated = outside <= t.head_margin_mm
    background = outside > t.head_margin_mm + 5.0
    if background.sum() < 1000:
        return QcCheck("ghosting", "not_assessed", None, "ratio", f"warn > {t.ghost_warn:g}",
                       "no background air in the field of view")
    # Project the head onto the in-plane axes (array [k, j, i]: axis 1 = rows, 2 = columns).
    other = 2 if phase_axis == 1 else 1
    ext_other = np.any(dilated, axis=(0, phase_axis))  # head extent along the readout axis
    ext_phase = np.any(dilated, axis=(0, other))  # head extent along the phase axis
    # Ghost band: same readout positions as the head, outside the head along phase.
    shape_other = [1, 1, 1]
    shape_other[other] = -1
    shape_phase = [1, 1, 1]
    shape_phase[phase_axis] = -1
    in_other = ext_other.reshape(shape_other)
    in_phase = ext_phase.reshape(shape_phase)
    ghost_band = background & in_other & ~in_phase
    clean_band = background & ~in_other & in_phase
    if ghost_band.sum() < 200 or clean_band.sum() < 200:
        return QcCheck("ghosting", "not_assessed", None, "ratio", f"warn > {t.ghost_warn:g}",
                       "not enough background around the head to measure ghosts")
    gsr = (float(image[ghost_band].mean()) - float(image[clean_band].mean())) / max(signal, 1e-6)
    gsr = max(gsr, 0.0)
    status = _grade_high(gsr, t.ghost_warn, t.ghost_fail)
    msg = {"pass": "no relevant ghosting",
           "warn": "ghosting/motion artefact in the phase-encode direction: check image",
           "fail": "strong ghosting or motion artefact: volumes unreliable"}[status]
    return QcCheck("ghosting", status, gsr, "ghost/signal ratio",
                   f"warn > {t.ghost_warn:g}, fail > {t.ghost_fail:g}", msg)


def check_mask(mask: np.ndarray, spacing: tuple[float, float, float], t: QcThresholds) -> QcCheck:
    import SimpleITK as sitk

    inside = mask > 0
    vox_ml = float(np.prod(spacing)) / 1000.0
    icv = float(inside.sum()) * vox_ml
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(inside.astype(np.uint8)))
    sizes = np.bincount(sitk.GetArrayFromImage(cc).ravel())[1:]
    largest = float(sizes.max() / sizes.sum()) if sizes.size else 0.0
    problems = []
    if not t.icv_min_ml <= icv <= t.icv_max_ml:
        problems.append(f"intracranial volume {icv:.0f} mL outside the plausible adult range "
                        f"{t.icv_min_ml:g}-{t.icv_max_ml:g} mL")
    if largest < t.mask_largest_component_min:
        problems.append(f"brain mask in pieces (largest part {largest:.1%})")
    status: Status = "fail" if problems else "pass"
    msg = "; ".join(problems) if problems else "brain mask plausible"
    return QcCheck("mask_plausibility", status, icv, "mL (mask volume)",
                   f"{t.icv_min_ml:g}-{t.icv_max_ml:g} mL, largest part >= {t.mask_largest_component_min:g}",
                   msg)


def phase_axis_from_attributes(attributes: Mapping[str, Any] | None) -> int | None:
    """Array axis ([k, j, i]) of in-plane phase encoding: ROW → columns vary (axis 2)."""
    value = str((attributes or {}).get("InPlanePhaseEncodingDirection", "")).upper()
    return {"ROW": 2, "COL": 1}.get(value)


def run_qc(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
           thresholds: QcThresholds | None = None, *, attributes: Mapping[str, Any] | None = None) -> QcReport:
    """All checks on one volume. ``image``/``mask`` are [k, j, i]; ``spacing`` is (i, j, k) mm."""
    t = thresholds or QcThresholds()
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    img = np.asarray(image, dtype=np.float32)
    inside = np.asarray(mask) > 0
    checks: list[QcCheck] = [check_voxel_size(spacing, t), check_mask(inside, spacing, t),
                             check_field_of_view(inside, spacing, t)]
    if inside.sum() >= 1000:
        core, shell = core_and_shell(inside, spacing, t)
        checks.append(check_t1_contrast(img, core, shell, t))
        checks.append(check_snr(img, inside, core, t))
        checks.append(check_ghosting(img, inside, spacing, phase_axis_from_attributes(attributes),
                                     float(np.median(img[core])), t))
    return QcReport(tuple(checks))
