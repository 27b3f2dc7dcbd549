"""medai's NIfTI-1 writer against SimpleITK's and nibabel's readers (and SimpleITK's writer),
on the demo series' grid and on oblique and left-handed grids."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medai.dicom.outputs.nifti import write_nifti
from medai.dicom.volume import Geometry


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


GRIDS = {
    "axial identity": np.eye(3),
    "demo-like (LPS flips)": np.diag([1.0, 1.0, -1.0]) @ np.eye(3),
    "oblique": _rotation(np.array([0.3, -0.5, 0.8]), 0.61),
    "oblique, left-handed": _rotation(np.array([0.9, 0.1, -0.2]), 2.3) @ np.diag([1.0, -1.0, 1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
    "half turn": _rotation(np.array([0.0, 0.0, 1.0]), np.pi),
}


@pytest.mark.parametrize("name", list(GRIDS))
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_written_nifti_reads_back_like_simpleitks_own(tmp_path: Path, name: str, dtype: type) -> None:
    rng = np.random.default_rng(7)
    array = (rng.random((7, 9, 11)) * 50).astype(dtype)
    geometry = Geometry((12.5, -40.25, 3.0), (0.9, 1.1, 2.5), tuple(GRIDS[name].reshape(-1)))  # type: ignore[arg-type]
    ours = write_nifti(array, geometry, tmp_path / "ours.nii.gz")
    theirs = tmp_path / "theirs.nii.gz"
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(theirs), useCompression=True)
    a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(theirs))
    assert np.array_equal(sitk.GetArrayFromImage(a), array) and a.GetPixelID() == b.GetPixelID()
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4) and np.allclose(a.GetOrigin(), geometry.origin, atol=1e-4)
    assert np.allclose(a.GetSpacing(), geometry.spacing, atol=1e-6)
    assert np.allclose(a.GetDirection(), geometry.direction, atol=1e-5)
    n_ours, n_theirs = nib.load(str(ours)), nib.load(str(theirs))
    assert np.allclose(n_ours.affine, n_theirs.affine, atol=1e-4)
    assert np.allclose(n_ours.header.get_qform(), n_ours.header.get_sform(), atol=1e-4)  # both say the same
    assert np.array_equal(np.asarray(n_ours.dataobj), np.asarray(n_theirs.dataobj))
