"""Triage ranking, worklist files and state database: no model needed."""

from __future__ import annotations

import csv
import json

from medai.triage import (STATUS_DONE, STATUS_NO_MATCH, Outcome, StateDB, StudyRow, TriageReport, rank,
                          write_worklist)


def _row(key: str, *, priority: str = "", score: float = 0.0, qc: str = "", status: str = STATUS_DONE) -> StudyRow:
    return StudyRow(key, "ACC-" + key, "PID-" + key, "20260101", "MR", status, ["m"], priority, score, qc)


def test_rank_qc_failures_first_then_priority_then_no_result_ties_by_key():
    rows = [
        _row("e", status=STATUS_NO_MATCH),
        _row("b", priority="routine", score=0.0, qc="pass"),
        _row("a", priority="routine", score=0.0, qc="pass"),
        _row("c", priority="urgent", score=1.0, qc="pass"),
        _row("d", priority="routine", score=0.0, qc="fail"),
        _row("f", status="failed: m: DicomInputError: x"),
        _row("g", priority="review", score=0.5, qc="warn"),
    ]
    assert [r.study_key for r in rank(rows)] == ["d", "c", "g", "a", "b", "e", "f"]
    assert [r.study_key for r in rank(reversed(rows))] == ["d", "c", "g", "a", "b", "e", "f"]


def test_worklist_csv_and_json(tmp_path):
    rows = rank([_row("a", priority="review", score=0.5), _row("b", status=STATUS_NO_MATCH)])
    csv_path = write_worklist(rows, tmp_path / "w.csv")
    with open(csv_path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert [r["study_key"] for r in read] == ["a", "b"]
    assert read[0]["rank"] == "1" and read[0]["accession_number"] == "ACC-a" and read[0]["priority"] == "review"
    data = json.loads(write_worklist(rows, tmp_path / "w.json").read_text())
    assert data["not_for_diagnostic_use"] is True
    assert data["studies"][1]["status"] == STATUS_NO_MATCH
    assert not list(tmp_path.glob("*.tmp"))


def test_state_database_survives_reopen(tmp_path):
    db = StateDB(tmp_path / "s.sqlite")
    out = Outcome("k1", "brain-extraction", "1.0", STATUS_DONE, volumes_ml={"brain": 1234.5},
                  priority={"level": "routine", "score": 0.0, "reasons": []}, audit=({"event": "model_run"},))
    db.put(out)
    db.close()
    again = StateDB(tmp_path / "s.sqlite").get("k1", "brain-extraction", "1.0")
    assert again is not None and again.volumes_ml == {"brain": 1234.5} and again.audit == ()
    assert StateDB(tmp_path / "s.sqlite").get("k1", "brain-extraction", "2.0") is None


def test_exit_codes():
    done, failed, nomatch = _row("a"), _row("b", status="failed: m: x"), _row("c", status=STATUS_NO_MATCH)
    assert TriageReport([done, nomatch], ran=1, skipped_done=0, failed=0, seconds=0).exit_code == 0
    assert TriageReport([done, failed], ran=2, skipped_done=0, failed=1, seconds=0).exit_code == 3
    assert TriageReport([failed], ran=1, skipped_done=0, failed=1, seconds=0).exit_code == 1
    assert TriageReport([], ran=0, skipped_done=0, failed=0, seconds=0).exit_code == 1
    assert TriageReport([nomatch], ran=0, skipped_done=0, failed=0, seconds=0).exit_code == 1
