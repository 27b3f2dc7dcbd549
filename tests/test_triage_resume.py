"""Interrupt a 50-study triage twice - Ctrl-C (SIGINT), then SIGKILL of the coordinator alone -
and rerun it while one of its pool workers gets killed: each rerun finishes the rest and
redoes nothing that was committed; at most the jobs in flight are lost. Model runs are counted in the audit trail (``model_run`` records)
and in the results store.

Cost: the 50 studies share one small real T1 series (ROBEX atlas shrunk to 4.5 mm, restamped
with new UIDs per study), but each still costs a full brain-extraction run (the model's
main stage is a fixed 256^3 grid), so the test does 50 to 56 model runs. The interruptions
come early (after 2 and 4 committed jobs) so that little is redone."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import triage_studies as ts
from medai.compliance import audit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N_STUDIES = 50
WORKERS = 2


def _committed(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
    except sqlite3.OperationalError:  # table not created yet
        return 0


def _model_runs() -> int:
    return sum(1 for r in audit.iter_records() if r["event"] == "model_run"
               and r["outcome_text"] == "success" and r["detail"].get("model") == "brain-extraction")


#: What is tested is resumption, not the model: the runs take OpenVINO bf16, this machine's
#: fastest path for brain extraction (about 3 s a run against 5 s on ONNX Runtime fp32).
def _env() -> dict[str, str]:
    return {**os.environ, "MEDAI_DEVICE": "openvino", "MEDAI_PRECISION": "bf16"}  # MEDAI_HOME: the test's


def _interrupt(cmd: list[str], db: Path, after: int, sig: signal.Signals) -> subprocess.Popen[str]:
    """Start ``cmd``, wait until ``after`` jobs are committed, send ``sig`` to the coordinator
    alone, and check that its pool workers are gone soon after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while _committed(db) < after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == WORKERS
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"pool workers outlived their coordinator ({sig.name})"
    return proc


def test_interrupt_then_rerun_finishes_the_rest(tmp_path, medai_home):
    t1 = ts.small_t1(tmp_path / "work")
    root = tmp_path / "studies"
    for i in range(N_STUDIES):
        ts.copy_study(t1, root / f"study-{i:02d}", f"resume-{i}")
    out = tmp_path / "worklist.csv"
    cmd = [sys.executable, "-m", "medai", "--json", "triage", str(root), "--models", "brain-extraction",
           "--workers", str(WORKERS), "--out", str(out)]
    db = medai_home / "results" / "index.sqlite"

    # Ctrl-C: a clean stop with exit code 130 and a hint; finished jobs are kept
    first = _interrupt(cmd, db, 2, signal.SIGINT)
    assert first.returncode == 130 and "run the same command again" in first.stderr.read()
    committed_1, runs_1 = _committed(db), _model_runs()
    assert 2 <= committed_1 <= runs_1 <= committed_1 + WORKERS  # lost: only what was in flight

    # SIGKILL of the coordinator: no chance to clean up; its workers die with it
    second = _interrupt(cmd, db, committed_1 + 2, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    committed_2, runs_2 = _committed(db), _model_runs()
    assert committed_1 + 2 <= committed_2 < N_STUDIES
    assert runs_2 - runs_1 >= committed_2 - committed_1  # nothing committed without running
    assert runs_2 <= committed_2 + 2 * WORKERS
    assert not out.exists()

    # the rest, while one pool worker is killed from outside (as the OOM killer would): the pool
    # is rebuilt, the jobs it held run again, the batch finishes with every study done
    third = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    while _committed(db) < committed_2 + 2 and third.poll() is None:
        time.sleep(0.1)
    victim = next(p for p in psutil.Process(third.pid).children(recursive=True)
                  if "spawn_main" in " ".join(p.cmdline()))
    victim.kill()
    stdout, stderr = third.communicate(timeout=800)
    assert third.returncode == 0, stderr[-2000:]
    assert "worker process died" in stderr
    summary = json.loads(stdout)
    assert summary["jobs_already_done"] == committed_2  # finished ones were not redone
    assert summary["jobs_run"] == N_STUDIES - committed_2
    runs_3 = _model_runs() - runs_2
    assert N_STUDIES - committed_2 <= runs_3 <= N_STUDIES - committed_2 + WORKERS
    assert _model_runs() <= N_STUDIES + 3 * WORKERS
    assert _committed(db) == N_STUDIES
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_STUDIES and {r["status"] for r in rows} == {"done"}
    assert len({r["study_key"] for r in rows}) == N_STUDIES
