"""The server-rendered viewer: each slice is drawn by :func:`medai.viewer.render`
and sent as an image. Kept for browsers without WebGL2 (the interactive viewport
in :mod:`medai.ui.viewport` needs it) and as the reference the viewport's speed is
measured against (``bench/ui_render.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st
from streamlit_image_coordinates import streamlit_image_coordinates

import state
from medai import viewer, workstation


def show(series: Any, files: tuple[str, ...], display: viewer.DisplayVolume) -> None:
    """The page body of the server-rendered viewer (one image, clicks round-trip)."""
    volume = display.volume
    ss = st.session_state
    # ---------------------------------------------------------------- controls (left)
    controls, main, info = st.columns([1.3, 3, 1.2], gap="medium")

    with controls:
        view = st.segmented_control("View", viewer.VIEWS, key="view", format_func=str.capitalize,
                                    selection_mode="single", persist_state="session") or "axial"
        n = viewer.slice_count(display, view)
        slider_key = f"slice-{series.series_uid}-{view}"
        ss.setdefault(slider_key, n // 2 + 1)  # 1-based, as the clinician counts slices

        def _step(delta: int, key: str = slider_key, count: int = n) -> None:
            ss[key] = min(count, max(1, ss[key] + delta))

        index = st.slider("Slice", 1, n, key=slider_key, help="Up/Down arrow keys step one slice",
                          persist_state="session") - 1
        prev_col, next_col = st.columns(2)
        prev_col.button("Prev", icon=":material/keyboard_arrow_up:", on_click=_step, args=(-1,),
                        shortcut="Up", width="stretch", key="prev-slice")
        next_col.button("Next", icon=":material/keyboard_arrow_down:", on_click=_step, args=(1,),
                        shortcut="Down", width="stretch", key="next-slice")

        st.divider()
        presets = viewer.windows_for(volume.modality)
        if ss.window not in presets:
            ss.window = "brain" if volume.modality.upper() == "CT" and viewer.default_window(volume).name == "brain" \
                else ("abdomen" if volume.modality.upper() == "CT" else "auto")
        preset = st.selectbox("Window", presets, key="window",
                              format_func=lambda p: f"{p} {viewer.CT_PRESETS[p].width:g}/{viewer.CT_PRESETS[p].level:g}"
                              if p in viewer.CT_PRESETS else p, persist_state="session")
        if preset == "manual":
            # start from what was on screen, so switching to manual does not jump
            base = viewer.WindowLevel(*(ss.wl_manual or ss.get("wl_shown") or (1.0, 0.0)))
            lo, hi = float(volume.array.min()), float(volume.array.max())
            span = max(1.0, hi - lo)
            step = float(max(1, round(span / 200)))
            width = st.number_input("Width", min_value=1.0, max_value=max(2.0, 4 * span, base.width),
                                    value=float(base.width), step=step, key="wl_width", persist_state="session")
            level = st.number_input("Level", min_value=min(lo - span, base.level), max_value=max(hi + span, base.level),
                                    value=float(base.level), step=step, key="wl_level", persist_state="session")
            window = viewer.WindowLevel(width, level, "manual")
            ss.wl_manual = (window.width, window.level)
        else:
            window = viewer.named_window(preset, volume)
            ss.wl_manual = None
        ss.wl_shown = (window.width, window.level)
        st.caption(f"W {window.width:.0f} / L {window.level:.0f}")

        st.divider()
        result_dir = ss.result_dir
        if result_dir:
            overlay_on = st.toggle("Show segmentation", key="overlay_on", persist_state="session")
            st.slider("Opacity", 0.0, 1.0, step=0.05, key="opacity", disabled=not overlay_on, persist_state="session")
            st.radio("Draw as", ["fill", "outline"], key="overlay_mode", horizontal=True, disabled=not overlay_on,
                     persist_state="session")
        else:
            overlay_on = False
            st.caption("No segmentation yet: run a model to see an overlay.")
        mode = st.radio("Click to", ["read value", "measure distance", "draw box prompt"], key="click_mode",
                        help="A box prompt is what interactive models (LiteMedSAM) segment from")

    # ---------------------------------------------------------------- image (centre)
    shown_result = result_dir if overlay_on else None
    image = state.rendered(series.series_uid, files, view, int(index), window.width, window.level,
                           shown_result, float(ss.opacity), ss.overlay_mode, 640)
    points_here = [p for p in (viewer.screen_point(display, image, v) for v in ss.points) if p is not None]
    if ss.last_pick is not None and mode == "read value":
        mark = viewer.screen_point(display, image, ss.last_pick)
        points_here = [mark] if mark else []

    with main:
        st.markdown(f"**{series.modality} · {series.description or 'series'}** — {view} {int(index) + 1}/{n}")
        box_here = ss.box if ss.box is not None and ss.get("box_at") == (view, int(index)) else None
        dragging = mode == "draw box prompt"
        click = streamlit_image_coordinates(viewer.annotate(image, points=points_here, box=box_here),
                                            key=f"img-{view}-{'drag' if dragging else 'click'}", width="stretch",
                                            cursor="crosshair", click_and_drag=dragging)
        if st.toggle("Other planes", key="show_planes", persist_state="session",
                     help="The two other planes through the middle of the volume, with the same window and overlay"):
            others = [v for v in viewer.VIEWS if v != view]
            for column, other in zip(st.columns(2), others):
                other_index = int(ss.get(f"slice-{series.series_uid}-{other}", viewer.slice_count(display, other) // 2 + 1)) - 1
                thumb = state.rendered(series.series_uid, files, other, other_index, window.width, window.level,
                                       shown_result, float(ss.opacity), ss.overlay_mode, 320)
                column.image(viewer.annotate(thumb), caption=f"{other} {other_index + 1}/{viewer.slice_count(display, other)}")
        st.caption(workstation.NOT_FOR_DIAGNOSTIC_USE)

    if click and click.get("unix_time") != ss.get("last_click_time"):
        ss.last_click_time = click.get("unix_time")
        if dragging and "x1" in click:
            ss.box = viewer.screen_box_to_raw(image, click["x1"], click["y1"], click["x2"], click["y2"],
                                              shown_width=click.get("width"))
            ss.box_at = (view, int(index))
        elif "x" in click:
            hit = viewer.pick(display, image, click["x"], click["y"], shown_width=click.get("width"))
            ss.last_pick = hit.display_voxel
            if mode == "measure distance":
                ss.points = [*ss.points[-1:], hit.display_voxel]
        st.rerun()

    # ---------------------------------------------------------------- readouts (right)
    with info:
        point_readout(display, ss.last_pick, "Click the image to read a value.")
        st.markdown("**Distance**")
        if len(ss.points) == 2:
            a, b = (display.lps(*p) for p in ss.points)
            st.metric("Distance", f"{viewer.distance_mm(a, b):.1f} mm")
            if st.button("Clear", key="clear-points"):
                ss.points = []
                st.rerun()
        else:
            st.caption("Choose 'measure distance', then click two points.")
        if result_dir:
            try:
                entries = workstation.legend(Path(result_dir))
            except (OSError, ValueError):
                entries = []
            if entries:
                st.markdown("**Segmentation**")
                for entry in entries:
                    ml = f" **{entry.volume_ml:.1f} mL**" if entry.volume_ml is not None else ""
                    st.markdown(f"{state.swatch(entry.colour)}{entry.name}:{ml}", unsafe_allow_html=True)
        voxel_caption(display)


def point_readout(display: viewer.DisplayVolume, pick: tuple[int, int, int] | None, empty: str) -> None:
    """The picked point's value, LPS position and source voxel (both viewers show it
    the same way, computed by medai.viewer from the display voxel), or ``empty``."""
    st.markdown("**Point**")
    if pick is None:
        st.caption(empty)
        return
    x, y, z = pick
    i, j, k = display.source_index(x, y, z)
    lps = display.lps(x, y, z)
    st.metric("HU" if display.volume.modality.upper() == "CT" else "intensity", f"{display.value(x, y, z):.0f}")
    st.caption(f"LPS ({lps[0]:.1f}, {lps[1]:.1f}, {lps[2]:.1f}) mm  \nvoxel i={i} j={j} k={k}")


def voxel_caption(display: viewer.DisplayVolume) -> None:
    sx, sy, sz = display.spacing
    st.caption(f"Voxel {sx:.2f} × {sy:.2f} × {sz:.2f} mm · {display.shape[2]}×{display.shape[1]}×{display.shape[0]}")
