"""nnU-Net v2 inference, torch-free: the pipeline of bundles made by ``medai models import-nnunet``.

The card's ``[[preprocessing]]`` steps spell out, per configuration (``stage``), exactly
what nnU-Net's ``nnUNetPredictor`` does, with the values read from the trained folder's
``plans.json`` and ``dataset.json`` at import time; this module executes them with
numpy, scipy.ndimage and ONNX Runtime:

[``reorient`` to the closest canonical RAS layout, an import option for TotalSegmentator
tasks] → ``transpose`` → ``crop_nonzero`` → [``previous_stage`` one-hot, cascade only] →
``normalize`` (per channel: CTNormalization with the fingerprint's percentiles, mean
and std; ZScoreNormalization) → ``resample`` to the configuration's spacing →
``sliding_window`` (patch size, tile step, Gaussian importance, mirroring, one graph
per fold, logits averaged over folds) → ``resample_back`` (probabilities to the cropped
input grid) → ``to_labels`` (softmax argmax, or sigmoid regions in
``regions_class_order``) → uncrop, transpose back.

Why scipy: nnU-Net resamples with ``skimage.transform.resize``, which is
``scipy.ndimage.zoom`` (cubic B-spline, ``grid_mode``, edge mode) plus a clip to the
input range, and it fills holes of the non-zero mask with
``scipy.ndimage.binary_fill_holes``. SimpleITK's B-spline treats the borders
differently, so exact parity needs scipy's own routines (scipy is small and has no
torch). The input array is the volume as SimpleITK reads it (``[k, j, i]``, spacing
reversed), which is what nnU-Net's ``SimpleITKIO`` hands the predictor.

nnU-Net accumulates the tiles' logits in float16 (half the memory of float32); the card's
``accumulate`` (default ``float16``) reproduces that, rounding included, since near the
borders, where every tile's Gaussian weight is tiny, float16 rounding moves the logits.
The import measures the agreement with ``nnUNetPredictor`` and writes it on the card.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from medai.errors import DicomInputError, ModelIntegrityError
from medai.inference.pipeline import PipelineContext, PipelineOutput, segments_from_card
from medai.inference.steps import reorientation

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.bundle import Bundle

ANISO_THRESHOLD = 3.0


# --------------------------------------------------------------------------- resampling (nnU-Net's rules)

def _skimage_resize(x: np.ndarray, new_shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(x, new_shape, order, mode="edge", anti_aliasing=False)`` on float64."""
    from scipy import ndimage

    factors = np.divide(x.shape, new_shape)
    out = ndimage.zoom(x, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, x.min(), x.max(), out=out)
    return out


def separate_z(current: Sequence[float], new: Sequence[float], force: bool | None,
               threshold: float = ANISO_THRESHOLD) -> int | None:
    """The axis nnU-Net resamples on its own (order_z), or None: its ``determine_do_sep_z_and_axis``."""
    def lowres_axis(spacing: Sequence[float]) -> np.ndarray:
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    if force is not None:
        axis = lowres_axis(current) if force else None
    elif np.max(current) / np.min(current) > threshold:
        axis = lowres_axis(current)
    elif np.max(new) / np.min(new) > threshold:
        axis = lowres_axis(new)
    else:
        axis = None
    if axis is None or len(axis) != 1:
        return None
    return int(axis[0])


def compute_new_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(round(s / n * k)) for s, n, k in zip(spacing, new_spacing, shape))


def resample(data: np.ndarray, new_shape: Sequence[int], current: Sequence[float], new: Sequence[float], *,
             order: int = 3, order_z: int = 0, force_separate_z: bool | None = None,
             anisotropy_threshold: float = ANISO_THRESHOLD, out_dtype: Any = np.float32,
             is_seg: bool = False) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` (``[c, *spatial]``); ``is_seg`` for label maps."""
    resize = resample_seg if is_seg else _skimage_resize
    shape = np.array(data.shape[1:])
    new_shape_a = np.array(new_shape)
    if np.all(shape == new_shape_a):
        return data.astype(out_dtype, copy=False)
    axis = separate_z(current, new, force_separate_z, anisotropy_threshold)
    out = np.zeros((data.shape[0], *new_shape_a), dtype=out_dtype)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64)
        if axis is None:
            out[c] = resize(channel, new_shape_a, order)
            continue
        inplane = np.delete(new_shape_a, axis)
        mid_shape = new_shape_a.copy()
        mid_shape[axis] = shape[axis]
        mid = np.zeros(mid_shape)
        for s in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = s
            mid[tuple(index)] = resize(channel[tuple(index)], inplane, order)
        if shape[axis] == new_shape_a[axis]:
            out[c] = mid
        elif order_z == 0:
            # map_coordinates(order=0, mode="nearest") along one axis: floor(x + .5), clamped.
            scale = float(shape[axis]) / new_shape_a[axis]
            coords = scale * (np.arange(new_shape_a[axis]) + 0.5) - 0.5
            idx = np.clip(np.floor(coords + 0.5).astype(np.intp), 0, shape[axis] - 1)
            out[c] = np.take(mid, idx, axis=axis)
        else:
            from scipy import ndimage

            grids = np.mgrid[tuple(slice(0, n) for n in new_shape_a)].astype(np.float64)
            scale = np.array(mid.shape, dtype=np.float64) / new_shape_a
            coords = np.array([scale[a] * (grids[a] + 0.5) - 0.5 for a in range(3)])
            if not is_seg:
                out[c] = ndimage.map_coordinates(mid, coords, order=order_z, mode="nearest")
            else:
                for lab in np.unique(mid):
                    hit = np.round(ndimage.map_coordinates((mid == lab).astype(float), coords, order=order_z,
                                                           mode="nearest")) > 0.5
                    out[c][hit] = lab
    return out


def resample_seg(seg: np.ndarray, new_shape: Sequence[int], order: int = 1) -> np.ndarray:
    """batchgenerators' ``resize_segmentation`` for one label map: each label's indicator is
    resized, the largest wins; exact ties go to the nearest-neighbour label when it is one of
    the tied labels, else to the smallest tied label (its ``seg_tiebreak="nearest"``)."""
    if tuple(seg.shape) == tuple(new_shape):
        return seg.copy()
    nearest = _skimage_resize(seg.astype(np.float64), new_shape, 0).astype(seg.dtype)
    if order == 0:
        return nearest
    out = np.zeros(tuple(new_shape), dtype=seg.dtype)
    best = np.full(tuple(new_shape), -np.inf)
    nn_score = np.full(tuple(new_shape), -np.inf)
    for lab in np.unique(seg):
        score = _skimage_resize((seg == lab).astype(np.float64), new_shape, order)
        better = score > best
        out[better] = lab
        best[better] = score[better]
        here = nearest == lab
        nn_score[here] = score[here]
    tie = nn_score == best
    out[tie] = nearest[tie]
    return out


# --------------------------------------------------------------------------- crop, normalise

def _fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    return binary_fill_holes(mask)


def nonzero_bbox(data: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """nnU-Net's ``crop_to_nonzero``: the hole-filled non-zero mask of all channels and its box."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = _fill_holes(mask)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.nonzero(mask.any(axis=other))[0]
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, mask.shape[axis]))
    return mask, tuple(box)


def normalize_channel(x: np.ndarray, outside: np.ndarray | None, scheme: str, params: Mapping[str, Any]) -> np.ndarray:
    """One channel, float32, as nnU-Net's normalisation class ``scheme`` does it."""
    x = x.astype(np.float32, copy=False)
    if scheme == "CTNormalization":
        np.clip(x, params["percentile_00_5"], params["percentile_99_5"], out=x)
        x -= params["mean"]
        x /= max(params["std"], 1e-8)
    elif scheme == "ZScoreNormalization":
        if params.get("use_mask_for_norm") and outside is not None:
            inside = ~outside
            mean, std = x[inside].mean(), x[inside].std()
            x[inside] = (x[inside] - mean) / max(std, 1e-8)
        else:
            mean, std = x.mean(), x.std()
            x -= mean
            x /= max(std, 1e-8)
    elif scheme == "NoNormalization":
        pass
    elif scheme == "RescaleTo01Normalization":
        x -= x.min()
        x /= np.clip(x.max(), 1e-8, None)
    else:
        raise ModelIntegrityError(f"nnU-Net normalisation {scheme!r} is not supported")
    return x


# --------------------------------------------------------------------------- sliding window

@lru_cache(maxsize=4)
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1 / 8, value_scale: float = 10.0) -> np.ndarray:
    """nnU-Net's ``compute_gaussian`` (float16 values, zeros replaced by the smallest), as float32."""
    from scipy.ndimage import gaussian_filter

    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / value_scale
    g = g.astype(np.float32).astype(np.float16)  # via float32, as torch converts double to half
    g[g == 0] = np.min(g[g != 0])
    return g.astype(np.float32)


def tile_starts(size: Sequence[int], patch: Sequence[int], step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``."""
    out = []
    for s, p in zip(size, patch):
        n = int(np.ceil((s - p) / (p * step))) + 1
        actual = (s - p) / (n - 1) if n > 1 else 99999999999
        out.append([int(np.round(actual * i)) for i in range(n)])
    return out


def sliding_window(data: np.ndarray, patch: Sequence[int], step: float, n_out: int,
                   predict: Callable[[np.ndarray], np.ndarray], *, gaussian: bool = True,
                   accumulate: Any = np.float16) -> np.ndarray:
    """Logits ``[n_out, *spatial]`` of ``data`` (``[c, *spatial]``), tiles as nnU-Net places them.

    ``predict`` maps a ``[1, c, *patch]`` tile to ``[1, n_out, *patch]``. 2-D patches on
    3-D data run slice by slice along the first axis, as nnU-Net's 2d configuration does.
    ``accumulate``: the dtype of the two accumulators. nnU-Net's predictor uses float16
    (half the memory); its rounding is visible near the borders, where every tile's
    Gaussian weight is tiny, so float16 is what reproduces nnU-Net's logits, float32
    is slightly more exact.
    """
    patch = tuple(int(p) for p in patch)
    spatial = data.shape[1:]
    tail = spatial[len(spatial) - len(patch):]
    pads = [max(0, p - s) for s, p in zip(tail, patch)]
    pad_width = [(0, 0)] * (data.ndim - len(patch)) + [(d // 2, d // 2 + d % 2) for d in pads]
    padded = np.pad(data, pad_width, mode="constant") if any(pads) else data
    size = padded.shape[1:]
    weights = gaussian_importance(patch) if gaussian else np.ones(patch, np.float32)
    acc = np.dtype(accumulate)
    weights_acc = weights.astype(acc)  # nnU-Net adds the (float16) map itself to its counter
    logits = np.zeros((n_out, *size), acc)
    norm = np.zeros(size, acc)
    starts = tile_starts(size[len(size) - len(patch):], patch, step)
    lead = [range(size[0])] if len(patch) < len(size) else []
    for pos in itertools.product(*lead, *starts):
        if lead:
            sl = (pos[0], *[slice(s, s + p) for s, p in zip(pos[1:], patch)])
        else:
            sl = tuple(slice(s, s + p) for s, p in zip(pos, patch))
        tile = np.ascontiguousarray(padded[(slice(None), *sl)], dtype=np.float32)[None]
        out = predict(tile)[0]
        out *= weights
        logits[(slice(None), *sl)] += out  # computed in float32, rounded to the accumulator's dtype
        norm[sl] += weights_acc
    np.divide(logits, norm, out=logits)
    crop = tuple(slice(lo, n - hi) for (lo, hi), n in zip(pad_width[1:], size))
    return logits[(slice(None), *crop)]


def mirrored(run: Callable[[np.ndarray], np.ndarray], axes: Sequence[int] | None, batched: bool
             ) -> Callable[[np.ndarray], np.ndarray]:
    """nnU-Net's test-time mirroring: the mean of the net over every non-empty set of flipped axes."""
    if not axes:
        return run
    spatial = [a + 2 for a in axes]
    combos = [c for i in range(len(spatial)) for c in itertools.combinations(spatial, i + 1)]

    def predict(x: np.ndarray) -> np.ndarray:
        if batched:
            batch = np.concatenate([x] + [np.flip(x, c) for c in combos])
            outs = run(np.ascontiguousarray(batch))
            total = outs[:1].copy()
            for i, c in enumerate(combos):
                total += np.flip(outs[i + 1:i + 2], c)
        else:
            total = run(x).copy()
            for c in combos:
                total += np.flip(run(np.ascontiguousarray(np.flip(x, c))), c)
        total /= len(combos) + 1
        return total

    return predict


def to_labels(logits: np.ndarray, regions_class_order: Sequence[int] | None) -> np.ndarray:
    """Softmax+argmax (= argmax of logits) or sigmoid > 0.5 per region, later regions on top."""
    if regions_class_order:
        seg = np.zeros(logits.shape[1:], np.uint16)
        for i, c in enumerate(regions_class_order):
            seg[logits[i] > 0] = c  # sigmoid(x) > 0.5  <=>  x > 0
        return seg
    # nnU-Net takes the argmax of the float32 softmax of its (float16) logits; equal except in ties.
    return np.argmax(logits.astype(np.float32, copy=False), axis=0).astype(np.uint16)


# --------------------------------------------------------------------------- the pipeline

class NnUNet:
    """Runs an imported nnU-Net v2 model (one configuration, or a cascade) from its card steps."""

    accepts_prompt = False

    def __init__(self, bundle: "Bundle") -> None:
        self.bundle = bundle
        meta = bundle.card.raw.get("nnunet")
        if not isinstance(meta, dict) or not meta.get("stages"):
            raise ModelIntegrityError(f"model {bundle.id}: card has no [nnunet] stages")
        self.stages: list[str] = list(meta["stages"])
        self.channels = int(meta.get("channels", 1))

    def run(self, volume: "Volume", ctx: PipelineContext) -> PipelineOutput:
        if self.channels != 1:
            raise DicomInputError(f"model {self.bundle.id} takes {self.channels} channels; one series gives one "
                                  "(multi-channel nnU-Net models are not supported)")
        reorient = next((s.params for s in self.bundle.card.preprocessing if s.op == "reorient"), None)
        labels = predict_oriented(np.asarray(volume.array), volume.geometry.spacing, volume.geometry.direction,
                                  ctx.steps.params, ctx.session, self.stages, reorient=reorient,
                                  record=ctx.steps.record)
        return PipelineOutput(labels=labels.astype(np.uint16 if labels.max() > 255 else np.uint8),
                              segments=segments_from_card(self.bundle.card))


Params = Callable[..., Mapping[str, Any]]


def predict_oriented(array_kji: np.ndarray, spacing_ijk: Sequence[float], direction: Sequence[float],
                     params: Params, session: Callable[[str], Any], stages: Sequence[str], *,
                     reorient: Mapping[str, Any] | None = None, record: Callable[..., None] | None = None,
                     logits_out: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Labels on the volume's own ``[k, j, i]`` grid.

    Without ``reorient`` the array goes to nnU-Net as stored, which is what nnU-Net's
    ``SimpleITKIO`` hands its predictor. With the card's ``reorient`` step (``to = "RAS"``)
    the array is first permuted and flipped to the closest canonical RAS layout, what
    TotalSegmentator does with ``nibabel.as_closest_canonical`` before it calls nnU-Net
    (its models were trained on canonical images), and the labels are brought back onto
    the source grid afterwards. No resampling either way.
    """
    record = record or (lambda op, **kw: None)
    array_kji = np.asarray(array_kji)
    if reorient:
        orient = reorientation(direction, str(reorient.get("to", "RAS")))
        record("reorient", to=orient.to, perm=list(orient.perm), flip=list(orient.flip))
        xyz = orient.apply(array_kji)
        image = np.ascontiguousarray(xyz.transpose(2, 1, 0))[None]  # [z, y, x], as nnU-Net reads the canonical file
        spacing = tuple(float(spacing_ijk[a]) for a in reversed(orient.perm))
    else:
        image = array_kji[None]
        spacing = tuple(float(s) for s in reversed(spacing_ijk))  # [k, j, i] like SimpleITKIO
    labels = predict(image, spacing, params, session, stages, record=record, logits_out=logits_out)
    if reorient:
        labels = orient.invert(np.ascontiguousarray(labels.transpose(2, 1, 0)))
    return labels


def predict(image: np.ndarray, spacing: Sequence[float], params: Params, session: Callable[[str], Any],
            stages: Sequence[str], *, record: Callable[..., None] | None = None,
            logits_out: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Labels for ``image`` (``[c, k, j, i]``, spacing in that order) through every stage."""
    record = record or (lambda op, **kw: None)
    previous: np.ndarray | None = None
    for stage in stages:
        previous = _stage(image, spacing, stage, params, session, previous, record, logits_out)
    assert previous is not None
    return previous


def _stage(image: np.ndarray, spacing: Sequence[float], stage: str, params: Params, session: Callable[[str], Any],
           previous: np.ndarray | None, record: Callable[..., None],
           logits_out: dict[str, np.ndarray] | None) -> np.ndarray:
    tp = params("transpose", stage)
    forward, backward = list(tp["forward"]), list(tp["backward"])
    data = image.astype(np.float32).transpose([0, *[a + 1 for a in forward]])
    sp = [spacing[a] for a in forward]
    shape_before = data.shape[1:]
    record("transpose", stage=stage, forward=forward)

    params("crop_nonzero", stage)
    mask, box = nonzero_bbox(data)
    data = data[(slice(None), *box)]
    outside = ~mask[box]
    record("crop_nonzero", stage=stage, box=[[s.start, s.stop] for s in box])

    rs = dict(params("resample", stage))
    target = list(rs.pop("spacing"))
    seg_order, seg_order_z = int(rs.pop("seg_order", 1)), int(rs.pop("seg_order_z", 0))
    if len(target) < data.ndim - 1:
        target = [sp[0], *target]
    new_shape = compute_new_shape(data.shape[1:], sp, target)

    norm = params("normalize", stage)
    for c, ch in enumerate(norm["channels"]):
        data[c] = normalize_channel(data[c], outside, ch["scheme"], ch)
    record("normalize", stage=stage, channels=[ch["scheme"] for ch in norm["channels"]])

    if previous is not None:
        prev = params("previous_stage", stage)
        seg = previous.transpose(forward)[box].astype(np.int16)[None]
        seg[0][(seg[0] == 0) & outside] = -1
        seg = resample(seg, new_shape, sp, target, order=seg_order, order_z=seg_order_z,
                       force_separate_z=rs.get("force_separate_z"), out_dtype=np.int16, is_seg=True)[0]
        onehot = np.stack([seg == lab for lab in prev["labels"]]).astype(np.float32)
        record("previous_stage", stage=stage, labels=list(prev["labels"]))
    data = resample(data, new_shape, sp, target, **rs)
    if previous is not None:
        data = np.concatenate([data, onehot])
    record("resample", stage=stage, spacing=target, shape=list(new_shape))

    sw = params("sliding_window", stage)
    graphs = list(sw["graphs"])
    mirror_axes = list(sw.get("mirror_axes") or []) if sw.get("use_mirroring", True) else []
    accumulate = np.dtype(sw.get("accumulate", "float16"))
    logits: np.ndarray | None = None
    for key in graphs:  # fold ensemble: summed and divided in the accumulator's dtype, as nnU-Net does
        sess = session(key)
        predict_tile = mirrored(sess.run, mirror_axes, bool(sw.get("batched_mirroring", True)))
        out = sliding_window(data, sw["patch_size"], float(sw["tile_step_size"]), int(sw["outputs"]), predict_tile,
                             gaussian=bool(sw.get("gaussian", True)), accumulate=accumulate)
        if logits is None:
            logits = out
        else:
            logits += out
    assert logits is not None
    if len(graphs) > 1:
        logits /= logits.dtype.type(len(graphs))
    record("sliding_window", stage=stage, graphs=graphs, mirror_axes=mirror_axes,
           patch_size=list(sw["patch_size"]), tile_step_size=sw["tile_step_size"])

    back = dict(params("resample_back", stage))
    cropped_shape = outside.shape
    current = target
    logits = resample(logits, cropped_shape, current, sp, out_dtype=logits.dtype, **back)
    if logits_out is not None:
        logits_out[stage] = logits
    record("resample_back", stage=stage, shape=list(cropped_shape))

    lab = params("to_labels", stage)
    seg = to_labels(logits, lab.get("regions_class_order"))
    full = np.zeros(shape_before, np.uint16)
    full[box] = seg
    record("to_labels", stage=stage, nonlin="sigmoid" if lab.get("regions_class_order") else "softmax")
    return np.ascontiguousarray(full.transpose(backward))


def create(bundle: "Bundle") -> NnUNet:
    return NnUNet(bundle)
