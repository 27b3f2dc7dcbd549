"""``medai audit`` end to end, as a user runs it (real CLI processes): show, verify with
an exported anchor, checkpoint, FHIR export, attest and verify the attestation on
"another machine" (a separate MEDAI_HOME with only the exported public key)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medai.compliance import audit

CANARY = "CANARY-CLI-5521"


def medai(*args: str, home: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["MEDAI_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "medai", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def populated(medai_home: Path) -> Path:
    audit.record("instances_accessed", patient_id=CANARY, patient_name="Canary^Cli", study_uid="1.2.3",
                 instance_uids=["1.2.3.1"])
    audit.record("model_run", patient_id=CANARY, study_uid="1.2.3", detail={"model": "brain-extraction"})
    return medai_home


def test_show_is_pseudonymised_filterable_and_audited(populated):
    out = medai("--json", "audit", "show", "--event", "model_run").stdout
    recs = json.loads(out)
    assert [r["event"] for r in recs] == ["model_run"]
    assert CANARY not in out
    by_patient = json.loads(medai("--json", "audit", "show", "--patient", CANARY).stdout)
    assert {r["event"] for r in by_patient} == {"instances_accessed", "model_run"}
    revealed = json.loads(medai("--json", "audit", "show", "--patient", CANARY, "--reveal").stdout)
    assert revealed[0]["participants"][0]["clear"]["id"] == CANARY
    used = [r for r in audit.iter_records() if r["event"] == "audit_log_used"]
    assert [u["detail"]["revealed"] for u in used] == [False, False, True]
    assert all(CANARY not in json.dumps(u) for u in used)
    human = medai("audit", "show").stdout
    assert "model_run" in human and CANARY not in human
    bad = medai("audit", "show", "--event", "nope", check=False)
    assert bad.returncode == 2


def test_verify_checkpoint_and_cut_tail(populated, tmp_path):
    anchor = tmp_path / "anchor.json"
    cp = json.loads(medai("--json", "audit", "checkpoint", "--export", str(anchor)).stdout)
    assert json.loads(anchor.read_text()) == cp
    ok = json.loads(medai("--json", "audit", "verify", "--anchor", str(anchor)).stdout)
    assert ok["ok"] and ok["records"] >= cp["count"]
    # cut the tail of the trail, its checkpoints and the local anchor: only the kept anchor tells
    trail = populated / "audit" / "trail.jsonl"
    lines = trail.read_bytes().splitlines(keepends=True)
    trail.write_bytes(b"".join(lines[:2]))
    (populated / "audit" / "checkpoints.jsonl").unlink()
    (populated / "audit-anchor.json").unlink()
    cut = medai("--json", "audit", "verify", "--anchor", str(anchor), check=False)
    assert cut.returncode == 1
    assert "records removed from the end" in " ".join(json.loads(cut.stdout)["problems"])


def test_verify_a_copied_trail_on_another_machine(populated, tmp_path):
    medai("audit", "checkpoint")
    pub = tmp_path / "install.pem"
    medai("audit", "keys", "export", "--out", str(pub))
    elsewhere = tmp_path / "auditor"
    shutil.copytree(populated / "audit", elsewhere / "copied")
    other_home = tmp_path / "auditor-home"
    args = ["--json", "audit", "verify", "--trail", str(elsewhere / "copied" / "trail.jsonl"),
            "--checkpoints", str(elsewhere / "copied" / "checkpoints.jsonl"), "--public-key", str(pub)]
    report = json.loads(medai(*args, home=other_home).stdout)
    assert report["ok"] and report["checkpoints"] >= 1
    data = bytearray((elsewhere / "copied" / "trail.jsonl").read_bytes())
    data[100] = ord("X") if data[100] != ord("X") else ord("Y")
    (elsewhere / "copied" / "trail.jsonl").write_bytes(bytes(data))
    tampered = medai(*args, home=other_home, check=False)
    assert tampered.returncode == 1 and "modified" in tampered.stdout


def test_fhir_export_to_file(populated, tmp_path):
    out = tmp_path / "audit-fhir.json"
    medai("audit", "export", "--format", "fhir", "--out", str(out))
    bundle = json.loads(out.read_text())
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    codes = [e["resource"]["type"]["code"] for e in bundle["entry"]]
    assert codes[:3] == ["110100", "110103", "MEDAI-001"]
    assert CANARY not in out.read_text()
    assert out.stat().st_mode & 0o077 == 0


def test_attestation_round_trip_on_another_machine(populated, tmp_path):
    att = tmp_path / "attestation.json"
    medai("audit", "attest", "--out", str(att))
    pub = tmp_path / "install.pem"
    medai("audit", "keys", "export", "--out", str(pub))
    other = tmp_path / "elsewhere"
    res = json.loads(medai("--json", "audit", "verify-attestation", str(att), "--public-key", str(pub),
                           home=other).stdout)
    body = res["statement"]
    assert res["ok"] and body["type"] == "medai-session-attestation"
    assert body["events"]["model_run"] == 1 and body["records"] >= 3
    assert body["telemetry_off"] and body["egress_guard"]
    assert set(body["network"]) == {"allowed", "blocked"}
    assert body["checkpoint"]["count"] >= body["records"]
    assert len(body["config_sha256"]) == 64 and body["versions"]["medai"]
    assert not (other / "audit").exists()  # verifying elsewhere wrote no trail there... 
    # ...and a changed number breaks the signature
    doc = json.loads(att.read_text())
    doc["statement"]["network"]["blocked"]["public"] = 0
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    bad = medai("audit", "verify-attestation", str(forged), "--public-key", str(pub), home=other, check=False)
    assert bad.returncode == 1 and "signature does not verify" in bad.stderr


def test_attestation_counts_blocked_egress_of_a_session(populated, tmp_path):
    code = ("import socket\nfrom medai.compliance import egress\negress.install_for_entry_point('probe')\n"
            "for _ in range(3):\n    try: socket.socket().connect(('203.0.113.1', 443))\n"
            "    except PermissionError: pass\nsocket.getaddrinfo('localhost', 80)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    session = [r for r in audit.iter_records() if r["event"] == "security_alert"][0]["actor"]["session"]
    body = json.loads(medai("--json", "audit", "attest", "--session", session).stdout)["statement"]
    assert body["network"]["blocked"] == {"public": 3}
    assert body["network"]["allowed"].get("loopback", 0) >= 1
    assert body["sessions"] == [session] and body["incomplete_sessions"] == []


def test_key_rotation_from_the_cli(populated, tmp_path):
    old = tmp_path / "old.pem"
    medai("audit", "keys", "export", "--out", str(old))
    rot = json.loads(medai("--json", "audit", "keys", "rotate").stdout)
    assert rot["old_key_id"] != rot["new_key_id"]
    assert json.loads(medai("--json", "audit", "verify", "--public-key", str(old)).stdout)["ok"]
    new = tmp_path / "new.pem"
    medai("audit", "keys", "export", "--out", str(new))
    assert new.read_text().count("BEGIN PUBLIC KEY") == 2
    assert (populated / "keys" / "audit-signing.key").stat().st_mode & 0o077 == 0
