"""The one imaging toolkit: OHIF's CT presets in one table that every consumer
reads, percentile windowing, resizing, nearest-axis orientation."""

from __future__ import annotations

import numpy as np
import pytest

from medai import imaging, viewer
from medai.inference.pipelines import medsam_lite as ml


def test_ct_presets_are_ohifs_values_on_keys_one_to_five() -> None:
    keys = {p["key"]: (p["name"], p["width"], p["level"]) for p in imaging.preset_keys()}
    assert keys["1"] == ("Soft tissue", 400, 40)
    assert keys["2"] == ("Lung", 1500, -600)
    assert keys["3"] == ("Liver", 150, 90)
    assert keys["4"] == ("Bone", 2500, 480)
    assert keys["5"] == ("Brain", 80, 40)


def test_one_preset_table_for_viewer_and_pipelines() -> None:
    assert viewer.CT_PRESETS is imaging.CT_PRESETS
    for name, window in imaging.CT_PRESETS.items():
        assert ml.CT_WINDOWS[name] == (window.level, window.width)
        w = ml.choose_windowing(_ct(), ml.Settings(), name)
        assert (w.low, w.high) == (window.low, window.high)
    with pytest.raises(ValueError, match="unknown CT window"):
        imaging.ct_preset("abdomen-ish")


def _ct() -> object:
    from medai.dicom.volume import Geometry, Volume

    arr = np.linspace(-1000, 1000, 8 * 16 * 16, dtype=np.float32).reshape(8, 16, 16)
    return Volume(arr, Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 2.0), tuple(np.eye(3).reshape(-1))), modality="CT")


def test_percentile_range_leaves_the_background_out() -> None:
    rng = np.random.default_rng(0)
    body = rng.normal(500, 50, size=20_000).astype(np.float32)
    volume = np.concatenate([np.zeros(80_000, np.float32), body])
    lo, hi = imaging.percentile_range(volume, 1, 99)
    assert lo == pytest.approx(np.percentile(body, 1), rel=1e-6)
    assert hi == pytest.approx(np.percentile(body, 99), rel=1e-6)
    flat = imaging.percentile_range(np.full(1000, 7.0), 1, 99)  # nothing to span: still a valid window
    assert flat[1] > flat[0]
    with pytest.raises(ValueError):
        imaging.percentile_range(volume, 50, 10)


def test_resample_matrix_preserves_constants_and_ramps() -> None:
    for n_in, n_out in ((512, 256), (100, 256), (7, 3)):
        w = imaging.resample_matrix(n_in, n_out)
        assert w.shape == (n_out, n_in)
        assert np.allclose(w.sum(axis=1), 1.0, atol=1e-5)
    ramp = np.arange(512, dtype=np.float32)
    half = imaging.resample_matrix(512, 256) @ ramp
    assert np.allclose(half[1:-1], 2 * np.arange(1, 255) + 0.5, atol=1e-3)  # pixel-centre convention


def test_nearest_axes_is_one_to_one_even_when_oblique() -> None:
    # 45 degrees between i and j: a naive argmax would map both onto one patient axis
    c = np.cos(np.pi / 4)
    matrix = np.array([[c, c, 0.0], [-c, c, 0.0], [0.0, 0.0, 1.0]])
    assigned = imaging.nearest_axes(matrix)
    assert sorted(assigned) == [0, 1, 2] and sorted(assigned.values()) == [0, 1, 2]
    assert assigned[2] == 2
    swapped = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # sagittal acquisition
    assert imaging.nearest_axes(swapped) == {0: 1, 1: 2, 2: 0}


def test_resize_equals_the_dense_resampling_product() -> None:
    """The banded resize gives the matrix product of :func:`resample_matrix` (up- and down-sampling)."""
    from medai.imaging import resample_matrix, resize

    rng = np.random.default_rng(3)
    for (rows_in, cols_in), (rows, cols) in (((256, 256), (101, 122)), ((101, 122), (256, 256)),
                                             ((7, 3), (2, 9)), ((1, 5), (4, 1))):
        image = rng.normal(size=(rows_in, cols_in)).astype(np.float32)
        dense = resample_matrix(rows_in, rows) @ image @ resample_matrix(cols_in, cols).T
        out = resize(image, rows, cols)
        assert out.shape == (rows, cols) and out.dtype == np.float32
        np.testing.assert_allclose(out, dense, atol=1e-5)
