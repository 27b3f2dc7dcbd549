"""Whole-process brain extraction, DICOM folder -> SEG/SR/NIfTI/JSON on disk: `medai run` vs deepbet (torch).

What a user waits for is a whole process, so that is what is timed: each path is a cold
child process (interpreter start, imports, DICOM read, model, outputs, audit), on the
same DICOM series, with the same thread count, and the paths alternate within each
repeat (order rotated every repeat) so that load on the machine hits all of them alike.
Wall time is measured around the child; CPU time (user + sys) and peak RSS are the
child's own (``os.wait4`` rusage).

* ``medai tuned``: ``medai run --model brain-extraction SRC --out OUT`` with this
  machine's tuned provider and precision (``medai doctor --tune`` is run first, untimed,
  on the bench's own MEDAI_HOME; its table is printed);
* ``medai cpu fp32``: the same command with ``--device cpu --precision fp32`` (ONNX
  Runtime's CPU provider);
* ``reference``: in the build venv (``.venv-models``: torch 2.13 CPU, deepbet 1.0.2 with
  ``--no-deps`` plus cc3d/fill_voids/pandas/tqdm/nibabel, and highdicom/platformdirs/
  cryptography for the SEG): SimpleITK's GDCM series reader, ``deepbet.BrainExtraction``
  on the NIfTI image, and medai's SEG writer, plus a mask file.

For the medai paths the split comes from the run's own ``result.json`` timings (load,
preprocess, model, postprocess, SEG, SR, NIfTI, audit); "start+imports+index" is the rest
of the process's wall time (interpreter start, imports, the header index that picks the
series, the results store, and the process's exit).

Usage::

    .venv/bin/python bench/inference.py [--source DICOM_DIR] [--threads 2] [--repeat 3]

Targets (issue 17): tuned <= 0.4x the reference, cpu fp32 <= 0.6x, peak RSS <= 0.6x.
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

REPO = Path(__file__).resolve().parents[1]
MODELS_PY = REPO / ".venv-models" / "bin" / "python"

CLI = "import sys; from medai.cli import entry; entry(sys.argv[1:])"  # what the `medai` console script runs
#: result.json timing keys -> split label (several keys may add up into one label).
SPLIT = (("load", ("load",)), ("preprocess", ("preprocess",)),
         ("model", ("session_bbox", "session_main", "infer_bbox", "infer_main")),
         ("postprocess", ("postprocess",)), ("SEG", ("write_seg",)), ("SR", ("write_sr",)),
         ("NIfTI", ("write_nifti",)), ("audit", ("audit",)))

REFERENCE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import medai
medai.__path__.append(sys.argv[4])  # medai.compliance lives in compliance/ (mapped by setuptools when installed)
import numpy as np, SimpleITK as sitk, nibabel as nib, pydicom, torch
torch.set_num_threads(int(sys.argv[3]))
from deepbet import BrainExtraction
from medai.dicom.volume import Geometry, InstanceRef, Volume
from medai.dicom.outputs.seg import write_seg
from medai.inference.pipeline import segments_from_card
from medai.inference.bundle import load_bundle
from medai.inference.pinned import PINNED

src, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
reader = sitk.ImageSeriesReader()
files = reader.GetGDCMSeriesFileNames(src)
reader.SetFileNames(files)
image = sitk.Cast(reader.Execute(), sitk.sitkFloat32)
array = sitk.GetArrayFromImage(image)                       # [k, j, i], LPS
d = np.asarray(image.GetDirection()).reshape(3, 3)
affine = np.eye(4)
affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ d @ np.diag(image.GetSpacing())
affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin())
nifti = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
_, mask_img, _ = BrainExtraction(no_gpu=True).run(nifti, threshold=0.5)
mask = np.ascontiguousarray(np.asarray(mask_img.dataobj).transpose(2, 1, 0).astype(np.uint8))
refs = []
for f in files:
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    refs.append(InstanceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID), Path(f)))
geometry = Geometry(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetDirection()))
volume = Volume(array, geometry, "MR", str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID),
                str(ds.get("FrameOfReferenceUID", "")), tuple(refs))
bundle = load_bundle(Path(sys.argv[4]) / "models" / "brain-extraction", origin="shipped", pinned=PINNED)
write_seg(volume, mask, segments_from_card(bundle.card), bundle, out / "seg.dcm")
m = sitk.GetImageFromArray(mask)
m.CopyInformation(image)
sitk.WriteImage(m, str(out / "mask.nii.gz"), useCompression=True)
print(json.dumps({"provider": "torch cpu", "brain_ml": float(mask.sum()) * float(np.prod(image.GetSpacing())) / 1000}))
"""


def _child(argv: list[str], env: dict[str, str], out: Path) -> dict[str, object]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed ({' '.join(argv[:1] + argv[3:6])}):\n{stderr[-3000:]}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    row: dict[str, object] = {"seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                              "peak_rss_mb": peak / 2**20}
    result = out / "result.json"
    if result.is_file():  # a medai run: its own split
        data = json.loads(result.read_text())
        t = data["timings_s"]
        split = {label: sum(float(t.get(k, 0.0)) for k in keys) for label, keys in SPLIT}
        split["start+imports+index"] = wall - float(t.get("load", 0.0)) - float(t["total"])
        row.update(split=split, provider=data["backend"]["provider"], precision=data["backend"]["precision"],
                   brain_ml=data["volumes_ml"]["Brain"], predicted_mb=data["memory"]["predicted_peak_mb"],
                   measured_mb=data["memory"]["measured_peak_rss_mb"])
    else:
        row.update(json.loads(stdout.strip().splitlines()[-1]))
    return row


def _not_byte_compiled() -> list[str]:
    """medai's modules whose cached bytecode is missing or older than the source (the
    interpreter compiles those on every start where it may not write the cache)."""
    import importlib.util

    stale = []
    for folder in (REPO / "medai", REPO / "compliance"):
        for source in sorted(folder.rglob("*.py")):
            cached = Path(importlib.util.cache_from_source(str(source)))
            try:
                header = cached.read_bytes()[:16]
            except OSError:
                stale.append(str(source.relative_to(REPO)))
                continue
            # header: magic, flags, source mtime, source size (PEP 552, timestamp-based)
            st = source.stat()
            if (int.from_bytes(header[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                    or int.from_bytes(header[12:16], "little") != st.st_size & 0xFFFFFFFF):
                stale.append(str(source.relative_to(REPO)))
    return stale


def _dice(a_path: Path, b_path: Path) -> float:
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(a_path))) > 0
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(b_path))) > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def main() -> int:
    from medai.data import demo_t1_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=demo_t1_dir(), help="DICOM series folder (default: demo T1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="alternating rounds (median reported)")
    ap.add_argument("--no-tune", action="store_true", help="skip `medai doctor --tune` (tuned path = auto)")
    args = ap.parse_args()
    if not MODELS_PY.exists():
        sys.stderr.write(f"{MODELS_PY} missing: the reference needs the build venv (see the docstring)\n")
        return 2
    stale = _not_byte_compiled()
    if stale:
        print(f"note: {len(stale)} of medai's modules are not byte-compiled or changed since (e.g. "
              f"{', '.join(stale[:3])}): every run below compiles them from source first "
              "(`python -m compileall medai compliance`, as scripts/setup does)")
    for f in args.source.iterdir():  # same warm page cache for every path
        f.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        # MEDAI_TUNE_ON_FIRST_USE=off: no background tuner competes with the timed runs (--no-tune).
        env = {**os.environ, "MEDAI_HOME": str(Path(tmp) / "home"), "OMP_NUM_THREADS": str(args.threads),
               "MEDAI_TUNE_ON_FIRST_USE": "off",
               "MEDAI_THREADS": str(args.threads)}
        if not args.no_tune:
            tuned = subprocess.run([sys.executable, "-c", CLI, "doctor", "--tune", "--no-parity"], env=env,
                                   capture_output=True, text=True)
            print("\n".join(line for line in tuned.stdout.splitlines()
                            if line.startswith(("Tuning", "   ", "CPU", "Runtime"))))
        # --force: the results store would otherwise hand back the first run's result.
        medai = [sys.executable, "-c", CLI, "run", "--model", "brain-extraction", str(args.source),
                 "--threads", str(args.threads), "--force", "--out"]
        paths = {
            "medai tuned": lambda out: medai + [str(out)],
            "medai cpu fp32": lambda out: medai + [str(out), "--device", "cpu", "--precision", "fp32"],
            "reference": lambda out: [str(MODELS_PY), "-c", REFERENCE, str(args.source), str(out),
                                      str(args.threads), str(REPO)],
        }
        # One untimed run of each medai path first: first-use parity checks and OpenVINO's
        # compiled-graph cache are one-time costs of an install, not of each run.
        for name in ("medai tuned", "medai cpu fp32"):
            subprocess.run(paths[name](Path(tmp) / f"warm-{name.replace(' ', '-')}"), env=env, check=True,
                           capture_output=True)
        runs: dict[str, list[dict]] = {k: [] for k in paths}
        names = list(paths)
        for i in range(args.repeat):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                out = Path(tmp) / f"{name.replace(' ', '-')}-{i}"
                runs[name].append(_child(paths[name](out), env, out))
                assert (out / "seg.dcm").is_file(), f"{name}: no SEG"
        dice = {name: _dice(Path(tmp) / f"{name.replace(' ', '-')}-0" / "mask.nii.gz",
                            Path(tmp) / "reference-0" / "mask.nii.gz") for name in ("medai tuned", "medai cpu fp32")}
    med = {k: {m: statistics.median(float(r[m]) for r in v) for m in ("seconds", "cpu_seconds", "peak_rss_mb")}
           for k, v in runs.items()}
    ref = med["reference"]
    print(f"volume: {args.source} ({sum(1 for _ in args.source.glob('*.dcm'))} DICOM files), "
          f"threads {args.threads}, {args.repeat} alternating rounds, medians")
    if args.no_tune:
        print("note: --no-tune: 'medai tuned' ran auto on an untuned home (the provider it used is in brackets), "
              "so that row is not the tuned precision")
    for k, m in med.items():
        r0 = runs[k][0]
        what = f"{r0['provider']} {r0.get('precision', '')}".strip()
        print(f"{k:<15} {m['seconds']:7.2f} s wall ({m['seconds'] / ref['seconds']:.2f}x)  "
              f"{m['cpu_seconds']:7.2f} s CPU ({m['cpu_seconds'] / ref['cpu_seconds']:.2f}x)  "
              f"peak RSS {m['peak_rss_mb']:6.0f} MB ({m['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x)  "
              f"[{what}, brain {float(r0['brain_ml']):.1f} mL]")
    for k, v in runs.items():
        print(f"  runs {k:<16} " + " ".join(f"{float(r['seconds']):.2f}" for r in v) + " (s, in order)")
    for k in ("medai tuned", "medai cpu fp32"):
        split = {label: statistics.median(float(r["split"][label]) for r in runs[k]) for label in runs[k][0]["split"]}
        print(f"  split {k:<15} " + ", ".join(f"{label} {v:.2f}" for label, v in split.items()) + " (s, medians)")
        print(f"  Dice {k} vs reference mask: {dice[k]:.5f}")
        pred, meas = (statistics.median(float(r[m]) for r in runs[k]) for m in ("predicted_mb", "measured_mb"))
        print(f"  planner {k}: predicted {pred:.0f} MB, measured {meas:.0f} MB during the run "
              f"({pred / meas - 1:+.0%}; target within +-25%)")
    ratios = {k: med[k]["seconds"] / ref["seconds"] for k in ("medai tuned", "medai cpu fp32")}
    mem = max(med[k]["peak_rss_mb"] for k in ("medai tuned", "medai cpu fp32")) / ref["peak_rss_mb"]
    print(f"targets: tuned {ratios['medai tuned']:.2f}x (<= 0.4x: {'ok' if ratios['medai tuned'] <= 0.4 else 'NOT MET'}), "
          f"cpu fp32 {ratios['medai cpu fp32']:.2f}x (<= 0.6x: {'ok' if ratios['medai cpu fp32'] <= 0.6 else 'NOT MET'}), "
          f"peak RSS {mem:.2f}x (<= 0.6x: {'ok' if mem <= 0.6 else 'NOT MET'})")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall-time ratios mean most on an otherwise idle machine; CPU-time ratios are less load-sensitive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
