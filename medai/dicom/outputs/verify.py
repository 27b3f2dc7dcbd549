"""A clinician's acceptance of a result, written into its SR (PS3.3 C.17.2, SR Document General).

A verified SR is a new instance, not an edit: it gets its own SOP Instance UID, says
``VerificationFlag = VERIFIED`` with one Verifying Observer (name, organisation, time;
identification code sequence empty, type 2), is ``COMPLETE``, and points back to the
unverified SR it replaces in the Predecessor Documents Sequence. Everything else
(content tree, evidence, references to the SEG and the source images) is unchanged.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path


def _person_name(name: str) -> str:
    """A PN value from a free-text or ``Family^Given`` name (at most 64 characters a group)."""
    text = name.strip() or "unknown"
    if "^" not in text and " " in text:
        given, _, family = text.rpartition(" ")
        text = f"{family}^{given}"
    return text[:64]


def verified_sr(source: Path, target: Path, *, observer: str, organization: str,
                when: _dt.datetime | None = None) -> Path:
    """Write ``source`` (an unverified SR) as a verified SR to ``target`` (atomically)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    now = (when or _dt.datetime.now(_dt.timezone.utc)).astimezone()
    previous = Dataset()
    previous.ReferencedSOPClassUID = ds.SOPClassUID
    previous.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = ds.SeriesInstanceUID
    series.ReferencedSOPSequence = Sequence([previous])
    study = Dataset()
    study.StudyInstanceUID = ds.StudyInstanceUID
    study.ReferencedSeriesSequence = Sequence([series])
    ds.PredecessorDocumentsSequence = Sequence([study])

    observer_item = Dataset()
    observer_item.VerifyingObserverName = _person_name(observer)
    observer_item.VerifyingObserverIdentificationCodeSequence = Sequence([])
    observer_item.VerifyingOrganization = organization[:64]
    observer_item.VerificationDateTime = now.strftime("%Y%m%d%H%M%S%z")
    ds.VerifyingObserverSequence = Sequence([observer_item])
    ds.VerificationFlag = "VERIFIED"
    ds.CompletionFlag = "COMPLETE"

    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    tmp = target.with_name(target.name + ".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target


__all__ = ["verified_sr"]
