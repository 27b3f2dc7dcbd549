"""The PACS hook and the clinician share one workstation, in Debian's Chromium (headless):

dcmtk ``storescu`` pushes the real demo T1 into ``medai pacs listen``; with nobody clicking,
the study appears in the Worklist with its result once it is stable and the model has run;
opening it shows the stored overlay without running the model again (the trail holds one
model run for that series). With ``pacs.send_policy = after-review``, nothing leaves before a
clinician looks: Accept sends the SEG and a VERIFIED SR to a dcmtk ``storescp`` (both
dciodvfy-clean), Reject on a second study sends nothing, and both reviews are audited.
(``immediate`` sending without review is test_pacs_robustness.py's round trip.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest

import triage_studies as ts
from medai.compliance import audit
from pacs_peers import Listener, StoreSCP, demo_t1, medai_json, needs_dcmtk, storescu, wait_until
from tests.test_ui_browser import CHROMIUM, CHROMIUM_FLAGS, settle
from tests.test_ui_server import running_ui

pytestmark = [pytest.mark.network, pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")]

DCIODVFY = "/usr/bin/dciodvfy"
#: The site's settings, read by the listener and the UI alike. Brain extraction measures the brain
#: volume, so its result is a SEG and an SR (volumetry would too, at several times the cost).
SETTINGS = """[pacs]
destination = "{destination}"
stable_seconds = 2

[[pacs.routes]]
model = "brain-extraction"
modality = ["MR"]
"""


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _model_runs(series_uid: str) -> list[dict]:
    return [r for r in audit.iter_records() if r["event"] == "model_run"
            and any(p.get("series_uid") == series_uid for p in r.get("participants", ()))]


def _review(page, action: str) -> None:
    """Open the line waiting for review in the review panel (the list refreshes every 3 s and may
    take a click while it redraws, as any live list: click again until the panel is there),
    then press ``action`` in the panel, which does not refresh."""
    from playwright.sync_api import expect

    panel = page.locator(".st-key-wl-review")
    for _ in range(10):
        page.locator("[class*='st-key-wl-item-']").filter(has_text="to review").get_by_role(
            "button", name="Review").click()
        try:
            expect(panel).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            continue
    panel.get_by_role("button", name=action).click()


@pytest.mark.timeout(1200)
def test_pushed_study_is_worked_listed_reviewed_and_sent(medai_home: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)
    first = demo_t1()
    second = sorted(ts.copy_study(first[0].parent, tmp_path / "second", "reject-me").glob("*.dcm"))
    first_series = str(pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID)
    second_series = str(pydicom.dcmread(second[0], stop_before_pixels=True).SeriesInstanceUID)
    dest = StoreSCP.start(tmp_path / "dest")
    (medai_home / "medai.toml").write_text(SETTINGS.format(destination=dest.address))
    lst = Listener(medai_home).start()
    seen: list[str] = []
    try:
        with running_ui(medai_home) as (_proc, port), sync_playwright() as p:
            profile = tempfile.mkdtemp(prefix="medai-chromium-")
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1600, "height": 1000}, service_workers="block")
            try:
                page = context.new_page()
                page.set_default_timeout(60_000)
                page.on("request", lambda request: seen.append(request.url))
                page.on("websocket", lambda ws: seen.append(ws.url))
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.get_by_text("No results yet")).to_be_visible()

                # The PACS pushes the study; nobody touches the page.
                assert storescu(lst.port, first, jpeg_ls=True).returncode == 0
                expect(page.get_by_text(re.compile(r"brain-extraction"))).to_be_visible(timeout=900_000)
                expect(page.get_by_text("to review", exact=True).first).to_be_visible()
                assert medai_json(medai_home, "pacs", "status")["transfers"] == {}  # held for review
                assert dest.files() == []

                # Open it: the Viewer with the stored overlay, the model not run again.
                page.locator("[class*='st-key-open-run-']").get_by_role("button", name="Open").first.click()
                settle(page)
                expect(page.get_by_text(re.compile(r"\d+(\.\d+)? mL")).first).to_be_visible()
                assert len(_model_runs(first_series)) == 1

                # Accept: SEG and a VERIFIED SR reach the destination.
                # the Worklist is the first page; the Viewer's series download may still be in flight,
                # so wait for the document, not for every resource of the page left behind
                page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
                settle(page)
                _review(page, "Accept and send")
                expect(page.get_by_text("sent", exact=True).first).to_be_visible(timeout=300_000)
                wait_until(lambda: len(dest.files()) >= 2, timeout=60, what="SEG and SR at the destination")

                # A second study arrives and is rejected: nothing of it is sent.
                sent_before = {f.name for f in dest.files()}
                assert storescu(lst.port, second, jpeg_ls=True).returncode == 0
                expect(page.get_by_text("to review", exact=True).first).to_be_visible(timeout=900_000)
                _review(page, "Reject")
                expect(page.get_by_text("rejected", exact=True).first).to_be_visible(timeout=300_000)
            finally:
                context.close()
                shutil.rmtree(profile, ignore_errors=True)
    finally:
        lst.terminate()
        received = dest.files()
        dest.stop()
    assert all(url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:")) or url.startswith(("data:", "blob:"))
               for url in seen), [u for u in seen if "127.0.0.1" not in u][:5]

    datasets = {f: pydicom.dcmread(f) for f in received}
    assert sorted(str(ds.Modality) for ds in datasets.values()) == ["SEG", "SR"]
    assert {f.name for f in received} == sent_before  # nothing of the rejected study
    for path, ds in datasets.items():
        assert not _dciodvfy_errors(path), _dciodvfy_errors(path)
        refs = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])]
        refs += [str(s.SeriesInstanceUID) for e in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                 for s in e.ReferencedSeriesSequence]
        assert second_series not in refs and first_series in refs, path
    (sr,) = [ds for ds in datasets.values() if ds.Modality == "SR"]
    assert sr.VerificationFlag == "VERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert str(sr.VerifyingObserverSequence[0].VerifyingObserverName)
    assert sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]

    reviews = [r for r in audit.iter_records() if r["event"] == "result_review"]
    assert [r["detail"]["decision"] for r in reviews] == ["accepted", "rejected"]
    assert [p.get("series_uid") for r in reviews for p in r["participants"] if p.get("series_uid")] == \
        [first_series, second_series]
    assert len(_model_runs(first_series)) == 1 and len(_model_runs(second_series)) == 1
