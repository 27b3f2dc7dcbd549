"""De-identified export: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

Why this exists: a case shared for a second opinion, teaching or research must carry no
patient identity, yet stay a valid, internally consistent DICOM study (a SEG still points at
its source images). The action of every attribute comes from PS3.15 Table E.1-1
(:mod:`medai.dicom.deid_table`, generated from maintained packages, edition noted there),
applied at every sequence depth, file meta included.

How the table's actions are carried out here (PS3.15 E.1.1 and E.3):

* ``D`` dummy value of the attribute's VR (UIDs: remapped; sequences: kept, items cleaned;
  dates: shifted when the Modified Dates option is on); ``Z`` empty value; ``X`` removed;
  ``K`` kept; ``C`` cleaned (dates shifted, text stripped of identifying tokens); ``U`` UID
  replaced by ``2.25.<HMAC-SHA-256(key, uid)>`` so the same UID maps to the same new UID in
  every file and every run with the same key: references stay resolvable.
* Combinations resolve to the least removal that keeps every IOD valid without knowing the
  IOD's type of each attribute: ``Z/D`` is ``D`` for dates, times and Patient ID (a keyed
  pseudonym), else ``Z``; ``X/Z`` is ``Z``; ``X/D`` is ``D`` for dates/times, else ``X``;
  ``X/Z/D`` is ``D`` for dates/times and Device Serial Number (Type 1 in enhanced objects),
  else ``Z``; ``X/Z/U*`` keeps a sequence whose UIDs are
  remapped (its other attributes are cleaned by their own rows), else ``Z``.
* Attributes not in the table are kept, with four safety nets beyond the standard: any
  other person name (PN) is emptied, any other date (DA/DT) is handled like a listed date,
  public attributes of unknown VR (UN) are removed, and free text (ST/LT/UT/UC, e.g. an SR
  Text Value) inside a sequence the table replaces (D, e.g. Content Sequence) gets a dummy. Private attributes are removed
  unless the Retain Safe Private option is on and they are on :data:`SAFE_PRIVATE`.
* Pixel data that may carry burned-in text is never exported silently: see
  :func:`burned_in_risk`. It is quarantined under ``MEDAI_HOME/quarantine/<export id>/`` unless
  a confirmed :class:`PixelRule` for the device blanks the text regions first.

The report written into the destination names rules, attribute keywords and counts, never
an original value or an input path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_has_tag, keyword_for_tag
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian

from medai import __version__, home
from medai.dicom import deid_table
from medai.errors import AuditWriteError, ConfigError, UnsafeInputError

log = logging.getLogger("medai.dicom.deid")
log.addHandler(logging.NullHandler())

PROFILE = "basic"


class DeidOption(StrEnum):
    """Options of PS3.15 E.3 that this implementation carries out."""

    RETAIN_UIDS = "retain-uids"
    RETAIN_LONGITUDINAL_FULL_DATES = "retain-longitudinal-full-dates"
    RETAIN_LONGITUDINAL_DATES = "retain-longitudinal-dates"  # the Modified Dates option
    RETAIN_PATIENT_CHARACTERISTICS = "retain-patient-characteristics"
    RETAIN_DEVICE_IDENTITY = "retain-device-identity"
    RETAIN_INSTITUTION_IDENTITY = "retain-institution-identity"
    RETAIN_SAFE_PRIVATE = "retain-safe-private"
    CLEAN_DESCRIPTORS = "clean-descriptors"


#: CID 7050 De-identification Method codes (scheme DCM).
CID7050: dict[str, tuple[str, str]] = {
    PROFILE: ("113100", "Basic Application Confidentiality Profile"),
    "clean-pixel-data": ("113101", "Clean Pixel Data Option"),
    DeidOption.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    DeidOption.RETAIN_LONGITUDINAL_FULL_DATES: ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    DeidOption.RETAIN_LONGITUDINAL_DATES: ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    DeidOption.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    DeidOption.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
    DeidOption.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
    DeidOption.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
}

#: Safe private attributes kept under the Retain Safe Private option: (private creator,
#: group, element byte). A deliberately small subset of PS3.15 Table E.3.10-1; add rows
#: only from that table.
SAFE_PRIVATE: frozenset[tuple[str, int, int]] = frozenset({
    ("GEMS_ACQU_01", 0x0019, 0x23),  # Table speed / table feed per rotation (CT geometry)
})

#: SOP classes whose pixels are typically screen captures or scanned documents.
SECONDARY_CAPTURE_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})
#: Ultrasound SOP classes (the operator types annotations into the image).
ULTRASOUND_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
})
#: Objects whose pixels are computed maps, never screens a device typed on (SEG, RT Dose):
#: the text detector is not run on them (a YES is still honoured).
_NO_TEXT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.481.2"})
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_DATE_VRS = frozenset({"DA", "DT"})
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE"})
_PATIENT_ID = 0x00100020
_PIXEL_DATA = 0x7FE00010


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class PixelRule:
    """A user-confirmed pixel-cleaning rule for one device: the rectangles
    (x, y, width, height in pixels, origin top left) where that device burns in text.
    Images from a matching Manufacturer and Manufacturer's Model Name (case-insensitive)
    are blanked there and exported instead of quarantined."""

    manufacturer: str
    model: str
    rectangles: tuple[tuple[int, int, int, int], ...]

    def __post_init__(self) -> None:
        if not self.manufacturer.strip() or not self.model.strip():
            raise ValueError("a pixel rule needs a manufacturer and a model")
        if not self.rectangles:
            raise ValueError("a pixel rule needs at least one rectangle")
        for rect in self.rectangles:
            if len(rect) != 4 or any(int(v) < 0 for v in rect) or rect[2] <= 0 or rect[3] <= 0:
                raise ValueError(f"rectangle {rect!r}: want x,y,width,height with width,height > 0")

    def matches(self, ds: Dataset) -> bool:
        return (str(ds.get("Manufacturer", "")).strip().lower() == self.manufacturer.strip().lower()
                and str(ds.get("ManufacturerModelName", "")).strip().lower() == self.model.strip().lower())

    @classmethod
    def parse(cls, text: str) -> "PixelRule":
        """``MANUFACTURER|MODEL|x,y,w,h;x,y,w,h`` (the CLI's inline form)."""
        parts = text.split("|")
        if len(parts) != 3:
            raise ValueError(f"pixel rule {text!r}: want MANUFACTURER|MODEL|x,y,w,h[;x,y,w,h...]")
        rects = []
        for chunk in parts[2].split(";"):
            nums = [int(v) for v in chunk.split(",") if v.strip()]
            if len(nums) != 4:
                raise ValueError(f"pixel rule rectangle {chunk!r}: want x,y,width,height")
            rects.append((nums[0], nums[1], nums[2], nums[3]))
        return cls(parts[0], parts[1], tuple(rects))

    @classmethod
    def from_json(cls, data: Any) -> "PixelRule":
        try:
            return cls(str(data["manufacturer"]), str(data["model"]),
                       tuple(tuple(int(v) for v in r) for r in data["rectangles"]))  # type: ignore[misc]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"pixel rule: want manufacturer, model, rectangles ({exc})") from exc


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one input file; ``input`` is its position in the sorted input
    list (never its path, which may name the patient)."""

    input: int
    status: str  # exported | quarantined | skipped | failed
    output: str | None = None  # relative to the destination (or to the quarantine folder)
    sop_class: str | None = None
    modality: str | None = None
    reason: str | None = None
    pixel_rule: bool = False


@dataclass(frozen=True)
class DeidReport:
    """Summary of one export. Holds no original value."""

    export_id: str
    profile: str
    options: tuple[str, ...]
    table_edition: str
    exported: int
    quarantined: int
    skipped: int
    failed: int
    actions: dict[str, int]
    attributes: dict[str, dict[str, int]]
    files: tuple[FileOutcome, ...]
    report_path: Path
    quarantine_dir: Path | None
    longitudinal: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["report_path"] = self.report_path.name
        data["quarantine_dir"] = (None if self.quarantine_dir is None
                                  else f"MEDAI_HOME/quarantine/{self.export_id}")
        data["medai_version"] = __version__
        return data


# ---------------------------------------------------------------------------- keys & mapping


def load_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The de-identification key. With a path: its bytes (at least 16). Without: the
    installation's key under ``MEDAI_HOME/deid/key`` (32 random bytes, created once,
    mode 0600), so repeated exports of the same study give the same UIDs and dates."""
    if path is not None:
        p = Path(path)
        try:
            key = p.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the de-identification key ({exc.strerror})") from exc
        if len(key) < 16:
            raise ConfigError(f"{p}: a de-identification key needs at least 16 bytes")
        return key
    kp = home.deid_dir() / "key"
    if not kp.exists():
        fd = os.open(kp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(32).encode())
    return kp.read_bytes().strip()


class _Mapper:
    """Keyed, deterministic replacements: UIDs, date offsets, patient pseudonyms."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._uids: dict[str, str] = {}

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        value = value.strip().rstrip("\0")
        if not value or value.startswith("1.2.840.10008."):
            return value  # empty, or a well-known DICOM UID (identifies no one)
        out = self._uids.get(value)
        if out is None:
            out = "2.25." + str(int.from_bytes(self._mac("uid", value)[:16], "big"))
            self._uids[value] = out
        return out

    def day_offset(self, patient_key: str) -> int:
        """Days to add to every date of one patient: 1 to 10 years back, a whole number of
        weeks (keeps the weekday, which scheduling analyses use)."""
        n = int.from_bytes(self._mac("date-shift", patient_key)[:8], "big")
        return -7 * (52 + n % 470)

    def patient_id(self, value: str) -> str:
        return "MEDAI-" + self._mac("patient-id", value.strip()).hex()[:16].upper()


# ---------------------------------------------------------------------------- actions


def _table_action(tag: int) -> str | None:
    action = deid_table.BASIC.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, act in deid_table.MASKED:
        if group & gm == g and element & em == e:
            return act
    return None


@dataclass
class _Context:
    """Per-file state of one pass over a dataset."""

    mapper: _Mapper
    options: frozenset[str]
    day_offset: int
    identifiers: tuple[str, ...]
    #: > 0 while inside a sequence whose action is D (e.g. an SR Content Sequence)
    dummy_depth: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    per_attr: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def note(self, rule: str, tag: int) -> None:
        self.counts[rule] += 1
        name = keyword_for_tag(tag) or ("private" if (tag >> 16) % 2 else f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        self.per_attr[name][rule] += 1


def _resolve(tag: int, vr: str, opts: frozenset[str], in_dummy: bool = False) -> tuple[str, str]:
    """(action, rule name) for one public attribute under the active options;
    ``in_dummy``: the attribute sits inside a sequence the table replaces (D)."""
    basic = _table_action(tag)
    rule = "table"
    if basic is None:
        if in_dummy and vr in _FREE_TEXT_VRS:
            basic, rule = "D", "safety-net-text-in-replaced-sequence"
        elif vr == "PN":
            basic, rule = "Z", "safety-net-person-name"
        elif vr in _DATE_VRS:
            basic, rule = "D", "safety-net-date"
        elif vr == "UN" and not dictionary_has_tag(tag):
            basic, rule = "X", "safety-net-unknown"
        else:
            return "K", "not-in-table"
    action = basic
    known = tag in deid_table.OPTIONS_KNOWN
    for opt in DeidOption:
        if opt not in opts:
            continue
        override = deid_table.OPTIONS.get(opt.value, {}).get(tag)
        if override is None and not known:
            # Attributes newer than the option columns' edition: apply the option by VR.
            if opt is DeidOption.RETAIN_UIDS and basic == "U":
                override = "K"
            elif opt is DeidOption.RETAIN_LONGITUDINAL_FULL_DATES and vr in _TEMPORAL_VRS:
                override = "K"
            elif opt is DeidOption.RETAIN_LONGITUDINAL_DATES and vr in _TEMPORAL_VRS:
                override = "C"
        if override is not None:
            action, rule = override, f"option:{opt.value}"
    return action, rule


#: Combined-action attributes that some IOD makes Type 1, so an empty value would break it:
#: they get a dummy. Device Serial Number is Type 1 in the Enhanced General Equipment module
#: (every enhanced multi-frame object, SEG included).
_TYPE1_SOMEWHERE = frozenset({0x00181000})


def _combine(action: str, tag: int, vr: str) -> str:
    """Resolve a combined action to one of D, Z, X, K, C, U, U* (see the module docstring)."""
    if "/" not in action:
        return action
    temporal = vr in _TEMPORAL_VRS
    if action == "Z/D":
        return "D" if temporal or tag == _PATIENT_ID else "Z"
    if action == "X/Z":
        return "Z"
    if action == "X/D":
        return "D" if temporal else "X"
    if action == "X/Z/D":
        return "D" if temporal or tag in _TYPE1_SOMEWHERE else "Z"
    if action == "X/Z/U*":
        return "U*" if vr == "SQ" else "Z"
    return "X"  # unknown combination: remove (the safe side)


_DUMMY_TEXT = {"CS": "ANONYMIZED", "AE": "ANONYMIZED", "SH": "ANONYMIZED", "LO": "ANONYMIZED",
               "ST": "ANONYMIZED", "LT": "ANONYMIZED", "UT": "ANONYMIZED", "UC": "ANONYMIZED",
               "PN": "ANONYMIZED", "DA": "19000101", "TM": "000000", "DT": "19000101000000",
               "AS": "000Y", "IS": "0", "DS": "0", "UR": ""}
#: Free-text VRs: inside a D sequence (an SR's Content Sequence) their unlisted values
#: (Text Value) are replaced, since only the Clean Structured Content option may keep them.
_FREE_TEXT_VRS = frozenset({"ST", "LT", "UT", "UC"})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})


def _shift_one(text: str, days: int) -> str:
    """Shift one DA value or the date part of one DT value by ``days``, keeping the rest."""
    text = text.strip()
    if not text:
        return text
    if "-" in text[1:] and len(text) >= 9 and text[:8].isdigit() and not text[8:9].isdigit():
        # a DA range "A-B": shift both ends
        return "-".join(_shift_one(p, days) for p in text.split("-"))
    if len(text) >= 8 and text[:8].isdigit():
        try:
            d = date(int(text[:4]), int(text[4:6]), int(text[6:8])) + timedelta(days=days)
        except ValueError:
            return _DUMMY_TEXT["DA"]
        return d.strftime("%Y%m%d") + text[8:]
    if len(text) >= 4 and text[:4].isdigit():  # year or year+month precision
        return f"{int(text[:4]) + round(days / 365.25):04d}" + text[4:]
    return _DUMMY_TEXT["DA"]


def _shift_dates(elem: DataElement, days: int) -> None:
    values = elem.value if elem.VM > 1 else [elem.value]
    shifted = [_shift_one(str(v), days) for v in values if v is not None]
    elem.value = shifted if elem.VM > 1 else (shifted[0] if shifted else "")


_DATE_PATTERNS = (
    re.compile(r"\b\d{4}[-/.]?\d{2}[-/.]?\d{2}\b"),
    re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"),
    re.compile(r"\d{5,}"),  # IDs, accession and phone numbers
    re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+"),  # e-mail addresses
)


def _clean_text(text: str, identifiers: Sequence[str]) -> str:
    """Best-effort cleaning of a descriptor (the C action on free text): remove every
    identifying value found in the same dataset (names, IDs, dates, addresses, institution,
    ...) and anything shaped like a date, long number or e-mail address."""
    out = text
    for ident in identifiers:
        out = re.sub(re.escape(ident), "*", out, flags=re.IGNORECASE)
    for pattern in _DATE_PATTERNS:
        out = pattern.sub("*", out)
    return out


#: Attributes the Clean Descriptors option cleans (free text that may mention identity).
_DESCRIPTORS = frozenset(deid_table.OPTIONS.get("clean-descriptors", {}))


def _collect_identifiers(ds: Dataset) -> tuple[str, ...]:
    """Values of the root dataset that the Basic Profile removes or replaces, as tokens
    for :func:`_clean_text` (names split into components)."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.tag.is_private or elem.tag.group == 0x0002:
                continue
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
                continue
            action = _table_action(int(elem.tag))
            if action is None and elem.VR != "PN":
                continue
            if (action in {"K", "U"} or int(elem.tag) in _DESCRIPTORS
                    or elem.VR in {"UI", "CS", "OB", "OW", "OF", "OD", "OL", "UN"} | _NUMERIC_VRS):
                continue  # descriptors are what gets cleaned, not what to look for
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                text = str(v).strip() if v is not None else ""
                parts = [text] + (re.split(r"[\^= ,]+", text) if elem.VR in {"PN", "LO", "SH"} else [])
                found.update(p for p in parts if len(p) >= 3)

    visit(ds)
    return tuple(sorted(found, key=len, reverse=True))


def _apply(ds: Dataset, ctx: _Context) -> None:
    """Apply the profile to one dataset (recursively). Elements are looked up by tag
    each time because an action may delete siblings."""
    private_kept: set[tuple[int, int]] = set()  # (group, block) whose creator must stay
    for tag in list(ds.keys()):
        elem = ds[tag]
        t = int(tag)
        if tag.group == 0x0002:
            continue  # file meta is rebuilt by _rebuild_meta
        if tag.group == 0x0000 or tag.element == 0x0000:
            del ds[tag]  # command set and group lengths: not allowed in, or obsolete for, files
            ctx.note("X-group-length-or-command", t)
            continue
        if tag.is_private:
            if tag.is_private_creator:
                continue
            creator = _creator_of(ds, tag)
            if (DeidOption.RETAIN_SAFE_PRIVATE in ctx.options and creator is not None
                    and (creator, tag.group, tag.element & 0xFF) in SAFE_PRIVATE):
                private_kept.add((tag.group, tag.element >> 8))
                ctx.note("K-safe-private", t)
            else:
                del ds[tag]
                ctx.note("X-private", t)
            continue
        vr = elem.VR
        action, rule = _resolve(t, vr, ctx.options, ctx.dummy_depth > 0)
        action = _combine(action, t, vr)
        _do(ds, elem, action, ctx)
        ctx.note(action if rule == "table" else f"{action} ({rule})", t)
    for tag in list(ds.keys()):
        if tag.is_private_creator and (tag.group, tag.element) not in private_kept:
            del ds[tag]
            ctx.note("X-private-creator", int(tag))


def _creator_of(ds: Dataset, tag: BaseTag) -> str | None:
    creator_tag = Tag(tag.group, tag.element >> 8)
    if creator_tag in ds:
        return str(ds[creator_tag].value).strip()
    return None


def _do(ds: Dataset, elem: DataElement, action: str, ctx: _Context) -> None:
    vr, tag = elem.VR, elem.tag
    if action == "X":
        del ds[tag]
    elif action == "K" or action == "U*":
        if vr == "SQ":
            for item in elem.value:
                _apply(item, ctx)
    elif action == "Z":
        if vr == "SQ":
            elem.value = DicomSequence()
        else:
            elem.value = None if vr not in _TEXT_VRS | _TEMPORAL_VRS | {"AS", "IS", "DS", "UR"} else ""
    elif action == "U":
        if vr != "UI":
            del ds[tag]
        elif elem.VM > 1:
            elem.value = [ctx.mapper.uid(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = ctx.mapper.uid(str(elem.value))
    elif action == "D":
        _dummy(ds, elem, ctx)
    elif action == "C":
        _clean(ds, elem, ctx)
    else:  # pragma: no cover - _combine only yields the actions above
        del ds[tag]


def _dummy(ds: Dataset, elem: DataElement, ctx: _Context) -> None:
    vr = elem.VR
    if vr == "SQ":
        ctx.dummy_depth += 1
        try:
            for item in elem.value:
                _apply(item, ctx)
        finally:
            ctx.dummy_depth -= 1
    elif vr == "UI":
        _do(ds, elem, "U", ctx)
    elif vr in _DATE_VRS:
        if DeidOption.RETAIN_LONGITUDINAL_DATES in ctx.options and elem.value:
            _shift_dates(elem, ctx.day_offset)
        elif DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in ctx.options:
            pass
        else:
            elem.value = _DUMMY_TEXT[vr]
    elif vr == "TM":
        if not ({DeidOption.RETAIN_LONGITUDINAL_DATES, DeidOption.RETAIN_LONGITUDINAL_FULL_DATES} & ctx.options):
            elem.value = _DUMMY_TEXT["TM"]
    elif int(elem.tag) == _PATIENT_ID:
        elem.value = ctx.mapper.patient_id(str(elem.value or ""))
    elif vr in _DUMMY_TEXT:
        elem.value = _DUMMY_TEXT[vr]
    elif vr in _NUMERIC_VRS:
        elem.value = 0
    else:  # binary or unknown VR: no meaningful dummy, remove
        del ds[elem.tag]


def _clean(ds: Dataset, elem: DataElement, ctx: _Context) -> None:
    vr = elem.VR
    if vr in _DATE_VRS:
        if elem.value:
            _shift_dates(elem, ctx.day_offset)
    elif vr == "TM":
        pass  # dates move by whole days: times of day are unchanged
    elif vr == "SQ":
        for item in elem.value:
            _apply(item, ctx)
    elif vr in {"LO", "SH", "ST", "LT", "UT", "UC"}:
        values = elem.value if elem.VM > 1 else [elem.value]
        cleaned = [_clean_text(str(v or ""), ctx.identifiers) for v in values]
        elem.value = cleaned if elem.VM > 1 else cleaned[0]
    elif vr == "PN":
        elem.value = ""
    elif vr in _DUMMY_TEXT or vr in _NUMERIC_VRS:
        pass  # codes and numbers (e.g. pregnancy status) carry no identity once isolated
    else:
        del ds[elem.tag]


# ---------------------------------------------------------------------------- pixels


def burned_in_risk(ds: Dataset) -> str | None:
    """Why this image may carry burned-in text, or None.

    ``BurnedInAnnotation`` YES is a risk. Secondary captures (screens) and ultrasound
    (typed annotations) are a risk whatever that attribute says: devices often write NO
    over text that a person still has to look at. Any other image with NO is trusted;
    without the attribute, the glyph detector :func:`text_like` decides."""
    if _PIXEL_DATA not in ds:
        return None
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned == "YES":
        return "BurnedInAnnotation is YES"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return "secondary capture image (screen content may include text)"
    if sop_class in ULTRASOUND_CLASSES or str(ds.get("Modality", "")).upper() == "US":
        return "ultrasound image (annotations are usually burned in)"
    if burned == "NO" or sop_class in _NO_TEXT_CLASSES:
        return None
    try:
        frame = _first_frame(ds)
    except Exception as exc:  # noqa: BLE001 - undecodable pixels cannot be checked: quarantine
        return f"pixel data could not be decoded for the text check ({type(exc).__name__})"
    if frame is not None and str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        frame = frame.max() - frame  # so that text, drawn white, is the maximum
    if frame is not None and text_like(frame):
        return "text-like content (a line of glyphs) in the pixels"
    return None


def _ensure_decoders() -> None:
    """Register medai's permissive JPEG decoders with pydicom."""
    from medai.dicom import codecs

    codecs.register()


def _first_frame(ds: Dataset) -> np.ndarray | None:
    _ensure_decoders()
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=0)
    else:
        arr = ds.pixel_array
    if arr.ndim == 3:  # one frame, samples last
        arr = arr.max(axis=-1)
    return arr if arr.ndim == 2 else None


def text_like(frame: np.ndarray) -> bool:
    """The text detector of :func:`burned_in_risk`, on one 2D frame whose brightest value
    displays white (invert MONOCHROME1 first).

    Burned-in text is drawn near the display maximum as glyphs: small bright connected
    shapes (5 px to 6% of the image height tall, at most twice as wide as tall, filling
    at most 70% of their box) with sharp edges (most of their pixels touch a pixel at least
    half the range darker) standing on a common baseline. A frame is text-like when at
    least :data:`TEXT_MIN_GLYPHS` such glyphs of similar height share a baseline (+-1 px).
    Anatomy, noise and saturated backgrounds rarely form such rows; frames with more than
    5000 bright components (noise) are not judged text-like."""
    import SimpleITK as sitk

    f = frame.astype(np.float32, copy=False)
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo or min(f.shape) < 8:
        return False
    span = hi - lo
    bright = f >= hi - 0.1 * span
    dark = f <= hi - 0.5 * span
    near_dark = np.zeros_like(dark)
    near_dark[1:] |= dark[:-1]
    near_dark[:-1] |= dark[1:]
    near_dark[:, 1:] |= dark[:, :-1]
    near_dark[:, :-1] |= dark[:, 1:]
    labels_img = sitk.ConnectedComponent(sitk.GetImageFromArray(bright.astype(np.uint8)), True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels_img)
    if stats.GetNumberOfLabels() > 5000:
        return False
    labels = sitk.GetArrayViewFromImage(labels_img).ravel()
    sharp = np.bincount(labels, weights=(bright & near_dark).ravel(), minlength=stats.GetNumberOfLabels() + 1)
    max_h = max(12, int(f.shape[0] * 0.06))
    glyphs: list[tuple[int, int]] = []  # (baseline row, height)
    for lab in stats.GetLabels():
        x, y, w, h = stats.GetBoundingBox(lab)
        n = stats.GetNumberOfPixels(lab)
        if 5 <= h <= max_h and w <= 2 * h and n <= 0.7 * w * h and sharp[lab] >= 0.6 * n:
            glyphs.append((y + h, h))
    for base, height in glyphs:
        line = sum(1 for b, h in glyphs if abs(b - base) <= 1 and abs(h - height) <= max(2, height // 3))
        if line >= TEXT_MIN_GLYPHS:
            return True
    return False


#: Glyphs on one baseline that make a frame text-like (a short word or a date).
TEXT_MIN_GLYPHS = 4


def _blank(ds: Dataset, rule: PixelRule) -> None:
    """Blank the rule's rectangles in every frame (writing uncompressed pixel data)."""
    _ensure_decoders()
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    arr = ds.pixel_array.copy()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    view = arr if frames > 1 else arr[np.newaxis]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    fill = view.max() if photometric == "MONOCHROME1" else (0 if int(ds.SamplesPerPixel) > 1 else view.min())
    for x, y, w, h in rule.rectangles:
        view[:, y:y + h, x:x + w, ...] = fill
    if int(ds.BitsAllocated) == 1:
        from pydicom.pixels import pack_bits

        ds.PixelData = pack_bits(arr)
    else:
        ds.PixelData = arr.tobytes()
    ds.BurnedInAnnotation = "NO"


# ---------------------------------------------------------------------------- files


def _iter_inputs(paths: Iterable[Path], dst: Path) -> list[Path]:
    from medai.dicom.index import iter_files

    dst_r = dst.resolve()
    for p in paths:
        if p.is_dir() and (dst_r == p.resolve() or dst_r.is_relative_to(p.resolve())):
            raise ConfigError(f"{dst}: the destination must not be inside the source {p}")
    return sorted(set(iter_files(paths)))


def _transfer_syntax_of(ds: Dataset) -> str:
    """The syntax a file without meta was read in (pydicom records it on the dataset)."""
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

    implicit, little = ds.original_encoding
    if little is False:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _patient_key(ds: Dataset) -> str:
    pid = str(ds.get("PatientID", "")).strip()
    if pid:
        return "id:" + pid + "|" + str(ds.get("IssuerOfPatientID", "")).strip()
    name = str(ds.get("PatientName", "")).strip()
    if name:
        return "name:" + name + "|" + str(ds.get("PatientBirthDate", ""))
    return "study:" + str(ds.get("StudyInstanceUID", ""))


def _longitudinal(options: frozenset[str]) -> str:
    if DeidOption.RETAIN_LONGITUDINAL_FULL_DATES in options:
        return "UNMODIFIED"
    if DeidOption.RETAIN_LONGITUDINAL_DATES in options:
        return "MODIFIED"
    return "REMOVED"


def _mark(ds: Dataset, options: frozenset[str], pixel_cleaned: bool) -> None:
    """PS3.15 E.1.1: record that and how the instance was de-identified."""
    ds.PatientIdentityRemoved = "YES"
    names = [f"PS3.15 E.1 Basic Profile (table {deid_table.EDITION})"]
    codes = [CID7050[PROFILE]]
    for opt in sorted((o for o in DeidOption if o in options), key=lambda o: CID7050[o][0]):
        names.append(CID7050[opt][1][:64])
        codes.append(CID7050[opt])
    if pixel_cleaned:
        names.append(CID7050["clean-pixel-data"][1])
        codes.append(CID7050["clean-pixel-data"])
    names.append(f"medai {__version__}")
    ds.DeidentificationMethod = names
    seq = DicomSequence()
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    ds.LongitudinalTemporalInformationModified = _longitudinal(options)


def _rebuild_meta(ds: Dataset, transfer_syntax: str) -> None:
    """A fresh file meta group: nothing from the source survives (Source/Sending AE
    titles and private meta identify sites), Media Storage UIDs follow the dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)


def _new_export_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def _audit(records: dict[tuple[str, str], dict[str, Any]], detail: dict[str, Any]) -> None:
    """One Export audit record per (patient, study), before anything is published."""
    from medai.compliance import audit

    for (pid, study), info in records.items():
        full = {**detail, "instances": len(info["instances"])}
        # The trail refuses a detail that contains the patient's identifiers in clear (a
        # destination folder named after the patient, or a very short Patient ID that
        # occurs in any number): fall back to less detail rather than fail the export.
        tries = (full, {k: v for k, v in full.items() if k != "destination"}, {"deidentified": True})
        for attempt, body in enumerate(tries):
            try:
                audit.record("export", outcome="success", patient_id=pid or None,
                             patient_name=info["patient_name"] or None, study_uid=study or None,
                             instance_uids=tuple(info["instances"]), detail=body)
                break
            except ValueError as exc:
                if attempt == len(tries) - 1:
                    raise AuditWriteError(f"export audit record refused ({exc}); nothing was exported") from exc


def deidentify_study(
    src_paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    options: Iterable[str | DeidOption] = (),
    key: bytes | None = None,
    *,
    pixel_rules: Sequence[PixelRule] = (),
    profile: str = PROFILE,
) -> DeidReport:
    """De-identify every DICOM file under ``src_paths`` into ``dst_dir``.

    Output files are ``<study>/<series>/<instance>.dcm`` named by the remapped UIDs;
    a JSON report ``deid-report-<export id>.json`` lands in ``dst_dir``. Images that may
    carry burned-in text go to ``MEDAI_HOME/quarantine/<export id>/`` (header
    de-identified, pixels untouched) unless a rule in ``pixel_rules`` matches their device.
    Nothing is published in ``dst_dir`` unless the Export audit record was written.
    One bad file never stops the export: it is reported as skipped or failed.
    """
    if profile != PROFILE:
        raise ConfigError(f"unknown de-identification profile {profile!r} (only {PROFILE!r})")
    try:
        opts = frozenset(DeidOption(o) for o in options)
    except ValueError as exc:
        raise ConfigError(f"unknown de-identification option: {exc}; "
                          f"known: {', '.join(o.value for o in DeidOption)}") from None
    if {DeidOption.RETAIN_LONGITUDINAL_DATES, DeidOption.RETAIN_LONGITUDINAL_FULL_DATES} <= opts:
        raise ConfigError("choose one of retain-longitudinal-dates and retain-longitudinal-full-dates")
    if isinstance(src_paths, (str, os.PathLike)):
        src_paths = [src_paths]
    dst = Path(dst_dir)
    inputs = _iter_inputs([Path(p) for p in src_paths], dst)
    export_id = _new_export_id()
    run = _Export(dst=dst, staging=dst / f".medai-staging-{export_id}",
                  quarantine=home.quarantine_dir(export_id),
                  mapper=_Mapper(key if key is not None else load_key()), options=opts,
                  pixel_rules=tuple(pixel_rules))
    run.staging.mkdir(parents=True, mode=0o700)
    try:
        with warnings.catch_warnings():
            # pydicom's warnings quote offending values, which may be identifiers: keep
            # them out of stderr and logs.
            warnings.simplefilter("ignore")
            for index, path in enumerate(inputs):
                run.outcomes.append(run.one(index, path))
        counts = Counter(o.status for o in run.outcomes)
        if run.audit_groups:
            _audit(run.audit_groups, {
                "deidentified": True, "export_id": export_id, "profile": profile,
                "options": sorted(o.value for o in opts), "destination": str(dst.resolve()),
                "exported": counts["exported"], "quarantined": counts["quarantined"],
                "failed": counts["failed"]})
        for staged, final in run.staged:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
    except BaseException:
        shutil.rmtree(run.quarantine, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(run.staging, ignore_errors=True)
    report = DeidReport(
        export_id=export_id, profile=profile, options=tuple(sorted(o.value for o in opts)),
        table_edition=deid_table.EDITION, exported=counts["exported"],
        quarantined=counts["quarantined"], skipped=counts["skipped"], failed=counts["failed"],
        actions=dict(sorted(run.totals.items())),
        attributes={k: dict(sorted(v.items())) for k, v in sorted(run.per_attr.items())},
        files=tuple(run.outcomes), report_path=dst / f"deid-report-{export_id}.json",
        quarantine_dir=run.quarantine if counts["quarantined"] else None,
        longitudinal=_longitudinal(opts),
    )
    text = json.dumps(report.to_json(), indent=2) + "\n"
    report.report_path.write_text(text)
    if report.quarantine_dir is not None:
        (report.quarantine_dir / "quarantine-report.json").write_text(text)
    log.info("export %s: %d exported, %d quarantined, %d skipped, %d failed", export_id,
             report.exported, report.quarantined, report.skipped, report.failed)
    return report


def _read(path: Path) -> Dataset:
    """Read a whole file under medai's input limits (:mod:`medai.dicom.safety`: no
    decompression bombs, absurd lengths or unbounded nesting). Files without preamble/meta
    (older writers) are read with force and must then still look like a composite instance."""
    from medai.dicom.safety import read_dataset_safely

    try:
        return read_dataset_safely(path)[0]
    except InvalidDicomError:
        ds = read_dataset_safely(path, force=True)[0]
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = _transfer_syntax_of(ds)
        return ds


@dataclass
class _Export:
    """State of one export run: where files go, what was done, who to audit."""

    dst: Path
    staging: Path
    quarantine: Path
    mapper: _Mapper
    options: frozenset[str]
    pixel_rules: tuple[PixelRule, ...]
    totals: Counter[str] = field(default_factory=Counter)
    per_attr: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    outcomes: list[FileOutcome] = field(default_factory=list)
    #: (original Patient ID, original Study UID) -> patient name and instance UIDs, for the audit
    audit_groups: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    staged: list[tuple[Path, Path]] = field(default_factory=list)

    def one(self, index: int, path: Path) -> FileOutcome:
        """De-identify one file into staging (or quarantine); never raises."""
        try:
            ds = _read(path)
        except Exception as exc:  # noqa: BLE001 - anything unreadable is skipped and reported
            return FileOutcome(index, "skipped", reason=f"not a readable DICOM file ({type(exc).__name__})")
        sop_class = str(ds.get("SOPClassUID", "")) or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        modality = str(ds.get("Modality", "")) or None
        if sop_class == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            return FileOutcome(index, "skipped", sop_class=sop_class, reason="DICOMDIR (not exported)")
        if "SOPInstanceUID" not in ds or not sop_class:
            return FileOutcome(index, "skipped", sop_class=sop_class or None, modality=modality,
                               reason="no SOP Class/Instance UID (not a composite instance)")
        try:
            return self._deidentify(index, ds, sop_class, modality)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the export
            log.warning("input #%d: de-identification failed (%s)", index, type(exc).__name__)
            return FileOutcome(index, "failed", sop_class=sop_class, modality=modality,
                               reason=f"de-identification failed ({type(exc).__name__})")

    def _deidentify(self, index: int, ds: Dataset, sop_class: str, modality: str | None) -> FileOutcome:
        patient = (str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", "")))
        patient_name, sop_uid = str(ds.get("PatientName", "")), str(ds.SOPInstanceUID)
        risk = burned_in_risk(ds)
        rule = next((r for r in self.pixel_rules if r.matches(ds)), None) if risk else None
        if rule is not None:
            _blank(ds, rule)
        ctx = _Context(mapper=self.mapper, options=self.options,
                       day_offset=self.mapper.day_offset(_patient_key(ds)),
                       identifiers=_collect_identifiers(ds))
        _apply(ds, ctx)
        _mark(ds, self.options, pixel_cleaned=rule is not None)
        transfer_syntax = (ExplicitVRLittleEndian if rule is not None
                           else str(ds.file_meta.get("TransferSyntaxUID") or _transfer_syntax_of(ds)))
        _rebuild_meta(ds, transfer_syntax)
        rel = _output_path(ds)
        self.totals.update(ctx.counts)
        for name, c in ctx.per_attr.items():
            self.per_attr[name].update(c)
        if risk is not None and rule is None:
            _write(ds, self.quarantine / rel)
            return FileOutcome(index, "quarantined", output=rel.as_posix(), sop_class=sop_class,
                               modality=modality, reason=risk)
        staged = self.staging / f"{index:06d}.dcm"
        _write(ds, staged)
        self.staged.append((staged, self.dst / rel))
        group = self.audit_groups.setdefault(patient, {"patient_name": patient_name, "instances": []})
        group["instances"].append(sop_uid)
        return FileOutcome(index, "exported", output=rel.as_posix(), sop_class=sop_class,
                           modality=modality, pixel_rule=rule is not None)


def _output_path(ds: Dataset) -> Path:
    """``<study>/<series>/<instance>.dcm`` from the (remapped) UIDs, which are checked to be
    plain UIDs so a crafted value cannot escape the destination."""
    parts = [str(ds.get("StudyInstanceUID", "") or "study"), str(ds.get("SeriesInstanceUID", "") or "series"),
             str(ds.SOPInstanceUID)]
    for part in parts:
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*|study|series", part) or len(part) > 64:
            raise UnsafeInputError(None, "a UID is not a plain UID; refusing to use it in a file name")
    return Path(parts[0], parts[1], parts[2] + ".dcm")


def iter_dicom_outputs(report: DeidReport, dst_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Paths of the DICOM files one export wrote (for callers such as the UI)."""
    for f in report.files:
        if f.status == "exported" and f.output:
            yield Path(dst_dir) / f.output


__all__ = [
    "CID7050", "DeidOption", "DeidReport", "FileOutcome", "PixelRule", "SAFE_PRIVATE",
    "burned_in_risk", "deidentify_study", "iter_dicom_outputs", "load_key", "text_like",
]
