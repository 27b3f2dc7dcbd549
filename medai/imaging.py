"""One imaging toolkit: display windows, percentile windowing, resizing and
nearest-axis orientation, used by the viewer, the pipelines and the reports.

Why one module: a preset table with two values for "liver", or two percentile
rules that disagree on what "the image" is, shows a clinician two different
pictures of the same voxels. Every consumer (``medai.viewer``, the browser
viewport's presets, ``medai.inference.pipelines.medsam_lite``, the volumetry
summary in ``medai.assist.report``) calls these functions instead of keeping
its own copy.

CT presets are OHIF's (Open Health Imaging Foundation viewer, the reference web
viewer radiologists meet in PACS front ends): soft tissue W 400 / L 40, lung
1500 / -600, liver 150 / 90, bone 2500 / 480, brain 80 / 40, on number keys 1-5
in that order. Two neuro windows that OHIF does not list (subdural, stroke) follow
on keys 6 and 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class WindowLevel:
    """A display window: grey values from ``level - width/2`` (black) to
    ``level + width/2`` (white)."""

    width: float
    level: float
    name: str = "manual"

    def __post_init__(self) -> None:
        if not math.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"window width must be positive, got {self.width}")
        if not math.isfinite(self.level):
            raise ValueError(f"window level must be finite, got {self.level}")

    @property
    def low(self) -> float:
        return self.level - self.width / 2.0

    @property
    def high(self) -> float:
        return self.level + self.width / 2.0


#: The one CT preset table (Hounsfield units), in number-key order. The first five
#: are OHIF's values; subdural and stroke are common neuro windows OHIF does not list.
CT_PRESETS: dict[str, WindowLevel] = {
    p.name: p
    for p in (
        WindowLevel(400, 40, "soft_tissue"),
        WindowLevel(1500, -600, "lung"),
        WindowLevel(150, 90, "liver"),
        WindowLevel(2500, 480, "bone"),
        WindowLevel(80, 40, "brain"),
        WindowLevel(200, 75, "subdural"),
        WindowLevel(40, 40, "stroke"),
    )
}

#: How each preset is named on screen.
PRESET_LABELS: dict[str, str] = {"soft_tissue": "Soft tissue", "lung": "Lung", "liver": "Liver", "bone": "Bone",
                                 "brain": "Brain", "subdural": "Subdural", "stroke": "Stroke"}


def ct_preset(name: str) -> WindowLevel:
    """A CT preset by name (``soft_tissue``, ``lung``, ...); a clear error otherwise."""
    try:
        return CT_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown CT window {name!r}: choose one of {', '.join(CT_PRESETS)}") from None


def preset_keys() -> list[dict[str, object]]:
    """The presets as the viewport binds them to number keys 1, 2, ..."""
    return [{"key": str(n), "id": p.name, "name": PRESET_LABELS[p.name], "width": p.width, "level": p.level}
            for n, p in enumerate(CT_PRESETS.values(), 1)]


#: Windows for images without an absolute scale (MR): number keys 1, 2, 3 in the viewport.
#: (id, name, low percentile, high percentile) of the voxels above the background; "Full
#: range" is the whole stored range, background included.
PERCENTILE_PRESETS: tuple[tuple[str, str, float, float], ...] = (
    ("full", "Full range", 0.0, 100.0),
    ("p1_99", "1–99 %", 1.0, 99.0),
    ("narrow", "Tissue contrast 25–99 %", 25.0, 99.0),
)


def percentile_preset_keys(array: np.ndarray) -> list[dict[str, object]]:
    """:data:`PERCENTILE_PRESETS` computed on ``array``, as the viewport binds them to
    number keys (the CT keys would mean nothing on MR's arbitrary scale). The third is
    a narrower window for grey/white matter contrast in a head MR: its lower bound sits
    above most CSF and background-adjacent voxels."""
    out: list[dict[str, object]] = []
    finite = np.asarray(array)
    for n, (pid, name, low, high) in enumerate(PERCENTILE_PRESETS, 1):
        if pid == "full":
            lo, hi = float(np.nanmin(finite)), float(np.nanmax(finite))
            hi = hi if hi > lo else lo + 1.0
        else:
            lo, hi = percentile_range(finite, low, high)
        out.append({"key": str(n), "id": pid, "name": name, "width": round(hi - lo, 3),
                    "level": round((hi + lo) / 2.0, 3)})
    return out


def percentile_range(array: np.ndarray, low: float, high: float, *, max_samples: int = 2_000_000) -> tuple[float, float]:
    """The ``low``-th and ``high``-th percentiles of a volume's voxels above its minimum.

    MR has no absolute scale, so a percentile range is the sensible window; the
    background (the minimum, usually air or a masked 0) is left out when enough
    voxels remain (1 % and over 100), so it does not pull the range down. A large
    volume is subsampled with a fixed stride: deterministic and fast, and the same
    for every slice that a pipeline windows.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got {low}, {high}")
    flat = np.asarray(array).reshape(-1)
    sample = flat[:: max(1, flat.size // max_samples)].astype(np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    body = sample[sample > sample.min()]
    if body.size >= 0.01 * sample.size and body.size > 100:
        sample = body
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    return lo, hi


def percentile_window(array: np.ndarray, low: float = 1.0, high: float = 99.5, name: str = "auto") -> WindowLevel:
    """A window spanning :func:`percentile_range`."""
    lo, hi = percentile_range(array, low, high)
    return WindowLevel(hi - lo, (hi + lo) / 2.0, name)


def apply_window(image: np.ndarray, window: WindowLevel) -> np.ndarray:
    """Grey values mapped through the window to 8-bit (linear ramp, clipped)."""
    scaled = (np.asarray(image, dtype=np.float32) - np.float32(window.low)) * np.float32(255.0 / window.width)
    return np.clip(scaled, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- resizing


@lru_cache(maxsize=64)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation weights, widened when shrinking (anti-aliased).

    Output pixel centres sit at ``(o + 0.5) * n_in / n_out - 0.5`` in input pixels
    (the half-pixel convention of OpenCV and PyTorch ``align_corners=False``);
    weights are a triangle as wide as one output pixel, renormalised at the edges.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    dist = np.abs(np.arange(n_in, dtype=np.float64)[None, :] - centres[:, None]) / support
    weights = np.maximum(0.0, 1.0 - dist)
    weights /= weights.sum(axis=1, keepdims=True)
    out = weights.astype(np.float32)
    out.flags.writeable = False  # shared by the cache
    return out


@lru_cache(maxsize=64)
def _band(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resample_matrix` as (index, weight) pairs: each output pixel's few nonzero taps."""
    weights = resample_matrix(n_in, n_out)
    nonzero = weights > 0
    first = nonzero.argmax(axis=1)
    taps = int(nonzero.sum(axis=1).max())
    index = np.minimum(first[:, None] + np.arange(taps), n_in - 1)
    tap_weights = np.take_along_axis(weights, index, axis=1) * (first[:, None] + np.arange(taps) < n_in)
    index.flags.writeable = tap_weights.flags.writeable = False
    return index, tap_weights.astype(np.float32)


def resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A 2-D image resampled to (rows, cols) with :func:`resample_matrix` (float32).

    Applied as a few taps per output pixel rather than dense matrix products: on a
    slice-sized image the dense product wakes the BLAS thread pool, whose start-up
    and spin cost more than the arithmetic (25 ms of CPU per LiteMedSAM mask on a
    loaded 2-core machine, against under 1 ms here).
    """
    out = image.astype(np.float32, copy=False)
    for axis, n_out in ((0, rows), (1, cols)):
        index, weights = _band(out.shape[axis], n_out)
        if axis == 0:
            out = np.einsum("otc,ot->oc", out[index], weights)
        else:
            out = np.einsum("rot,ot->ro", out[:, index], weights)
    return np.ascontiguousarray(out, dtype=np.float32)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest source index for each output pixel centre (labels: no blending)."""
    centres = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    return np.clip(np.rint(centres), 0, n_in - 1).astype(np.intp)


# --------------------------------------------------------------------------- orientation


def nearest_axes(matrix: np.ndarray | Sequence[Sequence[float]]) -> dict[int, int]:
    """Which voxel axis (0 = i, 1 = j, 2 = k) lies along each LPS axis (0, 1, 2).

    ``matrix``'s columns are the i, j, k directions in LPS. The axes are matched
    one-to-one by the largest |cosine| first, so an oblique series still gets three
    distinct planes (a greedy match, never two voxel axes on one patient axis).
    """
    d = np.abs(np.asarray(matrix, dtype=float).reshape(3, 3))
    order = sorted(((d[lps, ijk], lps, ijk) for lps in range(3) for ijk in range(3)), reverse=True)
    assigned: dict[int, int] = {}
    used: set[int] = set()
    for _, lps, ijk in order:
        if lps not in assigned and ijk not in used:
            assigned[lps] = ijk
            used.add(ijk)
    return assigned


__all__ = ["CT_PRESETS", "PERCENTILE_PRESETS", "PRESET_LABELS", "WindowLevel", "apply_window", "ct_preset", "nearest_axes",
           "nearest_index", "percentile_preset_keys", "percentile_range", "percentile_window", "preset_keys", "resample_matrix", "resize"]
