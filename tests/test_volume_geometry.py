from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from medai.dicom.volume import Geometry, Volume


def _rotation(a: float, b: float, c: float) -> tuple[float, ...]:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


angles = st.floats(-np.pi, np.pi, allow_nan=False)
spacings = st.floats(0.1, 10, allow_nan=False)
coords = st.floats(-500, 500, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(angles, angles, angles, spacings, spacings, spacings, coords, coords, coords)
def test_index_lps_round_trip_matches_simpleitk(a, b, c, sx, sy, sz, ox, oy, oz):
    geom = Geometry((ox, oy, oz), (sx, sy, sz), _rotation(a, b, c))
    vol = Volume(np.zeros((3, 4, 5), dtype=np.int16), geom)
    image = vol.to_sitk()
    for idx in [(0, 0, 0), (4, 3, 2), (1.5, 2.25, 0.5)]:
        ours = geom.index_to_lps(idx)
        theirs = image.TransformContinuousIndexToPhysicalPoint(idx)
        assert np.allclose(ours, theirs, atol=1e-6)
        assert np.allclose(geom.lps_to_index(ours), idx, atol=1e-6)
    back = Volume.from_sitk(image)
    assert back.geometry.origin == pytest.approx(geom.origin)
    assert np.array_equal(back.array, vol.array)


def test_geometry_rejects_bad_values():
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 0, 1), tuple(np.eye(3).ravel()))
    with pytest.raises(ValueError):
        Geometry((0, 0, 0), (1, 1, 1), (1, 0, 0, 1, 0, 0, 0, 0, 1))


def test_volume_must_be_3d():
    with pytest.raises(ValueError):
        Volume(np.zeros((2, 2)), Geometry((0, 0, 0), (1, 1, 1), tuple(np.eye(3).ravel())))
