"""Imported nnU-Net v2 bundles against nnU-Net's own ``nnUNetPredictor`` on a real CT.

The models are real nnU-Net v2 models trained by nnU-Net's own planner and trainer on CPU,
committed under ``tests/data/nnunet/`` (``tests/nnunet_fixture.py`` has the recipe, and
``test_fixture_recipe_still_trains`` re-runs it briefly; every label is a large tissue
class, so every per-label Dice is meaningful). Each test imports with ``medai models
import-nnunet``'s function (which measures its own parity, on a 20 x 64 x 64 crop of the CT
to keep imports cheap), runs the sealed bundle through medai's runtime (bundle
verification, backends, the ``nnunet`` pipeline) and compares its label map with
``nnUNetPredictor`` computed here, per label: on the whole CT where the model runs without
mirroring, on the crop where mirroring multiplies nnU-Net's (torch, CPU) cost by 4 or 8.
References are computed once per session and shared between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import nnunetv2  # noqa: F401  (the [models] extra plus nnunetv2: scripts/setup --test)

import nnunet_fixture as fx

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VALUES = [1, 2, 3]  # fat, soft_tissue, bone (labels); body, dense_tissue, bone (regions)
#: Smallest labelled volume nnU-Net must predict for every label (whole CT or crop): a label
#: the model does not predict would give a meaningless Dice of 1.
MIN_VOXELS = 500


@pytest.fixture(scope="module", autouse=True)
def _torch_on_one_thread():
    """nnUNetPredictor (torch, CPU) on one thread. These models are tiny: on two threads of a
    shared, oversubscribed machine each forward pass waited ~2 s on OpenMP barriers for the
    other thread, 80 times what it takes on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(image, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real CT, and the same voxels in other forms:

    * ``crop``: slices 5..24, rows 20..83, columns 30..93 (fat, soft tissue and spine);
    * ``aniso``: resampled to 2 x 2 x 7.5 mm (nnU-Net resamples the z axis on its own);
    * ``relaid``: stored sagittally, flipped, with a 10-degree oblique header (closest
      canonical RAS gives back the CT's own layout: TotalSegmentator's reorientation).
    """
    import SimpleITK as sitk

    folder = tmp_path_factory.mktemp("nnunet-images")
    ct = sitk.ReadImage(str(fx.CT))
    out = {"ct": fx.CT, "crop": _write(ct[30:94, 20:84, 5:25], folder / "crop.nii.gz")}
    spacing = (2.0, 2.0, 7.5)
    size = [int(round(n * s / t)) for n, s, t in zip(ct.GetSize(), ct.GetSpacing(), spacing)]
    out["aniso"] = _write(sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, ct.GetOrigin(), spacing,
                                        ct.GetDirection(), -1024.0, sitk.sitkInt16), folder / "aniso.nii.gz")
    out["relaid"] = _write(relaid(ct), folder / "relaid.nii.gz")
    return out


def relaid(ct):
    """The CT's voxels stored as [row, slice, column] with the rows reversed, and the
    header tilted by 10 degrees about the first axis (no resampling)."""
    import SimpleITK as sitk

    img = sitk.Flip(sitk.PermuteAxes(ct, [1, 2, 0]), [True, False, False])
    a = np.deg2rad(10.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    img.SetDirection(tuple((tilt @ np.array(img.GetDirection()).reshape(3, 3)).ravel()))
    return img


def relaid_array(kji: np.ndarray) -> np.ndarray:
    """What :func:`relaid` does to a ``[k, j, i]`` array of the CT's grid."""
    ijk = kji.transpose(2, 1, 0)
    new = ijk.transpose(1, 2, 0)[::-1]  # new (i, j, k) = old (j reversed, k, i)
    return np.ascontiguousarray(new.transpose(2, 1, 0))


@pytest.fixture(scope="session")
def reference() -> Callable[..., np.ndarray]:
    """``reference(config, image, folds, mirroring, dataset)``: nnUNetPredictor's labels, memoised."""
    from medai.inference.importers.nnunet import load_stages, read_image, reference_predict

    cache: dict[tuple, np.ndarray] = {}

    def get(config: str, image: Path, folds: tuple[str, ...] | None, mirroring: bool,
            dataset: str = fx.LABELLED) -> np.ndarray:
        key = (config, str(image), folds, mirroring, dataset)
        if key not in cache:
            stages = load_stages(fx.results_folder(config, dataset), folds=folds, use_mirroring=mirroring)
            img = read_image(image)
            cache[key] = reference_predict(stages, img.array, img.spacing)[0]
        return cache[key]

    return get


def _volume(path: Path):
    import SimpleITK as sitk

    from medai.dicom.volume import Volume

    return Volume.from_sitk(sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32), modality="CT")


def _import(out: Path, config: str, parity_image: Path, folds: tuple[str, ...] | None, mirroring: bool,
            model_id: str, dataset: str = fx.LABELLED, **kw):
    from medai.inference.bundle import load_bundle
    from medai.inference.importers.nnunet import import_nnunet

    _, parity = import_nnunet(fx.results_folder(config, dataset), model_id=model_id, license="Apache-2.0",
                              parity_image=parity_image, folds=folds, use_mirroring=mirroring, install=False,
                              out_dir=out, **kw)
    assert parity.min_dice >= 0.999 and parity.max_prob_diff < 0.05, parity
    return load_bundle(out, allow_unsigned=False), parity  # signed by this machine's key, which it trusts


def _run(bundle, image: Path, out: Path) -> np.ndarray:
    from medai.inference.run import run_on_volume

    return run_on_volume(bundle, _volume(image), out).labels


def _check(ref: np.ndarray, ours: np.ndarray) -> dict[int, float]:
    """Per-label Dice >= 0.999, every label substantial in the reference."""
    from medai.inference.importers._common import per_label_dice

    assert ref.shape == ours.shape
    counts = {v: int((ref == v).sum()) for v in VALUES}
    assert min(counts.values()) >= MIN_VOXELS, f"nnU-Net predicts too little of some label: {counts}"
    dice = per_label_dice(ref, ours, VALUES)
    assert min(dice.values()) >= 0.999, (dice, counts)
    print(f"per-label Dice {dice}, nnUNetPredictor voxels {counts}")  # shown with pytest -rP
    return dice


@pytest.fixture(scope="module")
def one_fold(tmp_path_factory: pytest.TempPathFactory, images: dict[str, Path]):
    """3d_fullres, fold 0, no mirroring, imported once for the tests that run it."""
    return _import(tmp_path_factory.mktemp("b3d") / "bundle", "3d_fullres", images["crop"], ("0",), False,
                   "ct-test-3d")


def test_3d_fullres_one_fold_without_mirroring(one_fold, images, reference, tmp_path: Path) -> None:
    bundle, parity = one_fold
    _check(reference("3d_fullres", fx.CT, ("0",), False), _run(bundle, fx.CT, tmp_path))
    card = bundle.card.raw
    assert card["nnunet"]["source"]["folds"] == ["0"]
    assert card["nnunet"]["source"]["configuration"] == "3d_fullres"
    assert card["nnunet"]["source"]["reorient"] == "none"
    assert card["license"]["spdx"] == "Apache-2.0"
    assert card["metrics"][0]["name"] == "import_parity_min_dice" and card["metrics"][0]["value"] >= 0.999
    assert card["nnunet"]["parity"]["min_dice"] == round(parity.min_dice, 6)
    assert [lab.name for lab in bundle.card.labels] == ["fat", "soft_tissue", "bone"]
    sw = next(s for s in bundle.card.preprocessing if s.op == "sliding_window")
    assert sw.params["mirror_axes"] == [] and len(sw.params["graphs"]) == 1


def test_3d_fullres_anisotropic_input_resamples_like_nnunet(one_fold, images, reference, tmp_path: Path) -> None:
    """2 x 2 x 7.5 mm input: in-plane cubic, z separately (order 0), and back, as nnU-Net does."""
    from medai.inference.pipelines.nnunet import separate_z

    assert separate_z((7.5, 2.0, 2.0), (3.0, 3.0, 3.0), None) == 0
    _check(reference("3d_fullres", images["aniso"], ("0",), False), _run(one_fold[0], images["aniso"], tmp_path))


def test_reorientation_to_ras_like_totalsegmentator(images, reference, tmp_path: Path) -> None:
    """``reorient="RAS"``: a CT stored sagittally, flipped and with an oblique header gives the
    labels nnUNetPredictor gives on the CT's canonical layout, put back on the stored grid
    (the import itself measured parity against nibabel's ``as_closest_canonical`` followed by
    nnUNetPredictor; ``test_nnunet_ops`` checks the step against nibabel array for array)."""
    from medai.inference.run import run_on_volume

    bundle, _ = _import(tmp_path / "bundle", "3d_fullres", images["relaid"], ("0",), False, "ct-test-ras",
                        reorient="RAS")
    assert bundle.card.raw["nnunet"]["source"]["reorient"] == "RAS"
    assert bundle.card.preprocessing[0].op == "reorient"
    expected = relaid_array(reference("3d_fullres", fx.CT, ("0",), False))
    result = run_on_volume(bundle, _volume(images["relaid"]), tmp_path / "run")
    _check(expected, result.labels)
    applied = json.loads(result.result_path.read_text())["preprocessing"]
    step = next(s for s in applied if s["op"] == "reorient")
    assert (step["perm"], step["flip"]) == ([2, 0, 1], [False, True, False])  # not a no-op


def test_2d_matches_nnunet_predictor(images, reference, tmp_path: Path) -> None:
    bundle, _ = _import(tmp_path / "bundle", "2d", images["crop"], ("0",), True, "ct-test-2d")
    assert next(s for s in bundle.card.preprocessing if s.op == "sliding_window").params["mirror_axes"] == [0, 1]
    _check(reference("2d", images["crop"], ("0",), True), _run(bundle, images["crop"], tmp_path / "run"))


def test_region_based_model_matches_nnunet_predictor(images, reference, tmp_path: Path) -> None:
    """Regions (body ⊃ dense tissue ⊃ bone), sigmoid per region, painted in regions_class_order."""
    bundle, _ = _import(tmp_path / "bundle", "3d_fullres", images["crop"], ("0",), False, "ct-test-regions",
                        dataset=fx.REGIONS)
    to_labels = next(s for s in bundle.card.preprocessing if s.op == "to_labels")
    assert to_labels.params["regions_class_order"] == fx.REGIONS_CLASS_ORDER
    assert [lab.name for lab in bundle.card.labels] == ["body", "dense_tissue", "bone"]
    _check(reference("3d_fullres", fx.CT, ("0",), False, fx.REGIONS), _run(bundle, fx.CT, tmp_path / "run"))


def test_cascade_matches_nnunet_predictor(images, reference, tmp_path: Path) -> None:
    """3d_lowres (folds 0, 1, ensembled) → 3d_cascade_fullres (fold 0), mirroring on: the low
    resolution labels go in as one-hot channels, resampled with nnU-Net's label rules."""
    bundle, _ = _import(tmp_path / "bundle", "3d_cascade_fullres", images["crop"], None, True, "ct-test-cascade")
    assert bundle.card.raw["nnunet"]["stages"] == ["3d_lowres", "3d_cascade_fullres"]
    assert {s.params.get("stage") for s in bundle.card.preprocessing if s.op == "previous_stage"} == \
        {"3d_cascade_fullres"}
    assert len(bundle.card.graphs) == 3  # two low-resolution folds, one full-resolution fold
    _check(reference("3d_cascade_fullres", images["crop"], None, True), _run(bundle, images["crop"], tmp_path / "run"))


def test_multichannel_model_is_refused_by_name(tmp_path: Path) -> None:
    """A model with two input channels (e.g. T1 and T2) is refused at import, naming them."""
    import shutil

    from medai.errors import ModelIntegrityError
    from medai.inference.importers.nnunet import import_nnunet

    folder = tmp_path / fx.results_folder("2d").name
    shutil.copytree(fx.results_folder("2d"), folder)
    meta = json.loads((folder / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (folder / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError, match="2 input channels.*T1, T2.*not supported"):
        import_nnunet(folder, model_id="two-channels", license="Apache-2.0", parity_image=fx.CT, install=False,
                      out_dir=tmp_path / "bundle")


def _medai(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torch in the importer: see _torch_on_one_thread
    return subprocess.run([sys.executable, "-m", "medai", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def test_imported_model_runs_from_cli_and_triage_and_writes_clean_seg(images, reference, tmp_path: Path) -> None:
    """`medai models import-nnunet` (folds 0 and 1 ensembled, mirroring on) → `medai run` on a
    DICOM series → dciodvfy-clean SEG with the dataset's label names, same labels as
    nnUNetPredictor; `medai models show` carries the parity; `medai triage` and the UI's
    workstation functions run it too.

    The DICOM headers are synthetic (medai.dicom.synth); the pixels are the real CT's crop."""
    import highdicom as hd
    import SimpleITK as sitk

    from medai.dicom.synth import write_series
    from medai.inference.registry import get_bundle

    ct = sitk.ReadImage(str(images["crop"]))
    hu = sitk.GetArrayFromImage(ct).astype(np.int32)
    study = tmp_path / "study"
    write_series(study, n=hu.shape[0], rows=hu.shape[1], cols=hu.shape[2], spacing=(3.0, 3.0, 3.0),
                 intercept=-2048.0, pixels=(hu + 2048).astype(np.uint16), name="ct")
    done = _medai("--json", "models", "import-nnunet", str(fx.results_folder("3d_fullres")), "--id", "ct-test-cli",
                  "--license", "Apache-2.0", "--parity-image", str(images["crop"]), "--fold", "0", "--fold", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)
    assert row["trust"].startswith("signed:") and row["parity"]["min_dice"] >= 0.999
    card = get_bundle("ct-test-cli").card
    sw = next(s for s in card.preprocessing if s.op == "sliding_window")
    assert sw.params["mirror_axes"] == [0, 1, 2] and len(sw.params["graphs"]) == 2
    assert card.raw["nnunet"]["source"]["folds"] == ["0", "1"]

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
    assert names == ["fat", "soft_tissue", "bone"]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "mask.nii.gz")))
    # the DICOM series holds the same voxels on the same grid as the NIfTI
    _check(reference("3d_fullres", images["crop"], ("0", "1"), True), ours)

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


def test_fixture_recipe_still_trains(tmp_path: Path) -> None:
    """The committed models stay reproducible: the recipe still plans exactly the committed
    plans (nnU-Net's planner, fingerprint and our edits) and trains with nnU-Net's trainer
    (here the 2d configuration, one epoch of one iteration; the full recipe trains all of
    them: ``python tests/nnunet_fixture.py build WORK``)."""
    import torch

    work = fx.build(tmp_path / "work", datasets=(fx.LABELLED,), configs=("2d",), epochs=1, iterations=1)
    built = fx.results_folder("2d", base=work / "nnUNet_results")
    committed = fx.results_folder("2d")
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert json.loads((built / name).read_text()) == json.loads((committed / name).read_text()), name

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == fx.TRAINER
        return {k: tuple(v.shape) for k, v in ckpt["network_weights"].items()}

    assert shapes(built) == shapes(committed)
