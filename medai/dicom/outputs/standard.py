"""highdicom's table of DICOM module attributes, read one module at a time; its IOD questions, answered once.

highdicom ships the attributes of every module of the standard (436 modules, about 100,000
rows) as one 22 MB JSON file, and parses all of it the first time a SOP class copies the
patient and study attributes of its source: 0.26 s and about 100 MB held for the rest of the
process, to look up the handful of modules a SEG or an SR needs. :func:`install` hands
highdicom a read-only mapping over the same file instead: the file is mapped, not read; the
offsets of the module keys are found in one pass over it, and a module's rows are parsed
when they are asked for. Same keys, same rows (``tests/test_dicom_outputs_standard.py``
compares every module with ``json.loads`` of the whole file).

The same :func:`install` has highdicom ask ``is_attribute_in_iod`` each question once (it
asks the same one of every source image of a SEG, 0.05 s for a 181-slice series).

The file is indented by highdicom's generator: each module key starts a line with two
spaces, every deeper line has more. :func:`install` leaves highdicom as it is when the file
does not look like that (a later highdicom that writes it differently).
"""

from __future__ import annotations

import json
import mmap
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_KEY = b'\n  "'  # a module key: new line, two spaces, quote
_lock = threading.Lock()
_installed: dict[str, Any] = {}


class ModuleAttributes(Mapping[str, list]):  # type: ignore[type-arg]
    """Module key -> list of attribute rows, parsed per module from the mapped file."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self._data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._data[:5] != b'{\n  "':
            raise ValueError(f"{path}: not laid out as expected")
        spans: dict[str, tuple[int, int]] = {}
        data, at = self._data, self._data.find(_KEY)
        previous: tuple[str, int] | None = None
        while at >= 0:
            colon = data.find(b'": [', at + len(_KEY))
            if colon < 0:
                raise ValueError(f"{path}: a module key without its list at byte {at}")
            if previous is not None:
                spans[previous[0]] = (previous[1], at)
            previous = (data[at + len(_KEY):colon].decode("utf-8"), colon + 3)
            at = data.find(_KEY, colon)
        end = data.rfind(b"\n}")
        if previous is None or end < previous[1]:
            raise ValueError(f"{path}: no module found")
        spans[previous[0]] = (previous[1], end)
        if hasattr(mmap, "MADV_DONTNEED"):  # the pages the scan touched leave this process
            self._data.madvise(mmap.MADV_DONTNEED)
        self._spans = spans
        self._parsed: dict[str, list] = {}  # type: ignore[type-arg]

    def __getitem__(self, key: str) -> list:  # type: ignore[type-arg]
        rows = self._parsed.get(key)
        if rows is None:
            start, end = self._spans[key]
            rows = json.loads(self._data[start:end].rstrip(b", \n"))
            self._parsed[key] = rows
        return rows

    def __contains__(self, key: object) -> bool:
        return key in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


def _remembering(function: Any) -> Any:
    """``is_attribute_in_iod`` answered once per question. highdicom asks it of every source
    image of a SEG (``is_multiframe_image``: is NumberOfFrames in the MR Image IOD?) and walks
    every attribute of every module of the IOD each time: 0.05 s for a 181-slice series, for
    one answer. The answer depends only on the arguments and on the standard's tables, which
    do not change in a process."""
    answers: dict[tuple[Any, ...], bool] = {}

    def is_attribute_in_iod(attribute: str, sop_class_uid: str, exclude_path_elements: Any = None) -> bool:
        key = (attribute, sop_class_uid, None if exclude_path_elements is None else tuple(exclude_path_elements))
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = bool(function(attribute, sop_class_uid, exclude_path_elements))
        return answer

    return is_attribute_in_iod


def install() -> bool:
    """Make every loaded highdicom module read the module table through
    :class:`ModuleAttributes`, and ask ``is_attribute_in_iod`` each question once
    (:func:`_remembering`). Idempotent; returns whether the table is in place (False: the file
    was not as expected, and highdicom reads it its own way)."""
    from highdicom import _standard_utils  # highdicom's __init__ loads the modules holding the function

    with _lock:
        if "is_attribute_in_iod" not in _installed:
            asked = _standard_utils.is_attribute_in_iod
            _installed["is_attribute_in_iod"] = (asked, _remembering(asked))
        _replace("is_attribute_in_iod", *_installed["is_attribute_in_iod"])
        if "original" not in _installed:
            original = _standard_utils.get_module_attribute_map
            try:
                table = ModuleAttributes(
                    Path(_standard_utils.__file__).parent / "_standard" / "module_attribute_map.json")
            except (OSError, ValueError):
                _installed.update(original=original, replacement=None)
            else:
                def get_module_attribute_map() -> ModuleAttributes:
                    return table

                _installed.update(original=original, replacement=get_module_attribute_map)
        original, replacement = _installed["original"], _installed["replacement"]
        if replacement is None:
            return False
        _replace("get_module_attribute_map", original, replacement)
        return True


def _replace(name: str, original: Any, replacement: Any) -> None:
    """Point every loaded highdicom module's global ``name`` that is ``original`` at
    ``replacement`` (highdicom's modules import these functions by name)."""
    for module_name, module in list(sys.modules.items()):
        if (module_name == "highdicom" or module_name.startswith("highdicom.")) and \
                getattr(module, name, None) is original:
            setattr(module, name, replacement)
