"""highdicom's module table, read per module (medai.dicom.outputs.standard)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from medai.dicom.outputs import standard


def _table_file() -> Path:
    from highdicom import _standard_utils

    return Path(_standard_utils.__file__).parent / "_standard" / "module_attribute_map.json"


def test_every_module_reads_as_the_whole_file_parses():
    whole = json.loads(_table_file().read_text())
    table = standard.ModuleAttributes(_table_file())
    assert list(table) == list(whole) and len(table) == len(whole)
    for key, rows in whole.items():
        assert key in table
        assert table[key] == rows, key
    assert "no-such-module" not in table
    with pytest.raises(KeyError):
        table["no-such-module"]


def test_a_file_laid_out_otherwise_is_refused(tmp_path):
    minified = tmp_path / "module_attribute_map.json"
    minified.write_text(json.dumps({"patient": [{"keyword": "PatientName", "type": "2", "path": []}]}))
    with pytest.raises(ValueError, match="not laid out as expected"):
        standard.ModuleAttributes(minified)


def test_install_reaches_every_highdicom_module_that_holds_the_table():
    import highdicom.seg  # noqa: F401
    import highdicom.sr  # noqa: F401
    from highdicom import _standard_utils

    assert standard.install()
    assert standard.install()  # idempotent
    holders = {name: module.get_module_attribute_map for name, module in list(sys.modules.items())
               if name.startswith("highdicom") and hasattr(module, "get_module_attribute_map")}
    assert {"highdicom._standard_utils", "highdicom.base"} <= set(holders)
    assert all(fn is _standard_utils.get_module_attribute_map for fn in holders.values())
    assert isinstance(_standard_utils.get_module_attribute_map(), standard.ModuleAttributes)
    tree = _standard_utils.construct_module_tree("patient")  # highdicom's own use of the table
    assert tree["attributes"]["PatientName"]["type"].value == "2"



def test_install_makes_highdicom_ask_each_iod_question_once():
    import highdicom.seg  # noqa: F401

    assert standard.install()
    asked, remembered = standard._installed["is_attribute_in_iod"]
    assert remembered is not asked
    holders = {name: module.is_attribute_in_iod for name, module in list(sys.modules.items())
               if name.startswith("highdicom") and hasattr(module, "is_attribute_in_iod")}
    assert {"highdicom._standard_utils", "highdicom.base"} <= set(holders)
    assert all(fn is remembered for fn in holders.values())
    mr, seg = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.66.4"
    questions = [("NumberOfFrames", mr, None), ("NumberOfFrames", seg, None), ("ContentDate", seg, None),
                 ("PixelData", mr, ["IconImageSequence"]), ("NoSuchKeyword", mr, None)]
    for question in questions * 2:  # the second time from what was remembered
        assert remembered(*question) == asked(*question), question
    assert remembered("NumberOfFrames", seg) and not remembered("NumberOfFrames", mr)
    with pytest.raises(KeyError):  # an unknown SOP class is an error every time, not remembered
        remembered("NumberOfFrames", "1.2.3.4")
    with pytest.raises(KeyError):
        remembered("NumberOfFrames", "1.2.3.4")
