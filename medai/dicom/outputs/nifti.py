"""NIfTI-1 label maps (``mask.nii.gz``) written with numpy and zlib, no imaging library.

A run writes one label map beside its SEG; loading SimpleITK only for that cost 0.11 s of
imports (and its libraries' memory) in a process that needs nothing else from it. The
header is the plain single-file NIfTI-1 layout (``n+1``, data at byte 352), with the same
geometry in the qform (quaternion, ``qform_code`` 1, scanner) and the sform (``sform_code``
1): LPS as medai keeps it, turned to NIfTI's RAS by negating x and y. Checked against
SimpleITK's own writer and reader, and nibabel's, in the tests.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Geometry

#: numpy dtype -> (NIfTI datatype code, bits per voxel)
_DATATYPES = {np.dtype(np.uint8): (2, 8), np.dtype(np.int16): (4, 16), np.dtype(np.int32): (8, 32),
              np.dtype(np.float32): (16, 32), np.dtype(np.float64): (64, 64), np.dtype(np.int8): (256, 8),
              np.dtype(np.uint16): (512, 16), np.dtype(np.uint32): (768, 32)}


def ras_affine(geometry: "Geometry") -> np.ndarray:
    """The 4x4 voxel (i, j, k) -> RAS mm affine of ``geometry``."""
    flip = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = flip @ geometry.matrix @ np.diag(geometry.spacing)
    affine[:3, 3] = flip @ np.asarray(geometry.origin, dtype=float)
    return affine


def quaternion(rotation: np.ndarray) -> tuple[float, float, float, float]:
    """(b, c, d, qfac) of NIfTI's qform for an orthonormal 3x3 ``rotation`` (PS: the NIfTI-1
    header's quaternion convention; a left-handed rotation gets qfac -1 and its third
    column negated first)."""
    r = np.array(rotation, dtype=float)
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    a = r[0, 0] + r[1, 1] + r[2, 2] + 1.0
    if a > 0.5:
        a = 0.5 * np.sqrt(a)
        b, c, d = 0.25 * (r[2, 1] - r[1, 2]) / a, 0.25 * (r[0, 2] - r[2, 0]) / a, 0.25 * (r[1, 0] - r[0, 1]) / a
    else:
        xd, yd, zd = 1.0 + r[0, 0] - (r[1, 1] + r[2, 2]), 1.0 + r[1, 1] - (r[0, 0] + r[2, 2]), \
            1.0 + r[2, 2] - (r[0, 0] + r[1, 1])
        if xd > 1.0:
            b = 0.5 * np.sqrt(xd)
            c, d, a = 0.25 * (r[0, 1] + r[1, 0]) / b, 0.25 * (r[0, 2] + r[2, 0]) / b, 0.25 * (r[2, 1] - r[1, 2]) / b
        elif yd > 1.0:
            c = 0.5 * np.sqrt(yd)
            b, d, a = 0.25 * (r[0, 1] + r[1, 0]) / c, 0.25 * (r[1, 2] + r[2, 1]) / c, 0.25 * (r[0, 2] - r[2, 0]) / c
        else:
            d = 0.5 * np.sqrt(zd)
            b, c, a = 0.25 * (r[0, 2] + r[2, 0]) / d, 0.25 * (r[1, 2] + r[2, 1]) / d, 0.25 * (r[1, 0] - r[0, 1]) / d
        if a < 0.0:
            b, c, d = -b, -c, -d
    return float(b), float(c), float(d), qfac


def header(shape_kji: tuple[int, int, int], dtype: np.dtype, geometry: "Geometry") -> bytes:
    """The 348-byte NIfTI-1 header plus the 4-byte empty extension flag."""
    if np.dtype(dtype) not in _DATATYPES:
        raise ValueError(f"no NIfTI-1 datatype for {np.dtype(dtype)}")
    code, bits = _DATATYPES[np.dtype(dtype)]
    nk, nj, ni = (int(n) for n in shape_kji)
    affine = ras_affine(geometry)
    rotation = affine[:3, :3] / np.asarray(geometry.spacing, dtype=float)
    b, c, d, qfac = quaternion(rotation)
    sx, sy, sz = (float(s) for s in geometry.spacing)
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    h[38:39] = b"r"
    struct.pack_into("<8h", h, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, code, bits)
    struct.pack_into("<8f", h, 76, qfac, sx, sy, sz, 0.0, 0.0, 0.0, 0.0)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset; scl_slope 0 = no scaling
    h[123] = 10  # xyzt_units: mm and s
    struct.pack_into("<hh", h, 252, 1, 1)  # qform_code, sform_code: scanner anatomical
    struct.pack_into("<6f", h, 256, b, c, d, *affine[:3, 3])
    struct.pack_into("<12f", h, 280, *affine[:3, :].reshape(-1))
    h[344:348] = b"n+1\0"
    return bytes(h)


def write_nifti(array: np.ndarray, geometry: "Geometry", path: str | Path, *, compress_level: int = 1) -> Path:
    """Write ``array`` ([k, j, i] on ``geometry``) to ``path`` (``.nii`` or ``.nii.gz``),
    through a temporary name and a rename, so a reader never sees half a file."""
    path = Path(path)
    data = np.ascontiguousarray(array)
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.ndim != 3:
        raise ValueError(f"a 3-D array is needed, not {data.shape}")
    payload = header(data.shape, data.dtype, geometry) + data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compress_level, mtime=0)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path


__all__ = ["header", "quaternion", "ras_affine", "write_nifti"]
