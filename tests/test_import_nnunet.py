"""Imported nnU-Net v2 bundles against nnU-Net's own ``nnUNetPredictor`` on a real CT.

The model is trained by nnU-Net's own planner/trainer (``tests/nnunet_fixture.py``,
cached). Each test imports with ``medai models import-nnunet``'s function, then runs the
sealed bundle through medai's runtime (bundle verification, backends, the ``nnunet``
pipeline) and compares the label map with ``nnUNetPredictor`` computed here, per label.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nnunetv2  # noqa: E402,F401  (the [models] extra plus nnunetv2: scripts/setup --test)

import nnunet_fixture as fx  # noqa: E402

# The fixture is trained once per machine (minutes on a quiet one; its setup counts in the
# first test's time), then cached.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def trained() -> Path:
    return fx.ensure_trained()


@pytest.fixture(scope="module")
def ct_aniso(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT resampled to 2 x 2 x 7.5 mm (anisotropic: nnU-Net resamples z on its own)."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(fx.CT))
    spacing = (2.0, 2.0, 7.5)
    size = [int(round(n * s / t)) for n, s, t in zip(src.GetSize(), src.GetSpacing(), spacing)]
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, src.GetOrigin(), spacing,
                        src.GetDirection(), -1024.0, sitk.sitkInt16)
    path = tmp_path_factory.mktemp("aniso") / "ct_aniso.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


def _volume(path: Path):
    import SimpleITK as sitk

    from medai.dicom.volume import Volume

    return Volume.from_sitk(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32), modality="CT")


def _reference(folder: Path, image: Path, folds: tuple[str, ...] | None, mirroring: bool) -> np.ndarray:
    from medai.inference.importers.nnunet import load_stages, read_image, reference_predict

    stages = load_stages(folder, folds=folds, use_mirroring=mirroring)
    arr, spacing = read_image(image)
    seg, _ = reference_predict(stages, arr, spacing)
    return seg


def _import_and_run(tmp_path: Path, folder: Path, image: Path, folds: tuple[str, ...] | None, mirroring: bool,
                    model_id: str):
    from medai.inference.bundle import load_bundle
    from medai.inference.importers.nnunet import import_nnunet
    from medai.inference.run import run_on_volume

    out = tmp_path / "bundle"
    bundle, parity = import_nnunet(folder, model_id=model_id, license="Apache-2.0", parity_image=image,
                                   folds=folds, use_mirroring=mirroring, install=False, out_dir=out)
    bundle = load_bundle(out, allow_unsigned=False)  # signed by this machine's key, which it trusts
    result = run_on_volume(bundle, _volume(image), tmp_path / "run")
    return bundle, parity, result


def _check(ref: np.ndarray, ours: np.ndarray) -> dict[int, float]:
    """Per-label Dice >= 0.999. A label the briefly trained model does not predict would give a
    meaningless Dice of 1, so the body label must be substantial; the class probabilities of every
    label (degenerate ones included) are compared at import (``Parity.max_prob_diff``)."""
    from medai.inference.importers._common import per_label_dice

    assert ref.shape == ours.shape
    dice = per_label_dice(ref, ours, list(fx.LABELS.values())[1:])
    assert (ref == fx.LABELS["body"]).sum() > 10000, "the reference predicts no body: degenerate fixture"
    assert min(dice.values()) >= 0.999, dice
    return dice


@pytest.mark.parametrize("folds,mirroring", [(("0",), False), (("0", "1"), True)], ids=["1fold-nomirror",
                                                                                         "2folds-mirror"])
def test_3d_fullres_matches_nnunet_predictor(trained: Path, tmp_path: Path, folds, mirroring) -> None:
    """One fold without mirroring, two folds (ensembled) with mirroring: same labels as nnU-Net."""
    folder = fx.results_folder("3d_fullres")
    ref = _reference(folder, fx.CT, folds, mirroring)
    bundle, parity, result = _import_and_run(tmp_path, folder, fx.CT, folds, mirroring, "ct-test-3d")
    dice = _check(ref, result.labels)
    assert parity.min_dice >= 0.999 and parity.max_prob_diff < 0.05
    card = bundle.card.raw
    assert card["nnunet"]["source"]["folds"] == list(folds)
    assert card["nnunet"]["source"]["configuration"] == "3d_fullres"
    assert card["license"]["spdx"] == "Apache-2.0"
    assert card["metrics"][0]["name"] == "import_parity_min_dice" and card["metrics"][0]["value"] >= 0.999
    assert [lab.name for lab in bundle.card.labels] == ["body", "bone", "air_in_body"]
    sw = next(s for s in bundle.card.preprocessing if s.op == "sliding_window")
    assert sw.params["mirror_axes"] == ([0, 1, 2] if mirroring else [])
    assert len(sw.params["graphs"]) == len(folds)
    print("dice", dice)


def test_3d_fullres_anisotropic_input_resamples_like_nnunet(trained: Path, tmp_path: Path, ct_aniso: Path) -> None:
    """2 x 2 x 7.5 mm input: in-plane cubic, z separately (order 0), and back, as nnU-Net does."""
    from medai.inference.pipelines.nnunet import separate_z

    assert separate_z((7.5, 2.0, 2.0), (3.0, 3.0, 3.0), None) == 0
    folder = fx.results_folder("3d_fullres")
    ref = _reference(folder, ct_aniso, ("0",), False)
    _, _, result = _import_and_run(tmp_path, folder, ct_aniso, ("0",), False, "ct-test-aniso")
    _check(ref, result.labels)


def test_2d_matches_nnunet_predictor(trained: Path, tmp_path: Path) -> None:
    folder = fx.results_folder("2d")
    ref = _reference(folder, fx.CT, ("0",), True)
    _, parity, result = _import_and_run(tmp_path, folder, fx.CT, ("0",), True, "ct-test-2d")
    _check(ref, result.labels)
    assert parity.min_dice >= 0.999


def _medai(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medai", *args], capture_output=True, text=True, timeout=600)


def test_imported_model_runs_from_cli_and_triage_and_writes_clean_seg(trained: Path, tmp_path: Path) -> None:
    """`medai models import-nnunet` → `medai run` on a DICOM series → dciodvfy-clean SEG with the
    dataset's label names; `medai models show` carries the parity; `medai triage` and the UI's
    workstation functions run it too.

    The DICOM headers are synthetic (medai.dicom.synth); the pixels are the real CT."""
    import highdicom as hd
    import SimpleITK as sitk

    from medai.dicom.synth import write_series

    ct = sitk.ReadImage(str(fx.CT))
    hu = sitk.GetArrayFromImage(ct).astype(np.int32)
    study = tmp_path / "study"
    write_series(study, n=hu.shape[0], rows=hu.shape[1], cols=hu.shape[2], spacing=(3.0, 3.0, 3.0),
                 intercept=-2048.0, pixels=(hu + 2048).astype(np.uint16), name="ct")
    folder = fx.results_folder("3d_fullres")
    done = _medai("--json", "models", "import-nnunet", str(folder), "--id", "ct-test-cli", "--license", "Apache-2.0",
                  "--parity-image", str(fx.CT), "--fold", "0", "--fold", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)
    assert row["trust"].startswith("signed:") and row["parity"]["min_dice"] >= 0.999

    shown = _medai("models", "show", "ct-test-cli")
    assert shown.returncode == 0, shown.stderr
    assert "import_parity_min_dice" in shown.stdout and "Apache-2.0" in shown.stdout

    out = tmp_path / "out"
    ran = _medai("--json", "run", "--model", "ct-test-cli", str(study), "--out", str(out))
    assert ran.returncode == 0, ran.stderr[-3000:]
    check = subprocess.run(["/usr/bin/dciodvfy", str(out / "seg.dcm")], capture_output=True, text=True, timeout=120)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    seg = hd.seg.segread(out / "seg.dcm")
    names = [seg.get_segment_description(i).segment_label for i in seg.segment_numbers]
    assert names == ["body", "bone", "air_in_body"]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz")))
    ref = _reference(folder, fx.CT, ("0", "1"), True)
    _check(ref, ours)  # the DICOM series holds the same voxels on the same grid as the NIfTI

    tri = _medai("--json", "triage", str(study), "--models", "ct-test-cli", "--out", str(tmp_path / "wl.json"))
    assert tri.returncode == 0, tri.stderr[-3000:]
    worklist = json.loads((tmp_path / "wl.json").read_text())
    assert "ct-test-cli" in json.dumps(worklist)

    # The UI's door (medai.workstation, what the Streamlit pages call): offered for the series,
    # the card's import parity shown, and the run gives the same labels.
    from medai import workstation
    from medai.dicom.volume import load_series

    studies, _ = workstation.catalog([(study, "local")])
    series = studies[0].series[0]
    choice = next(m for m in workstation.models_for(series) if m.model_id == "ct-test-cli")
    assert choice.accepts, choice.reason
    # the import parity is agreement with the original model, not accuracy against reference masks
    agreement = workstation.card_summary(choice.card)["metrics_agreement"]
    assert any("parity" in m["Measure"].lower() and float(m["Value"]) >= 0.999 for m in agreement), agreement
    stored, _reused = workstation.run("ct-test-cli", load_series(list(series.files)), series, studies[0])
    ui_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(stored.folder / stored.outputs["mask"])))
    assert np.array_equal(ui_mask, ours)


def test_cascade_matches_nnunet_predictor(trained: Path, tmp_path: Path) -> None:
    """3d_lowres (folds 0, 1, ensembled) → 3d_cascade_fullres (fold 0), mirroring on: the low
    resolution labels go in as one-hot channels, resampled with nnU-Net's label rules."""
    fx.ensure_cascade()
    folder = fx.results_folder("3d_cascade_fullres")
    ref = _reference(folder, fx.CT, None, True)
    bundle, parity, result = _import_and_run(tmp_path, folder, fx.CT, None, True, "ct-test-cascade")
    _check(ref, result.labels)
    assert bundle.card.raw["nnunet"]["stages"] == ["3d_lowres", "3d_cascade_fullres"]
    assert {s.params.get("stage") for s in bundle.card.preprocessing if s.op == "previous_stage"} == \
        {"3d_cascade_fullres"}
    assert len(bundle.card.graphs) == 3  # two low-resolution folds, one full-resolution fold
    assert parity.max_prob_diff < 0.05
