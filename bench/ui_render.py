"""Viewer responsiveness: one slice step in the browser viewport against today's
server-rendered step, both measured in the same run, in alternating rounds, in
Debian's Chromium (headless, WebGL2 through SwiftShader) against one `medai ui`.

* viewport step: a wheel event over the axial plane to the finished frame, timed
  inside the page (``performance.now()`` around NiiVue's draw, which ends with
  ``gl.finish()``), and to the next animation frame (the frame handed to the
  compositor);
* server step (the reference): the "Simple (server images)" viewer in a second tab,
  the Down arrow key to the rerun that shows the next slice finished (render,
  annotate, PNG, websocket), timed from Python around Playwright;
* where the server step's time goes: ``medai.viewer.render`` plus annotate + PNG
  encode of one slice, in this process;
* first image: from the click on "Open" (the Studies page's clock) to the first image
  on screen (the middle-slice previews; the viewport's clock; both epoch ms) and to the
  volume drawn with every interaction live. The first opening of the run clicks "Open"
  as soon as the study is listed (nothing read ahead, nothing cached: the reference);
  the next ``--opens`` each open the series in a fresh tab (a new Streamlit session)
  after the selected study was read ahead, as a clinician's choosing of the series allows.

Run: ``.venv/bin/python bench/ui_render.py [SERIES_DIR] [--rounds 4] [--steps 27] [--opens 5]``
(default series: the head CT atlas of tests/viewer_data.py, 179 slices; needs
scripts/fetch-test-data, Chromium and the [test] extra for Playwright).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

def _stats(values: list[float]) -> str:
    v = sorted(values)
    return f"median {statistics.median(v):7.1f} ms  p95 {v[int(0.95 * (len(v) - 1))]:7.1f} ms  (n={len(v)})"


def _read_ahead(home: Path, shape: tuple[int, int, int], timeout_s: float = 300) -> None:
    """Wait until the server's viewer cache holds a series of ``shape`` (read ahead)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for meta in (home / "cache" / "viewer").glob("*.json"):
            try:
                if tuple(json.loads(meta.read_text())["shape"]) == shape:
                    return
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.1)
    raise TimeoutError("the selected study was not read ahead")


def _server_viewer(page, port: int, folder: Path) -> None:
    """The series in the "Simple (server images)" viewer of ``page`` (its own session)."""
    from viewer_data import DESCRIPTION
    from viewport_browser import add_folder_and_select, open_series, settle

    add_folder_and_select(page, port, folder, DESCRIPTION)
    open_series(page, wait_ready=False)
    page.get_by_test_id("stButtonGroup").get_by_text("Simple (server images)").click()
    settle(page)
    page.wait_for_selector("iframe[title*='streamlit_image_coordinates']")


VIEWPORT_STEPS = """async (n) => {
    const S = window.__medaiViewport, stage = document.getElementById('stage');
    const r = document.getElementById('gl').getBoundingClientRect();
    const t = S.api.tiles()[0].ltwh;
    const at = {clientX: r.left + t[0] + t[2] / 2, clientY: r.top + t[1] + t[3] / 2, bubbles: true, cancelable: true};
    const drawn = [], framed = [];
    for (let i = 0; i < n; i++) {
        const dy = (Math.floor(i / 40) % 2 === 0) ? -100 : 100;  // back and forth inside the volume
        const before = S.steps.length, t0 = performance.now();
        stage.dispatchEvent(new WheelEvent('wheel', {...at, deltaY: dy}));
        await new Promise((resolve) => requestAnimationFrame(resolve));
        framed.push(performance.now() - t0);
        drawn.push(S.steps[before].ms);
    }
    return {drawn, framed};
}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", nargs="?", help="DICOM series folder (default: the head CT atlas)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds (viewport, then server)")
    parser.add_argument("--steps", type=int, default=27, help="viewport steps per round")
    parser.add_argument("--server-steps", type=int, default=5, help="server-rendered steps per round")
    parser.add_argument("--opens", type=int, default=5, help="openings of the read-ahead series, each in a new tab")
    args = parser.parse_args()

    from PIL import Image
    from playwright.sync_api import sync_playwright
    from test_ui_server import running_ui
    from viewer_data import DESCRIPTION, head_ct_series
    from viewport_browser import add_folder_and_select, chromium, open_series, settle

    from medai import viewer
    from medai.dicom.volume import load_series

    folder = Path(args.series) if args.series else head_ct_series(Path(tempfile.mkdtemp(prefix="bench-ct-")))
    volume = load_series(folder)
    display = viewer.to_display(volume)
    window = viewer.default_window(volume)
    n = viewer.slice_count(display, "axial")
    render_ms, encode_ms = [], []
    for i in range(20):
        t0 = time.perf_counter()
        image = viewer.render(display, "axial", (n // 2 + i) % n, window, target=640)
        t1 = time.perf_counter()
        Image.fromarray(viewer.annotate(image)).save(io.BytesIO(), format="PNG", compress_level=1)
        t2 = time.perf_counter()
        render_ms.append((t1 - t0) * 1000)
        encode_ms.append((t2 - t1) * 1000)
    print(f"series {folder}: {volume.shape} (k, j, i), modality {volume.modality}")
    print(f"server work per step in this process: render {statistics.median(render_ms):.1f} ms + "
          f"annotate/PNG {statistics.median(encode_ms):.1f} ms (median of 20)")

    home = Path(tempfile.mkdtemp(prefix="bench-ui-home-"))
    drawn: list[float] = []
    framed: list[float] = []
    server: list[float] = []
    with running_ui(home) as (_proc, port), sync_playwright() as p, chromium(p) as context:
        # the reference: Open clicked as soon as the study is listed, nothing read ahead or cached
        fast = context.new_page()
        fast.set_default_timeout(300_000)
        add_folder_and_select(fast, port, folder, DESCRIPTION)
        cold, frame = open_series(fast)
        firsts, readies = [], []
        for _ in range(args.opens):
            tab = context.new_page()
            tab.bring_to_front()  # a background tab draws no frames
            tab.set_default_timeout(300_000)
            add_folder_and_select(tab, port, folder, DESCRIPTION)
            _read_ahead(home, display.shape)
            opening, _ = open_series(tab)
            firsts.append(opening.first_image_ms)
            readies.append(opening.ready_ms)
            tab.close()
        print(f"first image, Open click to the middle slices on screen: Open clicked at once (reference) "
              f"{cold.first_image_ms:.0f} ms; read ahead: median {statistics.median(firsts):.0f} ms "
              f"(n={len(firsts)}: {', '.join(f'{v:.0f}' for v in firsts)})")
        print(f"volume drawn, every interaction live: cold {cold.ready_ms:.0f} ms; read ahead: median "
              f"{statistics.median(readies):.0f} ms; viewport page timing (cold) {cold.timing}")
        slow = context.new_page()
        slow.set_default_timeout(300_000)
        _server_viewer(slow, port, folder)
        for _ in range(args.rounds):
            fast.bring_to_front()
            result = frame.evaluate(VIEWPORT_STEPS, args.steps)
            drawn += result["drawn"]
            framed += result["framed"]
            slow.bring_to_front()
            slow.mouse.click(1500, 960)  # keys go to the page, not a widget
            for _ in range(args.server_steps):
                shown = slow.get_by_text(re.compile(r"axial \d+/\d+")).inner_text()
                index, count = (int(v) for v in re.search(r"axial (\d+)/(\d+)", shown).groups())
                key, expected = ("ArrowDown", index + 1) if index < count else ("ArrowUp", index - 1)
                t0 = time.perf_counter()
                slow.keyboard.press(key)
                slow.get_by_text(re.compile(rf"axial {expected}/{count}")).wait_for()
                settle(slow)
                server.append((time.perf_counter() - t0) * 1000)
    print(f"viewport step, event to drawn frame (in page): {_stats(drawn)}")
    print(f"viewport step, event to next animation frame:   {_stats(framed)}")
    print(f"server-rendered step (reference), key to shown:  {_stats(server)}")
    print(f"ratio (median server step / median viewport drawn step): "
          f"{statistics.median(server) / statistics.median(drawn):.0f}x; "
          f"vs the next animation frame: {statistics.median(server) / statistics.median(framed):.0f}x")
    print(f"alternating rounds: {args.rounds} x ({args.steps} viewport steps, {args.server_steps} server steps); "
          f"stepping {len(drawn)} slices in the page took {sum(framed) / 1000:.1f} s, "
          f"the same number at the server's median would take {statistics.median(server) * len(drawn) / 1000:.0f} s")


if __name__ == "__main__":
    main()
