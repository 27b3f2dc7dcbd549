"""Viewer responsiveness: what one slice step costs, against references measured in
the same run on the same series.

* render: :func:`medai.viewer.render` of one slice (window, square pixels, overlay)
  from the display volume the page keeps in memory, per view;
* annotate + PNG: burning in the labels and encoding the PNG the browser receives;
* reference: re-reading the series from DICOM (``load_series``), what a page that did
  not cache the volume would pay on every interaction.

Run: ``.venv/bin/python bench/ui_render.py [SERIES_DIR] [--repeats 20]`` (default: the
bundled demo T1, 181 x 217 x 181).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("series", nargs="?", help="DICOM series folder (default: bundled demo T1)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--target", type=int, default=640, help="screen size of the longer side, pixels")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from medai import viewer, workstation
    from medai.dicom.volume import load_series

    folder = Path(args.series) if args.series else workstation.demo_dir()
    if folder is None:
        raise SystemExit("no series given and no bundled demo study")
    reload_s = _median_seconds(lambda: load_series(folder), max(3, args.repeats // 5))
    volume = load_series(folder)
    display = viewer.to_display(volume)
    window = viewer.default_window(volume)
    labels = display.reorient_labels((volume.array > np.percentile(volume.array, 60)).astype(np.uint8))
    print(f"series {folder} shape {volume.shape} (k, j, i); reload from DICOM: {reload_s * 1000:.0f} ms")
    for view in viewer.VIEWS:
        n = viewer.slice_count(display, view)
        i = iter(range(10**9))
        render_s = _median_seconds(lambda: viewer.render(display, view, next(i) % n, window, labels=labels,
                                                         target=args.target), args.repeats)
        image = viewer.render(display, view, n // 2, window, labels=labels, target=args.target)

        def encode() -> None:
            Image.fromarray(viewer.annotate(image)).save(io.BytesIO(), format="PNG", compress_level=0)

        encode_s = _median_seconds(encode, args.repeats)
        step = render_s + encode_s
        print(f"{view:9s} render {render_s * 1000:6.1f} ms + annotate/PNG {encode_s * 1000:5.1f} ms "
              f"= {step * 1000:6.1f} ms per step; reload/step = {reload_s / step:5.1f}x")


if __name__ == "__main__":
    main()
