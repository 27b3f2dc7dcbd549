"""Driving the browser viewport in Debian's Chromium: one home for what the viewport
test (tests/test_ui_viewport_browser.py) and the bench (bench/ui_render.py) both do.

Chromium runs headless with WebGL2 on SwiftShader (ANGLE on the CPU; Chromium refuses
it without the unsafe flag), which is what a machine without a GPU offers, from a
fresh profile; Playwright cannot download its own browser here.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT_FRAME = "/component/medai.ui.viewport"


@contextlib.contextmanager
def chromium(playwright: Any) -> Iterator[Any]:
    """A Chromium context at 1600 x 1000 on a throw-away profile."""
    profile = tempfile.mkdtemp(prefix="medai-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1600, "height": 1000},
        service_workers="block")
    try:
        yield context
    finally:
        context.close()
        shutil.rmtree(profile, ignore_errors=True)


def settle(page: Any, pause_ms: int = 150) -> None:
    """Wait until Streamlit has finished the script run the last action started."""
    page.wait_for_timeout(pause_ms)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state]:not([data-test-script-state='running'])",
                           timeout=300_000)


def viewport_frame(page: Any, timeout_s: float = 300.0) -> Any:
    """The viewport component's frame, once its page has loaded."""
    page.wait_for_selector("iframe[title*='viewport']", timeout=timeout_s * 1000)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = next((f for f in page.frames if VIEWPORT_FRAME in f.url), None)
        if frame is not None:
            return frame
        page.wait_for_timeout(50)
    raise AssertionError("the viewport frame never loaded")


def add_folder_and_select(page: Any, port: int, folder: Path, description: str) -> None:
    """Studies page: add ``folder`` and select its study (local folders are listed first,
    the demo T1 too), so that its series' Open buttons show."""
    page.goto(f"http://127.0.0.1:{port}/")
    page.get_by_role("link", name="Studies").click()
    settle(page)
    page.get_by_placeholder("/path/to/DICOM folder").fill(str(folder))
    page.get_by_role("button", name="Add").click()
    settle(page)
    try:
        page.get_by_text(description).wait_for(timeout=5_000)
    except Exception:  # noqa: BLE001 - another study is selected: pick the CT by name
        page.get_by_test_id("stSelectbox").filter(has_text="Study").click()
        page.get_by_role("option", name=re.compile(r"· CT · local")).click()
        settle(page)
    page.get_by_text(description).wait_for()


@dataclass(frozen=True)
class Opening:
    """Times of one "Open" click, in ms from the click (the page's clock): the first image
    on screen (the middle-slice previews, else the volume) and the volume drawn by NiiVue
    with every interaction live; ``timing`` is the viewport page's own breakdown."""

    first_image_ms: float
    ready_ms: float
    timing: dict[str, float]


CLICK_CLOCK = """(selector) => {
    const button = document.querySelector(selector);
    window.__medaiClickAt = null;
    button.addEventListener('click', () => { window.__medaiClickAt = performance.timeOrigin + performance.now(); },
                            {capture: true, once: true});
}"""


def open_series(page: Any, *, wait_ready: bool = True) -> tuple[Opening, Any]:
    """Click the first "Open" on the Studies page and time it to the first image and to
    the volume drawn, on one clock (``performance.timeOrigin + now`` of the page and of
    the viewport frame, both epoch milliseconds)."""
    button = "[class*='st-key-open-'] button"
    page.evaluate(CLICK_CLOCK, button)
    page.locator(button).first.click()
    frame = viewport_frame(page)
    frame.wait_for_function("() => window.__medaiViewport && window.__medaiViewport.firstImageAt !== null",
                            timeout=300_000)
    if wait_ready:
        frame.wait_for_function("() => window.__medaiViewport.readyAt !== null", timeout=300_000)
    clicked = page.evaluate("() => window.__medaiClickAt")
    state = frame.evaluate("() => ({first: window.__medaiViewport.firstImageAt, ready: window.__medaiViewport.readyAt, "
                           "timing: window.__medaiViewport.timing})")
    ready = state["ready"] - clicked if state["ready"] is not None else float("nan")
    return Opening(state["first"] - clicked, ready, state["timing"]), frame
