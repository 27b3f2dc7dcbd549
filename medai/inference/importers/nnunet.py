"""Import a trained nnU-Net v2 model folder as a signed bundle that runs without torch.

A results folder (``<Trainer>__<Plans>__<configuration>/`` with ``dataset.json``,
``plans.json`` and ``fold_*/checkpoint_final.pth``; a TotalSegmentator task folder is one)
becomes a bundle with one ONNX graph per fold (and per stage of a cascade) and a card
whose ``[[preprocessing]]`` steps carry every value nnU-Net's predictor would use:
transpose, non-zero crop, normalisation per channel, target spacing and resampling
orders, patch size, tile step, Gaussian weighting, mirroring axes, label handling.
:mod:`medai.inference.pipelines.nnunet` executes them.

The folder is read through nnU-Net's own ``nnUNetPredictor`` (so the network is built
exactly as nnU-Net builds it), and the same predictor is the reference for the parity
figures measured at import on an image the user supplies: per-label Dice of the two
label maps and the largest difference of their class probabilities. An import whose
Dice falls below ``min_dice`` is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medai.errors import ModelIntegrityError
from medai.inference.importers._common import (check_licence, folder_digest, label_entry, per_label_dice,
                                               seal_and_install, toml_table, toml_value)

MIN_DICE = 0.999


def _need_torch() -> Any:
    try:
        import torch  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as exc:
        raise ModelIntegrityError(f"importing an nnU-Net model needs torch and nnunetv2 ({exc.name} is missing): "
                                  "pip install 'medai[models]' nnunetv2") from None
    return torch


@dataclass(frozen=True)
class Stage:
    """One nnU-Net configuration of the model (two for a cascade), as read from its folder."""

    config: str
    folder: Path
    folds: tuple[str, ...]
    predictor: Any


@dataclass(frozen=True)
class Parity:
    """Imported bundle vs ``nnUNetPredictor`` on one image."""

    dice: Mapping[int, float]
    max_prob_diff: float
    voxels: Mapping[int, int]
    seconds_reference: float
    seconds_bundle: float

    @property
    def min_dice(self) -> float:
        return min(self.dice.values()) if self.dice else 1.0


def _config_of(folder: Path) -> str:
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelIntegrityError(f"{folder}: not an nnU-Net results folder (expected <Trainer>__<Plans>__<config>)")
    return parts[2]


def _folds(folder: Path, folds: Sequence[str] | None, checkpoint: str) -> tuple[str, ...]:
    found = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if (p / checkpoint).is_file())
    if not found:
        raise ModelIntegrityError(f"{folder}: no fold_*/{checkpoint}")
    if folds is None:
        return tuple(found)
    missing = [f for f in folds if str(f) not in found]
    if missing:
        raise ModelIntegrityError(f"{folder}: fold(s) {', '.join(map(str, missing))} have no {checkpoint} "
                                  f"(found {', '.join(found)})")
    return tuple(str(f) for f in folds)


def load_stages(folder: str | Path, *, folds: Sequence[str] | None = None, checkpoint: str = "checkpoint_final.pth",
                use_mirroring: bool = True, tile_step_size: float = 0.5) -> list[Stage]:
    """The configuration(s) to import: ``folder``, preceded by its low-resolution stage for a cascade."""
    _need_torch()
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    folder = Path(folder).resolve()
    for name in ("dataset.json", "plans.json"):
        if not (folder / name).is_file():
            raise ModelIntegrityError(f"{folder}: {name} missing; give the folder that holds dataset.json, "
                                      "plans.json and fold_*/")
    config = _config_of(folder)
    plans = json.loads((folder / "plans.json").read_text())
    if config not in plans.get("configurations", {}):
        raise ModelIntegrityError(f"{folder}: plans.json has no configuration {config!r}")
    chain = [(config, folder)]
    previous = plans["configurations"][config].get("previous_stage")
    if previous:
        trainer, plans_name, _ = folder.name.split("__")
        prev_folder = folder.parent / f"{trainer}__{plans_name}__{previous}"
        if not prev_folder.is_dir():
            raise ModelIntegrityError(f"{folder}: the cascade needs its first stage {previous!r} in {prev_folder}")
        chain.insert(0, (previous, prev_folder))
    stages = []
    for cfg, path in chain:
        use = _folds(path, folds, checkpoint)
        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(path), [int(f) if f != "all" else f for f in use],
                                                       checkpoint)
        stages.append(Stage(cfg, path, use, predictor))
    return stages


def graph_key(config: str, fold: str) -> str:
    return f"{config.replace('3d_', 'c3d_')}_fold_{fold}"


def export_onnx(network: Any, n_in: int, patch: Sequence[int], path: Path) -> None:
    """One fold's network to ONNX (batch axis dynamic, so mirrored tiles run as one batch)."""
    import torch

    network.eval()
    dummy = torch.zeros((1, n_in, *patch), dtype=torch.float32)
    with torch.no_grad():
        torch.onnx.export(network, (dummy,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def stage_steps(stage: Stage, *, use_mirroring: bool, tile_step_size: float) -> list[dict[str, Any]]:
    """The card steps for one configuration, values taken from nnU-Net's own managers."""
    p = stage.predictor
    pm, cm, lm = p.plans_manager, p.configuration_manager, p.label_manager
    cfg = stage.config
    props = pm.foreground_intensity_properties_per_channel
    channels = []
    for c, scheme in enumerate(cm.normalization_schemes):
        ch: dict[str, Any] = {"scheme": scheme, "use_mask_for_norm": bool(cm.use_mask_for_norm[c])}
        if scheme == "CTNormalization":
            ip = props[str(c)]
            ch.update({k: float(ip[k]) for k in ("percentile_00_5", "percentile_99_5", "mean", "std")})
        elif scheme not in ("ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization"):
            raise ModelIntegrityError(f"{stage.folder}: normalisation {scheme!r} has no medai equivalent")
        channels.append(ch)
    for fn in ("resampling_fn_data", "resampling_fn_probabilities", "resampling_fn_seg"):
        name = cm.configuration[fn]
        if name not in ("resample_data_or_seg_to_shape",):
            raise ModelIntegrityError(f"{stage.folder}: resampling function {name!r} has no medai equivalent")
    data_kw = cm.configuration["resampling_fn_data_kwargs"]
    prob_kw = cm.configuration["resampling_fn_probabilities_kwargs"]
    seg_kw = cm.configuration["resampling_fn_seg_kwargs"]

    def resampling(kw: Mapping[str, Any]) -> dict[str, Any]:
        out = {"order": int(kw.get("order", 3)), "order_z": int(kw.get("order_z", 0))}
        if kw.get("force_separate_z") is not None:
            out["force_separate_z"] = bool(kw["force_separate_z"])
        return out

    steps: list[dict[str, Any]] = [
        {"op": "transpose", "stage": cfg, "forward": list(pm.transpose_forward),
         "backward": list(pm.transpose_backward)},
        {"op": "crop_nonzero", "stage": cfg},
        {"op": "normalize", "stage": cfg, "channels": channels},
        {"op": "resample", "stage": cfg, "spacing": [float(s) for s in cm.spacing], **resampling(data_kw),
         "seg_order": int(seg_kw.get("order", 1)), "seg_order_z": int(seg_kw.get("order_z", 0))},
    ]
    if cm.previous_stage_name:
        steps.append({"op": "previous_stage", "stage": cfg, "labels": [int(v) for v in lm.foreground_labels]})
    mirror = list(p.allowed_mirroring_axes or []) if use_mirroring else []
    steps += [
        {"op": "sliding_window", "stage": cfg, "patch_size": [int(v) for v in cm.patch_size],
         "tile_step_size": float(tile_step_size), "gaussian": True, "accumulate": "float16",
         "use_mirroring": bool(mirror),
         "mirror_axes": mirror, "outputs": int(lm.num_segmentation_heads),
         "graphs": [graph_key(cfg, f) for f in stage.folds]},
        {"op": "resample_back", "stage": cfg, **resampling(prob_kw)},
        {"op": "to_labels", "stage": cfg,
         "regions_class_order": [int(v) for v in lm.regions_class_order] if lm.has_regions else []},
    ]
    return steps


def labels_of(dataset_json: Mapping[str, Any], label_manager: Any) -> list[dict[str, Any]]:
    names = [n for n, v in dataset_json["labels"].items() if n != "background" and v != 0 and n != "ignore"]
    if label_manager.has_regions:
        values = list(label_manager.regions_class_order)
    else:
        values = [int(dataset_json["labels"][n]) for n in names]
    return [label_entry(v, n) for v, n in zip(values, names)]


def step_lookup(steps: Sequence[Mapping[str, Any]]) -> Callable[..., Mapping[str, Any]]:
    """``params(op, stage)`` over plain step dicts (what ``StepRunner.params`` does over a card)."""
    def params(op: str, stage: str | None = None) -> Mapping[str, Any]:
        for s in steps:
            if s["op"] == op and s.get("stage") == stage:
                return {k: v for k, v in s.items() if k not in ("op", "stage")}
        raise ModelIntegrityError(f"no step {op!r} for stage {stage!r}")
    return params


@dataclass(frozen=True)
class ParityImage:
    """The image parity is measured on: its voxels as SimpleITK reads them and their geometry."""

    path: Path
    array: np.ndarray  # [1, k, j, i] float32, what nnU-Net's SimpleITKIO hands its predictor
    spacing_ijk: tuple[float, float, float]
    direction: tuple[float, ...]  # LPS, columns i, j, k

    @property
    def spacing(self) -> tuple[float, ...]:
        """nnU-Net's order (``[k, j, i]``)."""
        return tuple(reversed(self.spacing_ijk))


def read_image(path: str | Path) -> ParityImage:
    import SimpleITK as sitk

    path = Path(path)
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise ModelIntegrityError(f"{path}: parity image must be 3-D")
    return ParityImage(path, sitk.GetArrayFromImage(image)[None].astype(np.float32),
                       tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
                       tuple(float(d) for d in image.GetDirection()))


def reference_predict_image(stages: Sequence[Stage], image: ParityImage, reorient: str | None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nnU-Net's prediction of ``image``: labels on its own ``[k, j, i]`` grid, and the class
    probabilities and input array in the frame nnU-Net saw.

    With ``reorient="RAS"`` this is TotalSegmentator's path, done with nibabel itself:
    ``as_closest_canonical`` of the file, nnU-Net on the canonical array, the labels put back
    with nibabel's orientation transform (the reference for medai's own ``reorient`` step).
    """
    if not reorient:
        seg, probs = reference_predict(stages, image.array, image.spacing)
        return seg, probs, image.array
    if reorient != "RAS":
        raise ModelIntegrityError(f"reorient to {reorient!r}: only RAS (TotalSegmentator's canonical) is supported")
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    source = nib.load(str(image.path))
    canonical = nib.as_closest_canonical(source)
    array = np.asarray(canonical.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]
    spacing = tuple(float(z) for z in reversed(canonical.header.get_zooms()[:3]))
    seg, probs = reference_predict(stages, array, spacing)
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(source.affine))
    seg_source = apply_orientation(np.asarray(seg).transpose(2, 1, 0), back).transpose(2, 1, 0)
    return np.ascontiguousarray(seg_source), probs, array


def reference_predict(stages: Sequence[Stage], image: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's own prediction (label map and class probabilities) through every stage."""
    previous = None
    seg = probs = None
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        out = stage.predictor.predict_single_npy_array(image, {"spacing": list(spacing)}, previous, None, last)
        if last:
            seg, probs = out
        else:
            previous = np.asarray(out)[None].astype(np.int16)  # as nnU-Net reads a label file: [1, *spatial], signed
    return np.asarray(seg), np.asarray(probs)


def bundle_predict(folder: Path, steps: Sequence[Mapping[str, Any]], stage_names: Sequence[str], graphs: Mapping[str, str],
                   image: ParityImage, *, threads: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The bundle's own runtime path on CPU, before it is sealed (same code the pipeline runs)."""
    import onnxruntime as ort

    from medai.inference.backends import session_options, thread_count
    from medai.inference.pipelines.nnunet import predict_oriented

    sessions: dict[str, Any] = {}

    class _Run:
        def __init__(self, sess: Any) -> None:
            self._s = sess

        def run(self, x: np.ndarray) -> np.ndarray:
            return self._s.run(["logits"], {"input": x})[0]

    def session(key: str) -> Any:
        if key not in sessions:
            opts = session_options(thread_count(threads))
            sessions[key] = _Run(ort.InferenceSession(str(folder / graphs[key]), sess_options=opts,
                                                      providers=["CPUExecutionProvider"]))
        return sessions[key]

    logits: dict[str, np.ndarray] = {}
    reorient = next((s for s in steps if s["op"] == "reorient"), None)
    labels = predict_oriented(image.array[0], image.spacing_ijk, image.direction, step_lookup(steps), session,
                              stage_names, reorient=reorient, logits_out=logits)
    return labels, logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32)
    e = np.exp(logits - logits.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def measure_parity(stages: Sequence[Stage], folder: Path, steps: Sequence[Mapping[str, Any]],
                   graphs: Mapping[str, str], image: ParityImage, values: Sequence[int],
                   reorient: str | None = None) -> Parity:
    t0 = time.perf_counter()
    ref_seg, ref_probs, seen = reference_predict_image(stages, image, reorient)
    t1 = time.perf_counter()
    ours, logits = bundle_predict(folder, steps, [s.config for s in stages], graphs, image)
    t2 = time.perf_counter()
    # Probabilities compared inside the non-zero box (nnU-Net fills outside with background).
    from medai.inference.pipelines.nnunet import nonzero_bbox

    last = stages[-1]
    fwd = list(last.predictor.plans_manager.transpose_forward)
    _, box = nonzero_bbox(seen.transpose([0, *[a + 1 for a in fwd]]))
    ref_box = ref_probs.transpose([0, *[a + 1 for a in fwd]])[(slice(None), *box)]
    lm = last.predictor.label_manager
    ours_p = (1 / (1 + np.exp(-logits[last.config].astype(np.float32)))) if lm.has_regions else _softmax(logits[last.config])
    diff = float(np.max(np.abs(ref_box.astype(np.float64) - ours_p)))
    return Parity(per_label_dice(ref_seg, ours, values), diff, {int(v): int((ref_seg == v).sum()) for v in values},
                  t1 - t0, t2 - t1)


def _modality(dataset_json: Mapping[str, Any]) -> list[str]:
    names = " ".join(str(v) for v in dataset_json.get("channel_names", dataset_json.get("modality", {})).values())
    if "CT" in names.upper():
        return ["CT"]
    if any(k in names.upper() for k in ("MR", "T1", "T2", "FLAIR", "ADC", "DWI")):
        return ["MR"]
    return []


def _refuse_multichannel(folder: Path) -> None:
    """One series is one channel: a model that takes several (e.g. T1 and T2 of one study) is
    refused before anything is built, naming its channels."""
    path = folder / "dataset.json"
    if not path.is_file():
        return  # load_stages says which files the folder must hold
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelIntegrityError(f"{path}: not readable as JSON ({exc})") from None
    channels = meta.get("channel_names", meta.get("modality", {}))
    if len(channels) != 1:
        raise ModelIntegrityError(
            f"{folder}: the model takes {len(channels)} input channels ({', '.join(map(str, channels.values()))}); "
            "medai gives a model one series, so multi-channel nnU-Net models (e.g. several MR contrasts) are "
            "not supported")


def import_nnunet(folder: str | Path, *, model_id: str, license: str, parity_image: str | Path,
                  folds: Sequence[str] | None = None, checkpoint: str = "checkpoint_final.pth",
                  use_mirroring: bool = True, tile_step_size: float = 0.5, reorient: str | None = None,
                  version: str = "1.0.0",
                  name: str | None = None, modality: Sequence[str] | None = None, min_dice: float = MIN_DICE,
                  install: bool = True, out_dir: str | Path | None = None) -> tuple[Any, Parity]:
    """Import ``folder``; returns the installed (or written) bundle and the parity measured.

    ``reorient="RAS"``: the bundle first brings every volume to the closest canonical RAS
    layout and its labels back, as TotalSegmentator does around nnU-Net; parity is then
    measured against nibabel's ``as_closest_canonical`` + ``nnUNetPredictor``.
    """
    licence = check_licence(license)
    if reorient not in (None, "RAS"):
        raise ModelIntegrityError(f"reorient to {reorient!r}: only RAS (TotalSegmentator's canonical) is supported")
    folder = Path(folder).resolve()
    _refuse_multichannel(folder)
    stages = load_stages(folder, folds=folds, checkpoint=checkpoint, use_mirroring=use_mirroring,
                         tile_step_size=tile_step_size)
    import nnunetv2

    nnunet_version = getattr(nnunetv2, "__version__", None)
    if nnunet_version is None:
        from importlib.metadata import version as _v

        nnunet_version = _v("nnunetv2")
    last = stages[-1].predictor
    dataset_json = last.dataset_json
    labels = labels_of(dataset_json, last.label_manager)
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    image = read_image(Path(parity_image))
    digests = {s.config: folder_digest(s.folder, ["dataset.json", "plans.json"] +
                                       [f"fold_{f}/{checkpoint}" for f in s.folds]) for s in stages}
    parity_holder: dict[str, Parity] = {}

    def build(out: Path) -> tuple[str, list[str]]:
        steps: list[dict[str, Any]] = [{"op": "reorient", "to": reorient}] if reorient else []
        graphs: dict[str, str] = {}
        graph_tables = []
        for stage in stages:
            p = stage.predictor
            n_in = n_channels + (len(p.label_manager.foreground_labels) if p.configuration_manager.previous_stage_name
                                 else 0)
            patch = [int(v) for v in p.configuration_manager.patch_size]
            for fold, params in zip(stage.folds, p.list_of_parameters):
                key = graph_key(stage.config, fold)
                p.network.load_state_dict(params)
                export_onnx(p.network, n_in, patch, out / f"{key}.onnx")
                graphs[key] = f"{key}.onnx"
                graph_tables.append(toml_table(f"input.graphs.{key}", {
                    "file": f"{key}.onnx", "input": "input", "output": "logits", "shape": [1, n_in, *patch],
                    "activation_bytes_per_voxel": 400.0}))
            steps += stage_steps(stage, use_mirroring=use_mirroring, tile_step_size=tile_step_size)
        parity = measure_parity(stages, out, steps, graphs, image, [lab["value"] for lab in labels], reorient)
        if parity.min_dice < min_dice:
            raise ModelIntegrityError(
                f"{folder}: the imported model disagrees with nnUNetPredictor on {parity_image}: per-label Dice "
                f"{dict(parity.dice)} (minimum {min_dice}); not imported")
        parity_holder["p"] = parity
        stage_names = [s.config for s in stages]
        title = name or f"{dataset_json.get('name', folder.parent.name)} (nnU-Net {'→'.join(stage_names)})"
        parts = [
            "# Made by `medai models import-nnunet`; every [[preprocessing]] value comes from the source folder.",
            f"schema = 1\nid = {toml_value(model_id)}\nversion = {toml_value(version)}\nname = {toml_value(title)}",
            'task = "segmentation"\npipeline = "nnunet"\naccepts_prompt = false',
            f"summary = {toml_value(f'nnU-Net v2 model {folder.parent.name}, configuration {stage_names[-1]}, folds ' + ','.join(stages[-1].folds) + ', imported to ONNX')}\n",
            toml_table("selection", {"modality": list(modality) if modality is not None else _modality(dataset_json),
                                     "min_slices": 1}),
            toml_table("input", {"modality": ", ".join(str(v) for v in dataset_json.get("channel_names", {}).values()),
                                 "baseline_mb": 150, "working_copies": 6}),
            *graph_tables,
            *[toml_table("preprocessing", s, array=True) for s in steps],
            *[toml_table("labels", lab, array=True) for lab in labels],
            toml_table("parity", {"dice_min": 0.99, "max_abs_diff": 0.1}),
            toml_table("license", {"spdx": licence, "attribution": f"weights from {folder.parent.name}; "
                                                                  "licence as stated by the importing site"}),
            toml_table("intended_use", {"text": "As intended by the model's authors; imported by this site, "
                                                "which is responsible for its validation. Not for diagnostic use.",
                                        "out_of_scope": "Inputs unlike the model's training data."}),
            toml_table("training_data", {"text": f"See the source model ({dataset_json.get('name', '')}); "
                                                 f"{dataset_json.get('numTraining', '?')} training cases."}),
            toml_table("nnunet", {"stages": stage_names, "channels": n_channels}),
            toml_table("nnunet.source", {
                "folder": folder.name, "folder_sha256": digests[stages[-1].config],
                "stage_sha256": [digests[s.config] for s in stages], "nnunetv2": nnunet_version,
                "configuration": stage_names[-1], "trainer": last.trainer_name,
                "plans": last.plans_manager.plans_name, "folds": list(stages[-1].folds), "checkpoint": checkpoint,
                "use_mirroring": use_mirroring, "tile_step_size": tile_step_size,
                "reorient": reorient or "none"}),
            toml_table("nnunet.parity", {
                "reference": f"nnUNetPredictor (nnunetv2 {nnunet_version}, torch CPU)",
                "image": Path(parity_image).name, "image_shape": list(image.array.shape[1:]),
                "min_dice": round(parity.min_dice, 6), "max_prob_diff": float(f"{parity.max_prob_diff:.3g}"),
                "dice": {str(k): round(v, 6) for k, v in parity.dice.items()},
                "reference_voxels": {str(k): v for k, v in parity.voxels.items()}}),
            toml_table("metrics", {
                "name": "import_parity_min_dice", "value": round(parity.min_dice, 6),
                "data": f"{Path(parity_image).name}, shape {list(image.array.shape[1:])}",
                "note": "lowest per-label Dice of this bundle vs nnUNetPredictor at import "
                        f"(max |probability diff| {parity.max_prob_diff:.2g})"}, array=True),
        ]
        return "\n".join(parts), sorted(graphs.values())

    bundle = seal_and_install(build, install=install, out_dir=Path(out_dir) if out_dir else None)
    return bundle, parity_holder["p"]


__all__ = ["MIN_DICE", "Parity", "ParityImage", "Stage", "bundle_predict", "import_nnunet", "load_stages",
           "read_image", "reference_predict", "reference_predict_image"]
