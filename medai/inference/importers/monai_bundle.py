"""Import a MONAI bundle (``configs/inference.json`` + ``metadata.json`` + weights) as a signed ONNX bundle.

The network is built from the bundle's own ``network_def`` with MONAI's config parser,
its weights loaded from ``models/model.pt`` (state dict) or ``models/model.ts``
(TorchScript), and exported to ONNX. The bundle's pre/post transforms and its inferer
are mapped one by one onto card steps (:mod:`medai.inference.pipelines.monai_bundle`);
a transform without an exact medai equivalent stops the import with its name, so no
bundle runs with a silently different preprocessing. Parity is measured at import
against MONAI's own inference (the bundle's transforms, inferer and network in torch)
on an image the user gives.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from medai.errors import ModelIntegrityError
from medai.inference.importers._common import (check_licence, folder_digest, label_entry, per_label_dice,
                                               seal_and_install, toml_table, toml_value)
from medai.inference.importers.nnunet import MIN_DICE, Parity

#: Transforms that only load, type or add a channel: nothing for the runtime to do.
PASS_THROUGH = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AddChanneld",
                "EnsureTyped", "EnsureType", "ToTensord", "ToTensor", "ToNumpyd", "SaveImaged", "SaveImage",
                "CopyItemsd", "Invertd"}
MAPPED = {"Orientationd", "Orientation", "ScaleIntensityRanged", "ScaleIntensityRange", "NormalizeIntensityd",
          "NormalizeIntensity", "CastToTyped", "Activationsd", "Activations", "AsDiscreted", "AsDiscrete"}


def _short(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _parser(folder: Path) -> Any:
    try:
        from monai.bundle import ConfigParser
    except ImportError:
        raise ModelIntegrityError("importing a MONAI bundle needs torch and monai: pip install 'medai[models]'") from None
    cfg = folder / "configs" / "inference.json"
    meta = folder / "configs" / "metadata.json"
    for p in (cfg, meta):
        if not p.is_file():
            raise ModelIntegrityError(f"{folder}: {p.relative_to(folder)} missing (not a MONAI bundle?)")
    parser = ConfigParser()
    parser.read_meta(str(meta))
    parser.read_config(str(cfg))
    parser["bundle_root"] = str(folder)
    return parser


def _transforms(parser: Any, key: str) -> list[tuple[str, str]]:
    """(config path, class name) of each transform of ``key`` (a Compose)."""
    if key not in parser:
        return []
    node = parser[key]
    if not isinstance(node, dict) or "transforms" not in node:
        raise ModelIntegrityError(f"{key} is not a Compose of transforms; medai maps transforms one by one")
    return [(f"{key}#transforms#{i}", _short(t.get("_target_", "?"))) for i, t in enumerate(node["transforms"])]


def _arg(parser: Any, path: str, name: str, default: Any = None) -> Any:
    full = f"{path}#{name}"
    if full not in parser:
        return default
    value = parser.get_parsed_content(full)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, tuple):
        value = list(value)
    return value


def map_steps(parser: Any, n_out: int) -> list[dict[str, Any]]:
    """The bundle's transforms and inferer as card steps; refuses any transform by name."""
    steps: list[dict[str, Any]] = []
    refused: list[str] = []
    for path, name in _transforms(parser, "preprocessing"):
        if name in PASS_THROUGH:
            continue
        if name in ("Orientationd", "Orientation"):
            axcodes = _arg(parser, path, "axcodes", "RAS")
            if axcodes != "RAS":
                refused.append(f"{name}(axcodes={axcodes!r})")
            steps.append({"op": "reorient", "to": "RAS"})
        elif name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            steps.append({"op": "scale_intensity_range", "a_min": float(_arg(parser, path, "a_min")),
                          "a_max": float(_arg(parser, path, "a_max")),
                          "b_min": _arg(parser, path, "b_min"), "b_max": _arg(parser, path, "b_max"),
                          "clip": bool(_arg(parser, path, "clip", False))})
        elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
            steps.append({"op": "normalize_intensity", "nonzero": bool(_arg(parser, path, "nonzero", False)),
                          "channel_wise": bool(_arg(parser, path, "channel_wise", False)),
                          "subtrahend": _arg(parser, path, "subtrahend"), "divisor": _arg(parser, path, "divisor")})
        elif name == "CastToTyped":
            dtype = str(_arg(parser, path, "dtype", "float32"))
            if "float32" not in dtype:
                refused.append(f"{name}(dtype={dtype})")
        else:
            refused.append(name)
    inferer = _short(parser["inferer"].get("_target_", "?")) if "inferer" in parser else "?"
    if inferer != "SlidingWindowInferer":
        refused.append(f"inferer {inferer}")
    else:
        roi = [int(v) for v in _arg(parser, "inferer", "roi_size")]
        overlap = _arg(parser, "inferer", "overlap", 0.25)
        overlap = [float(o) for o in (overlap if isinstance(overlap, list) else [overlap] * len(roi))]
        mode = str(_arg(parser, "inferer", "mode", "constant"))
        mode = mode.rsplit(".", 1)[-1].lower()
        padding = str(_arg(parser, "inferer", "padding_mode", "constant")).rsplit(".", 1)[-1].lower()
        if padding != "constant":
            refused.append(f"SlidingWindowInferer(padding_mode={padding})")
        steps.append({"op": "sliding_window", "graph": "main", "roi_size": roi, "overlap": overlap, "mode": mode,
                      "sigma_scale": _arg(parser, "inferer", "sigma_scale", 0.125),
                      "sw_batch_size": int(_arg(parser, "inferer", "sw_batch_size", 1)),
                      "cval": float(_arg(parser, "inferer", "cval", 0.0)), "outputs": n_out})
    for path, name in _transforms(parser, "postprocessing"):
        if name in PASS_THROUGH:
            continue
        if name in ("Activationsd", "Activations"):
            steps.append({"op": "activation", "softmax": bool(_arg(parser, path, "softmax", False)),
                          "sigmoid": bool(_arg(parser, path, "sigmoid", False))})
        elif name in ("AsDiscreted", "AsDiscrete"):
            argmax = bool(_arg(parser, path, "argmax", False))
            threshold = _arg(parser, path, "threshold")
            if not argmax and threshold is None:
                refused.append(f"{name}(to_onehot only)")
            steps.append({"op": "as_discrete", "argmax": argmax, "threshold": threshold})
        else:
            refused.append(name)
    if refused:
        raise ModelIntegrityError(
            "MONAI bundle uses transform(s) medai cannot run exactly: " + ", ".join(refused) +
            f". Supported: {', '.join(sorted(MAPPED | PASS_THROUGH))} and SlidingWindowInferer.")
    if not any(s["op"] == "as_discrete" for s in steps):
        raise ModelIntegrityError("MONAI bundle has no AsDiscreted(argmax/threshold) step: medai needs a label map")
    return steps


def load_network(folder: Path, parser: Any) -> Any:
    import torch

    pt, ts = folder / "models" / "model.pt", folder / "models" / "model.ts"
    if pt.is_file():
        net = parser.get_parsed_content("network_def")
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "model" in state and not any(k.endswith("weight") for k in state):
            state = state["model"]
        net.load_state_dict(state)
    elif ts.is_file():
        net = torch.jit.load(str(ts), map_location="cpu")
    else:
        raise ModelIntegrityError(f"{folder}: models/model.pt or models/model.ts missing")
    net.eval()
    return net


def _labels(meta: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
    try:
        pred = meta["network_data_format"]["outputs"]["pred"]
    except KeyError:
        raise ModelIntegrityError("metadata.json has no network_data_format.outputs.pred") from None
    channels = pred.get("channel_def", {})
    n_out = int(pred.get("num_channels", len(channels)))
    labels = [label_entry(int(k), str(v)) for k, v in sorted(channels.items(), key=lambda kv: int(kv[0]))
              if int(k) != 0 and str(v).lower() != "background"]
    if not labels:
        raise ModelIntegrityError("metadata.json outputs.pred.channel_def names no foreground labels")
    return labels, n_out


def reference_predict(parser: Any, net: Any, image_path: Path) -> np.ndarray:
    """MONAI's own inference with the bundle's transforms and inferer: labels ``[i, j, k]``."""
    import torch
    from monai.transforms import Compose

    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post_items = [parser.get_parsed_content(path) for path, name in _transforms(parser, "postprocessing")
                  if name not in ("SaveImaged", "SaveImage")]
    key = "image"
    data = pre({key: str(image_path)})
    with torch.no_grad():
        data["pred"] = inferer(data[key][None], net)[0]
    data = Compose(post_items)(data) if post_items else data
    return np.asarray(data["pred"])[0].astype(np.uint16)


def import_monai_bundle(folder: str | Path, *, model_id: str, license: str, parity_image: str | Path,
                        version: str = "1.0.0", min_dice: float = MIN_DICE, install: bool = True,
                        out_dir: str | Path | None = None) -> tuple[Any, Parity]:
    import onnxruntime as ort
    import SimpleITK as sitk
    import torch

    from medai.inference.backends import session_options, thread_count
    from medai.inference.pipelines.monai_bundle import predict

    licence = check_licence(license)
    folder = Path(folder).resolve()
    parser = _parser(folder)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    labels, n_out = _labels(meta)
    steps = map_steps(parser, n_out)
    net = load_network(folder, parser)
    n_in = int(meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("num_channels", 1))
    roi = next(s["roi_size"] for s in steps if s["op"] == "sliding_window")
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    digest = folder_digest(folder, files)
    image = sitk.ReadImage(str(parity_image))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    monai_version = __import__("monai").__version__
    holder: dict[str, Parity] = {}

    def build(out: Path) -> tuple[str, list[str]]:
        dummy = torch.zeros((1, n_in, *roi), dtype=torch.float32)
        with torch.no_grad():
            torch.onnx.export(net, (dummy,), str(out / "main.onnx"), input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        t0 = time.perf_counter()
        ref = reference_predict(parser, net, Path(parity_image))
        t1 = time.perf_counter()
        sess = ort.InferenceSession(str(out / "main.onnx"), sess_options=session_options(thread_count(None)),
                                    providers=["CPUExecutionProvider"])

        class _Run:
            def run(self, x: np.ndarray) -> np.ndarray:
                return sess.run(["logits"], {"input": x})[0]

        ours_kji = predict(array, image.GetDirection(), steps, lambda key: _Run())
        t2 = time.perf_counter()
        ours = np.transpose(ours_kji, (2, 1, 0))
        if any(s["op"] == "reorient" for s in steps):  # MONAI's output stays in RAS unless inverted
            from medai.inference.steps import reorientation

            ours = reorientation(image.GetDirection(), "RAS").apply(ours_kji)
        if ref.shape != ours.shape:
            raise ModelIntegrityError(f"MONAI output shape {ref.shape} differs from medai's {ours.shape}")
        values = [lab["value"] for lab in labels]
        parity = Parity(per_label_dice(ref, ours, values), 0.0, {v: int((ref == v).sum()) for v in values},
                        t1 - t0, t2 - t1)
        if parity.min_dice < min_dice:
            raise ModelIntegrityError(f"{folder}: the imported bundle disagrees with MONAI's inference on "
                                      f"{parity_image}: per-label Dice {dict(parity.dice)} (minimum {min_dice})")
        holder["p"] = parity
        name = meta.get("name", folder.name)
        parts = [
            "# Made by `medai models import-monai-bundle`; steps mapped one by one from configs/inference.json.",
            f"schema = 1\nid = {toml_value(model_id)}\nversion = {toml_value(version)}\nname = {toml_value(str(name))}",
            'task = "segmentation"\npipeline = "monai_bundle"\naccepts_prompt = false',
            f"summary = {toml_value('MONAI bundle ' + str(name) + ' ' + str(meta.get('version', '')) + ', imported to ONNX')}\n",
            toml_table("selection", {"modality": [str(meta.get("network_data_format", {}).get("inputs", {})
                                                      .get("image", {}).get("modality", "")).upper()]
                                     if meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
                                     .get("modality") else [], "min_slices": 1}),
            toml_table("input", {"baseline_mb": 150, "working_copies": 6}),
            toml_table("input.graphs.main", {"file": "main.onnx", "input": "input", "output": "logits",
                                             "shape": [1, n_in, *roi], "activation_bytes_per_voxel": 400.0}),
            *[toml_table("preprocessing", s, array=True) for s in steps],
            *[toml_table("labels", lab, array=True) for lab in labels],
            toml_table("parity", {"dice_min": 0.99, "max_abs_diff": 0.1}),
            toml_table("license", {"spdx": licence, "attribution": f"MONAI bundle {name}; licence as stated by the "
                                                                  "importing site"}),
            toml_table("intended_use", {"text": str(meta.get("description", "")) + " Imported by this site, which is "
                                        "responsible for its validation. Not for diagnostic use."}),
            toml_table("monai", {"bundle": str(name), "bundle_version": str(meta.get("version", "")),
                                 "monai": monai_version, "folder_sha256": digest}),
            toml_table("monai.parity", {"reference": f"MONAI {monai_version} bundle inference (torch CPU)",
                                        "image": Path(parity_image).name, "min_dice": round(parity.min_dice, 6),
                                        "dice": {str(k): round(v, 6) for k, v in parity.dice.items()}}),
            toml_table("metrics", {"name": "import_parity_min_dice", "value": round(parity.min_dice, 6),
                                   "data": f"{Path(parity_image).name}, shape {list(array.shape)}",
                                   "note": "lowest per-label Dice of this bundle vs MONAI's own inference at import"},
                       array=True),
        ]
        return "\n".join(parts), ["main.onnx"]

    bundle = seal_and_install(build, install=install, out_dir=Path(out_dir) if out_dir else None)
    return bundle, holder["p"]


__all__ = ["import_monai_bundle", "map_steps", "reference_predict"]

