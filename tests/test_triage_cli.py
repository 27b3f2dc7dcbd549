"""`medai triage` as a subprocess on a folder of real studies that are not in this repository:
real T1 MR (full resolution and shrunk), a real PD MR series, a real CT volume and a real
CT slice, and broken studies (truncated, missing slices, an unreadable edge slice, a lone
broken file). One row per study, correct statuses, QC failures ranked first, exit code 3;
JSON first, then CSV from the results store without running anything again."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import triage_studies as ts
from medai.compliance import audit, pseudonym

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("triage-real")
    return root, ts.real_folder(root)


def _medai(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medai", *args], capture_output=True, text=True, timeout=400)


def _model_runs(model: str) -> int:
    return sum(1 for r in audit.iter_records()
               if r["event"] == "model_run" and (r.get("detail") or {}).get("model") == model)


def test_real_folder_worklist(folder, tmp_path):
    root, studies = folder
    keys = {name: pseudonym(ts.study_uid(path)) for name, path in studies.items()}
    out = tmp_path / "worklist.json"
    proc = _medai("--json", "triage", str(root), "--models", "brain-volumetry", "--out", str(out))
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["studies"] == len(studies) == 9
    assert summary["jobs_run"] == 4 and summary["jobs_already_done"] == 0  # 2 good T1 + 2 that fail on load
    data = json.loads(out.read_text())
    assert data["not_for_diagnostic_use"] is True
    rows = {r["study_key"]: r for r in data["studies"]}
    assert set(rows) == set(keys.values())  # one row per study, orphan included
    row = {name: rows[key] for name, key in keys.items()}

    # done: the full-resolution T1 passes QC; the 4.5 mm one fails QC (voxel size) and leads the list
    assert row["t1"]["status"] == "done" and row["t1"]["qc"] in ("pass", "warn")
    assert "brain-volumetry:" in row["t1"]["measurements"] and row["t1"]["patient_id"] == "MEDAI-DEMO-0001"
    assert Path(row["t1"]["results"], "seg.dcm").is_file()
    assert row["t1_small"]["status"] == "done" and row["t1_small"]["qc"] == "fail"
    assert "voxel" in row["t1_small"]["reasons"]
    assert data["studies"][0]["study_key"] == keys["t1_small"]
    # no matching series: PD MR (no T1 in the description, 20 slices), CT volume and CT slice
    for name in ("pd", "ct", "ct_slice"):
        assert row[name]["status"] == "no matching series", name
    assert "modality CT" in row["ct"]["reasons"]
    # failed, each with its reason
    assert row["truncated"]["status"].startswith("failed: brain-volumetry: TruncatedInputError")
    assert "gap" in row["missing"]["status"]
    assert "series incomplete" in row["edge"]["status"] and "pixel data" in row["edge"]["status"]
    assert row["orphan"]["status"].startswith("failed: no readable instance")
    # ranking: results first (by priority), then failed, then no match; ranks are 1..n
    order = [r["status"].split(":")[0] for r in data["studies"]]
    assert order == ["done"] * 2 + ["failed"] * 4 + ["no matching series"] * 3
    assert [r["rank"] for r in data["studies"]] == list(range(1, 10))
    # identifiers only in the worklist file, never on the terminal
    assert "MEDAI-DEMO-0001" not in proc.stderr + proc.stdout and "SYNTH-0000" not in proc.stderr + proc.stdout
    # stderr is not a terminal: no progress bar, but the summary table
    assert "studies/s" not in proc.stderr and "Worklist: 9 studies" in proc.stderr
    assert _model_runs("brain-volumetry") == 2

    # the CSV, from the results store: nothing runs again, same rows, same order, same exit code
    out_csv = tmp_path / "worklist.csv"
    again = _medai("--json", "triage", str(root), "--models", "brain-volumetry", "--out", str(out_csv))
    assert again.returncode == 3, again.stderr
    assert json.loads(again.stdout)["jobs_run"] == 0
    with open(out_csv, newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["study_key"] for r in csv_rows] == [r["study_key"] for r in data["studies"]]
    assert [r["status"] for r in csv_rows] == [r["status"] for r in data["studies"]]
    assert _model_runs("brain-volumetry") == 2


def test_usage_errors_exit_2(tmp_path):
    assert _medai("triage", str(tmp_path)).returncode == 2  # no --out
    assert _medai("triage", str(tmp_path), "--out", str(tmp_path / "w.txt")).returncode == 2
    assert _medai("triage", str(tmp_path / "missing"), "--out", str(tmp_path / "w.csv")).returncode == 2
    proc = _medai("triage", str(tmp_path), "--models", "no-such-model", "--out", str(tmp_path / "w.csv"))
    assert proc.returncode != 0 and "no-such-model" in proc.stderr


def test_empty_folder_nothing_could_run_progress_on_a_terminal(tmp_path):
    import os
    import pty

    (tmp_path / "notes.txt").write_text("not DICOM")
    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "medai", "triage", str(tmp_path), "--models", "brain-extraction",
                           "--out", str(tmp_path / "w.csv")], stdout=subprocess.PIPE, stderr=slave, timeout=120)
    os.close(slave)
    shown = b""
    try:
        while chunk := os.read(master, 65536):
            shown += chunk
    except OSError:  # EIO: the terminal's other side is closed
        pass
    os.close(master)
    assert proc.returncode == 1, shown
    assert b"studies/s" in shown  # the progress bar, on the terminal only
