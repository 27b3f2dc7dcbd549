"""Diagnostic assist: the numerical parts behind brain volumetry.

Small, pure modules (numpy and SimpleITK only, no ONNX, no DICOM I/O) so each can be
tested on its own and read in one sitting:

* :mod:`medai.assist.tissue` — CSF/GM/WM classification inside a brain mask;
* :mod:`medai.assist.qc` — image-quality checks that block or qualify a report;
* :mod:`medai.assist.normative` — published age/sex reference ranges, z-scores;
* :mod:`medai.assist.priors` — MNI152 tissue priors registered to a subject (not used by the card yet);
* :mod:`medai.assist.plausibility` — physiological gates: an impossible result is not measurable;
* :mod:`medai.assist.caveats` — caveats by series grid (template space), for every model that measures;
* :mod:`medai.assist.report` — the one-page summary a clinician reads.
"""

from typing import Any, Mapping


def reject_unknown(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Refuse a card table with keys that are not fields of the dataclass ``cls`` it fills
    (a misspelt parameter must not be silently ignored); ``what`` names the table."""
    unknown = set(data) - set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
