"""The PS3.15 Table E.1-1 data module: size and known rows (a wrong regeneration fails here)."""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword

from medai.dicom import deid_table
from medai.dicom.deid import DeidOption, _combine, _resolve


def _t(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def test_table_size_and_edition() -> None:
    assert deid_table.EDITION == "2026c"
    assert len(deid_table.BASIC) == 652
    assert len(deid_table.MASKED) == 3
    assert set(deid_table.BASIC.values()) == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    assert sum(v == "U" for v in deid_table.BASIC.values()) == 55
    assert set(deid_table.OPTIONS) >= {o.value for o in DeidOption if o is not DeidOption.RETAIN_SAFE_PRIVATE}


def test_known_rows() -> None:
    rows = {
        "PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "OtherPatientIDsSequence": "X",
        "PatientAddress": "X", "AccessionNumber": "Z", "StudyInstanceUID": "U", "SOPInstanceUID": "U",
        "MediaStorageSOPInstanceUID": "U", "FrameOfReferenceUID": "U", "ReferencedSOPInstanceUID": "U",
        "ReferencedImageSequence": "X/Z/U*", "SourceImageSequence": "X/Z/U*",
        "InstitutionName": "X/Z/D", "ReferringPhysicianName": "Z", "StudyDate": "Z", "ContentDate": "Z/D",
        "SeriesDate": "X/D", "StudyDescription": "X", "DeviceSerialNumber": "X/Z/D",
        "ReferencedStudySequence": "X/Z",
    }
    for keyword, action in rows.items():
        assert deid_table.BASIC[_t(keyword)] == action, keyword
    for keyword in ("SOPClassUID", "Modality", "PixelData", "ReferencedSeriesSequence"):
        assert _t(keyword) not in deid_table.BASIC, keyword
    # Curve data (50xx,xxxx) and overlay data (60xx,3000) are removed.
    assert (0x5000, 0x0000, 0xFF00, 0x0000, "X") in deid_table.MASKED
    assert (0x6000, 0x3000, 0xFF00, 0xFFFF, "X") in deid_table.MASKED


def test_option_columns() -> None:
    opts = deid_table.OPTIONS
    assert opts["retain-uids"][_t("SeriesInstanceUID")] == "K"
    assert opts["retain-longitudinal-dates"][_t("StudyDate")] == "C"
    assert opts["retain-longitudinal-full-dates"][_t("StudyDate")] == "K"
    assert _t("PatientBirthDate") not in opts["retain-longitudinal-dates"]
    assert opts["retain-patient-characteristics"][_t("PatientAge")] == "K"
    assert opts["retain-institution-identity"][_t("InstitutionName")] == "K"
    assert opts["clean-descriptors"][_t("SeriesDescription")] == "C"


def test_resolution_of_actions() -> None:
    none: frozenset[str] = frozenset()
    assert _resolve(_t("PatientName"), "PN", none) == ("Z", "table")
    assert _resolve(_t("Modality"), "CS", none) == ("K", "not-in-table")
    assert _resolve(_t("SegmentLabel"), "LO", none) == ("K", "not-in-table")
    assert _resolve(0x00091001, "PN", none)[1] == "safety-net-person-name"
    assert _resolve(_t("StudyDate"), "DA", frozenset({"retain-longitudinal-dates"})) == \
        ("C", "option:retain-longitudinal-dates")
    assert _resolve(_t("StudyInstanceUID"), "UI", frozenset({"retain-uids"}))[0] == "K"
    assert _combine("X/Z/U*", _t("ReferencedImageSequence"), "SQ") == "U*"
    assert _combine("Z/D", _t("PatientID"), "LO") == "D"
    assert _combine("X/Z/D", _t("InstitutionName"), "LO") == "Z"
    assert _combine("X/D", _t("SeriesDate"), "DA") == "D"
    assert _combine("X/D", _t("ProtocolName"), "LO") == "X"
