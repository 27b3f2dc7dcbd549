"""Sliding-window inference with overlap blending, for models that work on tiles.

A pipeline whose graph takes fixed-size patches (or whose plan chose tiling to fit
``--max-memory``, see :mod:`medai.inference.planner`) calls :func:`sliding_window`
with the tile size from ``ctx.plan.tile`` (or its card). Tiles start on a regular grid
with the requested overlap; the last tile on each axis is shifted back to end at the
border (no padding unless the volume is smaller than a tile). Each tile's output is
weighted (a Gaussian centred on the tile, ``sigma = tile / 8``, floored so edges still
count, or constant) and the weighted sum is divided by the summed weights, so seams do
not show. Memory: one tile in, one tile out, plus two float32 accumulators of the
output size.
"""

from __future__ import annotations

import itertools
from typing import Callable, Literal

import numpy as np


def _starts(size: int, tile: int, overlap: float) -> list[int]:
    if size <= tile:
        return [0]
    step = max(1, int(round(tile * (1.0 - overlap))))
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def _weights(tile: tuple[int, ...], mode: str) -> np.ndarray:
    if mode == "constant":
        return np.ones(tile, dtype=np.float32)
    w = np.ones((), dtype=np.float32)
    for n in tile:
        centre = (n - 1) / 2.0
        sigma = max(n / 8.0, 1e-3)
        g = np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2).astype(np.float32)
        w = np.multiply.outer(w, np.maximum(g, 1e-3))
    return w


def sliding_window(x: np.ndarray, tile: tuple[int, int, int], run: Callable[[np.ndarray], np.ndarray], *,
                   overlap: float = 0.25, blend: Literal["gaussian", "constant"] = "gaussian",
                   out_channels: int = 1, pad_value: float = 0.0) -> np.ndarray:
    """Run ``run`` over ``x`` (``[z, y, x]`` float32) tile by tile and blend the outputs.

    ``run`` takes a ``[1, 1, *tile]`` array and returns ``[1, out_channels, *tile]``.
    Returns ``[out_channels, *x.shape]`` float32.
    """
    if x.ndim != 3 or len(tile) != 3:
        raise ValueError("sliding_window needs a 3-D array and a 3-D tile")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    shape = x.shape
    padded_shape = tuple(max(s, t) for s, t in zip(shape, tile))
    if padded_shape != shape:
        pad = [(0, p - s) for s, p in zip(shape, padded_shape)]
        x = np.pad(x, pad, constant_values=pad_value)
    weights = _weights(tuple(tile), blend)
    acc = np.zeros((out_channels,) + padded_shape, dtype=np.float32)
    norm = np.zeros(padded_shape, dtype=np.float32)
    grids = [_starts(s, t, overlap) for s, t in zip(padded_shape, tile)]
    for z, y, xx in itertools.product(*grids):
        sl = (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(xx, xx + tile[2]))
        patch = np.ascontiguousarray(x[sl], dtype=np.float32)[None, None]
        out = run(patch)
        if out.shape != (1, out_channels) + tuple(tile):
            raise ValueError(f"tile output has shape {out.shape}, expected {(1, out_channels) + tuple(tile)}")
        acc[(slice(None),) + sl] += out[0] * weights
        norm[sl] += weights
    acc /= norm
    return acc[(slice(None),) + tuple(slice(0, s) for s in shape)]
