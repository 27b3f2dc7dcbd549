"""Brain tissue classification (CSF, grey matter, white matter) inside a brain mask.

Method: the classical unsupervised model behind FSL FAST and SPM's tissue step, without
their atlases. Intensities inside the mask are a mixture of three Gaussians (one per
tissue); a Potts Markov random field says neighbouring voxels tend to share a tissue.
The fit is expectation-maximisation with a mean-field approximation of the field
(Zhang, Brady & Smith, IEEE TMI 2001), after N4 bias-field correction (Tustison et al.,
IEEE TMI 2010, through SimpleITK) so one set of class means holds over the whole brain.

Volumes are the sum of the final posterior probabilities times the voxel volume (a soft
estimate that spreads boundary voxels between classes, as partial-volume estimates do);
the label map for display and DICOM SEG is the most probable class per voxel.

Coarse series (thick slices, 2-3 mm voxels) are classified on a 1 mm working grid
(``TissueParams.working_grid_mm``): the MRF and partial-volume model are calibrated at
1 mm, and fitted directly on coarse voxels they let GM absorb thin sulcal CSF.

Classes are ordered by mean intensity (darkest first). That is CSF, GM, WM only on a
T1-weighted image: deciding whether the image is T1-weighted is the job of
:mod:`medai.assist.qc`, not of this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medai.assist import reject_unknown

log = logging.getLogger("medai.assist")

#: Label values in the output map (0 is outside the brain mask).
CSF, GM, WM = 1, 2, 3
CLASS_NAMES = ("CSF", "GM", "WM")


@dataclass(frozen=True)
class TissueParams:
    """Parameters of the classification (the card's ``[postprocessing.tissue]``)."""

    #: Strength of the Potts prior (per unit neighbour weight); 0 disables it.
    beta: float = 0.6
    max_iterations: int = 25
    #: Stop when the largest change of a posterior mean between iterations is below this.
    tolerance: float = 1e-3
    bias_correction: bool = True
    #: Which pure classes share one noise variance: "all" or "gm_wm" (CSF free).
    tied_variance: str = "all"
    #: Intensities below this percentile of the mask are raised to it (see classify_tissue).
    clip_low_percentile: float = 0.0
    #: Shrink factor for the N4 fit (the field is smooth; fitting it coarse is enough).
    n4_shrink: int = 3
    n4_iterations: tuple[int, ...] = (50, 50, 30)
    #: MRF neighbour weight = (1 mm / centre distance) ** this power: 1 at 1 mm whatever the
    #: power, weaker between the centres of coarse voxels (see classify_tissue).
    neighbour_weight_power: float = 1.0
    #: Voxels coarser than this (mm, any axis, 25 % slack) are classified on an isotropic grid
    #: of this size (B-spline interpolation), where the MRF and the partial-volume model were
    #: calibrated; 0 classifies on the source grid whatever its voxels.
    working_grid_mm: float = 0.0
    #: Edge-preserving denoising before the mixture (see :func:`denoise`): iterations (0: off),
    #: the SNR the noise is brought to (white-matter signal over noise sigma; an image already
    #: at or above it is left as it is), and Tukey's edge threshold in units of the
    #: difference of two noisy voxels (sqrt(2) x the excess noise sigma).
    denoise_iterations: int = 0
    denoise_target_snr: float = 30.0
    denoise_edge_k: float = 2.0

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None) -> "TissueParams":
        if not data:
            return cls()
        reject_unknown(cls, data, "tissue parameters")
        values = dict(data)
        if "n4_iterations" in values:
            values["n4_iterations"] = tuple(int(v) for v in values["n4_iterations"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "max_iterations": self.max_iterations, "tolerance": self.tolerance,
                "bias_correction": self.bias_correction, "tied_variance": self.tied_variance, "clip_low_percentile": self.clip_low_percentile, "n4_shrink": self.n4_shrink,
                "n4_iterations": list(self.n4_iterations),
                "neighbour_weight_power": self.neighbour_weight_power, "working_grid_mm": self.working_grid_mm,
                "denoise_iterations": self.denoise_iterations, "denoise_target_snr": self.denoise_target_snr,
                "denoise_edge_k": self.denoise_edge_k}


@dataclass(frozen=True, eq=False)
class TissueSegmentation:
    """Result of :func:`classify_tissue` on the input grid."""

    #: uint8 label map: 0 outside the mask, then :data:`CSF`, :data:`GM`, :data:`WM`.
    labels: np.ndarray
    #: Soft volumes in mL per class, in :data:`CLASS_NAMES` order.
    volumes_ml: dict[str, float]
    #: Mask (intracranial) volume in mL.
    mask_ml: float
    #: Class means and standard deviations of the bias-corrected intensities, darkest first.
    means: tuple[float, float, float]
    stds: tuple[float, float, float]
    #: Mixing proportions of CSF, CSF|GM, GM, GM|WM, WM (the last EM step).
    mixing: tuple[float, ...]
    iterations: int
    converged: bool
    params: TissueParams
    #: Bias-corrected intensities inside the mask's bounding box (for QC), and that box.
    corrected: np.ndarray = field(repr=False)
    bbox: tuple[slice, slice, slice] = field(repr=False)
    #: Voxel size (mm, isotropic) the mixture was fitted on, when not the source grid.
    working_grid_mm: float | None = None
    #: What :func:`denoise` measured and did (None: denoising is off in the parameters).
    denoising: dict[str, float] | None = None


def _bbox(mask: np.ndarray, margin: int = 1) -> tuple[slice, slice, slice]:
    idx = np.nonzero(mask)
    return tuple(slice(max(int(a.min()) - margin, 0), min(int(a.max()) + margin + 1, n))  # type: ignore[return-value]
                 for a, n in zip(idx, mask.shape))


def n4_correct(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], *,
               shrink: int = 3, iterations: tuple[int, ...] = (50, 50, 30)) -> np.ndarray:
    """Divide out a smooth multiplicative bias field (N4) fitted inside ``mask``.

    ``spacing`` is (i, j, k) = (column, row, slice) like SimpleITK; arrays are [k, j, i].
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))
    msk.CopyInformation(img)
    shrink = max(1, int(shrink))
    small = sitk.Shrink(img, [shrink] * 3) if shrink > 1 else img
    small_mask = sitk.Shrink(msk, [shrink] * 3) if shrink > 1 else msk
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    # Intensities must be positive for the log-domain fit.
    small = sitk.Maximum(small, 1e-3)
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).astype(np.float32)
    return (image / np.exp(log_field)).astype(np.float32)


def _kmeans_1d(y: np.ndarray, k: int = 3, iterations: int = 30) -> np.ndarray:
    centres = np.percentile(y, np.linspace(10, 90, k))
    for _ in range(iterations):
        assign = np.argmin(np.abs(y[:, None] - centres[None, :]), axis=1)
        new = np.array([y[assign == c].mean() if np.any(assign == c) else centres[c] for c in range(k)])
        if np.allclose(new, centres, rtol=0, atol=1e-6 * (abs(centres).max() + 1)):
            break
        centres = new
    return np.sort(centres)


def _neighbour_sum(p: np.ndarray, weights: tuple[float, float, float]) -> np.ndarray:
    """Weighted sum over the 6 face neighbours of each voxel, per class (axis 0 is class)."""
    out = np.zeros_like(p)
    for axis, w in zip((1, 2, 3), weights):
        lo = [slice(None)] * 4
        hi = [slice(None)] * 4
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        out[tuple(lo)] += w * p[tuple(hi)]
        out[tuple(hi)] += w * p[tuple(lo)]
    return out


def _five_classes(mu: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means/variances of CSF, CSF|GM, GM, GM|WM, WM: a mixed voxel's intensity is a
    uniform blend of its two tissues plus noise (mean midway, variance + Δμ²/12)."""
    mu5 = np.array([mu[0], (mu[0] + mu[1]) / 2, mu[1], (mu[1] + mu[2]) / 2, mu[2]])
    var5 = np.array([var[0], (var[0] + var[1]) / 2 + (mu[1] - mu[0]) ** 2 / 12, var[1],
                     (var[1] + var[2]) / 2 + (mu[2] - mu[1]) ** 2 / 12, var[2]])
    return mu5, var5


def _tissue_fractions(p5: np.ndarray, y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Expected fraction of each tissue per voxel: pure classes count whole, a mixed
    class splits by where the intensity lies between the two tissue means."""
    a_cg = np.clip((y - mu[0]) / max(mu[1] - mu[0], 1e-6), 0, 1)
    a_gw = np.clip((y - mu[1]) / max(mu[2] - mu[1], 1e-6), 0, 1)
    frac = np.empty((3, y.shape[0]), dtype=np.float32)
    frac[0] = p5[0] + p5[1] * (1 - a_cg)
    frac[1] = p5[2] + p5[1] * a_cg + p5[3] * (1 - a_gw)
    frac[2] = p5[4] + p5[3] * a_gw
    return frac


def denoise(image: np.ndarray, mask: np.ndarray, *, iterations: int, target_snr: float = 30.0,
            edge_k: float = 2.0) -> tuple[np.ndarray, dict[str, float]]:
    """Edge-preserving (robust anisotropic) diffusion inside ``mask`` (Black, Sapiro, Marimont
    & Heeger, IEEE TIP 1998: Perona-Malik with Tukey's biweight as the edge-stopping function),
    removing only the noise beyond ``target_snr``.

    The noise sigma is image QC's estimate (:func:`medai.assist.qc.noise_sigma`), the signal
    the median of the brightest third of the mask (white matter on a T1). The part of the
    noise above what ``target_snr`` allows, sigma_x = sqrt(sigma^2 - (signal/target)^2), sets
    Tukey's threshold: a difference between two neighbours larger than ``edge_k`` x sqrt(2)
    x sigma_x is an edge and is not smoothed across, so tissue boundaries stay where they
    are while the noise inside each tissue shrinks. Six face neighbours, step 1/6 (stable);
    voxels outside the mask neither receive nor give. Returns the image and what was done."""
    from medai.assist.qc import face_shifts, noise_sigma

    img = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    vals = img[m]
    signal = float(np.median(vals[vals >= np.percentile(vals, 200.0 / 3.0)]))
    sigma = noise_sigma(img, m)
    info = {"noise_sigma": round(sigma, 4), "snr": round(signal / sigma, 2) if sigma > 0 else float("inf"),
            "iterations": 0}
    excess_sq = sigma * sigma - (signal / target_snr) ** 2 if sigma > 0 and target_snr > 0 else 0.0
    if iterations <= 0 or excess_sq <= 0:
        return img, info
    lam = float(edge_k) * np.sqrt(2.0) * np.sqrt(excess_sq)
    # Which face neighbours exchange (both voxels in the mask): fixed, so worked out once.
    pairs = [(axis, shift, m & np.roll(m, shift, axis=axis) & valid) for axis, shift, valid in face_shifts(m.shape)]
    out = img.copy()
    for _ in range(int(iterations)):
        flow = np.zeros_like(out)
        for axis, shift, ok in pairs:
            diff = np.roll(out, shift, axis=axis) - out
            r = diff / lam
            flow += np.where(ok & (np.abs(r) < 1.0), diff * (1.0 - r * r) ** 2, 0.0).astype(np.float32)
        out += flow / 6.0  # no flow reaches a voxel outside the mask: it keeps its value
    info.update(iterations=int(iterations), edge_threshold=round(lam, 4), excess_sigma=round(float(np.sqrt(excess_sq)), 4))
    return out, info


def _working_grid(img: np.ndarray, m: np.ndarray, spacing: tuple[float, float, float], grid_mm: float,
                  priors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray | None]:
    """``img``/``m`` ([k, j, i], voxel size ``spacing`` = (i, j, k)) on an isotropic grid of
    ``grid_mm`` covering the same extent (B-spline for the image, clamped to its range;
    nearest for the mask), and a function that samples [c, k, j, i] maps on that grid back
    at the source voxel centres (linear)."""
    import SimpleITK as sitk

    def on_grid(a: np.ndarray, sp: tuple[float, ...], origin: tuple[float, ...]) -> "sitk.Image":
        out = sitk.GetImageFromArray(a)
        out.SetSpacing(tuple(float(v) for v in sp))
        out.SetOrigin(tuple(float(v) for v in origin))
        return out

    src = on_grid(img.astype(np.float32), spacing, (0.0, 0.0, 0.0))
    # Fine voxels tile the source voxels' extent: [-s/2, (n - 1/2) s] on every axis.
    size = [max(1, int(round(n * s / grid_mm))) for n, s in zip(src.GetSize(), spacing)]
    origin = [-0.5 * s + 0.5 * grid_mm for s in spacing]
    fine_spacing = [grid_mm] * 3
    fine = sitk.Resample(src, size, sitk.Transform(), sitk.sitkBSpline, origin, fine_spacing,
                         src.GetDirection(), 0.0, sitk.sitkFloat32)
    fine_img = np.clip(sitk.GetArrayFromImage(fine), float(img.min()), float(img.max()))
    msk = sitk.Resample(on_grid(m.astype(np.uint8), spacing, (0.0, 0.0, 0.0)), size, sitk.Transform(),
                        sitk.sitkNearestNeighbor, origin, fine_spacing, src.GetDirection(), 0, sitk.sitkUInt8)
    fine_mask = sitk.GetArrayFromImage(msk) > 0
    fine_priors = None
    if priors is not None:  # smooth maps: linear is enough
        fine_priors = np.stack([sitk.GetArrayFromImage(sitk.Resample(
            on_grid(np.ascontiguousarray(c, dtype=np.float32), spacing, (0.0, 0.0, 0.0)), size, sitk.Transform(),
            sitk.sitkLinear, origin, fine_spacing, src.GetDirection(), 1.0 / 3.0, sitk.sitkFloat32)) for c in priors])

    def back(maps: np.ndarray) -> np.ndarray:
        out = np.empty((maps.shape[0],) + img.shape, dtype=np.float32)
        for c in range(maps.shape[0]):
            sampled = sitk.Resample(on_grid(maps[c], fine_spacing, origin), src, sitk.Transform(),
                                    sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            out[c] = sitk.GetArrayFromImage(sampled)
        return out

    return fine_img.astype(np.float32), fine_mask, back, fine_priors


def mask_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The box of ``mask`` that :func:`classify_tissue` works in (priors are given over it)."""
    return _bbox(np.asarray(mask) > 0)


def classify_tissue(image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                    params: TissueParams | None = None, *, priors: np.ndarray | None = None,
                    prior_weight: float = 1.0) -> TissueSegmentation:
    """Classify voxels inside ``mask`` into three tissues ordered by mean intensity.

    ``image`` and ``mask`` are [k, j, i] arrays of the same shape; ``spacing`` is
    (i, j, k) in mm. Raises ``ValueError`` for inputs that cannot be classified
    (empty or tiny mask, constant image).

    ``priors``: spatial prior probabilities of CSF, GM, WM over :func:`mask_box` of the mask
    ([3, k, j, i], e.g. :func:`medai.assist.priors.tissue_priors`). With them, each voxel's
    posterior is prior ** ``prior_weight`` x likelihood x MRF (as in SPM, FAST ``-P`` and
    Atropos); a mixed class takes the mean prior of its two tissues.
    """
    params = params or TissueParams()
    if image.shape != mask.shape:
        raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
    mask = np.asarray(mask) > 0
    n_mask = int(mask.sum())
    if n_mask < 1000:
        raise ValueError(f"brain mask has {n_mask} voxels; too small to classify tissue")
    box = _bbox(mask)
    m = mask[box]
    img = np.asarray(image, dtype=np.float32)[box]
    if priors is not None and priors.shape != (3,) + m.shape:
        raise ValueError(f"priors {priors.shape} do not cover the mask's box {(3,) + m.shape}")
    vals = img[m]
    if not np.isfinite(vals).all():
        raise ValueError("image has non-finite values inside the brain mask")
    lo, hi = np.percentile(vals, [0.5, 99.5])
    if hi <= lo:
        raise ValueError("image is constant inside the brain mask")
    sx, sy, sz = (float(s) for s in spacing)
    src_mask, src_vox_ml = m, sx * sy * sz / 1000.0
    denoised: dict[str, float] | None = None
    if params.denoise_iterations > 0:
        # On the source voxels, before any interpolation: resampling correlates the noise, and
        # a neighbour-difference estimate then reads a noisy coarse series as a clean one.
        img, denoised = denoise(img, m, iterations=params.denoise_iterations, target_snr=params.denoise_target_snr,
                                edge_k=params.denoise_edge_k)
    grid = float(params.working_grid_mm)
    back = None
    if grid > 0 and max(sx, sy, sz) > 1.25 * grid:
        # Coarse voxels: fit where the model was calibrated. Interpolation adds no detail,
        # but the MRF then couples voxels at the distance it was tuned for and a thick
        # slice's blend of tissues is spread over several fine voxels whose mixed classes
        # can share it out, instead of one coarse voxel going to its majority tissue.
        img, m, back, priors = _working_grid(img, m, (sx, sy, sz), grid, priors)
        sx = sy = sz = grid
    if params.bias_correction:
        shifted = np.where(m, img - min(lo, 0.0) + 1e-3 * (hi - lo), 0).astype(np.float32)
        img = n4_correct(shifted, m, (sx, sy, sz), shrink=params.n4_shrink, iterations=params.n4_iterations)
    corrected = np.where(m, img, 0).astype(np.float32)
    vals = img[m].astype(np.float64)
    # Scale to a robust unit range so tolerances mean the same on every scanner. The darkest
    # voxels are clipped up to a low percentile: inside an intracranial mask they are CSF,
    # dura or air the mask took in, and a dense spike of them (e.g. zeros around a
    # skull-stripped input) would otherwise capture the CSF class on its own.
    floor = np.percentile(vals, params.clip_low_percentile) if params.clip_low_percentile > 0 else -np.inf
    vals = np.maximum(vals, floor)
    lo, hi = np.percentile(vals, [0.5, 99.5])
    scale = hi - lo
    y = (vals - lo) / scale
    mu = _kmeans_1d(y)
    assign = np.argmin(np.abs(y[:, None] - mu[None, :]), axis=1)
    var = np.array([max(y[assign == c].var() if np.any(assign == c) else 0.01, 1e-4) for c in range(3)])
    pi = np.array([max((assign == c).mean(), 1e-3) for c in range(3)])

    # Neighbour weights = 1 / centre distance in mm (1 at 1 mm, so β is calibrated on 1 mm
    # images). Not renormalised: neighbours 3 mm apart say less about each other than
    # neighbours 1 mm apart, and a prior as strong as at 1 mm over-smooths coarse voxels
    # (thin sulcal CSF was absorbed into GM at 2x2x3 mm). Axis order of the box is
    # [k, j, i] -> spacing (sz, sy, sx).
    q = params.neighbour_weight_power
    w = (sz ** -q, sy ** -q, sx ** -q)
    yy = y.astype(np.float32)
    member = np.zeros((3,) + m.shape, dtype=np.float32)  # tissue membership for the MRF
    converged = False
    it = 0
    prev_mean = None
    pi5 = np.array([pi[0], 0.05, pi[1], 0.05, pi[2]])
    pi5 /= pi5.sum()
    log_prior = None
    if priors is not None:
        pv = np.maximum(priors[:, m], 1e-6).astype(np.float32)
        log_prior = prior_weight * np.log(np.stack([pv[0], 0.5 * (pv[0] + pv[1]), pv[1], 0.5 * (pv[1] + pv[2]), pv[2]]))
    for it in range(1, params.max_iterations + 1):
        # float32 on the voxel arrays (half the memory traffic); class parameters stay float64.
        mu5, var5 = (v.astype(np.float32) for v in _five_classes(mu, var))
        logp = -0.5 * (yy[None, :] - mu5[:, None]) ** 2 / var5[:, None]
        logp += (np.log(pi5) - 0.5 * np.log(var5)).astype(np.float32)[:, None]
        if log_prior is not None:
            logp += log_prior
        if it > 1 and params.beta > 0:
            nb = _neighbour_sum(member, w)[:, m]
            logp[0::2] += params.beta * nb
            logp[1] += params.beta * 0.5 * (nb[0] + nb[1])
            logp[3] += params.beta * 0.5 * (nb[1] + nb[2])
        logp -= logp.max(axis=0, keepdims=True)
        p = np.exp(logp)
        p /= p.sum(axis=0, keepdims=True)
        frac = _tissue_fractions(p, yy, mu.astype(np.float32))
        for c in range(3):
            member[c][m] = frac[c]
        # M-step: pure-class parameters from pure-class posteriors only.
        pure = p[0::2]
        wsum = pure.sum(axis=1, dtype=np.float64) + 1e-9
        mu = (pure @ yy).astype(np.float64) / wsum
        # One noise variance shared by the pure classes: spread beyond it is left to the
        # mixed classes (otherwise the broadest pure class swallows the boundary voxels).
        sq = (pure * (yy[None, :] - mu.astype(np.float32)[:, None]) ** 2).sum(axis=1, dtype=np.float64)
        if params.tied_variance == "all":
            var = np.full(3, max(float(sq.sum() / wsum.sum()), 1e-4))
        else:  # "gm_wm": CSF keeps its own (vessels, dura and partial skull make it broader)
            tied = max(float((sq[1] + sq[2]) / (wsum[1] + wsum[2])), 1e-4)
            var = np.array([max(float(sq[0] / wsum[0]), tied), tied, tied])
        pi5 = np.maximum(p.sum(axis=1, dtype=np.float64) / p.shape[1], 1e-3)
        pi5 /= pi5.sum()
        order = np.argsort(mu)
        if not np.array_equal(order, np.arange(3)):
            mu, var = mu[order], var[order]
        mean_p = frac.mean(axis=1)
        if prev_mean is not None and np.abs(mean_p - prev_mean).max() < params.tolerance and it > 3:
            converged = True
            break
        prev_mean = mean_p
    p = frac

    totals = p.sum(axis=1, dtype=np.float64)
    # Volumes are shares of the source mask (the ICV): on a working grid the resampled mask
    # differs from it by a few boundary voxels, which must not move the tissue volumes.
    icv_ml = n_mask * src_vox_ml
    volumes = {name: float(totals[c] / totals.sum() * icv_ml) for c, name in enumerate(CLASS_NAMES)}
    labels = np.zeros(mask.shape, dtype=np.uint8)
    sub = np.zeros(src_mask.shape, dtype=np.uint8)
    if back is None:
        sub[m] = (np.argmax(p, axis=0) + 1).astype(np.uint8)
    else:
        maps = np.zeros((3,) + m.shape, dtype=np.float32)
        maps[:, m] = p
        sub[src_mask] = (np.argmax(back(maps)[:, src_mask], axis=0) + 1).astype(np.uint8)
    labels[box] = sub
    means = tuple(float(v * scale + lo) for v in mu)
    stds = tuple(float(np.sqrt(v) * scale) for v in var)
    log.debug("tissue classification: %d iterations, converged=%s", it, converged)
    return TissueSegmentation(labels=labels, volumes_ml=volumes, mask_ml=icv_ml,
                              means=means, stds=stds, mixing=tuple(float(v) for v in pi5), iterations=it, converged=converged,  # type: ignore[arg-type]
                              params=params, corrected=corrected, bbox=box,
                              working_grid_mm=grid if back is not None else None, denoising=denoised)
