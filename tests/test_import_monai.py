"""A MONAI bundle built here from MONAI's own classes, imported and compared with MONAI's inference.

The network is ``monai.networks.nets.UNet``, trained for a few dozen steps on the real
CT of ``tests/nnunet_fixture.py`` (its tissue classes: fat, soft tissue, bone) so that it
predicts every label; the bundle's ``configs/inference.json`` uses MONAI's own transforms and
``SlidingWindowInferer`` (Gaussian blending, padding along the short axis).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import nnunet_fixture as fx

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

INFERENCE = {
    "image_key": "image",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                    "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -1000, "a_max": 1000,
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"}]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [64, 64, 32], "sw_batch_size": 4,
                "overlap": 0.25, "mode": "gaussian"},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
}
METADATA = {
    "version": "0.1.0", "name": "medai test CT UNet", "description": "Test bundle (fat, soft tissue, bone).",
    "network_data_format": {
        "inputs": {"image": {"modality": "CT", "num_channels": 1}},
        "outputs": {"pred": {"num_channels": 4, "channel_def": {"0": "background", "1": "fat", "2": "soft_tissue",
                                                                 "3": "bone"}}}},
}


@pytest.fixture(scope="module", autouse=True)
def _torch_on_one_thread():
    """MONAI (torch, CPU) on one thread: on a shared, oversubscribed machine two OpenMP threads
    wait on each other's barriers far longer than the small network computes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train_unet(steps: int = 30):
    """MONAI's UNet, a few Adam steps on random crops of the real CT (deterministic seed)."""
    import SimpleITK as sitk
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(fx.CT))).astype(np.float32).transpose(2, 1, 0)  # [i, j, k]
    body = sitk.GetArrayFromImage(sitk.ReadImage(str(fx.BODY))).transpose(2, 1, 0) > 0
    lab = fx.tissue_labels(hu, body).astype(np.int64)
    x = np.clip((hu + 1000) / 2000, 0, 1)
    net = UNet(**{k: v for k, v in INFERENCE["network_def"].items() if k != "_target_"})
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    weights = torch.tensor([0.2, 1.0, 1.0, 3.0])
    for _ in range(steps):
        i0, j0 = rng.integers(0, hu.shape[0] - 64), rng.integers(0, hu.shape[1] - 64)
        xb = torch.from_numpy(x[None, None, i0:i0 + 64, j0:j0 + 64, :28].copy())
        yb = torch.from_numpy(lab[None, i0:i0 + 64, j0:j0 + 64, :28].copy())
        xb = torch.nn.functional.pad(xb, (2, 2))
        yb = torch.nn.functional.pad(yb, (2, 2))
        loss = torch.nn.functional.cross_entropy(net(xb), yb, weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("monai") / "ct_unet"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=2))
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    torch.save(_train_unet().state_dict(), folder / "models" / "model.pt")
    return folder


def test_monai_bundle_matches_monai_inference(bundle_dir: Path, tmp_path: Path) -> None:
    import SimpleITK as sitk

    from medai.dicom.volume import Volume
    from medai.inference.bundle import load_bundle
    from medai.inference.importers._common import per_label_dice
    from medai.inference.importers.monai_bundle import _parser, import_monai_bundle, load_network, reference_predict
    from medai.inference.run import run_on_volume

    parser = _parser(bundle_dir)
    ref = reference_predict(parser, load_network(bundle_dir, parser), fx.CT).transpose(2, 1, 0)  # -> [k, j, i]
    out = tmp_path / "bundle"
    _, parity = import_monai_bundle(bundle_dir, model_id="ct-unet-monai", license="Apache-2.0",
                                    parity_image=fx.CT, install=False, out_dir=out)
    bundle = load_bundle(out)
    volume = Volume.from_sitk(sitk.Cast(sitk.ReadImage(str(fx.CT)), sitk.sitkFloat32), modality="CT")
    result = run_on_volume(bundle, volume, tmp_path / "run")
    dice = per_label_dice(ref, result.labels, [1, 2, 3])
    for value in (1, 2, 3):
        assert (ref == value).sum() > 50, f"label {value}: MONAI predicts almost nothing (degenerate)"
    assert min(dice.values()) >= 0.999, dice
    assert parity.min_dice >= 0.999
    assert [lab.name for lab in bundle.card.labels] == ["fat", "soft_tissue", "bone"]
    assert bundle.card.raw["metrics"][0]["value"] >= 0.999


def test_unsupported_transform_is_refused_by_name(tmp_path: Path) -> None:
    from medai.errors import ModelIntegrityError
    from medai.inference.importers.monai_bundle import _parser, map_steps

    cfg = json.loads(json.dumps(INFERENCE))
    cfg["preprocessing"]["transforms"].insert(2, {"_target_": "Spacingd", "keys": "@image_key",
                                                  "pixdim": [1.5, 1.5, 2.0]})
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(json.dumps(cfg))
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(METADATA))
    with pytest.raises(ModelIntegrityError, match="Spacingd"):
        map_steps(_parser(tmp_path), 4)
