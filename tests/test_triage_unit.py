"""Triage ranking, worklist files, the results store it shares, concurrency and planning: no model run."""

from __future__ import annotations

import csv
import json

import pytest

from medai.results import ResultsStore, StoredRun, qc_state
from medai.triage import (STATUS_DONE, STATUS_FAILED, STATUS_NO_MATCH, Job, StudyRow, TriageReport, concurrency,
                          rank, select_bundles, write_worklist)


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
    # without a result: failed (someone must look) before no match
    assert [r.study_key for r in rank(rows)] == ["d", "c", "g", "a", "b", "f", "e"]
    assert [r.study_key for r in rank(reversed(rows))] == ["d", "c", "g", "a", "b", "f", "e"]


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


def _stored(tmp_path, run_id: str, *, digest: str = "d1", status: str = STATUS_DONE, card: str = "c1",
            prompted: bool = False) -> StoredRun:
    folder = tmp_path / run_id
    folder.mkdir(exist_ok=True)
    (folder / "result.json").write_text("{}")
    return StoredRun(run_id=run_id, study_key="st", series_key="se", content_digest=digest,
                     model_id="brain-extraction", model_version="v", card_sha256=card, surface="ui", status=status,
                     created=float(len(run_id)), folder=folder, outputs={"result": "result.json"},
                     summary={"volumes_ml": {"brain": 1234.5}}, prompted=prompted)


def test_results_store_survives_reopen_and_answers_only_the_same_series_content(tmp_path):
    db = ResultsStore(tmp_path / "index.sqlite")
    db.commit(_stored(tmp_path, "r1"))
    db.close()
    store = ResultsStore(tmp_path / "index.sqlite")
    again = store.find("se", "d1", "brain-extraction", "v", "c1")
    assert again is not None and again.summary["volumes_ml"] == {"brain": 1234.5} and again.review == "new"
    assert store.find("se", "d2", "brain-extraction", "v", "c1") is None  # series gained/lost instances
    assert store.find("se", "d1", "brain-extraction", "v2", "c1") is None  # another model version
    assert store.find("se", "d1", "brain-extraction", "v", "c2") is None  # another card
    (again.folder / "result.json").unlink()
    assert store.find("se", "d1", "brain-extraction", "v", "c1") is None  # results deleted: redo
    store.commit(_stored(tmp_path, "r22", status=STATUS_FAILED))
    assert store.find("se", "d1", "brain-extraction", "v", "c1") is None
    failed = store.find("se", "d1", "brain-extraction", "v", "c1", include_failed=True)
    assert failed is not None and failed.status == STATUS_FAILED
    store.commit(_stored(tmp_path, "r333", prompted=True))  # a person's prompt: never reused
    assert store.find("se", "d1", "brain-extraction", "v", "c1") is None
    assert [r.run_id for r in store.runs(series_key="se", latest_only=False)] == ["r333", "r22", "r1"]


def test_review_states_are_strict(tmp_path):
    from medai.errors import ConfigError

    store = ResultsStore(tmp_path / "index.sqlite")
    store.commit(_stored(tmp_path, "r1"))
    run = store.set_review("r1", "accepted", reviewer="Dr A", comment="ok")
    assert (run.review, run.reviewer, run.review_comment) == ("accepted", "Dr A", "ok") and run.reviewed_at
    run = store.set_review("r1", "send_failed", send_error="refused")
    assert (run.review, run.reviewer, run.send_error) == ("send_failed", "Dr A", "refused")
    with pytest.raises(ConfigError):
        store.set_review("r1", "maybe")


def test_exit_codes():
    done, failed, nomatch = _row("a"), _row("b", status="failed: m: x"), _row("c", status=STATUS_NO_MATCH)
    assert TriageReport([done, nomatch], ran=1, skipped_done=0, failed=0, seconds=0).exit_code == 0
    assert TriageReport([done, failed], ran=2, skipped_done=0, failed=1, seconds=0).exit_code == 3
    assert TriageReport([failed], ran=1, skipped_done=0, failed=1, seconds=0).exit_code == 1
    assert TriageReport([], ran=0, skipped_done=0, failed=0, seconds=0).exit_code == 1
    assert TriageReport([nomatch], ran=0, skipped_done=0, failed=0, seconds=0).exit_code == 1
    assert TriageReport([failed, nomatch], ran=1, skipped_done=0, failed=1, seconds=0).exit_code == 3
    # a rerun where everything was already done is a success, not "nothing could run"
    assert TriageReport([done], ran=0, skipped_done=1, failed=0, seconds=0).exit_code == 0


def _job(**kw) -> Job:
    base = dict(study_key="k", study_uid="1.2.3", model_id="brain-extraction", model_version="v",
                series_uid="1.2.3.4", files=("a.dcm",), out_dir="out", shape=(181, 217, 181), inputs_digest="d1")
    base.update(kw)
    return Job(**base)


def test_concurrency_follows_planner_prediction_and_memory_budget():
    from medai.inference import planner, registry

    bundle = registry.get_bundle("brain-extraction")
    jobs = [_job(study_key=f"k{i}") for i in range(8)]
    peak = planner.plan(bundle, (181, 217, 181), None, in_this_process=False).predicted_bytes
    assert peak > 500 * 2**20  # the 256^3 main stage dominates
    assert concurrency(jobs, [bundle], 4, 10 * peak) == (4, peak)        # budget allows more than asked
    assert concurrency(jobs, [bundle], 4, int(2.5 * peak)) == (2, peak)  # budget caps it
    assert concurrency(jobs, [bundle], 4, peak // 2) == (1, peak)        # never below one
    assert concurrency(jobs[:3], [bundle], 8, 100 * peak) == (3, peak)   # never more than jobs
    # a bigger series predicts more memory, hence fewer at once
    big = [_job(study_key="b", shape=(600, 512, 512))]
    n_big, peak_big = concurrency(big + jobs, [bundle], 4, int(2.5 * peak))
    assert peak_big > peak and n_big == 1


def test_prompted_models_are_not_triaged(monkeypatch):
    from dataclasses import replace

    from medai.errors import ConfigError
    from medai.inference import registry

    real = registry.get_bundle("brain-extraction")
    prompted = replace(real, card=replace(real.card, id="boxy", accepts_prompt=True))
    monkeypatch.setattr(registry, "list_bundles", lambda **kw: [real, prompted])
    monkeypatch.setattr(registry, "get_bundle", lambda m, **kw: {"boxy": prompted}.get(m, real))
    assert select_bundles(None) == [real]
    with pytest.raises(ConfigError, match="prompt"):
        select_bundles(["boxy"])


def test_qc_verdicts_nested_or_flat():
    assert qc_state({"image_quality": {"status": "fail", "checks": []}}) == "fail"
    assert qc_state({"a": {"status": "warn"}, "b": {"status": "pass"}}) == "warn"
    assert qc_state({"passed": True}) == "pass"
    assert qc_state({"dice": 0.9}) == ""
