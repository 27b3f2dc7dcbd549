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
