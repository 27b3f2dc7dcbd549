"""An imported nnU-Net v2 model (``medai run``) against nnU-Net's own predictor, whole process, CPU.

Both sides predict the same real CT file with the same trained model (the nnU-Net test
fixture committed in ``tests/data/nnunet/``, recipe in ``tests/nnunet_fixture.py``:
3d_fullres, folds 0 and 1, mirroring on, tile step 0.5; labels fat, soft tissue, bone)
and write a label map:

* reference: ``nnUNetv2_predict_from_modelfolder -i IN -o OUT -m MODEL -f 0 1 -device cpu
  -npp 1 -nps 1`` (nnU-Net's CLI, torch CPU; its worker processes count);
* medai: ``medai run --model <imported id> CT.nii.gz --out OUT`` (ONNX Runtime, no torch;
  it also writes result.json and the mask).

Runs alternate (reference, medai, reference, ...), each a cold child process. Wall time is
taken around the child; peak memory is the largest sum of RSS over the child's whole
process tree, sampled every 10 ms (psutil), because nnU-Net works in several processes.
Both sides get the same thread count (``--threads``; OMP/MKL/ORT threads and
``nnUNet_def_n_proc``). The machine may be shared: ratios from alternating pairs are the
figure to read, not absolute seconds. Prints medians, ratios (targets: time <= 0.5x, peak
memory <= 0.6x), where medai's time goes (result.json timings) and the Dice between the
two label maps.

Usage::

    .venv/bin/python bench/nnunet_import.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import nnunet_fixture as fx  # noqa: E402


def _tree_rss(proc: "psutil.Process") -> int:  # noqa: F821
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak process-tree RSS (bytes) of one child run."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss(proc))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import SimpleITK as sitk

    folder = fx.results_folder("3d_fullres")
    work = Path(tempfile.mkdtemp(prefix="bench-nnunet-"))
    try:
        home = work / "home"
        n = str(args.threads)
        env = dict(os.environ, MEDAI_HOME=str(home), OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, nnUNet_def_n_proc=n,
                   MEDAI_THREADS=n, nnUNet_compile="false")
        bin_dir = Path(sys.executable).parent
        t0 = time.perf_counter()
        imp = subprocess.run([sys.executable, "-m", "medai", "--json", "models", "import-nnunet", str(folder),
                              "--id", "bench-nnunet", "--license", "Apache-2.0", "--parity-image", str(fx.CT),
                              "--fold", "0", "--fold", "1"], env=env, capture_output=True, text=True)
        if imp.returncode != 0:
            raise SystemExit(imp.stderr[-3000:])
        print(f"import (export 2 folds to ONNX, parity on the CT): {time.perf_counter() - t0:.1f} s; "
              f"parity {json.loads(imp.stdout)['parity']}")
        inp = work / "in"
        inp.mkdir()
        shutil.copy(fx.CT, inp / "ct_0000.nii.gz")
        ref_cmd = [str(bin_dir / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(work / "ref"),
                   "-m", str(folder), "-f", "0", "1", "-device", "cpu", "-npp", "1", "-nps", "1",
                   "--disable_progress_bar"]
        # --force: a fresh run every round (medai otherwise reuses a stored result of the same input)
        ours_cmd = [sys.executable, "-m", "medai", "--json", "run", "--model", "bench-nnunet", str(fx.CT),
                    "--out", str(work / "ours"), "--threads", n, "--force"]
        rows: dict[str, list[tuple[float, int]]] = {"nnUNetPredictor": [], "medai": []}
        for r in range(args.rounds):
            for name, cmd in (("nnUNetPredictor", ref_cmd), ("medai", ours_cmd)):
                out_dir = work / ("ref" if name == "nnUNetPredictor" else "ours")
                shutil.rmtree(out_dir, ignore_errors=True)
                wall, peak = measure(cmd, env)
                rows[name].append((wall, peak))
                print(f"round {r + 1} {name:<16} {wall:7.2f} s  peak {peak / 2**20:7.0f} MiB", flush=True)
        med = {k: (statistics.median(w for w, _ in v), statistics.median(p for _, p in v)) for k, v in rows.items()}
        ratios_t = [o[0] / rf[0] for o, rf in zip(rows["medai"], rows["nnUNetPredictor"])]
        ratios_m = [o[1] / rf[1] for o, rf in zip(rows["medai"], rows["nnUNetPredictor"])]
        print(f"\nmedian wall: nnUNetPredictor {med['nnUNetPredictor'][0]:.2f} s, medai {med['medai'][0]:.2f} s; "
              f"per-pair ratio medai/reference {', '.join(f'{x:.2f}' for x in ratios_t)} "
              f"(median {statistics.median(ratios_t):.2f}x, target <= 0.5x)")
        print(f"median peak: nnUNetPredictor {med['nnUNetPredictor'][1] / 2**20:.0f} MiB, medai "
              f"{med['medai'][1] / 2**20:.0f} MiB; per-pair ratio {', '.join(f'{x:.2f}' for x in ratios_m)} "
              f"(median {statistics.median(ratios_m):.2f}x, target <= 0.6x)")
        result = json.loads((work / "ours" / "result.json").read_text())
        print(f"medai time by phase (last run, s): {result['timings_s']}")
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ref" / "ct.nii.gz")))
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ours" / "mask.nii.gz")))
        dice = {v: (2 * float(((ref == v) & (ours == v)).sum()) / float((ref == v).sum() + (ours == v).sum())
                    if (ref == v).any() or (ours == v).any() else "empty in both") for v in (1, 2, 3)}
        print(f"Dice medai vs nnUNetPredictor per label: {dice}; labelled voxels in reference: "
              f"{ {v: int((ref == v).sum()) for v in (1, 2, 3)} }")

    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
