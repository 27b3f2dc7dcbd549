"""`medai run --model medsam-lite` end to end: a real CT as a DICOM series to SEG + mask + result.json.

The CT is the real abdominal CT of the body-organ-analysis wheel (fetched by
scripts/fetch-test-data); its pixels are written as a DICOM CT series with
medai.dicom.synth (headers synthetic and marked so). The reference is the wheel's
model-made body mask. One prompted slice only (one encoder run per call) keeps this
to seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import testdata as fetched
from medai.dicom.synth import write_series
from medai.dicom.volume import Volume
from medai.errors import PromptError

pytestmark = pytest.mark.slow

K = 15  # axial slice with the prompt (the volume has 30)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, str]:
    image = sitk.ReadImage(str(fetched("boa-ct", "example_ct_sm.nii.gz")), sitk.sitkFloat32)
    vol = Volume.from_sitk(image, modality="CT")
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(fetched("boa-ct", "example_ct_sm_T300_output.nii.gz")))) > 0
    d = vol.geometry.matrix
    stored = np.clip(np.rint(vol.array + 1024.0), 0, 4095).astype(np.uint16)
    out = tmp_path_factory.mktemp("ct-series")
    write_series(out, n=vol.shape[0], rows=vol.shape[1], cols=vol.shape[2], spacing=vol.geometry.spacing,
                 origin=vol.geometry.origin, row_dir=tuple(d[:, 0]), col_dir=tuple(d[:, 1]), modality="CT",
                 intercept=-1024.0, pixels=stored, name="boa-ct")
    rows = np.flatnonzero(ref[K].any(axis=1))
    cols = np.flatnonzero(ref[K].any(axis=0))
    box = f"{max(cols[0] - 3, 0)},{max(rows[0] - 3, 0)},{min(cols[-1] + 3, vol.shape[2] - 1)}," \
          f"{min(rows[-1] + 3, vol.shape[1] - 1)}"
    return out, ref, box


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def test_run_model_with_a_box_writes_seg_mask_and_prompt(ct_series: tuple[Path, np.ndarray, str],
                                                          tmp_path: Path) -> None:
    from medai.inference.run import run_model

    series, ref, box = ct_series
    result = run_model("medsam-lite", series, tmp_path, device="cpu",
                       prompt={"plane": "axial", "slice": K, "box": box, "window": "lung"})
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(result.mask_path))) > 0
    assert mask.shape == ref.shape
    assert mask[K].any() and not np.delete(mask, K, axis=0).any()  # one slice, no propagation
    assert _dice(mask[K], ref[K]) >= 0.85
    record = json.loads(result.result_path.read_text())
    assert record["prompt"]["box"] == [int(v) for v in box.split(",")] and record["prompt"]["slice"] == K
    steps = {s["op"]: s for s in record["preprocessing"]}
    assert steps["ct_window"]["name"] == "lung" and steps["ct_window"]["low"] == -1350.0
    assert steps["resize"]["mode"] == "squash" and "orient_slice" in steps
    assert record["qc"]["user_prompted"] is True and record["qc"]["seed_predicted_iou"] > 0.5
    assert result.volumes_ml["User-prompted structure"] == pytest.approx(mask.sum() * 27.0 / 1000.0, rel=1e-3)
    assert result.seg_path is not None and result.seg_path.is_file()
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(result.seg_path)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_prompt_errors_are_typed(ct_series: tuple[Path, np.ndarray, str], tmp_path: Path) -> None:
    from medai.inference.run import run_model

    series, _, box = ct_series
    with pytest.raises(PromptError, match="out of range"):
        run_model("medsam-lite", series, tmp_path, prompt={"plane": "axial", "slice": 30, "box": box})
    with pytest.raises(PromptError, match="outside the slice"):
        run_model("medsam-lite", series, tmp_path, prompt={"plane": "axial", "slice": K, "box": "0,0,400,50"})
    with pytest.raises(PromptError, match="needs a prompt"):
        run_model("medsam-lite", series, tmp_path, prompt={"plane": "axial", "slice": K})


def test_cli_box_prompt_and_clear_error(ct_series: tuple[Path, np.ndarray, str], tmp_path: Path) -> None:
    series, _, box = ct_series
    ok = subprocess.run([sys.executable, "-m", "medai", "run", "--model", "medsam-lite", str(series),
                         "--plane", "axial", "--slice", str(K), "--box", box, "--window", "lung",
                         "--out", str(tmp_path / "ok")],
                        capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "ok" / "seg.dcm").is_file() and (tmp_path / "ok" / "result.json").is_file()
    import json

    result = json.loads((tmp_path / "ok" / "result.json").read_text())
    assert result["prompt"]["window"] == "lung"
    assert "lung" in json.dumps(result["preprocessing"])  # the window actually used is recorded
    bad = subprocess.run([sys.executable, "-m", "medai", "run", "--model", "medsam-lite", str(series),
                          "--plane", "axial", "--slice", "99", "--box", box, "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2
    assert "slice 99 is out of range" in bad.stderr
