"""A volume: voxels plus the LPS geometry that places them in the patient.

Conventions (the same as SimpleITK, so a ``Volume`` converts to an ``sitk.Image``
without copying meaning): ``array`` is indexed ``[k, j, i]`` = ``[slice, row,
column]``; ``spacing`` is ``(column spacing, row spacing, slice spacing)`` in mm;
``origin`` is the LPS position in mm of the centre of voxel ``[0, 0, 0]``;
``direction`` is the 3x3 matrix, row-major, whose columns are the unit vectors
of the i, j and k axes in LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

    from medai.dicom.index import SeriesEntry


@dataclass(frozen=True)
class Geometry:
    """Where each voxel is, in LPS millimetres."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, float, float, float, float, float, float, float, float]

    def __post_init__(self) -> None:
        if len(self.origin) != 3 or len(self.spacing) != 3 or len(self.direction) != 9:
            raise ValueError("Geometry needs 3 origin, 3 spacing and 9 direction values")
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"Geometry spacing must be positive and finite, got {self.spacing}")
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise ValueError("Geometry direction must be orthonormal")

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 direction matrix (columns are the i, j, k axes in LPS)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_lps(self, index: Any) -> np.ndarray:
        """LPS mm of continuous voxel index/indices given as (i, j, k) = (column, row, slice)."""
        idx = np.asarray(index, dtype=float)
        return np.asarray(self.origin) + (idx * np.asarray(self.spacing)) @ self.matrix.T

    def lps_to_index(self, point: Any) -> np.ndarray:
        """Continuous (i, j, k) index of LPS point(s)."""
        p = np.asarray(point, dtype=float) - np.asarray(self.origin)
        return (p @ self.matrix) / np.asarray(self.spacing)


@dataclass(frozen=True)
class InstanceRef:
    """One source instance of a volume (what a SEG/SR must reference)."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path | None = None
    frame: int | None = None  # 1-based frame number for multi-frame sources


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxels (``[k, j, i]``) with geometry and the instances they came from."""

    array: np.ndarray
    geometry: Geometry
    modality: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    #: Source instances in slice order (index k); may be empty for non-DICOM input.
    sources: tuple[InstanceRef, ...] = ()
    #: Non-identifying header facts models may need (e.g. PatientAge, PatientSex,
    #: SeriesDescription, MagneticFieldStrength). Never logged.
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume array must be 3-D [k, j, i], got shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        sx, sy, sz = self.geometry.spacing
        return sx * sy * sz / 1000.0

    def to_sitk(self) -> "sitk.Image":
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array)
        image.SetOrigin(self.geometry.origin)
        image.SetSpacing(self.geometry.spacing)
        image.SetDirection(self.geometry.direction)
        return image

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry and provenance, other voxels (e.g. a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.geometry, self.modality, self.series_instance_uid,
                      self.study_instance_uid, self.frame_of_reference_uid, self.sources,
                      dict(self.attributes))

    @classmethod
    def from_sitk(cls, image: "sitk.Image", **kwargs: Any) -> "Volume":
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
        geometry = Geometry(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))
        return cls(sitk.GetArrayFromImage(image), geometry, **kwargs)


# =========================================================================== loading
#
# The loader below turns one DICOM series into a Volume. Choices, in one place:
# * Slices are ordered by their position along the slice normal (row x column
#   cosines), never by file name or InstanceNumber.
# * Geometry follows SimpleITK's ImageSeriesReader (GDCM) so that ``medai convert``
#   matches it: origin = position of the first slice in that order, direction
#   columns = row cosine, column cosine, normal; slice spacing = distance from the
#   first to the last position / (n - 1).
# * Voxel values are the modality LUT output (rescale slope/intercept: CT in HU).
#   Integer slope and intercept give the smallest integer type that holds every
#   possible value (GDCM's rule), otherwise floating point.
# * A series that cannot form one regular volume is refused with a
#   SeriesGeometryError that names the problem: missing positions, mixed
#   orientation/size/pixel spacing, two different images at one position, gaps,
#   irregular spacing. A slice stored twice (same position, identical pixels, a new
#   SOP Instance UID) is dropped with a warning naming both files.
#   Gantry tilt (slices offset sideways along the stack) is resampled onto an
#   orthogonal grid by default (linear, in-plane shift per slice) and reported in
#   ``attributes["gantry_tilt_deg"]``; ``on_tilt="refuse"`` raises instead.

import logging as _logging
import os as _os
import warnings as _warnings
from collections.abc import Callable as _Callable
from collections.abc import Iterable as _Iterable
from typing import Literal as _Literal

from medai.errors import DicomInputError as _DicomInputError
from medai.errors import SeriesGeometryError as _SeriesGeometryError
from medai.errors import UnsafeInputError as _UnsafeInputError
from medai.dicom.safety import describe_error

_log = _logging.getLogger("medai.dicom")

#: Cosines of two slices' orientations may differ by this much and still be "the same".
ORIENTATION_TOLERANCE = 1e-3
#: Relative deviation of one slice step from the median step still accepted as regular.
SPACING_TOLERANCE = 0.2
#: A step this many times the median step means missing slices.
GAP_FACTOR = 1.5
#: Two slices closer than this (mm) are at the same position: one slice stored twice.
DUPLICATE_POSITION_TOLERANCE = 1e-3

#: Header elements the loader itself uses (converted and checked up front).
_LOADER_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration",
    "RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "ImagerPixelSpacing", "SpacingBetweenSlices", "SliceThickness",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
)

#: Header facts copied into ``Volume.attributes`` (non-identifying only).
ATTRIBUTE_KEYWORDS = (
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "Modality", "SeriesDescription",
    "BodyPartExamined", "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength",
    "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "ImageType", "SliceThickness", "SpacingBetweenSlices",
    "KVP", "ConvolutionKernel", "ContrastBolusAgent", "PhotometricInterpretation",
    "WindowCenter", "WindowWidth", "RescaleType", "SeriesNumber", "ProtocolName",
)


@dataclass(frozen=True)
class _Frame:
    """One 2-D frame of the series with everything the geometry checks need."""

    ref: InstanceRef
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None  # (row spacing, column spacing) as in PixelSpacing
    rows: int
    columns: int
    slope: float
    intercept: float
    source: int  # index into the list of decoded arrays
    frame_index: int  # index of the frame inside that array (0 for single-frame)


def _seq_item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _group_value(groups: list[Any], macro: str, keyword: str) -> Any:
    """A value from the first functional group (per-frame, then shared) that has it."""
    for group in groups:
        if group is None:
            continue
        item = _seq_item(group, macro)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _floats_or_none(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in (value if not isinstance(value, (int, float)) else [value]))
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _num(value: Any, default: float) -> float:
    try:
        out = float(value)
        return out if np.isfinite(out) else default
    except (TypeError, ValueError):
        return default


def _frames_of(ds: Any, path: Path, source: int) -> list[_Frame]:
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[_Frame] = []
    if per_frame is not None or shared is not None:  # enhanced multi-frame
        if per_frame is not None and len(per_frame) != n:
            raise _DicomInputError(path, f"{len(per_frame)} per-frame functional groups for {n} frames")
        for k in range(n):
            groups = [per_frame[k] if per_frame is not None else None, shared]
            frames.append(_Frame(
                ref=InstanceRef(sop_class, sop_uid, path, k + 1),
                position=_floats_or_none(_group_value(groups, "PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats_or_none(_group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                spacing=_floats_or_none(_group_value(groups, "PixelMeasuresSequence", "PixelSpacing"), 2),
                rows=rows, columns=cols,
                slope=_num(_group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
                           or ds.get("RescaleSlope"), 1.0),
                intercept=_num(_group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
                               if _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept") is not None
                               else ds.get("RescaleIntercept"), 0.0),
                source=source, frame_index=k))
        return frames
    position = _floats_or_none(ds.get("ImagePositionPatient"), 3)
    orientation = _floats_or_none(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats_or_none(ds.get("PixelSpacing"), 2)
    slope, intercept = _num(ds.get("RescaleSlope"), 1.0), _num(ds.get("RescaleIntercept"), 0.0)
    if n == 1:
        return [_Frame(InstanceRef(sop_class, sop_uid, path, None), position, orientation, spacing,
                       rows, cols, slope, intercept, source, 0)]
    # Legacy multi-frame (e.g. MR/NM): frames stacked along the normal.
    step = _num(ds.get("SpacingBetweenSlices"), 0.0) or _num(ds.get("SliceThickness"), 0.0)
    for k in range(n):
        pos = None
        if position is not None and orientation is not None and step > 0:
            normal = np.cross(orientation[:3], orientation[3:])
            pos = tuple(float(v) for v in np.asarray(position) + k * step * normal)
        frames.append(_Frame(InstanceRef(sop_class, sop_uid, path, k + 1), pos, orientation, spacing,
                             rows, cols, slope, intercept, source, k))
    return frames


def _resolve_series(files_or_dir: Any, series_uid: str | None) -> list[Path]:
    from medai.dicom.index import SeriesEntry, scan

    if isinstance(files_or_dir, SeriesEntry):  # already indexed: no second scan
        if not files_or_dir.instances:
            raise _DicomInputError(None, f"series {files_or_dir.series_instance_uid} has no instances")
        return list(files_or_dir.files)

    if isinstance(files_or_dir, (str, _os.PathLike)):
        items = [files_or_dir]
    else:
        items = list(files_or_dir)
    if not items:
        raise _DicomInputError(None, "no files given")
    index = scan(items)
    candidates = [s for s in index.series.values() if s.is_image]
    where = Path(items[0]) if len(items) == 1 else None
    if series_uid is not None:
        entry = index.series.get(series_uid)
        if entry is None:
            raise _DicomInputError(where, f"series {series_uid} not found "
                                   f"({len(index.series)} series, {len(index.skipped)} files skipped)")
        return list(entry.files)
    if not candidates and len(index.skipped) == 1 and index.files_seen == 1:
        only = index.skipped[0]
        error = _UnsafeInputError if only.kind == "unsafe" else _DicomInputError
        raise error(only.path, only.reason)
    if not candidates:
        reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in index.skipped[:3])
        raise _DicomInputError(where, "no image series found"
                               + (f" ({len(index.skipped)} files skipped, e.g. {reasons})" if reasons else ""))
    if len(candidates) > 1:
        uids = ", ".join(s.series_instance_uid for s in candidates[:5])
        raise _DicomInputError(where, f"{len(candidates)} image series found; pass series_uid= one of {uids}")
    return list(candidates[0].files)


_LOADER_TAGS: list[tuple[str, int]] = []


def _loader_tags() -> list[tuple[str, int]]:
    """(keyword, tag) of :data:`_LOADER_KEYWORDS` (pydicom's dictionary is read at first use)."""
    if not _LOADER_TAGS:
        from pydicom.datadict import tag_for_keyword

        _LOADER_TAGS.extend((k, int(tag_for_keyword(k))) for k in _LOADER_KEYWORDS)  # type: ignore[arg-type]
    return _LOADER_TAGS


def _read_full(path: Path) -> Any:
    """Read and check one file completely (pydicom's warnings about
    non-conformant values are silenced: what matters is raised as an error)."""
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        return _read_and_check(path)


def _read_and_check(path: Path) -> Any:
    from medai.dicom.safety import check_pixel_budget, read_dataset_safely

    try:
        ds, _ = read_dataset_safely(path)
    except _DicomInputError:
        raise
    except RecursionError:
        raise _UnsafeInputError(path, "sequences nested too deeply to parse") from None
    except Exception as exc:
        raise _DicomInputError(path, f"unreadable: {describe_error(exc)}") from None
    if "PixelData" not in ds:
        raise _DicomInputError(path, "no pixel data")
    # pydicom converts values on first access; convert everything the loader reads
    # now, so a corrupt value is reported here with the file's name instead of
    # escaping later as some parser exception.
    for keyword, tag in _loader_tags():
        if tag in ds:  # a present element only: asking for an absent one by keyword costs as much
            try:
                ds[tag]
            except Exception as exc:
                raise _DicomInputError(path, f"unreadable {keyword}: {describe_error(exc)}") from None
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        allocated = int(ds.get("BitsAllocated", 0) or 0)
        bits_stored = int(ds.get("BitsStored", allocated) or allocated)
        representation = int(ds.get("PixelRepresentation", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _DicomInputError(path, f"image pixel description unreadable: {describe_error(exc)}") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise _DicomInputError(path, f"image size {rows}x{cols}x{frames} is not positive")
    if allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= allocated or representation not in (0, 1):
        raise _DicomInputError(path, f"inconsistent pixel description: BitsAllocated={allocated}, "
                               f"BitsStored={bits_stored}, PixelRepresentation={representation}")
    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
    try:
        encapsulated = bool(ts is not None and ts.is_compressed)
    except ValueError:
        raise _DicomInputError(path, f"unknown transfer syntax {str(ts)[:64]!r}") from None
    stored = path.stat().st_size if encapsulated else len(ds.PixelData)
    check_pixel_budget(ds, path, stored, encapsulated)
    return ds


_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # lossless, near-lossless


@dataclass(frozen=True)
class _Codestream:
    """The JPEG-LS codestream of one single-frame instance and what its pixels must be."""

    data: bytes
    shape: tuple[int, int]
    dtype: Any

    def decode(self) -> np.ndarray | None:
        """CharLS (imagecodecs; it releases the interpreter lock, so several decode at once);
        None when the result is not exactly what the header describes or CharLS refuses it:
        pydicom's own path then decodes the file, or names what is wrong with it. Touches no
        pydicom object, so it may run in any thread."""
        try:
            import imagecodecs

            arr = imagecodecs.jpegls_decode(self.data)
        except Exception:  # noqa: BLE001 - pydicom's path reports what is wrong with this file
            return None
        if arr.shape != self.shape or arr.dtype != self.dtype:
            return None
        return arr[np.newaxis]


def _jpeg_ls_codestream(ds: Any) -> _Codestream | None:
    """The codestream of a single-frame, unsigned, monochrome JPEG-LS instance (the
    fast path of :func:`_decode`: the same CharLS without pydicom's per-call set-up, and in
    worker threads in :func:`load_series`); None for anything else."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or str(meta.get("TransferSyntaxUID", "")) not in _JPEG_LS:
        return None
    try:
        from pydicom.encaps import generate_frames

        allocated = int(ds.BitsAllocated)
        if (int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1
                or int(ds.get("PixelRepresentation", 0) or 0) != 0 or allocated not in (8, 16)):
            return None
        data = next(generate_frames(ds.PixelData, number_of_frames=1))
        return _Codestream(bytes(data), (int(ds.Rows), int(ds.Columns)), np.dtype(np.uint8 if allocated == 8 else np.uint16))
    except Exception:  # noqa: BLE001 - pydicom's path reports what is wrong with this file
        return None


class _Prefetch:
    """Fast-path decodes (:class:`_Codestream`) running ahead of the caller in two worker
    threads, at most ``window`` files ahead, so memory stays bounded by the window whatever
    the series' size. :meth:`take` returns a file's pixels, or None where the fast path does
    not apply (the caller decodes that file itself)."""

    def __init__(self, order: list[int], datasets: list[Any], window: int = 16) -> None:
        self._order, self._datasets, self._window = order, datasets, window
        self._position = {source: i for i, source in enumerate(order)}
        self._at = 0  # next position of ``order`` to submit
        self._futures: dict[int, Any] = {}
        self._pool: Any = None
        if len(order) >= 4:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="medai-decode")

    def take(self, source: int) -> np.ndarray | None:
        if self._pool is None:
            stream = _jpeg_ls_codestream(self._datasets[source])
            return stream.decode() if stream is not None else None
        limit = self._position[source] + self._window
        while self._at < len(self._order) and self._at <= limit:
            s = self._order[self._at]
            stream = _jpeg_ls_codestream(self._datasets[s])  # pydicom objects: this thread only
            self._futures[s] = self._pool.submit(stream.decode) if stream is not None else None
            self._at += 1
        future = self._futures.pop(source, None)
        return future.result() if future is not None else None

    def close(self) -> None:
        if self._pool is not None:
            for future in self._futures.values():
                if future is not None:
                    future.cancel()
            self._pool.shutdown(wait=True)
            self._futures.clear()


def _decode(ds: Any, path: Path) -> np.ndarray:
    stream = _jpeg_ls_codestream(ds)
    fast = stream.decode() if stream is not None else None
    return fast if fast is not None else _decode_with_pydicom(ds, path)


def _decode_with_pydicom(ds: Any, path: Path) -> np.ndarray:
    """pydicom's decoders (plugins as in :mod:`medai.dicom.codecs`); the error names the file."""
    from pydicom.pixels import pixel_array

    from medai.dicom import codecs

    codecs.register()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise _DicomInputError(path, f"colour image (SamplesPerPixel={spp}); volumes need monochrome data")
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        try:
            arr = pixel_array(ds, decoding_plugin=codecs.preferred_plugin(ds))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # Rust decoders panic with a BaseException subclass
            ts = ds.file_meta.get("TransferSyntaxUID", "?") if getattr(ds, "file_meta", None) else "?"
            raise _DicomInputError(path, f"cannot decode pixel data ({getattr(ts, 'name', ts)}): "
                                   f"{describe_error(exc)}") from None
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n == 1 and arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3 or arr.shape[0] != n:
        raise _DicomInputError(path, f"decoded pixel data has shape {arr.shape}, header says {n} frame(s)")
    return arr


_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                 "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"}


def _j2k_precision(ds: Any) -> int | None:
    """Sample precision from the JPEG 2000 codestream's SIZ marker. GDCM sizes its
    output from it rather than from BitsStored (they disagree in real files)."""
    from pydicom.encaps import generate_frames

    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
        frame = next(generate_frames(ds.PixelData, number_of_frames=n))
        at = frame.find(b"\xff\x51")
        if at < 0 or len(frame) < at + 41:
            return None
        return (frame[at + 40] & 0x7F) + 1
    except Exception:  # malformed codestream: the decoder will say so
        return None


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) in _J2K_SYNTAXES:
        bits = _j2k_precision(ds) or bits
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _output_dtype(frames: list[_Frame], stored: tuple[int, int], float_dtype: Any) -> np.dtype:
    """GDCM's rule: integer slope/intercept -> smallest integer type holding
    slope * [stored min, stored max] + intercept; otherwise floating point."""
    if any(f.slope != int(f.slope) or f.intercept != int(f.intercept) for f in frames):
        return np.dtype(float_dtype)
    lo = min(min(f.slope * stored[0], f.slope * stored[1]) + f.intercept for f in frames)
    hi = max(max(f.slope * stored[0], f.slope * stored[1]) + f.intercept for f in frames)
    if lo >= 0:
        for t in (np.uint8, np.uint16, np.uint32):
            if hi <= np.iinfo(t).max:
                return np.dtype(t)
    else:
        for t in (np.int8, np.int16, np.int32):
            if lo >= np.iinfo(t).min and hi <= np.iinfo(t).max:
                return np.dtype(t)
    return np.dtype(np.float64)


def _describe(frame: _Frame) -> str:
    name = frame.ref.path.name if frame.ref.path is not None else frame.ref.sop_instance_uid
    return f"{name} frame {frame.ref.frame}" if frame.ref.frame else name


def _check_consistent(frames: list[_Frame], where: Path | None) -> None:
    first = frames[0]
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise _SeriesGeometryError(where, f"inconsistent image size: {_describe(first)} is "
                                       f"{first.rows}x{first.columns}, {_describe(f)} is {f.rows}x{f.columns}")
    missing = [f for f in frames if f.position is None or f.orientation is None]
    if missing and len(frames) > 1:
        raise _SeriesGeometryError(where, f"missing position tags (ImagePositionPatient/"
                                   f"ImageOrientationPatient) on {len(missing)} of {len(frames)} slices, "
                                   f"e.g. {_describe(missing[0])}; slices cannot be ordered safely")
    if len(frames) == 1:
        return
    o0 = np.asarray(first.orientation)
    for f in frames[1:]:
        if np.max(np.abs(np.asarray(f.orientation) - o0)) > ORIENTATION_TOLERANCE:
            raise _SeriesGeometryError(where, f"inconsistent orientation: {_describe(first)} and "
                                       f"{_describe(f)} differ (mixed planes or a localizer in the series)")
    s0 = first.spacing
    for f in frames[1:]:
        if (s0 is None) != (f.spacing is None) or (
                s0 is not None and f.spacing is not None
                and np.max(np.abs(np.asarray(f.spacing) - np.asarray(s0))) > 1e-3 * max(s0)):
            raise _SeriesGeometryError(where, f"inconsistent pixel spacing: {_describe(first)} "
                                       f"{s0} vs {_describe(f)} {f.spacing}")


def _unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    norm = np.linalg.norm(a)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError("zero vector")
    return a / norm


#: Headers (pixel data dropped) of the last series :func:`load_series` read, keyed by the
#: (SOPInstanceUID, path) of its sources in slice order: the SEG/SR writers need exactly
#: these, and reading 200 files a second time costs as much as the SEG itself. One
#: entry, in memory only (they hold identifiers: never written anywhere from here).
_last_headers: tuple[tuple[tuple[str, str], ...], list[Any]] | None = None


def source_headers(volume: "Volume") -> list[Any] | None:
    """The source headers of ``volume`` in slice order, when it is the series last loaded."""
    key = tuple((s.sop_instance_uid, str(s.path)) for s in volume.sources)
    if _last_headers is not None and _last_headers[0] == key:
        return list(_last_headers[1])
    return None


def load_series(files_or_dir: "str | _os.PathLike[str] | _Iterable[str | _os.PathLike[str]] | SeriesEntry", *,
                series_uid: str | None = None,
                on_tilt: _Literal["resample", "refuse"] = "resample",
                float_dtype: Any = np.float32) -> "Volume":
    """Load one image series as a :class:`Volume` (voxels after the modality LUT,
    LPS geometry like SimpleITK, ``sources`` in slice order).

    ``files_or_dir``: a folder (scanned recursively), a list of files/folders, or
    a :class:`~medai.dicom.index.SeriesEntry` from :func:`~medai.dicom.index.scan`.
    ``series_uid``: which series, when there is more than one image series.
    ``on_tilt``: ``"resample"`` (default) corrects gantry tilt onto an orthogonal
    grid, ``"refuse"`` raises :class:`SeriesGeometryError`.
    ``float_dtype``: dtype of non-integer voxel values (float64 for exact
    agreement with SimpleITK, float32 to halve memory).

    Raises :class:`DicomInputError` (or its subclasses ``UnsafeInputError`` and
    ``SeriesGeometryError``) naming the file and the reason.
    """
    files = _resolve_series(files_or_dir, series_uid)
    where = Path(files[0]) if len(files) == 1 else Path(files[0]).parent
    datasets = []
    frames: list[_Frame] = []
    for i, path in enumerate(files):
        ds = _read_full(Path(path))
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise _DicomInputError(Path(path), "colour image (SamplesPerPixel != 1); volumes need monochrome data")
        datasets.append(ds)
        try:
            frames.extend(_frames_of(ds, Path(path), i))
        except _DicomInputError:
            raise
        except Exception as exc:  # corrupt functional groups and the like
            raise _DicomInputError(Path(path), f"unreadable frame geometry: {describe_error(exc)}") from None
    _check_consistent(frames, where)
    first_ds = datasets[0]

    def same_pixels(a: _Frame, b: _Frame) -> bool:
        """Whether two frames hold the same voxel values (same rescale, equal stored pixels)."""
        if (a.slope, a.intercept) != (b.slope, b.intercept):
            return False
        pa = _decode(datasets[a.source], Path(files[a.source]))[a.frame_index]
        pb = _decode(datasets[b.source], Path(files[b.source]))[b.frame_index]
        return bool(np.array_equal(pa, pb))

    ordered, geometry, tilt = _order_and_geometry(frames, first_ds, where, on_tilt, same_pixels)

    ranges = [_stored_range(d) for d in datasets]
    stored = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    dtype = _output_dtype(ordered, stored, float_dtype) if tilt is None else np.dtype(float_dtype)
    decoded: dict[int, np.ndarray] = {}
    out = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=dtype)
    # Decode each file once, fill its frames, release it.
    uses: dict[int, int] = {}
    for f in ordered:
        uses[f.source] = uses.get(f.source, 0) + 1
    prefetch = _Prefetch(list(uses), datasets)  # in decode order (dicts keep insertion order)
    try:
        for k, f in enumerate(ordered):
            if f.source not in decoded:
                fast = prefetch.take(f.source)
                decoded[f.source] = (fast if fast is not None  # the prefetch already tried the fast path
                                     else _decode_with_pydicom(datasets[f.source], Path(files[f.source])))
            raw = decoded[f.source][f.frame_index]
            if dtype.kind in "iu":
                if f.slope == 1 and f.intercept == 0:
                    out[k] = raw
                else:
                    out[k] = raw.astype(np.int64) * int(f.slope) + int(f.intercept)
            else:
                out[k] = raw.astype(np.float64) * f.slope + f.intercept
            uses[f.source] -= 1
            if uses[f.source] == 0:
                del decoded[f.source]
                datasets[f.source].PixelData = None  # free the encoded bytes early
    finally:
        prefetch.close()
    if tilt is not None:
        out = _resample_tilt(out, ordered, geometry)

    attributes = _attributes(first_ds)
    if len(ordered) < len(frames):
        attributes["duplicate_slices_dropped"] = len(frames) - len(ordered)
    if tilt is not None:
        attributes["gantry_tilt_deg"] = round(tilt, 3)
        attributes["resampled"] = "gantry tilt corrected: linear in-plane shift per slice"
    if str(first_ds.get("Modality", "")).upper() == "CT":
        attributes.setdefault("units", "HU")
    global _last_headers
    if tilt is None and all(f.frame_index == 0 for f in ordered) and len({f.source for f in ordered}) == len(ordered):
        _last_headers = (tuple((f.ref.sop_instance_uid, str(f.ref.path)) for f in ordered),
                         [datasets[f.source] for f in ordered])
    return Volume(
        array=out, geometry=geometry,
        modality=str(first_ds.get("Modality", "")),
        series_instance_uid=str(first_ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(first_ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first_ds.get("FrameOfReferenceUID", "")),
        sources=tuple(f.ref for f in ordered),
        attributes=attributes,
    )


def _order_and_geometry(frames: list[_Frame], ds: Any, where: Path | None, on_tilt: str,
                        same_pixels: _Callable[[_Frame, _Frame], bool]) -> tuple[list[_Frame], Geometry, float | None]:
    first = frames[0]
    if first.spacing is not None:
        row_spacing, col_spacing = first.spacing
    else:
        ips = _floats_or_none(ds.get("ImagerPixelSpacing"), 2)
        row_spacing, col_spacing = ips if ips else (1.0, 1.0)
    if row_spacing <= 0 or col_spacing <= 0:
        raise _SeriesGeometryError(where, f"pixel spacing must be positive, got {first.spacing}")
    if first.orientation is None:
        row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    else:
        try:
            row_dir, col_dir = _unit(first.orientation[:3]), _unit(first.orientation[3:])
        except ValueError:
            raise _SeriesGeometryError(where, "ImageOrientationPatient has a zero vector") from None
        if abs(float(row_dir @ col_dir)) > 1e-3:
            raise _SeriesGeometryError(where, "ImageOrientationPatient row and column are not perpendicular")
    normal = _unit(np.cross(row_dir, col_dir))
    direction = tuple(float(v) for v in np.column_stack([row_dir, col_dir, normal]).ravel())

    if len(frames) == 1:
        # One slice has no slice spacing; like GDCM, use SpacingBetweenSlices or 1 mm.
        z = _num(ds.get("SpacingBetweenSlices"), 0.0) or 1.0
        origin = first.position if first.position is not None else (0.0, 0.0, 0.0)
        return frames, Geometry(tuple(origin), (col_spacing, row_spacing, abs(z)), direction), None

    positions = np.array([f.position for f in frames], dtype=float)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    frames = [frames[i] for i in order]
    positions, dist = positions[order], dist[order]
    keep = _drop_identical_duplicates(frames, positions, where, same_pixels)
    if len(keep) < len(frames):
        frames, positions, dist = [frames[i] for i in keep], positions[keep], dist[keep]
        if len(frames) == 1:
            return _order_and_geometry(frames, ds, where, on_tilt, same_pixels)
    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise _SeriesGeometryError(where, f"slices {_describe(frames[k])} and {_describe(frames[k + 1])} lie "
                                   "in the same plane at different in-plane offsets")
    median = float(np.median(steps))
    big = np.flatnonzero(steps > GAP_FACTOR * median)
    if big.size:
        k = int(big[0])
        missing = int(round(steps[k] / median)) - 1
        raise _SeriesGeometryError(where, f"gap: about {missing} slice(s) missing between {_describe(frames[k])} "
                                   f"and {_describe(frames[k + 1])} ({steps[k]:.3f} mm where slices are "
                                   f"{median:.3f} mm apart)")
    off = np.flatnonzero(np.abs(steps - median) > SPACING_TOLERANCE * median)
    if off.size:
        k = int(off[0])
        raise _SeriesGeometryError(where, f"irregular slice spacing: {steps[k]:.3f} mm between "
                                   f"{_describe(frames[k])} and {_describe(frames[k + 1])}, median {median:.3f} mm")

    # In-plane drift along the stack: gantry tilt (or positions that are not on a line).
    rel = positions - positions[0]
    drift = rel - np.outer(rel @ normal, normal)
    half_pixel = 0.5 * min(row_spacing, col_spacing)
    total_drift = float(np.linalg.norm(drift[-1]))
    tilt: float | None = None
    if total_drift > half_pixel:
        expected = np.outer((rel @ normal) / (rel[-1] @ normal), drift[-1])
        if np.max(np.linalg.norm(drift - expected, axis=1)) > half_pixel:
            raise _SeriesGeometryError(where, "slice positions do not lie on a straight line "
                                       "(mixed stacks or corrupted positions)")
        tilt = float(np.degrees(np.arctan2(total_drift, float(rel[-1] @ normal))))
        if on_tilt == "refuse":
            raise _SeriesGeometryError(where, f"gantry tilt of {tilt:.2f} degrees: slices are sheared, "
                                       "not an orthogonal grid (load with on_tilt='resample' to correct it)")
        z = float(rel[-1] @ normal) / (len(frames) - 1)
    else:
        z = float(np.linalg.norm(positions[-1] - positions[0])) / (len(frames) - 1)
    geometry = Geometry(tuple(float(v) for v in positions[0]), (col_spacing, row_spacing, z), direction)
    return frames, geometry, tilt


def _drop_identical_duplicates(frames: list[_Frame], positions: np.ndarray, where: Path | None,
                               same_pixels: _Callable[[_Frame, _Frame], bool]) -> list[int]:
    """Indices of the frames to keep, in slice order: a slice stored twice (same
    position, identical pixels, a new SOP Instance UID, as PACS re-sends and some
    exports produce) is the same image, so the later copy is dropped with a warning
    naming both files, as dcm2niix and common viewers do (the copy that comes first
    in the series' file order, InstanceNumber then path, is kept). Two different images at
    one position (several acquisitions or phases in one series) cannot form one
    volume: SeriesGeometryError.

    ``frames`` are sorted along the slice normal, so copies are neighbours."""
    keep = [0]
    conflicts: list[tuple[_Frame, _Frame, np.ndarray]] = []
    for i in range(1, len(frames)):
        kept = keep[-1]
        if np.linalg.norm(positions[i] - positions[kept]) >= DUPLICATE_POSITION_TOLERANCE:
            keep.append(i)
            continue
        a, b = frames[kept], frames[i]
        if not same_pixels(a, b):
            conflicts.append((a, b, positions[kept]))
            continue
        _log.warning("identical duplicate slice dropped: %s and %s are the same image at the same position "
                     "(different SOP Instance UIDs); using %s", _source_name(a), _source_name(b),
                     _source_name(a))
    if conflicts:
        a, b, at = conflicts[0]
        raise _SeriesGeometryError(where, f"duplicate slice position with different pixels: {_describe(a)} and "
                                   f"{_describe(b)} are both at {tuple(round(float(v), 3) for v in at)} "
                                   f"({len(conflicts)} conflicting duplicate(s); several acquisitions or phases "
                                   "in one series?)")
    return keep


def _source_name(frame: _Frame) -> str:
    """A frame's file path (user-chosen, never patient data) and frame number."""
    name = str(frame.ref.path) if frame.ref.path is not None else frame.ref.sop_instance_uid
    return f"{name} frame {frame.ref.frame}" if frame.ref.frame else name


def _shift_axis(a: np.ndarray, shift: float, axis: int, fill: float) -> np.ndarray:
    """Sample ``a`` at ``x - shift`` along ``axis`` with linear interpolation."""
    if abs(shift) < 1e-6:
        return a
    n = a.shape[axis]
    src = np.arange(n) - shift
    i0 = np.floor(src).astype(int)
    frac = float(src[0] - i0[0])
    valid0 = (i0 >= 0) & (i0 < n)
    valid1 = (i0 + 1 >= 0) & (i0 + 1 < n)
    a0 = np.take(a, np.clip(i0, 0, n - 1), axis=axis)
    a1 = np.take(a, np.clip(i0 + 1, 0, n - 1), axis=axis)
    shape = [1] * a.ndim
    shape[axis] = n
    v0 = valid0.reshape(shape)
    v1 = valid1.reshape(shape)
    out = np.where(v0, a0, fill) * (1 - frac) + np.where(v1, a1, fill) * frac
    # Outside the source slice entirely: fill.
    return np.where(v0 | v1, out, fill)


def _resample_tilt(array: np.ndarray, frames: list[_Frame], geometry: Geometry) -> np.ndarray:
    """Move each slice in-plane so that the stack forms an orthogonal grid."""
    m = geometry.matrix
    row_dir, col_dir, normal = m[:, 0], m[:, 1], m[:, 2]
    sx, sy, _ = geometry.spacing
    p0 = np.asarray(geometry.origin)
    fill = float(array.min())
    out = np.empty(array.shape, dtype=array.dtype)
    for k, f in enumerate(frames):
        rel = np.asarray(f.position) - p0
        offset = rel - (rel @ normal) * normal
        di, dj = float(offset @ row_dir) / sx, float(offset @ col_dir) / sy
        # New voxel (i, j) takes old (i - di, j - dj) of slice k.
        sl = _shift_axis(array[k].astype(np.float64), di, axis=1, fill=fill)
        sl = _shift_axis(sl, dj, axis=0, fill=fill)
        out[k] = sl
    return out


def _attributes(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    for kw in ATTRIBUTE_KEYWORDS:
        try:
            value = ds.get(kw)
        except Exception:  # a corrupt optional fact is left out, not fatal
            continue
        if value is None and shared is not None:
            for macro in ("MREchoSequence", "MRTimingAndRelatedParametersSequence",
                          "MRModifierSequence", "CTAcquisitionDetailsSequence",
                          "CTReconstructionSequence", "FrameVOILUTSequence",
                          "PixelMeasuresSequence", "MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
                item = _seq_item(shared, macro)
                if item is not None and kw in item:
                    value = item.get(kw)
                    break
            if kw == "EchoTime" and value is None:
                item = _seq_item(shared, "MREchoSequence")
                value = item.get("EffectiveEchoTime") if item is not None else None
        if value is None or value == "":
            continue
        out[kw] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """pydicom values as JSON-friendly Python values."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat, IS

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (DSfloat, float)):
        return float(value)
    if isinstance(value, (IS, int)):
        return int(value)
    return str(value)


__all__ = ["Geometry", "InstanceRef", "Volume", "load_series", "ATTRIBUTE_KEYWORDS"]
