"""MONAI bundle inference, torch-free: the pipeline of bundles made by ``medai models import-monai-bundle``.

The card's ``[[preprocessing]]`` steps are the bundle's own transforms, in their order,
each mapped at import onto an operation here (anything else was refused by name then):

* ``reorient`` (``Orientationd``, RAS): axis permutation/flips, no resampling;
* ``scale_intensity_range`` (``ScaleIntensityRanged``), ``normalize_intensity``
  (``NormalizeIntensityd``);
* ``sliding_window`` (``SlidingWindowInferer``: roi size, overlap, batch size, constant
  or Gaussian blending, padding with ``cval``), through the ONNX graph ``main``;
* ``activation`` (``Activationsd`` softmax/sigmoid) and ``as_discrete``
  (``AsDiscreted`` argmax/threshold).

The array is what MONAI's image readers give: ``[channel, i, j, k]`` (x fastest in the
file, i.e. the transpose of medai's ``[k, j, i]``). The label map is returned on the
source grid.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from medai.errors import ModelIntegrityError
from medai.inference.pipeline import PipelineContext, PipelineOutput, segments_from_card
from medai.inference.steps import reorientation

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.bundle import Bundle

OPS = ("reorient", "scale_intensity_range", "normalize_intensity", "sliding_window", "activation", "as_discrete")


def importance_map(roi: Sequence[int], mode: str, sigma_scale: float | Sequence[float] = 0.125) -> np.ndarray:
    """MONAI's ``compute_importance_map`` (float32)."""
    if mode == "constant":
        return np.ones(tuple(roi), np.float32)
    if mode != "gaussian":
        raise ModelIntegrityError(f"sliding-window blend mode {mode!r} is not supported")
    scales = list(sigma_scale) if isinstance(sigma_scale, (list, tuple)) else [sigma_scale] * len(roi)
    w = np.ones((), np.float32)
    for n, s in zip(roi, scales):
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
        sigma = np.float32(n * s)
        g = np.exp(x ** 2 / (np.float32(-2) * sigma ** 2)).astype(np.float32)
        w = np.multiply.outer(w, g)
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def window_starts(size: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> list[list[int]]:
    """MONAI's scan interval and ``dense_patch_slices`` starts per axis."""
    out = []
    for n, r, o in zip(size, roi, overlap):
        interval = r if r == n else max(int(r * (1 - o)), 1)
        count = int(math.ceil(float(n) / interval))
        scan = next((d for d in range(count) if d * interval + r >= n), None)
        num = scan + 1 if scan is not None else 1
        out.append([i * interval - max(i * interval + r - n, 0) for i in range(num)])
    return out


def sliding_window(x: np.ndarray, roi: Sequence[int], run: Callable[[np.ndarray], np.ndarray], *,
                   overlap: Sequence[float], mode: str, sigma_scale: Any, sw_batch_size: int, cval: float,
                   n_out: int) -> np.ndarray:
    """``[c, *spatial]`` → ``[n_out, *spatial]`` the way ``SlidingWindowInferer`` blends tiles."""
    roi = tuple(int(r) for r in roi)
    spatial = x.shape[1:]
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(spatial, roi)]
    padded = np.pad(x, [(0, 0), *pads], constant_values=cval) if any(sum(p) for p in pads) else x
    size = padded.shape[1:]
    weights = importance_map(roi, mode, sigma_scale)
    out = np.zeros((n_out, *size), np.float32)
    count = np.zeros(size, np.float32)
    starts = list(itertools.product(*window_starts(size, roi, overlap)))
    for b in range(0, len(starts), max(1, sw_batch_size)):
        chunk = starts[b:b + max(1, sw_batch_size)]
        slices = [tuple(slice(s, s + r) for s, r in zip(pos, roi)) for pos in chunk]
        batch = np.stack([padded[(slice(None), *sl)] for sl in slices]).astype(np.float32)
        pred = run(np.ascontiguousarray(batch))
        for sl, p in zip(slices, pred):
            out[(slice(None), *sl)] += p * weights
            count[sl] += weights
    out /= count
    crop = tuple(slice(lo, n - hi) for (lo, hi), n in zip(pads, size))
    return out[(slice(None), *crop)]


def predict(array_kji: np.ndarray, direction: Sequence[float], steps: Sequence[Mapping[str, Any]],
            session: Callable[[str], Any], *, record: Callable[..., None] | None = None) -> np.ndarray:
    """Run the card steps on one volume; returns labels ``[k, j, i]`` (uint16)."""
    record = record or (lambda op, **kw: None)
    x = np.transpose(np.asarray(array_kji, dtype=np.float32), (2, 1, 0))[None]  # [1, i, j, k]
    orient = None
    for step in steps:
        op = step["op"]
        p = {k: v for k, v in step.items() if k != "op"}
        if op == "reorient":
            orient = reorientation(direction, p.get("to", "RAS"))
            x = orient.apply(np.asarray(array_kji, dtype=np.float32))[None]
        elif op == "scale_intensity_range":
            a_min, a_max = p["a_min"], p["a_max"]
            if a_max - a_min == 0.0:
                x = x - a_min + (p.get("b_min") or 0.0)
            else:
                x = (x - np.float32(a_min)) / np.float32(a_max - a_min)
                if p.get("b_min") is not None and p.get("b_max") is not None:
                    x = x * np.float32(p["b_max"] - p["b_min"]) + np.float32(p["b_min"])
                if p.get("clip"):
                    x = np.clip(x, p.get("b_min"), p.get("b_max"))
            x = x.astype(np.float32)
        elif op == "normalize_intensity":
            chans = [x[c:c + 1] for c in range(x.shape[0])] if p.get("channel_wise") else [x]
            outs = []
            for ch in chans:
                ch = ch.astype(np.float32).copy()
                sel = ch != 0 if p.get("nonzero") else np.ones(ch.shape, bool)
                if sel.any():
                    vals = ch[sel]
                    sub = np.float32(p["subtrahend"]) if p.get("subtrahend") is not None else vals.mean()
                    div = np.float32(p["divisor"]) if p.get("divisor") is not None else vals.std()
                    div = div if div != 0 else np.float32(1.0)
                    ch[sel] = (vals - sub) / div
                outs.append(ch)
            x = np.concatenate(outs)
        elif op == "sliding_window":
            sess = session(p.get("graph", "main"))
            x = sliding_window(x, p["roi_size"], sess.run, overlap=p["overlap"], mode=p["mode"],
                               sigma_scale=p.get("sigma_scale", 0.125), sw_batch_size=int(p.get("sw_batch_size", 1)),
                               cval=float(p.get("cval", 0.0)), n_out=int(p["outputs"]))
        elif op == "activation":
            if p.get("softmax"):
                e = np.exp(x - x.max(axis=0, keepdims=True))
                x = e / e.sum(axis=0, keepdims=True)
            elif p.get("sigmoid"):
                x = 1 / (1 + np.exp(-x))
        elif op == "as_discrete":
            if p.get("argmax"):
                x = np.argmax(x, axis=0)[None]
            elif p.get("threshold") is not None:
                x = (x >= p["threshold"]).astype(np.uint16)
        else:
            raise ModelIntegrityError(f"MONAI bundle step {op!r} is not supported here")
        record(op, **p)
    labels = np.asarray(x[0]).astype(np.uint16)
    if orient is not None:
        return orient.invert(labels)
    return np.ascontiguousarray(np.transpose(labels, (2, 1, 0)))


class MonaiBundle:
    accepts_prompt = False

    def __init__(self, bundle: "Bundle") -> None:
        self.bundle = bundle

    def run(self, volume: "Volume", ctx: PipelineContext) -> PipelineOutput:
        steps = [s.as_dict() for s in self.bundle.card.preprocessing]
        labels = predict(volume.array, volume.geometry.direction, steps, ctx.session, record=ctx.steps.record)
        return PipelineOutput(labels=labels.astype(np.uint8 if labels.max() < 256 else np.uint16),
                              segments=segments_from_card(self.bundle.card))


def create(bundle: "Bundle") -> MonaiBundle:
    return MonaiBundle(bundle)
