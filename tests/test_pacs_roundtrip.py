"""Unattended round trip through a real Orthanc (temp config, loopback ports):
StableStudy on its changes feed -> ``medai pacs follow-orthanc`` -> the real
models -> SEG uploaded back, visible in Orthanc. (The storescu -> ``medai pacs
listen`` -> model -> storescp round trip is test_pacs_robustness, run under a
SIGKILL.)

The study is the bundled T1 demo (real Colin27 pixels, synthetic headers, JPEG-LS).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest

from pacs_peers import (MEDAI, T1_ROUTE, demo_t1, free_port, medai_json, needs_dcmtk, storescu,
                        wait_port, wait_until)

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def t1_study() -> list[Path]:
    return demo_t1()


def _check_seg(path: Path, study_uid: str) -> None:
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.StudyInstanceUID == study_uid
    assert seg.Modality == "SEG"
    assert seg.SegmentSequence[0].SegmentLabel


def _job_models(home: Path) -> list[str]:
    from medai.pacs.queue import PacsDB

    return [r[0] for r in PacsDB(home / "pacs" / "queue.sqlite3").rows("SELECT model_id FROM jobs")]


class Orthanc:
    """A real Orthanc on loopback ports with a temp config and storage."""

    def __init__(self, root: Path, **extra: object) -> None:
        self.http, self.dicom = free_port(), free_port()
        storage = root / "storage"
        storage.mkdir(parents=True)
        cfg = {"Name": "medai-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
               "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC",
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StableAge": 2,
               "DicomCheckCalledAet": False, "Plugins": [], "HttpServerEnabled": True, **extra}
        (root / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(root / "orthanc.log", "w")
        self.proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=self.log, stderr=self.log)
        wait_port(self.http, 60)
        self.url = f"http://127.0.0.1:{self.http}"

    def get(self, path: str):  # type: ignore[no-untyped-def]
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: object):  # type: ignore[no-untyped-def]
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read() or b"null")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc not installed")
def test_orthanc_changes_feed_round_trip(t1_study: list[Path], medai_home: Path, tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    env = {**os.environ, "MEDAI_HOME": str(medai_home), **T1_ROUTE}
    follower = subprocess.Popen([*MEDAI, "-v", "pacs", "follow-orthanc", "--url", orthanc.url,
                                 "--send-policy", "immediate"],
                                env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / "follow.log", "w"),
                                text=True)
    try:
        assert json.loads(follower.stdout.readline())["event"] == "following"  # type: ignore[union-attr]
        # The study reaches Orthanc by DICOM, as from a modality.
        sent = storescu(orthanc.dicom, t1_study, aec="ORTHANC", jpeg_ls=True)
        assert sent.returncode == 0, sent.stderr[-500:]

        def seg_series() -> list[dict]:
            studies = orthanc.get("/studies")
            if not studies:
                return []
            series = orthanc.get(f"/studies/{studies[0]}/series")
            return [s for s in series if s["MainDicomTags"].get("Modality") == "SEG"]

        # Routed to brain-extraction (default routing by the cards is tested in
        # test_pacs_queue); the job runs once and each result is uploaded once.
        def settled() -> bool:
            st = medai_json(medai_home, "pacs", "status")
            return bool(st["jobs"]) and st["queue_depth"] == 0 and set(st["jobs"]) == {"done"}

        wait_until(lambda: len(seg_series()) >= 1 and settled(), timeout=300, interval=1.0,
                   what="results uploaded into Orthanc")
        instance = orthanc.get(f"/series/{seg_series()[0]['ID']}/instances")[0]
        with urllib.request.urlopen(f"{orthanc.url}/instances/{instance['ID']}/file", timeout=30) as resp:
            (tmp_path / "seg.dcm").write_bytes(resp.read())
        study_uid = str(pydicom.dcmread(t1_study[0], stop_before_pixels=True).StudyInstanceUID)
        _check_seg(tmp_path / "seg.dcm", study_uid)
        status = medai_json(medai_home, "pacs", "status")
        sent = status["transfers"]["sent"]
        assert status["transfers"] == {"sent": sent} and _job_models(medai_home) == ["brain-extraction"]
        assert len(orthanc.get("/instances")) == len(t1_study) + sent
        # Our uploads make Orthanc announce the study as stable again: no second run.
        time.sleep(6)
        again = medai_json(medai_home, "pacs", "status")
        assert again["jobs"] == status["jobs"] and again["transfers"] == {"sent": sent}
        assert len(orthanc.get("/instances")) == len(t1_study) + sent
    finally:
        follower.send_signal(signal.SIGTERM)
        code = follower.wait(60)
        orthanc.stop()
    assert code == 0, (tmp_path / "follow.log").read_text()[-2000:]


@pytest.mark.skipif(shutil.which("Orthanc") is None, reason="Orthanc not installed")
def test_orthanc_sends_a_study_to_medai_pacs_listen(t1_study: list[Path], medai_home: Path, tmp_path: Path) -> None:
    """Orthanc as the sending PACS (its own DICOM stack, C-STORE SCU) into medai's
    acceptor: the JPEG-LS study arrives as sent, every instance byte-identical in
    its pixel data, and the association is audited."""
    from pacs_peers import Listener, pixel_sha, stored_files

    lst = Listener(medai_home, "--no-worker", "--stable-seconds", "3600", "--allow-caller", "ORTHANC").start()
    orthanc = Orthanc(tmp_path / "orthanc", DicomModalities={"medai": ["MEDAI", "127.0.0.1", lst.port]})
    try:
        assert storescu(orthanc.dicom, t1_study, aec="ORTHANC", jpeg_ls=True).returncode == 0
        (study_id,) = orthanc.get("/studies")
        orthanc.post("/modalities/medai/store", {"Resources": [study_id], "Synchronous": True})
        stored = stored_files(medai_home)
        assert len(stored) == len(t1_study)
        for f in t1_study:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            back = pydicom.dcmread(stored[str(ds.SOPInstanceUID)], stop_before_pixels=True)
            assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # kept, not transcoded
            assert pixel_sha(stored[str(ds.SOPInstanceUID)]) == pixel_sha(f)
    finally:
        orthanc.stop()
        assert lst.terminate() == 0
    from medai.compliance import audit

    transferred = [r for r in audit.iter_records(medai_home / "audit" / "trail.jsonl")
                   if r["event"] == "instances_transferred"]
    assert transferred and transferred[0]["detail"]["calling_ae"] == "ORTHANC"
    assert sum(r["detail"]["count"] for r in transferred) == len(t1_study)
