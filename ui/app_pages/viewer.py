"""Viewer: the interactive browser viewport (1x3 MPR, W/L, zoom, pan, cine, measurements,
label overlay, box prompt), with readouts mapped back to the series by medai.viewer."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import simple_viewer
import state
from medai import viewer, workstation
from medai.ui.viewport import viewport

study, series = state.selected()
if series is None:
    st.title("Viewer")
    st.info("Open a series from the Studies page first.")
    st.page_link("app_pages/studies.py", label="Go to Studies", icon=":material/folder_open:")
    st.stop()

files = tuple(str(f) for f in series.files)
accessed = st.session_state.setdefault("accessed", set())


def _display() -> viewer.DisplayVolume:
    """The series in memory (read-outs, the simple viewer); its failure stops the page."""
    try:
        return state.loaded(series.series_uid, files)
    except Exception as exc:  # noqa: BLE001 - the reason is shown, the page survives
        st.error(f"Cannot show this series: {exc}")
        st.stop()
        raise


ss = st.session_state
mode = ss.get("viewport_mode") or "browser"
try:
    if series.series_uid not in accessed:
        workstation.audit("instances_accessed", study=study, series=series, detail={"action": "view"})
        accessed.add(series.series_uid)
    # what the viewport needs, from the viewer cache when the series was opened or read
    # ahead before: the first image does not wait for its DICOM files
    shown = state.viewport_series(series.series_uid, files, series) if mode == "browser" else None
except Exception as exc:  # noqa: BLE001 - the reason is shown, the page survives
    st.title("Viewer")
    st.error(f"Cannot show this series: {exc}")
    st.stop()

mode = st.segmented_control("Viewport", ["browser", "server"], key="viewport_mode", selection_mode="single",
                            format_func={"browser": "Interactive", "server": "Simple (server images)"}.get,
                            help="Interactive runs in this browser (needs WebGL2); Simple draws each slice "
                                 "on the server", persist_state="session") or "browser"
if mode == "server":
    simple_viewer.show(series, files, _display())
    st.stop()
if shown is None:  # switched to the interactive viewport in this run
    shown = state.viewport_series(series.series_uid, files, series)

result_dir = ss.result_dir
main, info = st.columns([4.4, 1.2], gap="small")

with info:
    overlay_on = bool(result_dir) and st.toggle("Show segmentation", key="overlay_on", persist_state="session")
    entries = []
    if result_dir:
        try:
            entries = workstation.legend(Path(result_dir))
        except (OSError, ValueError):
            entries = []

labels = state.viewport_labels(result_dir, series.series_uid, files) if overlay_on else None
with main:
    action = viewport(
        volume=shown.volume_nifti, labels=labels, window=shown.window, unit=shown.unit, presets=shown.presets,
        corners=workstation.corner_text(study, series, thickness_mm=shown.thickness_mm), previews=shown.previews,
        label_entries=[{"value": e.value, "name": e.name, "colour": list(e.colour)} for e in entries] if overlay_on else [],
        height=600, key=f"viewport-{workstation.key_for(series.series_uid)}")
    # after the viewport, so the images are on their way while the models are matched
    hint_key = f"viewer-hint-{workstation.key_for(series.series_uid)}"  # once per series
    if hint_key not in ss:
        ss[hint_key] = workstation.viewer_hint(workstation.models_for(series), series.modality)
    if ss[hint_key]:
        st.info(ss[hint_key], icon=":material/crop_free:")
    st.caption(workstation.NOT_FOR_DIAGNOSTIC_USE)

# the series in memory for the read-outs: after the viewport, which needs only the cache
display = _display()

if action and action.get("seq") != ss.viewport_seq:
    ss.viewport_seq = action.get("seq")
    event = action.get("event")
    try:
        if event == "pick":
            ss.last_pick = viewer.display_voxel_from_ras(display, action["vox"])
        elif event == "distance":
            pair = (viewer.display_voxel_from_ras(display, action["a"]),
                    viewer.display_voxel_from_ras(display, action["b"]))
            ss.measures = [*ss.measures[-7:], pair]
        elif event == "box":
            (x0, y0, z), (x1, y1, _) = (viewer.display_voxel_from_ras(display, action[k]) for k in ("a", "b"))
            ss.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            ss.box_at = ("axial", z)
    except (KeyError, TypeError, ValueError):
        st.warning("The viewport sent a point outside the volume; it was ignored.")

with info:
    simple_viewer.point_readout(display, ss.last_pick, "Choose Probe above the image and click a point to read its value here.")
    if ss.measures:
        st.markdown("**Distances**")
        for n, (a, b) in enumerate(ss.measures, 1):
            st.caption(f"Distance {n}: {viewer.distance_mm(display.lps(*a), display.lps(*b)):.1f} mm")
    if ss.box is not None and ss.get("box_at") and ss.box_at[0] == "axial":
        st.markdown("**Box prompt**")
        st.caption(f"On axial slice {ss.box_at[1] + 1}: {workstation.box_extent_text(display, ss.box)}")
        st.page_link("app_pages/run.py", label="Segment it on Run model", icon=":material/play_arrow:")
    if entries and overlay_on:
        st.markdown("**Segmentation**")
        card = workstation.card_for_result(Path(result_dir))
        for entry in entries:
            text = workstation.volume_text(entry.name, entry.volume_ml, card)
            st.markdown(f"{state.swatch(entry.colour)}{entry.name}: {text}", unsafe_allow_html=True)
    elif not result_dir:
        st.caption("No segmentation yet: run a model to see an overlay.")
    simple_viewer.voxel_caption(display)
