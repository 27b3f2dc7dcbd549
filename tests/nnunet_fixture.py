"""A real nnU-Net v2 model, trained by nnU-Net's own planner, preprocessor and trainer on CPU.

Used by the import tests and ``bench/nnunet_import.py``. The data is the real CT that
``scripts/fetch-test-data`` extracts from the ``body-organ-analysis`` wheel (Apache-2.0):
``example_ct_sm.nii.gz`` (30 x 101 x 122 voxels, 3 mm) with its model-made body mask.
That mask has one label, so the recipe adds two more that exist in the same CT and that a
network can learn from it: bone (HU >= 200 inside the body) and air inside the body
(HU <= -400: lungs, bowel gas). The labels are made from the data, not drawn by a person;
the point of the fixture is parity between two executions of one trained network, not
clinical accuracy, but the network must predict every label (non-trivial masks).

nnU-Net needs several cases for its folds: the dataset is the CT and three variants
(left-right mirrored, upper and lower 20 slices). The plans are nnU-Net's own
(``ExperimentPlanner``) with the network's feature widths divided by 8 and a smaller
patch (16 x 64 x 64; 64 x 64 for 2d; nnU-Net documents editing plans), so that training
takes minutes on two shared cores and inference runs many overlapping tiles. Training is
nnU-Net's ``nnUNetTrainer`` with fewer epochs/iterations set on the instance (its class
name, and so the results folder name, stay the standard ones).

The results folder is cached under ``$XDG_CACHE_HOME/medai-tests/nnunet-fixture/<recipe
digest>/`` (default ``~/.cache``), outside the clone, so later runs and fresh clones on the
same machine reuse it; a new machine trains it once. Change ``RECIPE`` and the digest changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / ".cache" / "testdata" / "boa-ct" / "example_ct_sm.nii.gz"
BODY = ROOT / ".cache" / "testdata" / "boa-ct" / "example_ct_sm_T300_output.nii.gz"
DATASET_ID = 901
DATASET = f"Dataset{DATASET_ID}_MedaiCT"
LABELS = {"background": 0, "body": 1, "bone": 2, "air_in_body": 3}
RECIPE = {
    "version": 3,
    "nnunetv2": "2.8.1",
    "labels": LABELS,
    "cases": ["full", "mirror_lr", "upper20", "lower20"],
    "feature_divisor": 8,
    "patch_size": {"3d_fullres": [16, 64, 64], "2d": [64, 64]},
    "configs": {"3d_fullres": {"folds": [0, 1], "epochs": 3, "iters": 10},
                "2d": {"folds": [0], "epochs": 3, "iters": 10}},
    "seed": 1234,
}
PLANS = "nnUNetPlansTiny"
TRAINER = "nnUNetTrainer"


def recipe_digest() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medai-tests" / "nnunet-fixture" / recipe_digest()


def results_folder(config: str) -> Path:
    return cache_dir() / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{config}"


def ensure_trained(timeout: float = 3600.0) -> Path:
    """Build (once) and return the cache folder holding nnUNet_raw/_preprocessed/_results.

    An interrupted build resumes: each finished step (dataset, plans, preprocessing, each
    fold's final checkpoint) is kept in ``<digest>.tmp`` and skipped the next time.
    """
    root = cache_dir()
    if (root / "done").is_file():
        return root
    if not CT.is_file():
        raise FileNotFoundError(f"{CT} missing: run scripts/fetch-test-data")
    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, nnUNet_raw=str(tmp / "nnUNet_raw"), nnUNet_preprocessed=str(tmp / "nnUNet_preprocessed"),
               nnUNet_results=str(tmp / "nnUNet_results"), nnUNet_n_proc_DA="0", nnUNet_compile="false",
               OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, __file__, "build", str(tmp)], env=env, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net fixture build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    (tmp / "build.log").write_text(proc.stdout[-20000:])
    (tmp / "done").write_text(json.dumps(RECIPE, sort_keys=True))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


#: A cascade on the same dataset: nnU-Net's own 3d_lowres (6 mm) -> 3d_cascade_fullres pair,
#: added to the plans the way nnU-Net's planner writes them ("inherits_from", "next_stage",
#: "previous_stage"); the low-resolution folds' validation predictions feed the cascade's
#: training exactly as in nnU-Net.
CASCADE = {
    "version": 1,
    "lowres_spacing": [6.0, 6.0, 6.0],
    "lowres_patch": [16, 32, 32],
    "configs": {"3d_lowres": {"folds": [0, 1], "epochs": 3, "iters": 10},
                "3d_cascade_fullres": {"folds": [0], "epochs": 3, "iters": 10}},
}


def ensure_cascade(timeout: float = 3600.0) -> Path:
    """The base fixture plus a trained cascade (built once, resumable, cached in the same folder)."""
    root = ensure_trained()
    marker = root / "cascade_done"
    if marker.is_file() and json.loads(marker.read_text()) == CASCADE:
        return root
    env = dict(os.environ, nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"), nnUNet_n_proc_DA="0", nnUNet_compile="false",
               nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, __file__, "cascade", str(root)], env=env, timeout=timeout,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net cascade fixture build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    marker.write_text(json.dumps(CASCADE))
    return root


def _build_cascade(root: Path) -> None:
    import torch

    pre = root / "nnUNet_preprocessed" / DATASET
    plans_path = pre / f"{PLANS}.json"
    plans = json.loads(plans_path.read_text())
    if "3d_cascade_fullres" not in plans["configurations"]:
        full = plans["configurations"]["3d_fullres"]
        scale = [a / b for a, b in zip(full["spacing"], CASCADE["lowres_spacing"])]
        plans["configurations"]["3d_lowres"] = {
            "inherits_from": "3d_fullres", "data_identifier": f"{PLANS}_3d_lowres",
            "spacing": CASCADE["lowres_spacing"], "patch_size": CASCADE["lowres_patch"],
            "median_image_size_in_voxels": [round(m * f) for m, f in zip(full["median_image_size_in_voxels"], scale)],
            "next_stage": "3d_cascade_fullres"}
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres",
                                                          "previous_stage": "3d_lowres"}
        plans_path.write_text(json.dumps(plans, indent=2))
    if not (pre / f"{PLANS}_3d_lowres").is_dir() or not any((pre / f"{PLANS}_3d_lowres").iterdir()):
        subprocess.run([sys.executable, "-c", "import sys; from nnunetv2.experiment_planning."
                        "plan_and_preprocess_entrypoints import preprocess_entry as f; sys.argv[0]='f'; f()",
                        "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", "3d_lowres", "-np", "1"],
                       check=True, env=dict(os.environ, nnUNet_n_proc_DA="1"))
    from nnunetv2.run.run_training import get_trainer_from_args

    for cfg, spec in CASCADE["configs"].items():
        for fold in spec["folds"]:
            out = root / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{cfg}" / f"fold_{fold}"
            trainer = get_trainer_from_args(str(DATASET_ID), cfg, fold, TRAINER, PLANS, device=torch.device("cpu"))
            if not (out / "checkpoint_final.pth").is_file():
                torch.manual_seed(RECIPE["seed"] + fold)
                trainer.num_epochs = spec["epochs"]
                trainer.num_iterations_per_epoch = spec["iters"]
                trainer.num_val_iterations_per_epoch = 2
                trainer.run_training()
            if cfg == "3d_lowres" and not (out / "validation" / "summary.json").is_file():
                if not trainer.was_initialized:
                    trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
                trainer.perform_actual_validation(False)  # writes predicted_next_stage/ for the cascade


# --------------------------------------------------------------------------- build (subprocess)

def _write_dataset(raw: Path) -> None:
    import numpy as np
    import SimpleITK as sitk

    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    ct = sitk.ReadImage(str(CT))
    hu = sitk.GetArrayFromImage(ct).astype(np.int16)
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(BODY))) > 0
    lab = np.zeros(hu.shape, np.uint8)
    lab[body] = LABELS["body"]
    lab[body & (hu >= 200)] = LABELS["bone"]
    lab[body & (hu <= -400)] = LABELS["air_in_body"]
    variants = {"full": (hu, lab), "mirror_lr": (hu[:, :, ::-1], lab[:, :, ::-1]),
                "upper20": (hu[-20:], lab[-20:]), "lower20": (hu[:20], lab[:20])}
    for i, name in enumerate(RECIPE["cases"]):
        img_a, lab_a = variants[name]
        for arr, path in ((img_a, folder / "imagesTr" / f"ct_{i:03d}_0000.nii.gz"),
                          (lab_a, folder / "labelsTr" / f"ct_{i:03d}.nii.gz")):
            im = sitk.GetImageFromArray(np.ascontiguousarray(arr))
            im.SetSpacing(ct.GetSpacing())
            im.SetDirection(ct.GetDirection())
            im.SetOrigin(ct.GetOrigin())
            sitk.WriteImage(im, str(path), useCompression=True)
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(RECIPE["cases"]),
        "file_ending": ".nii.gz", "name": "medai test CT (body-organ-analysis example, Apache-2.0)"}, indent=2))


def _build(tmp: Path) -> None:
    import torch

    torch.manual_seed(RECIPE["seed"])
    raw = tmp / "nnUNet_raw"
    if not (raw / DATASET / "dataset.json").is_file():
        shutil.rmtree(raw, ignore_errors=True)
        _write_dataset(raw)
    nn = [sys.executable, "-c", "import sys; from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                                "import {f}; sys.argv[0]='{f}'; {f}()"]

    def call(func: str, *args: str) -> None:
        cmd = [nn[0], nn[1], nn[2].format(f=func), *args]
        # nnU-Net's planner sets torch threads from nnUNet_n_proc_DA, which must then be >= 1.
        subprocess.run(cmd, check=True, env=dict(os.environ, nnUNet_n_proc_DA="1"))

    pre = tmp / "nnUNet_preprocessed" / DATASET
    if (pre / "splits_final.json").is_file():
        _train(pre)
        return
    call("extract_fingerprint_entry", "-d", str(DATASET_ID), "-np", "1")
    call("plan_experiment_entry", "-d", str(DATASET_ID))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    for cfg in plans["configurations"].values():
        arch = cfg.get("architecture", {}).get("arch_kwargs")
        if arch and "features_per_stage" in arch:
            arch["features_per_stage"] = [max(4, f // RECIPE["feature_divisor"]) for f in arch["features_per_stage"]]
        if "batch_size" in cfg:
            cfg["batch_size"] = 2
    for name, patch in RECIPE["patch_size"].items():
        plans["configurations"][name]["patch_size"] = patch
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
    configs = list(RECIPE["configs"])
    call("preprocess_entry", "-d", str(DATASET_ID), "-plans_name", PLANS, "-c", *configs,
         "-np", *["1"] * len(configs))
    # Two folds over four cases: a fixed split, so every fold validates on held-out cases.
    (pre / "splits_final.json").write_text(json.dumps([
        {"train": ["ct_000", "ct_002"], "val": ["ct_001", "ct_003"]},
        {"train": ["ct_001", "ct_003"], "val": ["ct_000", "ct_002"]}]))

    _train(pre)


def _train(pre: Path) -> None:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for cfg, spec in RECIPE["configs"].items():
        for fold in spec["folds"]:
            if (pre.parents[1] / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{cfg}" / f"fold_{fold}"
                    / "checkpoint_final.pth").is_file():
                continue
            torch.manual_seed(RECIPE["seed"] + fold)
            trainer = get_trainer_from_args(str(DATASET_ID), cfg, fold, TRAINER, PLANS, device=torch.device("cpu"))
            trainer.num_epochs = spec["epochs"]
            trainer.num_iterations_per_epoch = spec["iters"]
            trainer.num_val_iterations_per_epoch = 2
            trainer.run_training()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        _build(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "cascade":
        _build_cascade(Path(sys.argv[2]))
    elif len(sys.argv) == 2 and sys.argv[1] == "cascade":
        print(ensure_cascade())
    else:
        print(ensure_trained())
