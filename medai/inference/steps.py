"""Deterministic pre/post-processing steps (numpy + SimpleITK), driven by the card and recorded.

A card lists its preprocessing as ``[[preprocessing]]`` tables (``op`` plus
parameters, optionally ``stage`` when a multi-stage model uses the same op twice).
A pipeline calls ``ctx.steps.run(op, x, stage=...)``: the runner looks up the card's
parameters for that op/stage, applies the function from :data:`OPS`, and appends
``{"op", "stage", params..., derived values...}`` to the run record. Derived values
(e.g. the intensity quantiles actually found) are recorded too, so a result can be
replayed exactly.

Every function here is pure and deterministic (no random state, fixed
tie-breaking), so the same input gives bit-identical output on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from medai.errors import ModelIntegrityError

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.card import ModelCard
    from medai.inference.pipeline import PipelineContext

_WORLD_RAS = np.diag([-1.0, -1.0, 1.0])  # LPS → RAS


@dataclass(frozen=True)
class Reorientation:
    """How a ``[k, j, i]`` volume array was permuted/flipped to a canonical ``[x, y, z]`` array."""

    perm: tuple[int, int, int]  # canonical axis a comes from source (i, j, k) axis perm[a]
    flip: tuple[bool, bool, bool]  # flipped along canonical axis a
    to: str

    def apply(self, array_kji: np.ndarray, dtype: Any = None) -> np.ndarray:
        """The canonical array (a contiguous copy), converted to ``dtype`` in the same pass when
        given (one copy of the volume instead of a converted one and then a reordered one)."""
        ijk = np.transpose(array_kji, (2, 1, 0))
        out = np.transpose(ijk, self.perm)
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis)
        if dtype is None:
            return np.ascontiguousarray(out)
        result = np.empty(out.shape, dtype=dtype)
        np.copyto(result, out, casting="unsafe")
        return result

    def invert(self, canonical: np.ndarray) -> np.ndarray:
        out = canonical
        for axis, flipped in enumerate(self.flip):
            if flipped:
                out = np.flip(out, axis)
        inverse = tuple(int(a) for a in np.argsort(self.perm))
        ijk = np.transpose(out, inverse)
        return np.ascontiguousarray(np.transpose(ijk, (2, 1, 0)))


def reorientation(direction: Any, to: str = "RAS") -> Reorientation:
    """Closest-canonical axis permutation and flips (no resampling), like ``nibabel.as_closest_canonical``."""
    if to not in ("RAS", "LPS"):
        raise ValueError(f"reorient to {to!r}: only RAS and LPS are supported")
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    m = _WORLD_RAS @ d if to == "RAS" else d  # columns: i, j, k axes in the target world frame
    perm = [-1, -1, -1]
    flip = [False, False, False]
    used_world: set[int] = set()
    # Assign the most decisive source axis first (deterministic tie-break by axis order).
    order = sorted(range(3), key=lambda c: -float(np.max(np.abs(m[:, c]))))
    for c in order:
        candidates = [w for w in np.argsort(-np.abs(m[:, c]), kind="stable") if w not in used_world]
        w = int(candidates[0])
        used_world.add(w)
        perm[w] = c
        flip[w] = bool(m[w, c] < 0)
    return Reorientation(tuple(perm), tuple(flip), to)  # type: ignore[arg-type]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position under PyTorch's ``nearest-exact`` rule."""
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.intp)
    return np.minimum(idx, n_in - 1)


def resize_nearest(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize with PyTorch's ``nearest-exact`` rule: src = floor((dst + .5) * in/out)."""
    out = x
    for axis in reversed(range(x.ndim)):  # last axis first: later takes copy whole rows/planes
        n_in, n_out = x.shape[axis], shape[axis]
        if n_in == n_out:
            continue
        out = np.take(out, _nearest_index(n_in, n_out), axis=axis)
    return out


def resize_nearest_s2d(x: np.ndarray, shape: tuple[int, int, int], factor: int, pad: int) -> np.ndarray:
    """``space_to_depth(resize_nearest(x, shape), factor, pad)`` without the resized array: each
    interleaved sub-volume is taken from ``x`` with every ``factor``-th nearest-neighbour index
    (the takes shared between sub-volumes done once), so the 256³ copy and the second pass over
    it are not made (0.05 s and 67 MB for brain extraction's main graph)."""
    f = int(factor)
    if x.ndim != 3 or len(shape) != 3:
        raise ValueError(f"resize_nearest_s2d needs 3-D shapes, got {x.shape} -> {shape}")
    h, layout = _s2d_layout(tuple(shape), f, int(pad))
    index = [_nearest_index(n_in, n_out) for n_in, n_out in zip(x.shape, shape)]
    # per axis and offset: (output slice, source indices of the resized axis' positions there)
    spans = [[(dst, idx[src]) for dst, src in per_offset] for per_offset, idx in zip(layout, index)]
    out = np.zeros((f ** 3, *h), dtype=x.dtype)
    for r in range(f):  # last axis first, as resize_nearest: later takes copy whole rows/planes
        by_r = np.take(x, spans[2][r][1], axis=2)
        for q in range(f):
            by_qr = np.take(by_r, spans[1][q][1], axis=1)
            for p in range(f):
                out[(p * f + q) * f + r, spans[0][p][0], spans[1][q][0], spans[2][r][0]] = \
                    np.take(by_qr, spans[0][p][1], axis=0)
    return out


def resize_normalize(x: np.ndarray, shape: tuple[int, ...], low: float, high: float, scale: float = 1.0,
                     shift: float = 0.0, space_to_depth: tuple[int, int] | None = None) -> np.ndarray:
    """``normalize(resize_nearest(x, shape), low, high, scale, shift)``, worked out on ``x``'s
    own voxels before they are copied out to ``shape``. ``space_to_depth`` = (factor, pad): the
    result in that layout (:func:`space_to_depth`), taken straight from ``x``
    (:func:`resize_nearest_s2d`).

    A nearest-neighbour resize only repeats or drops voxels, so the element-wise steps commute
    with it, and the resized array's mean and variance are ``x``'s weighted by how many output
    voxels each source voxel becomes (a product of one count per axis). An upsampled crop
    (brain extraction: about 6 M voxels to 256³ = 16.8 M) then takes the clip, the statistics
    and the affine map on a third of the voxels, and no float copy of the large array is made
    before the one the resize writes. Values agree with the two steps in sequence to float32
    rounding of the statistics (the tests bound it)."""
    if x.ndim != 3:
        if space_to_depth is not None:
            raise ValueError("resize_normalize: space_to_depth needs a 3-D array")
        return normalize(resize_nearest(x, shape), low, high, scale, shift)
    y = x.astype(np.float32)  # always a copy: the caller's array is left alone
    y -= np.float32(low)
    y *= np.float32(1.0 / (high - low if high > low else 1.0))
    np.clip(y, 0.0, 1.0, out=y)
    index = [_nearest_index(n_in, n_out) for n_in, n_out in zip(x.shape, shape)]
    wk, wj, wi = (np.bincount(i, minlength=n).astype(np.float64) for i, n in zip(index, x.shape))
    total = squares = 0.0
    for k in np.flatnonzero(wk):  # float64 sums, one source plane at a time
        plane = y[k].astype(np.float64)
        total += wk[k] * float(wj @ (plane @ wi))
        plane *= plane
        squares += wk[k] * float(wj @ (plane @ wi))
    n = int(np.prod(shape, dtype=np.int64))
    mean = total / n
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    std = var ** 0.5 if var > 0 else 1.0
    y *= np.float32(scale / std)
    y += np.float32(shift - mean * scale / std)
    if space_to_depth is not None:
        return resize_nearest_s2d(y, shape, *space_to_depth)  # type: ignore[arg-type]
    return resize_nearest(y, shape)


def nan_to_num(x: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(x, copy=False)``, skipped when ``x`` holds no NaN or infinity: a float64
    sum is finite exactly then, or when finite values overflow it (then the full pass runs).
    numpy's pass takes several masks over the array (0.02-0.03 s on a 7 M-voxel volume that was
    an integer series and cannot hold either); the sum, a few milliseconds."""
    if x.dtype.kind != "f":
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        total = x.sum(dtype=np.float64)
    if not np.isfinite(total):
        np.nan_to_num(x, copy=False)
    return x


def space_to_depth(x: np.ndarray, factor: int = 2, pad: int = 0) -> np.ndarray:
    """``x`` (3-D) zero-padded by ``pad`` on every side and cut into ``factor``³ interleaved
    sub-volumes, stacked as channels: ``out[(p, q, r), i, j, k] = padded[f*i + p, f*j + q,
    f*k + r]`` with channel index ``(p * f + q) * f + r``.

    A graph whose first layer is a strided convolution of a one-channel image takes this
    instead (built by ``models/brain-extraction/build.py``): the same convolution over
    ``factor``³ channels with stride 1 is the same sum, and the CPU's matrix units (AMX)
    can run it (one input channel cannot fill them: deepbet's first layer took 44 % of the
    256³ graph in bf16). Padding here is the convolution's own zero padding."""
    f, pad = int(factor), int(pad)
    if x.ndim != 3 or f < 1 or pad < 0:
        raise ValueError(f"space_to_depth needs a 3-D array, factor >= 1 and pad >= 0 (got {x.shape}, {f}, {pad})")
    h, layout = _s2d_layout(x.shape, f, pad)
    out = np.zeros((f ** 3, *h), dtype=x.dtype)
    for channel, offsets in enumerate(np.ndindex(f, f, f)):  # channel (p * f + q) * f + r
        spans = [per_offset[o] for per_offset, o in zip(layout, offsets)]
        out[(channel, *(dst for dst, _ in spans))] = x[tuple(src for _, src in spans)]
    return out


def _s2d_layout(shape: tuple[int, ...], f: int, pad: int) -> tuple[list[int], list[list[tuple[slice, slice]]]]:
    """Where :func:`space_to_depth` puts each axis of a ``shape`` array: the output's spatial
    size, and per axis and offset ``o`` the (output slice, input slice) pair: output position
    ``i`` holds input ``f*i + o - pad``, for the ``i`` where that lies inside the input (the
    rest is the zero padding)."""
    padded = [n + 2 * pad for n in shape]
    if any(n % f for n in padded):
        raise ValueError(f"space_to_depth: padded shape {padded} is not a multiple of {f}")
    h = [n // f for n in padded]
    layout = []
    for n, m in zip(shape, h):
        per_offset = []
        for o in range(f):
            first = max(0, -(-(pad - o) // f))  # smallest i with f*i + o - pad >= 0
            last = min(m - 1, (n - 1 + pad - o) // f)  # largest i with f*i + o - pad <= n - 1
            per_offset.append((slice(first, last + 1), slice(f * first + o - pad, f * last + o - pad + 1, f)))
        layout.append(per_offset)
    return h, layout


def quantiles(x: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Linear-interpolated quantiles (numpy's default = torch.quantile's)."""
    lo, hi = np.quantile(x.astype(np.float32, copy=False).ravel(), [low, high])
    return float(np.float32(lo)), float(np.float32(hi))


def normalize(x: np.ndarray, low: float, high: float, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Clip to [low, high] → [0, 1], z-score (unbiased std), then ``scale * z + shift`` (float32)."""
    y = x.astype(np.float32)  # always a copy: the caller's array is left alone
    y -= np.float32(low)
    y *= np.float32(1.0 / (high - low if high > low else 1.0))
    np.clip(y, 0.0, 1.0, out=y)
    # Mean and variance with float64 accumulators over chunks: exact enough, no 8-byte copy.
    flat = y.reshape(-1)
    total = squares = 0.0
    for start in range(0, flat.size, 1 << 16):
        chunk = flat[start:start + (1 << 16)]
        total += float(chunk.sum(dtype=np.float64))
        squares += float(np.dot(chunk, chunk))
    n = flat.size
    mean = total / n
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    std = var ** 0.5 if var > 0 else 1.0
    # scale * (y - mean) / std + shift  ==  y * a + b
    a = np.float32(scale / std)
    y *= a
    y += np.float32(shift - mean * scale / std)
    return y


def label(mask: np.ndarray, fully_connected: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Connected-component labels of a boolean array (any number of dimensions) and each
    label's voxel count (``counts[0]`` = 0 for the background).

    The same labels, numbered the same way (in C order of each component's first voxel),
    as ``scipy.ndimage.label`` with the full (``fully_connected``) or the face structuring
    element; the tests check that voxel for voxel. Written here in numpy because importing
    scipy.ndimage costs a one-shot ``medai run`` about 0.25 s and 28 MB, most of it held
    while the largest graph runs, for the one function a brain mask needs.

    How: the array is cut into runs (maximal stretches of set voxels along the last axis);
    two runs are joined when their rows are neighbours and they overlap (touch diagonally
    too, with full connectivity); components of the run graph are found by hooking each
    root to the smallest root it touches and compressing paths until nothing changes."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        mask = mask.reshape(1)
    *lead, width = mask.shape
    rows = int(np.prod(lead, dtype=np.int64))
    if mask.size == 0 or not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), np.zeros(1, dtype=np.int64)
    # Runs: +1/-1 where a row's padded values rise/fall; starts and (exclusive) ends pair up in order.
    padded = np.zeros((rows, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask.reshape(rows, width)
    step = np.diff(padded, axis=1).ravel()
    del padded
    starts = np.flatnonzero(step == 1)
    ends = np.flatnonzero(step == -1)
    del step
    row = starts // (width + 1)
    start = starts - row * (width + 1)
    end = ends - row * (width + 1)
    n = row.size
    # Edges to runs in earlier neighbouring rows (each pair once; the rest are symmetric).
    reach = 1 if fully_connected else 0
    span = width + 4  # keys of different rows never interleave
    key_start, key_end = row * span + start, row * span + end
    coords = np.unravel_index(row, lead) if lead else ()
    strides = [int(np.prod(lead[a + 1:], dtype=np.int64)) for a in range(len(lead))]
    sources, targets = [], []
    for offset in np.ndindex(*(3,) * len(lead)):
        delta = [d - 1 for d in offset]
        if not any(delta) or [d for d in delta if d][0] > 0:
            continue  # itself, or a later row
        if not fully_connected and sum(d != 0 for d in delta) > 1:
            continue
        ok = np.ones(n, dtype=bool)
        for axis, d in enumerate(delta):
            if d:
                moved = coords[axis] + d
                ok &= (moved >= 0) & (moved < lead[axis])
        other = row + sum(d * st for d, st in zip(delta, strides))
        # runs y of that row with end_y > start_x - reach and start_y < end_x + reach
        lo = np.searchsorted(key_end, other * span + start - reach, side="right")
        hi = np.searchsorted(key_start, other * span + end + reach, side="left")
        count = np.where(ok, np.maximum(hi - lo, 0), 0)
        if not count.any():
            continue
        x = np.repeat(np.arange(n), count)
        first = np.repeat(lo - np.cumsum(count) + count, count)
        sources.append(x)
        targets.append(first + np.arange(x.size))
    root = np.arange(n)
    if sources:
        x, y = np.concatenate(sources), np.concatenate(targets)
        while True:
            rx, ry = root[x], root[y]
            apart = rx != ry
            if not apart.any():
                break
            np.minimum.at(root, np.maximum(rx[apart], ry[apart]), np.minimum(rx[apart], ry[apart]))
            while True:  # path compression: every run points at its component's first run
                up = root[root]
                if np.array_equal(up, root):
                    break
                root = up
    firsts, component = np.unique(root, return_inverse=True)
    lab = component.astype(np.int32) + 1  # numbered by each component's first run (C order)
    # Paint: +label where a run starts, -label where it ends, summed along the raveled array.
    flat = row * width
    paint = np.zeros(rows * width + 1, dtype=np.int32)
    np.add.at(paint, flat + start, lab)
    np.add.at(paint, flat + end, -lab)
    labels = np.cumsum(paint[:-1], dtype=np.int32).reshape(mask.shape)
    counts = np.zeros(firsts.size + 1, dtype=np.int64)
    counts[1:] = np.bincount(component, weights=end - start).astype(np.int64)
    return labels, counts


def largest_component(mask: np.ndarray, *, fully_connected: bool = True) -> np.ndarray:
    """Keep the largest connected component (26-connectivity by default); empty stays empty."""
    if not mask.any():
        return mask.astype(bool)
    labels, counts = label(mask, fully_connected)
    return labels == int(np.argmax(counts))


def continuing_components(mask: np.ndarray, previous: np.ndarray, image: np.ndarray,
                          value_range: tuple[float, float], min_fraction: float, *,
                          fully_connected: bool = False) -> np.ndarray:
    """The largest component plus every other one that continues ``previous`` and looks like it.

    For propagation through slices: a structure may split on the next slice (two
    hemispheres above the corpus callosum), so keeping only the largest part drops
    the rest; keeping every part that touches the previous mask also keeps the
    neighbouring tissue the model adds at a structure's edge. A further component
    is kept when it touches ``previous`` and at least ``min_fraction`` of its pixels
    in ``image`` lie in ``value_range`` (the seed mask's intensity range).
    """
    if not mask.any():
        return mask.astype(bool)
    labels, counts = label(mask, fully_connected)
    keep = {int(np.argmax(counts))}
    low, high = value_range
    inside = (image >= low) & (image <= high)
    touching = np.unique(labels[np.asarray(previous, dtype=bool) & (labels > 0)])
    for value in touching:
        part = labels == value
        if float(inside[part].mean()) >= min_fraction:
            keep.add(int(value))
    return np.isin(labels, sorted(keep))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background cavities not connected to the array border (3-D, face-connected background).

    One labelling of the background: every background component that reaches a face of
    the array is outside, the rest are holes (what SimpleITK's BinaryFillhole with
    ``fullyConnected=False`` gives, voxel for voxel, in a fraction of its time on noisy masks)."""
    mask = np.asarray(mask, dtype=bool)
    labels, counts = label(~mask, fully_connected=False)
    n = counts.size - 1
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for end in (0, -1):
            outside[np.unique(np.take(labels, end, axis=axis))] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[labels]


def bbox_with_margin(mask_small: np.ndarray, full_shape: tuple[int, ...], margin: float = 0.1,
                     threshold: float = 0.02) -> tuple[slice, ...]:
    """Bounding box of ``mask_small`` scaled to ``full_shape``, enlarged by ``margin`` on each side.

    An axis counts as foreground where the mask's mean over the other two axes
    exceeds ``threshold`` (drops thin stray bits).
    """
    m = mask_small.astype(np.float32)
    ranges = []
    for axes in ((1, 2), (0, 2), (0, 1)):
        idx = np.nonzero(m.mean(axis=axes) > threshold)[0]
        if idx.size == 0:
            raise ValueError("not enough foreground to place a bounding box")
        ranges.append(idx)
    out = []
    for r, n_small, n_full in zip(ranges, mask_small.shape, full_shape):
        scale = np.float32(n_full) / np.float32(n_small)
        center = np.float32((r.max() + 1 + r.min()) / 2) * scale
        size = np.float32((r.max() + 1) - r.min()) * scale * np.float32(1 + 2 * margin)
        center, size = np.round(center), np.round(size)
        lo, hi = int(center - size / 2), int(center + size / 2)
        out.append(slice(max(0, lo), min(n_full, hi), 1))
    return tuple(out)


#: op name → function(x, **params). Pipelines may call these directly too.
OPS: dict[str, Callable[..., Any]] = {
    "nan_to_num": lambda x: nan_to_num(x),
    "space_to_depth": lambda x, factor=2, pad=0: space_to_depth(x, factor, pad),
    "resize": lambda x, shape, mode="nearest-exact": resize_nearest(x, tuple(shape)),
    "quantiles": lambda x, low, high: quantiles(x, low, high),
    "normalize": normalize,
    "largest_component": lambda x, fully_connected=True: largest_component(x, fully_connected=fully_connected),
    "fill_holes": lambda x: fill_holes(x),
    "threshold": lambda x, value=0.5: x > value,
}


class StepRunner:
    """Applies the card's steps by name and records what was applied (see module docstring)."""

    def __init__(self, card: "ModelCard") -> None:
        self.card = card
        self._ctx: "PipelineContext | None" = None

    def bind(self, ctx: "PipelineContext") -> None:
        self._ctx = ctx

    def params(self, op: str, stage: str | None = None) -> dict[str, Any]:
        """The card's parameters for ``op`` (in ``stage``); refuses steps the card does not declare."""
        for step in self.card.preprocessing:
            if step.op == op and step.params.get("stage") == stage:
                return {k: v for k, v in step.params.items() if k != "stage"}
        where = f" (stage {stage})" if stage else ""
        raise ModelIntegrityError(f"model {self.card.id}: card declares no preprocessing step {op!r}{where}")

    def declares(self, op: str, stage: str | None = None) -> bool:
        """Whether the card lists ``op`` (in ``stage``): for steps a later card adds."""
        return any(step.op == op and step.params.get("stage") == stage for step in self.card.preprocessing)

    def run(self, op: str, x: Any, *, stage: str | None = None, **runtime: Any) -> Any:
        """Apply card step ``op`` to ``x``; ``runtime`` adds values found at run time (recorded)."""
        params = self.params(op, stage)
        result = OPS[op](x, **params, **runtime)
        derived = {}
        if op == "quantiles":
            derived = {"values": list(result)}
        self.record(op, stage=stage, **params, **runtime, **derived)
        return result

    def record(self, op: str, **params: Any) -> None:
        clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items() if v is not None}
        if self._ctx is not None:
            self._ctx.record(op, **clean)
