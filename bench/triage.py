#!/usr/bin/env python3
"""Triage throughput and memory: one worker, two workers, and a local Dask cluster, same input.

The input is the bundled demo T1 study (real Colin27 pixels, 181 slices at 1 mm, synthetic
headers) copied into ``--studies`` studies with their own UIDs. Each mode runs
``medai triage --models brain-extraction`` as a subprocess with a fresh MEDAI_HOME (nothing
already done), while the summed RSS of the whole process tree (coordinator, pool workers or
Dask scheduler, nannies and workers) is sampled every 0.1 s. Printed: wall seconds,
studies/min, peak tree RSS, and ratios against the one-worker run measured in the same
invocation. Usage::

    .venv/bin/python bench/triage.py [--studies 6] [--modes 1,2,local2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medai.data import demo_t1_dir  # noqa: E402
from medai.dicom import synth  # noqa: E402


def make_input(root: Path, n: int) -> Path:
    src = sorted(demo_t1_dir().glob("*.dcm"))
    for s in range(n):
        study, series = synth.synthetic_uid("bench-triage", s), synth.synthetic_uid("bench-triage-series", s)
        for i, path in enumerate(src):
            synth.restamp(path, root / f"study-{s:03d}" / path.name, study_uid=study, series_uid=series,
                          sop_uid=synth.synthetic_uid("bench-triage-sop", s, i))
    return root


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_mode(mode: str, studies: Path, work: Path) -> dict[str, float]:
    home = work / f"home-{mode}"
    args = ["--workers", mode[len("local"):], "--cluster", "local"] if mode.startswith("local") else ["--workers", mode]
    cmd = [sys.executable, "-m", "medai", "--json", "triage", str(studies), "--models", "brain-extraction",
           *args, "--out", str(work / f"worklist-{mode}.csv")]
    env = {**os.environ, "MEDAI_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(ps))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mode {mode} failed ({proc.returncode}):\n{err[-3000:]}")
    summary = json.loads(out)
    return {"seconds": seconds, "studies": summary["studies"], "jobs": summary["jobs_run"],
            "at_once": summary["workers"], "peak_mb": peak / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=6)
    ap.add_argument("--modes", default="1,2,local2", help="comma-separated: N workers, or localN (Dask)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="medai-bench-triage-") as tmp:
        work = Path(tmp)
        studies = make_input(work / "studies", args.studies)
        print(f"input: {args.studies} studies x 181-slice T1 (demo study restamped); "
              f"{len(os.sched_getaffinity(0))} CPUs; model brain-extraction")
        results = {m: run_mode(m, studies, work) for m in modes}
    ref = results[modes[0]]
    print(f"{'mode':<10} {'at once':>7} {'seconds':>8} {'studies/min':>12} {'peak RSS MB':>12} "
          f"{'speed vs ' + modes[0]:>14} {'memory vs ' + modes[0]:>15}")
    for mode, r in results.items():
        rate = r["studies"] / r["seconds"] * 60
        ref_rate = ref["studies"] / ref["seconds"] * 60
        print(f"{mode:<10} {r['at_once']:>7} {r['seconds']:>8.1f} {rate:>12.2f} {r['peak_mb']:>12.0f} "
              f"{rate / ref_rate:>14.2f} {r['peak_mb'] / ref['peak_mb']:>15.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
