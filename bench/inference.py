"""End-to-end brain extraction, DICOM folder -> SEG on disk: medai (ONNX Runtime) vs reference deepbet (torch).

Each path runs in its own child process, started cold (interpreter start and imports
count, as they do for a user), on the same DICOM series, with the same thread count;
with ``--repeat`` the two paths alternate. Wall time is measured around the child;
CPU time (user + sys) and peak memory are the child's own (``os.wait4`` rusage, so one
child's numbers never mix with another's).

* ours: ``medai.inference.run.run_model("brain-extraction", folder, out)`` in the
  project venv — medai's DICOM loader, the ONNX pipeline, SEG + mask + result.json;
* reference: in the build venv (``.venv-models``: torch 2.13 CPU, deepbet 1.0.2 with
  ``--no-deps`` plus cc3d/fill_voids/pandas/tqdm, and highdicom/platformdirs/
  cryptography for the SEG): SimpleITK's GDCM series reader, ``deepbet.BrainExtraction``
  on the resulting NIfTI image, and the same medai SEG writer, plus a mask file.

Usage::

    .venv/bin/python bench/inference.py [--source DICOM_DIR] [--threads 2] [--repeat 1]

Prints both measurements and the ratios ours/reference (targets: time <= 0.5x,
memory <= 0.6x; required <= 0.8x) and the Dice between the two masks.
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

OURS = r"""
import json, sys
from medai.inference.run import run_model
r = run_model("brain-extraction", sys.argv[1], sys.argv[2], threads=int(sys.argv[3]))
print(json.dumps({"provider": r.provider, "brain_ml": r.volumes_ml["Brain"]}))
"""

REFERENCE = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])
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


def _child(argv: list[str], env: dict[str, str]) -> dict[str, float | str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({argv[0]}):\n{stderr[-3000:]}")
    info = json.loads(stdout.strip().splitlines()[-1])
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cpu = usage.ru_utime + usage.ru_stime
    return {"seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": peak / 2**20, **info}


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
    ap.add_argument("--repeat", type=int, default=1, help="runs per path (median reported)")
    args = ap.parse_args()
    if not MODELS_PY.exists():
        sys.stderr.write(f"{MODELS_PY} missing: the reference needs the build venv (see the docstring)\n")
        return 2
    for f in args.source.iterdir():  # same warm page cache for both paths
        f.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MEDAI_HOME": str(Path(tmp) / "home"), "OMP_NUM_THREADS": str(args.threads)}
        runs: dict[str, list[dict]] = {"ours": [], "reference": []}
        for i in range(args.repeat):
            out_o, out_r = Path(tmp) / f"ours{i}", Path(tmp) / f"ref{i}"
            runs["ours"].append(_child([sys.executable, "-c", OURS, str(args.source), str(out_o),
                                        str(args.threads)], env))
            runs["reference"].append(_child([str(MODELS_PY), "-c", REFERENCE, str(args.source), str(out_r),
                                             str(args.threads), str(REPO)], env))
            assert (out_o / "seg.dcm").is_file() and (out_r / "seg.dcm").is_file()
        dice = _dice(Path(tmp) / "ours0" / "mask.nii.gz", Path(tmp) / "ref0" / "mask.nii.gz")
    med = {k: {m: statistics.median(float(r[m]) for r in v) for m in ("seconds", "cpu_seconds", "peak_rss_mb")}
           for k, v in runs.items()}
    t_ratio = med["ours"]["seconds"] / med["reference"]["seconds"]
    m_ratio = med["ours"]["peak_rss_mb"] / med["reference"]["peak_rss_mb"]
    print(f"volume: {args.source} ({sum(1 for _ in args.source.glob('*.dcm'))} DICOM files), "
          f"threads {args.threads}, runs {args.repeat}")
    for k in ("ours", "reference"):
        print(f"{k:<10} {med[k]['seconds']:7.2f} s wall  {med[k]['cpu_seconds']:7.2f} s CPU   "
              f"peak RSS {med[k]['peak_rss_mb']:7.0f} MB   "
              f"({runs[k][0]['provider']}, brain {float(runs[k][0]['brain_ml']):.1f} mL)")
    print(f"ratio time   {t_ratio:.2f}x  (target <= 0.5x, required <= 0.8x: {'ok' if t_ratio <= 0.8 else 'FAIL'})")
    print(f"ratio memory {m_ratio:.2f}x  (target <= 0.6x, required <= 0.8x: {'ok' if m_ratio <= 0.8 else 'FAIL'})")
    c_ratio = med["ours"]["cpu_seconds"] / med["reference"]["cpu_seconds"]
    print(f"ratio CPU time {c_ratio:.2f}x  (user+sys of the child: less sensitive to other load on the machine)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall-time ratios are only meaningful on an otherwise idle machine)")
    print(f"Dice ours vs reference mask: {dice:.5f}")
    return 0 if t_ratio <= 0.8 and m_ratio <= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
