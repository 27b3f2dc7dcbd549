"""Display logic of the workstation viewer, free of Streamlit so it can be tested.

The UI pages only call this module: it turns a :class:`~medai.dicom.volume.Volume`
into screen images and maps screen clicks back to the patient. Why it exists as
a plain module: windowing, reorientation, overlay compositing and measurement are
where a viewer can silently mislead a clinician (a flipped side, a squashed
slice, a wrong HU), so they live where unit tests can pin them down.

Conventions
-----------
* The volume is first brought to the nearest *display orientation*
  (:class:`DisplayVolume`): array ``[z, y, x]`` with x running to patient Left,
  y to Posterior and z to Superior, by axis permutation and flips only (no
  resampling, so every displayed voxel is a source voxel). An oblique
  acquisition is shown in its nearest orthogonal plane, as most PACS viewers do.
* Radiological convention: patient Right is on the screen's left in axial and
  coronal views, anterior on the left in sagittal views, superior at the top.
* Each view is resampled to square screen pixels so that a millimetre is the
  same length across and down (correct physical proportions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from medai import imaging
from medai.dicom.volume import Volume

View = Literal["axial", "coronal", "sagittal"]
VIEWS: tuple[View, ...] = ("axial", "coronal", "sagittal")
FillMode = Literal["fill", "outline"]


# --------------------------------------------------------------------------- windowing
# Windows, presets, percentile windowing and resizing live in medai.imaging (one
# toolkit for the viewer, the pipelines and the reports); re-exported here because
# the pages speak to this module.

WindowLevel = imaging.WindowLevel
CT_PRESETS = imaging.CT_PRESETS
apply_window = imaging.apply_window


def auto_window(array: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.5) -> WindowLevel:
    """A window spanning the given percentiles of the voxels above the background
    (:func:`medai.imaging.percentile_window`)."""
    return imaging.percentile_window(array, low_percentile, high_percentile, "auto")


def default_window(volume: Volume) -> WindowLevel:
    """What to show first: the brain window for CT of the head, soft tissue
    for other CT, a percentile window for everything else."""
    if volume.modality.upper() == "CT":
        body = str(volume.attributes.get("BodyPartExamined", "")).upper()
        if body in {"HEAD", "BRAIN", "SKULL"}:
            return CT_PRESETS["brain"]
        return CT_PRESETS["soft_tissue"]
    return auto_window(volume.array)


def windows_for(modality: str) -> list[str]:
    """Preset names offered for a modality (CT gets the HU presets)."""
    if modality.upper() == "CT":
        return ["auto", *CT_PRESETS, "manual"]
    return ["auto", "auto (wide)", "manual"]


def named_window(name: str, volume: Volume) -> WindowLevel:
    """Resolve a preset name from :func:`windows_for` to a window for ``volume``."""
    if name in CT_PRESETS:
        return CT_PRESETS[name]
    if name == "auto":
        return auto_window(volume.array)
    if name == "auto (wide)":
        wide = auto_window(volume.array, 0.1, 99.9)
        return WindowLevel(wide.width, wide.level, "auto (wide)")
    raise ValueError(f"unknown window preset {name!r}")


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class DisplayVolume:
    """A volume brought to display orientation ``[z, y, x]`` = (S, P, L) by
    permutation and flips only.

    ``axis_of`` and ``flipped`` record, for display axes x, y, z, which source
    array axis (0 = k, 1 = j, 2 = i) they came from and whether it was reversed;
    this is what maps a displayed voxel back to the source voxel and to LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]  # (x, y, z) mm
    axis_of: tuple[int, int, int]  # source array axis for display x, y, z
    flipped: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]
    volume: Volume

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def source_index(self, x: int, y: int, z: int) -> tuple[int, int, int]:
        """Source voxel index ``(i, j, k)`` (column, row, slice) of display voxel (x, y, z)."""
        src = [0, 0, 0]  # array-axis order: k, j, i
        for disp_pos, value in enumerate((x, y, z)):
            axis = self.axis_of[disp_pos]
            n = self.source_shape[axis]
            src[axis] = n - 1 - value if self.flipped[disp_pos] else value
        k, j, i = src
        return i, j, k

    def lps(self, x: int, y: int, z: int) -> tuple[float, float, float]:
        """LPS millimetres of the centre of display voxel (x, y, z)."""
        point = self.volume.geometry.index_to_lps(self.source_index(x, y, z))
        return float(point[0]), float(point[1]), float(point[2])

    def value(self, x: int, y: int, z: int) -> float:
        """The stored (HU for CT) value of display voxel (x, y, z)."""
        return float(self.array[z, y, x])

    def reorient_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map in source layout (``[k, j, i]``) brought to display layout."""
        if labels.shape != self.source_shape:
            raise ValueError(f"label map shape {labels.shape} differs from the volume's {self.source_shape}")
        return _reorient(labels, self.axis_of, self.flipped)


def _reorient(array: np.ndarray, axis_of: tuple[int, int, int], flipped: tuple[bool, bool, bool]) -> np.ndarray:
    # display array is [z, y, x]: transpose so that axes come in order z, y, x
    out = np.transpose(array, (axis_of[2], axis_of[1], axis_of[0]))
    for disp_pos, flip in enumerate(flipped):
        if flip:
            out = np.flip(out, axis=2 - disp_pos)
    return np.ascontiguousarray(out)


def to_display(volume: Volume) -> DisplayVolume:
    """Bring ``volume`` to the nearest (S, P, L) display orientation.

    The direction matrix's columns are the i, j, k axes in LPS; each is assigned
    to the LPS axis it is most aligned with (a one-to-one assignment, chosen
    greedily by largest cosine so an oblique series cannot map two axes to one).
    """
    d = volume.geometry.matrix  # columns: i, j, k in LPS
    # source array axis for each of i, j, k
    array_axis_of_ijk = (2, 1, 0)
    spacing_ijk = volume.geometry.spacing
    assigned = imaging.nearest_axes(d)  # LPS axis -> ijk index
    axis_of = tuple(array_axis_of_ijk[assigned[lps]] for lps in range(3))
    flipped = tuple(bool(d[lps, assigned[lps]] < 0) for lps in range(3))
    spacing = tuple(float(spacing_ijk[assigned[lps]]) for lps in range(3))
    array = _reorient(volume.array, axis_of, flipped)  # type: ignore[arg-type]
    return DisplayVolume(array, spacing, axis_of, flipped, tuple(volume.array.shape), volume)  # type: ignore[arg-type]


#: Screen-edge labels (top, bottom, left, right) of each view, radiological convention.
ORIENTATION_LABELS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


def slice_count(display: DisplayVolume, view: View) -> int:
    """Number of slices along the view's normal."""
    nz, ny, nx = display.shape
    return {"axial": nz, "coronal": ny, "sagittal": nx}[view]


def raw_slice(display: DisplayVolume, view: View, index: int) -> np.ndarray:
    """The 2-D plane as it appears on screen (rows top to bottom), not resampled."""
    n = slice_count(display, view)
    if not 0 <= index < n:
        raise IndexError(f"{view} slice {index} outside 0..{n - 1}")
    a = display.array
    if view == "axial":
        return a[index, :, :]
    if view == "coronal":
        return a[::-1, index, :]
    return a[::-1, :, index]


def _pixel_spacing(display: DisplayVolume, view: View) -> tuple[float, float]:
    """(row, column) spacing in mm of the raw slice of ``view``."""
    sx, sy, sz = display.spacing
    return {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}[view]


@dataclass(frozen=True)
class SliceImage:
    """An RGB screen image of one slice with what is needed to map a click back."""

    rgb: np.ndarray  # [rows, cols, 3] uint8, square pixels
    view: View
    index: int
    mm_per_pixel: float
    raw_shape: tuple[int, int]  # rows, cols of the slice before resampling
    labels: tuple[str, str, str, str]  # top, bottom, left, right


def display_size(display: DisplayVolume, view: View, target: int = 512) -> tuple[int, int, float]:
    """Screen (rows, cols) with square pixels, the longer side ``target`` pixels,
    and the resulting mm per screen pixel."""
    rows, cols = raw_slice(display, view, 0).shape
    rs, cs = _pixel_spacing(display, view)
    height_mm, width_mm = rows * rs, cols * cs
    mm_per_pixel = max(height_mm, width_mm) / float(target)
    return max(1, round(height_mm / mm_per_pixel)), max(1, round(width_mm / mm_per_pixel)), mm_per_pixel


# --------------------------------------------------------------------------- overlay


#: Distinct, colour-blind-aware label colours (Okabe-Ito order, then Tableau extras).
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (148, 103, 189), (140, 86, 75), (127, 127, 127),
)


def label_colour(label: int) -> tuple[int, int, int]:
    """Colour of a label value (1-based; 0 is background)."""
    if label <= 0:
        raise ValueError("label 0 is background and has no colour")
    return LABEL_COLOURS[(label - 1) % len(LABEL_COLOURS)]


def _outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels of ``mask`` that touch a pixel outside it (4-neighbourhood)."""
    inner = mask.copy()
    for _ in range(thickness):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def composite(grey: np.ndarray, labels: np.ndarray | None, *, opacity: float = 0.4,
              mode: FillMode = "fill", visible: Sequence[int] | None = None,
              colours: Mapping[int, tuple[int, int, int]] | None = None) -> np.ndarray:
    """RGB image of an 8-bit grey image with a label map blended over it.

    ``fill`` blends each label's colour at ``opacity``; ``outline`` draws the
    label boundary opaque (opacity applies to fill only, so an outline stays
    readable). ``visible`` limits the labels drawn.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0..1, got {opacity}")
    rgb = np.repeat(np.asarray(grey, dtype=np.uint8)[..., None], 3, axis=2)
    if labels is None:
        return rgb
    if labels.shape != grey.shape:
        raise ValueError(f"label slice {labels.shape} differs from image slice {grey.shape}")
    present = [int(v) for v in np.unique(labels) if v > 0]
    if visible is not None:
        wanted = set(int(v) for v in visible)
        present = [v for v in present if v in wanted]
    out = rgb.astype(np.float32)
    thickness = max(1, round(min(grey.shape) / 256))
    for value in present:
        colour = np.asarray((colours or {}).get(value, label_colour(value)), dtype=np.float32)
        mask = labels == value
        if mode == "outline":
            out[_outline(mask, thickness)] = colour
        else:
            out[mask] = (1 - opacity) * out[mask] + opacity * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render(display: DisplayVolume, view: View, index: int, window: WindowLevel, *,
           labels: np.ndarray | None = None, opacity: float = 0.4, mode: FillMode = "fill",
           visible: Sequence[int] | None = None, target: int = 512,
           colours: Mapping[int, tuple[int, int, int]] | None = None) -> SliceImage:
    """The screen image of one slice: windowed, square-pixel, overlay on top.

    ``labels`` is a label map already in display layout (see
    :meth:`DisplayVolume.reorient_labels`). Grey values are resampled bilinearly
    and labels by nearest neighbour, so outlines stay crisp.
    """
    plane = raw_slice(display, view, index)
    rows, cols, mm = display_size(display, view, target)
    grey = apply_window(imaging.resize(plane, rows, cols), window)
    label_plane = None
    if labels is not None:
        if labels.shape != display.shape:
            raise ValueError(f"label map {labels.shape} is not in display layout {display.shape}")
        raw_labels = raw_slice(DisplayVolume(labels, display.spacing, display.axis_of, display.flipped,
                                             display.source_shape, display.volume), view, index)
        label_plane = raw_labels[imaging.nearest_index(plane.shape[0], rows)][:, imaging.nearest_index(plane.shape[1], cols)]
    rgb = composite(grey, label_plane, opacity=opacity, mode=mode, visible=visible, colours=colours)
    return SliceImage(rgb, view, index, mm, plane.shape, ORIENTATION_LABELS[view])


# --------------------------------------------------------------------------- picking, measuring


@dataclass(frozen=True)
class Pick:
    """What is under one screen point: the voxel, its LPS position and value."""

    display_voxel: tuple[int, int, int]  # x, y, z in display layout
    source_voxel: tuple[int, int, int]  # i, j, k in the source series
    lps: tuple[float, float, float]
    value: float


def pick(display: DisplayVolume, image: SliceImage, px: float, py: float,
         shown_width: float | None = None) -> Pick:
    """Map a click at (px, py) on the screen image back to the patient.

    ``shown_width`` is the width the browser drew the image at, when it scaled
    it (clicks arrive in drawn pixels). Points outside the image are clamped.
    """
    rows, cols = image.rgb.shape[:2]
    scale = cols / shown_width if shown_width else 1.0
    sx, sy = px * scale, py * scale
    raw_rows, raw_cols = image.raw_shape
    r = int(np.clip(math.floor(sy * raw_rows / rows), 0, raw_rows - 1))
    c = int(np.clip(math.floor(sx * raw_cols / cols), 0, raw_cols - 1))
    nz = display.shape[0]
    if image.view == "axial":
        x, y, z = c, r, image.index
    elif image.view == "coronal":
        x, y, z = c, image.index, nz - 1 - r
    else:
        x, y, z = image.index, c, nz - 1 - r
    return Pick((x, y, z), display.source_index(x, y, z), display.lps(x, y, z), display.value(x, y, z))


def screen_point(display: DisplayVolume, image: SliceImage, voxel: Sequence[int]) -> tuple[float, float] | None:
    """Screen position (centre of the voxel) of display voxel (x, y, z) on
    ``image``, or ``None`` when the voxel is not on that slice."""
    x, y, z = (int(v) for v in voxel)
    nz = display.shape[0]
    if image.view == "axial":
        on, c, r = z == image.index, x, y
    elif image.view == "coronal":
        on, c, r = y == image.index, x, nz - 1 - z
    else:
        on, c, r = x == image.index, y, nz - 1 - z
    if not on:
        return None
    rows, cols = image.rgb.shape[:2]
    raw_rows, raw_cols = image.raw_shape
    return (c + 0.5) * cols / raw_cols, (r + 0.5) * rows / raw_rows


def annotate(image: SliceImage, *, points: Sequence[tuple[float, float]] = (),
             box: tuple[int, int, int, int] | None = None, scale_bar_mm: float = 50.0) -> np.ndarray:
    """The screen image with orientation letters at the edges, a scale bar,
    point markers (a line between the first two) and a prompt box drawn in."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image.rgb)
    draw = ImageDraw.Draw(pil)
    rows, cols = image.rgb.shape[:2]
    size = max(12, rows // 28)
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        font = ImageFont.load_default()
    top, bottom, left, right = image.labels
    ink, shadow = (255, 214, 0), (0, 0, 0)
    for text, (px, py), anchor in ((top, (cols / 2, 4), "mt"), (bottom, (cols / 2, rows - 4), "mb"),
                                   (left, (4, rows / 2), "lm"), (right, (cols - 4, rows / 2), "rm")):
        draw.text((px, py), text, fill=ink, font=font, anchor=anchor, stroke_width=2, stroke_fill=shadow)
    bar = scale_bar_mm / image.mm_per_pixel
    if bar < cols * 0.6:
        y0 = rows - 10
        draw.line([(cols - 10 - bar, y0), (cols - 10, y0)], fill=(230, 230, 230), width=2)
        draw.text((cols - 10 - bar / 2, y0 - 4), f"{scale_bar_mm:g} mm", fill=(230, 230, 230), font=font,
                  anchor="mb", stroke_width=2, stroke_fill=shadow)
    marker = (0, 255, 255)
    for px, py in points:
        r = 5
        draw.line([(px - r, py), (px + r, py)], fill=marker, width=2)
        draw.line([(px, py - r), (px, py + r)], fill=marker, width=2)
    if len(points) >= 2:
        draw.line([points[0], points[1]], fill=marker, width=1)
    if box is not None:
        raw_rows, raw_cols = image.raw_shape
        c0, r0, c1, r1 = box
        draw.rectangle([c0 * cols / raw_cols, r0 * rows / raw_rows, (c1 + 1) * cols / raw_cols,
                        (r1 + 1) * rows / raw_rows], outline=(255, 80, 80), width=2)
    return np.asarray(pil)


def distance_mm(a: Sequence[float], b: Sequence[float]) -> float:
    """Euclidean distance between two LPS points in millimetres."""
    pa, pb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if pa.shape != (3,) or pb.shape != (3,):
        raise ValueError("points must be 3-D LPS coordinates")
    return float(np.linalg.norm(pa - pb))


def screen_box_to_raw(image: SliceImage, x1: float, y1: float, x2: float, y2: float,
                      shown_width: float | None = None) -> tuple[int, int, int, int]:
    """A box dragged on the screen image as raw-slice pixel bounds
    ``(col0, row0, col1, row1)``, inclusive, ordered and clamped."""
    rows, cols = image.rgb.shape[:2]
    scale = cols / shown_width if shown_width else 1.0
    raw_rows, raw_cols = image.raw_shape

    def col(v: float) -> int:
        return int(np.clip(math.floor(v * scale * raw_cols / cols), 0, raw_cols - 1))

    def row(v: float) -> int:
        return int(np.clip(math.floor(v * scale * raw_rows / rows), 0, raw_rows - 1))

    c0, c1 = sorted((col(x1), col(x2)))
    r0, r1 = sorted((row(y1), row(y2)))
    return c0, r0, c1, r1


# --------------------------------------------------------------------------- browser viewport


@dataclass(frozen=True)
class RasGrid:
    """The display volume as the browser viewport receives it: a voxel grid whose
    axes run to patient Right (i), Anterior (j) and Superior (k), with a diagonal
    affine. Why: the viewport (NiiVue) then shows, picks and steps in the very voxel
    indices sent here, and :func:`display_voxel_from_ras` maps them back exactly.

    ``array`` is ``[k, j, i]``; ``origin_ras`` the RAS millimetres of voxel (0, 0, 0).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]  # (i, j, k) mm
    origin_ras: tuple[float, float, float]


def ras_grid(display: DisplayVolume, labels: np.ndarray | None = None) -> RasGrid:
    """The display volume (or a label map in display layout) on the RAS grid.

    Display x runs to patient Left and y to Posterior, so both are reversed; z
    (Superior) is kept. The origin is the position of display voxel
    ``(nx-1, ny-1, 0)``, LPS turned to RAS.
    """
    source = display.array if labels is None else labels
    if source.shape != display.shape:
        raise ValueError(f"array {source.shape} is not in display layout {display.shape}")
    nz, ny, nx = display.shape
    lps = display.lps(nx - 1, ny - 1, 0)
    return RasGrid(np.ascontiguousarray(source[:, ::-1, ::-1]), display.spacing, (-lps[0], -lps[1], lps[2]))


def display_voxel_from_ras(display: DisplayVolume, ras_voxel: Sequence[int]) -> tuple[int, int, int]:
    """Display voxel (x, y, z) of a voxel index ``(i, j, k)`` on :func:`ras_grid`'s
    grid, as the viewport reports it; refuses indices outside the volume."""
    nz, ny, nx = display.shape
    i, j, k = (int(v) for v in ras_voxel)
    if not (0 <= i < nx and 0 <= j < ny and 0 <= k < nz):
        raise ValueError(f"voxel ({i}, {j}, {k}) outside the volume ({nx}, {ny}, {nz})")
    return nx - 1 - i, ny - 1 - j, k


def nifti_gz(grid: RasGrid, *, labels: bool = False, window: WindowLevel | None = None, level: int = 1) -> bytes:
    """``grid`` as a gzipped NIfTI-1 file in memory (nothing touches the disk).

    Grey values are stored as int16 when they are whole numbers within its range
    (CT in HU), else float32; labels as uint8. The header carries geometry only,
    never a patient field. Level 1 gzip: the volume is built once per series and
    the loopback transfer is cheap, so compression speed matters more than size.
    ``window`` goes into the header's display range (``cal_min``/``cal_max``), which
    the viewport's NiiVue takes as the image's own range whenever it recomputes one.
    """
    import gzip
    import struct

    data = grid.array
    if labels:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError("label values must be within 0..255")
        data, code, bits = data.astype(np.uint8), 2, 8
    elif data.size and np.all(np.isfinite(data)) and data.min() >= -32768 and data.max() <= 32767 \
            and np.array_equal(data, np.round(data)):
        data, code, bits = data.astype("<i2"), 4, 16
    else:
        data, code, bits = data.astype("<f4"), 16, 32
    nz, ny, nx = data.shape
    si, sj, sk = grid.spacing
    ox, oy, oz = grid.origin_ras
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, nx, ny, nz, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, code, bits)
    struct.pack_into("<8f", header, 76, 1.0, si, sj, sk, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", header, 112, 1.0, 0.0)  # scl_slope, scl_inter: stored values are the values
    header[123] = 2  # xyzt_units: millimetres
    if window is not None:
        struct.pack_into("<ff", header, 124, window.high, window.low)  # cal_max, cal_min
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<4f", header, 280, si, 0.0, 0.0, ox)
    struct.pack_into("<4f", header, 296, 0.0, sj, 0.0, oy)
    struct.pack_into("<4f", header, 312, 0.0, 0.0, sk, oz)
    header[344:348] = b"n+1\0"
    payload = bytes(header) + b"\0\0\0\0" + np.ascontiguousarray(data).tobytes()
    return gzip.compress(payload, compresslevel=level, mtime=0)


def viewport_presets(volume: Volume) -> list[dict[str, object]]:
    """The windows on the viewport's number keys: OHIF's CT presets for CT (absolute HU),
    percentile windows of this volume otherwise (MR has no absolute scale)."""
    if volume.modality.upper() == "CT":
        return imaging.preset_keys()
    return imaging.percentile_preset_keys(volume.array)


def slice_thickness_mm(volume: Volume) -> float:
    """The slice thickness the header states, else the slice spacing."""
    value = volume.attributes.get("SliceThickness")
    try:
        return float(value) if value not in (None, "") else float(volume.geometry.spacing[2])
    except (TypeError, ValueError):
        return float(volume.geometry.spacing[2])


def preview_pngs(display: DisplayVolume, window: WindowLevel, target: int = 384) -> tuple[bytes, bytes, bytes]:
    """The middle axial, coronal and sagittal slices, windowed, with orientation letters,
    as PNG: what the viewport shows the moment it opens, while its WebGL renderer is
    still compiling and the volume still travelling (seconds on a machine that draws
    WebGL on the CPU). Drawn by :func:`render`, so proportions and sides are the tested ones."""
    import io

    from PIL import Image

    out = []
    for view in VIEWS:
        image = render(display, view, slice_count(display, view) // 2, window, target=target)
        buffer = io.BytesIO()
        Image.fromarray(annotate(image)).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out[0], out[1], out[2]


def label_volumes_ml(labels: np.ndarray, volume: Volume) -> dict[int, float]:
    """Volume in mL of each non-zero label of a label map in source layout."""
    if labels.shape != volume.array.shape:
        raise ValueError(f"label map {labels.shape} differs from the volume {volume.array.shape}")
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return {int(v): float(c) * volume.voxel_volume_ml for v, c in zip(values, counts)}


__all__ = [
    "CT_PRESETS", "DisplayVolume", "RasGrid", "display_voxel_from_ras", "nifti_gz", "ras_grid", "LABEL_COLOURS", "ORIENTATION_LABELS", "Pick", "SliceImage",
    "VIEWS", "WindowLevel", "annotate", "apply_window", "auto_window", "composite", "default_window",
    "display_size", "distance_mm", "label_colour", "label_volumes_ml", "named_window", "pick",
    "preview_pngs", "raw_slice", "render", "screen_box_to_raw", "screen_point", "slice_count",
    "slice_thickness_mm", "to_display", "viewport_presets", "windows_for",
]
