"""Which series of a study a model should run on, by the card's ``[selection]`` rules.

Rules (all given ones must hold; matching is case-insensitive):

* ``modality``: the series modality is one of these;
* ``body_part``: when the series states a body part, it is one of these (many
  scanners leave it empty, so an empty body part never excludes);
* ``description_any``: some substring occurs in the series description (or, when
  the description is empty, in the protocol name);
* ``description_none``: no substring occurs there;
* ``min_slices``: the series has at least this many image instances/frames.

Series entries come from :func:`medai.dicom.index.scan`; only their header facts
are read here. Results are ordered best first: more slices first, then UID, so the
choice is deterministic.
"""

from __future__ import annotations

from typing import Any, Iterable

from medai.inference.card import ModelCard


def _text(entry: Any, *names: str) -> str:
    for name in names:
        value = getattr(entry, name, None)
        if value is None and isinstance(entry, dict):
            value = entry.get(name)
        if value:
            return str(value)
    return ""


def _count(entry: Any) -> int:
    for name in ("frame_count", "n_frames", "num_frames", "frames", "n_instances"):
        value = getattr(entry, name, None)
        if isinstance(value, int) and value > 0:
            return value
    files = getattr(entry, "files", None)
    return len(files) if files is not None else 0


def series_matches(card: ModelCard, entry: Any) -> tuple[bool, str]:
    """Whether one series entry matches; the reason names the first rule that failed."""
    rules = card.selection
    if getattr(entry, "is_image", True) is False:
        return False, "not an image series"
    modality = _text(entry, "modality").upper()
    if rules.modality and modality not in rules.modality:
        return False, f"modality {modality or '(none)'} not in {', '.join(rules.modality)}"
    body = _text(entry, "body_part", "body_part_examined").upper()
    if rules.body_part and body and body not in rules.body_part:
        return False, f"body part {body} not in {', '.join(rules.body_part)}"
    desc = (_text(entry, "description", "series_description") or _text(entry, "protocol_name")).lower()
    if rules.description_any and not any(s in desc for s in rules.description_any):
        return False, "series description does not name an accepted sequence"
    bad = [s for s in rules.description_none if s in desc]
    if bad:
        return False, f"series description names an excluded sequence ({bad[0]})"
    n = _count(entry)
    if n < rules.min_slices:
        return False, f"{n} slices, fewer than {rules.min_slices}"
    return True, "matches"


def _series_entries(index: Any) -> Iterable[Any]:
    series = getattr(index, "series", index)
    return series.values() if isinstance(series, dict) else series


def matching_series(card: ModelCard, index: Any) -> list[Any]:
    """Series entries of ``index`` (a DicomIndex, a dict of entries, or a list) the card accepts."""
    hits = [e for e in _series_entries(index) if series_matches(card, e)[0]]
    return sorted(hits, key=lambda e: (-_count(e), _text(e, "series_uid", "series_instance_uid")))
