"""The audit trail as the rest of medai uses it: codes, pseudonyms, sealed identifiers,
fail-closed writes, concurrent writers, key rotation, FHIR export."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from medai.compliance import audit, fhir, keys, pseudonym, trail
from medai.compliance.verify import verify
from medai.errors import AuditVerificationError, AuditWriteError

CANARY_ID = "CANARY-PID-7731904"
CANARY_NAME = "Qxcanary^Wilhelmina"


def _records() -> list[dict]:
    return list(audit.iter_records())


def test_events_carry_dicom_codes_and_required_fields():
    for name in audit.EVENTS:
        audit.record(name, outcome="minor_failure" if name == "security_alert" else "success")
    recs = _records()
    assert recs[0]["event"] == "application_start"  # first record of a process announces it
    by_event = {r["event"]: r for r in recs}
    expected = {"application_start": "110100", "application_stop": "110100", "audit_log_used": "110101",
                "instances_accessed": "110103", "instances_transferred": "110104", "export": "110106",
                "import": "110107", "query": "110112", "security_alert": "110113"}
    for name, code in expected.items():
        assert by_event[name]["code"] == {"code": code, "scheme": "DCM", "display": audit.EVENTS[name].display}
    assert by_event["model_run"]["code"]["scheme"] == audit.MEDAI_SCHEME
    assert by_event["application_start"]["subtype"]["code"] == "110120"
    assert by_event["application_stop"]["subtype"]["code"] == "110121"
    assert by_event["security_alert"]["outcome"] == 4
    for rec in recs:
        assert rec["time"].endswith("Z")
        assert rec["actor"]["user"] and rec["actor"]["pid"] == os.getpid()
        assert rec["host"]
    assert [r["seq"] for r in recs] == list(range(len(recs)))


def test_bad_event_or_outcome_is_refused_and_nothing_written():
    with pytest.raises(ValueError, match="unknown audit event"):
        audit.record("coffee_break")
    with pytest.raises(ValueError, match="unknown outcome"):
        audit.record("query", outcome="meh")
    assert not trail.trail_path().exists()


def test_pseudonym_is_keyed_stable_and_short(tmp_path, monkeypatch):
    first = pseudonym("12345")
    assert first == pseudonym(" 12345 ") == audit.pseudonym("12345")
    assert len(first) == 16 and int(first, 16) >= 0
    assert first != pseudonym("12346")
    monkeypatch.setenv("MEDAI_HOME", str(tmp_path / "other-install"))
    assert pseudonym("12345") != first  # a different install key gives different pseudonyms


def test_canary_identifiers_never_in_clear(medai_home, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="medai")
    audit.record("instances_accessed", patient_id=CANARY_ID, patient_name=CANARY_NAME,
                 study_uid="1.2.826.0.1.3680043.8.498.1", instance_uids=["1.2.3.4"])
    audit.record("model_run", patient_id=CANARY_ID, detail={"model": "brain", "sha256": "ab" * 32})
    shown = audit.select(audit.Filter(patient=CANARY_ID))  # filter by clear id
    assert len(shown) == 2 and shown[0]["participants"][0]["pseudonym"] == pseudonym(CANARY_ID)
    trail.checkpoint()
    bundle = json.dumps(fhir.bundle(shown))
    from medai.compliance import attest

    doc = json.dumps(attest.attest())
    blobs = [bundle, doc, caplog.text, capsys.readouterr().err]
    blobs += [p.read_bytes().decode("latin-1") for p in medai_home.rglob("*") if p.is_file()]
    for blob in blobs:
        for canary in (CANARY_ID, CANARY_NAME, CANARY_NAME.split("^")[0]):
            assert canary not in blob and canary.lower() not in blob.lower()
    # the clear values are there for an authorised auditor (and that is recorded)
    revealed = audit.select(audit.Filter(patient=pseudonym(CANARY_ID)), reveal=True)
    assert revealed[0]["participants"][0]["clear"] == {"id": CANARY_ID, "name": CANARY_NAME}
    assert _records()[-1]["detail"]["revealed"] is True


def test_detail_with_clear_identifier_is_refused():
    with pytest.raises(ValueError, match="patient identifier in clear"):
        audit.record("export", patient_id=CANARY_ID, detail={"folder": f"/exports/{CANARY_ID}"})
    assert not trail.trail_path().exists()


def test_reading_the_trail_is_audited():
    audit.record("query", detail={"n": 1})
    audit.select(audit.Filter(events=("query",)), purpose="show")
    last = _records()[-1]
    assert last["event"] == "audit_log_used" and last["code"]["code"] == "110101"
    assert last["detail"]["purpose"] == "show" and last["detail"]["records"] == 1


def test_filters():
    audit.record("query", patient_id="A")
    audit.record("export", patient_id="B", outcome="serious_failure")
    t = _records()[-1]["time"]
    audit.record("query", patient_id="B")
    assert [r["event"] for r in audit.select(audit.Filter(patient="B"))] == ["export", "query"]
    assert len(audit.select(audit.Filter(events=("query",)))) == 2
    assert [r["event"] for r in audit.select(audit.Filter(outcome="serious_failure"))] == ["export"]
    assert [r["event"] for r in audit.select(audit.Filter(events=("query",), since=t))] == ["query"]
    assert audit.select(audit.Filter(session=audit.session_id(), events=("export",)), limit=1)[0]["event"] == "export"


def test_missing_key_fails_closed(medai_home):
    audit.record("query", patient_id="A")
    (medai_home / "keys" / keys.DATA_KEY).unlink()
    with pytest.raises(AuditWriteError, match="key missing"):
        audit.record("instances_accessed", patient_id="A")
    assert not (medai_home / "keys" / keys.DATA_KEY).exists()  # not silently regenerated


def test_key_files_are_private(medai_home):
    audit.record("query", patient_id="A")
    trail.checkpoint()
    for path in [*(medai_home / "keys").iterdir(), trail.trail_path(), trail.checkpoints_path()]:
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, path


def test_torn_last_record_is_cut_and_reported():
    audit.record("query")
    with open(trail.trail_path(), "ab") as fh:
        fh.write(b'{"action":"R","actor":{"pid":1')  # a crash in the middle of a write
    audit.record("export")
    recs = _records()
    alert = recs[-2]
    assert alert["event"] == "security_alert" and "incomplete last record" in alert["detail"]["reason"]
    assert recs[-1]["event"] == "export"
    assert verify().ok


def _run_unshared(script: str, mount: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount} && exec {sys.executable} -c \"$0\"", script],
                          capture_output=True, text=True, timeout=120)


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


FAIL_CLOSED = """
from medai.compliance import audit
from medai.errors import AuditWriteError
try:
    audit.record("instances_accessed", patient_id="A", study_uid="1.2.3")
except AuditWriteError as exc:
    print("REFUSED", exc)
else:
    print("WRITTEN")
"""


def test_read_only_audit_dir_fails_closed(medai_home):
    audit.record("query")
    audit_dir = trail.audit_dir()
    size = trail.trail_path().stat().st_size
    if _unshare_works():  # a read-only bind mount: refuses root too
        proc = _run_unshared(FAIL_CLOSED, f"mount --bind -o ro {audit_dir} {audit_dir}")
    elif os.geteuid() != 0:
        audit_dir.chmod(0o500)
        trail.trail_path().chmod(0o400)
        try:
            proc = subprocess.run([sys.executable, "-c", FAIL_CLOSED], capture_output=True, text=True, timeout=60)
        finally:
            audit_dir.chmod(0o700)
            trail.trail_path().chmod(0o600)
    else:
        pytest.skip("running as root without unshare: cannot make a directory read-only")
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr
    assert "Read-only file system" in proc.stdout or "Permission denied" in proc.stdout
    assert "the operation was not performed" in proc.stdout
    assert trail.trail_path().stat().st_size == size


DISK_FULL = """
from medai.compliance import audit, verify
from medai.errors import AuditWriteError
n = 0
try:
    while True:
        audit.record("query", detail={"pad": "x" * 3000, "n": n})
        n += 1
except AuditWriteError as exc:
    print("FULL after", n, "records:", exc)
print("VERIFY", verify.verify().ok)
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm for a small tmpfs")
def test_disk_full_fails_closed_and_leaves_a_valid_trail(tmp_path):
    home = tmp_path / "small"
    home.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"mount -t tmpfs -o size=256k tmpfs {home} && MEDAI_HOME={home} "
                           f"exec {sys.executable} -c \"$0\"", DISK_FULL],
                          capture_output=True, text=True, timeout=120)
    assert "FULL after" in proc.stdout and "No space left on device" in proc.stdout, proc.stdout + proc.stderr
    assert "VERIFY True" in proc.stdout


WRITER = """
import sys
from medai.compliance import audit
tag = sys.argv[1]
for i in range(int(sys.argv[2])):
    audit.record("query", detail={"writer": tag, "i": i})
"""


@pytest.mark.slow
def test_concurrent_writers_never_interleave():
    writers, each = 4, 120
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, f"w{k}", str(each)]) for k in range(writers)]
    assert [p.wait(timeout=120) for p in procs] == [0] * writers
    report = verify()
    assert report.ok, report.problems
    recs = _records()
    for k in range(writers):
        mine = [r["detail"]["i"] for r in recs if r["event"] == "query" and r["detail"].get("writer") == f"w{k}"]
        assert mine == list(range(each))
    assert sum(r["event"] == "application_start" for r in recs) == writers


def test_rotation_keeps_old_records_verifiable(tmp_path, medai_home):
    audit.record("instances_accessed", patient_id="A")
    old_pub = tmp_path / "old.pem"
    old_pub.write_bytes(keys.export_public_keys())
    rot = audit.rotate_keys(data=True)
    assert rot.old_key_id != rot.new_key_id and rot.old_data_key_id != rot.new_data_key_id
    audit.record("instances_accessed", patient_id="A")
    assert verify().ok
    # a verifier holding only the pre-rotation key follows the endorsement in the trail
    assert verify(public_keys=old_pub).ok
    assert not (medai_home / "keys" / "retired" / f"{rot.old_key_id}.key").exists()
    revealed = audit.select(audit.Filter(events=("instances_accessed",)), reveal=True)
    assert [r["participants"][0]["clear"]["id"] for r in revealed] == ["A", "A"]  # old and new data key
    assert len({r["participants"][0]["pseudonym"] for r in revealed}) == 1  # pseudonyms stay stable


def test_unknown_signing_key_is_reported(tmp_path):
    audit.record("query")
    trail.checkpoint()
    other = tmp_path / "other.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    other.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    report = verify(public_keys=other)
    assert not report.ok and "unknown key" in report.problems[0]


def test_fhir_export_is_valid_r4_auditevent_bundle():
    from fhir.resources.R4B.bundle import Bundle

    audit.record("instances_accessed", patient_id=CANARY_ID, patient_name=CANARY_NAME, study_uid="1.2.3",
                 series_uid="1.2.3.4", instance_uids=["1.2.3.4.5", "1.2.3.4.6"], detail={"viewer": "axial"})
    audit.record("security_alert", outcome="serious_failure", subtype=audit.ALERT_RESTRICTED,
                 detail={"destination": "203.0.113.1:443"})
    records = audit.select()
    doc = fhir.bundle(records)
    parsed = Bundle.model_validate(doc)  # R4B AuditEvent is unchanged from R4
    events = [e.resource for e in parsed.entry]
    assert [e.type.code for e in events] == ["110100", "110103", "110113"]
    assert events[1].entity[0].what.identifier.value == pseudonym(CANARY_ID)
    assert events[1].entity[1].what.identifier.value == "urn:oid:1.2.3"
    assert events[2].outcome == "8" and events[2].subtype[0].code == "110132"
    assert CANARY_ID not in json.dumps(doc)
    revealed = fhir.bundle(audit.select(reveal=True))
    assert revealed["entry"][1]["resource"]["entity"][0]["what"]["identifier"]["value"] == CANARY_ID


def test_unseal_with_wrong_key_fails(medai_home):
    audit.record("query", patient_id="A")
    sealed = _records()[-1]["participants"][0]["sealed"]
    kid, blob = sealed.split(":", 1)
    tampered = f"{kid}:{blob[:-4]}AAA="
    with pytest.raises(AuditVerificationError):
        audit.unseal(tampered)


def test_capture_collects_calls_for_a_coordinator():
    calls: list[dict] = []
    with audit.capture(calls):
        audit.record("model_run", patient_id="A", study_uid="1.2", detail={"model": "m"})
    assert not trail.trail_path().exists()
    assert calls == [{"event": "model_run", "outcome": "success", "patient_id": "A", "study_uid": "1.2",
                      "detail": {"model": "m"}}]
    audit.record(**calls[0])
    assert _records()[-1]["event"] == "model_run"


def test_announce_writes_the_start_record_once_and_not_for_a_coordinator():
    calls: list[dict] = []
    with audit.capture(calls):
        audit.announce()  # a cluster worker: its coordinator's process has its own start
    assert calls == [] and not trail.trail_path().exists()
    audit.announce()
    audit.announce()
    audit.record("query")
    assert [r["event"] for r in _records()] == ["application_start", "query"]


def test_threads_of_one_process_share_the_trail_safely():
    import threading

    def work(tag: str) -> None:
        for i in range(25):
            audit.record("query", detail={"thread": tag, "i": i})

    threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verify().ok
    recs = [r for r in _records() if r["event"] == "query"]
    assert len(recs) == 100
    for k in range(4):
        assert [r["detail"]["i"] for r in recs if r["detail"]["thread"] == f"t{k}"] == list(range(25))


def test_detail_check_matches_tokens_not_digits():
    audit.record("query", patient_id="12", detail={"instances": 312, "series": "1.2.3.12"})  # too short to tell
    audit.record("query", patient_id="4711", detail={"instances": 47110})  # not as a token
    with pytest.raises(ValueError):
        audit.record("query", patient_id="4711", detail={"note": "id 4711 seen"})
    with pytest.raises(ValueError):
        audit.record("query", patient_name="Müller^Anna", detail={"folder": "/x/müller^anna/"})


@pytest.mark.slow
def test_writer_killed_mid_stream_leaves_a_valid_trail():
    import signal
    import time

    endless = ("from medai.compliance import audit\ni = 0\nwhile True:\n"
               "    audit.record('query', detail={'writer': 'victim', 'i': i})\n    i += 1\n")
    victim = subprocess.Popen([sys.executable, "-c", endless])
    other = subprocess.Popen([sys.executable, "-c", WRITER, "survivor", "60"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # let the victim itself write a while, then kill it mid-stream
        path = trail.trail_path()
        if path.exists() and path.read_bytes().count(b'"victim"') > 20:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert other.wait(timeout=120) == 0
    audit.record("query", detail={"after": True})
    report = verify()
    assert report.ok, report.problems
    recs = _records()
    mine = [r["detail"]["i"] for r in recs if r["event"] == "query" and r["detail"].get("writer") == "victim"]
    assert mine == list(range(len(mine))) and len(mine) > 5  # no gap, no duplicate
    assert [r["detail"]["i"] for r in recs if r["detail"].get("writer") == "survivor"] == list(range(60))
