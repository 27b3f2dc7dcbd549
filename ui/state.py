"""Session state and caches of the page (Streamlit glue only; logic lives in
:mod:`medai.workstation` and :mod:`medai.viewer`).

Volumes are cached per series (a few at most, they are large); rendered slices
are cached per (series, view, slice, window, overlay settings) so scrolling back
and forth never re-reads DICOM nor re-renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from medai import viewer, viewer_cache, workstation
from medai.dicom.index import SeriesEntry

DEFAULTS: dict[str, Any] = {
    "folders": [],  # local folders the clinician added (strings)
    "study_uid": None,
    "series_uid": None,
    "view": "axial",
    "slices": {},  # view -> index, per series
    "window": None,  # preset name
    "wl_manual": None,  # (width, level)
    "overlay_on": True,
    "opacity": 0.4,
    "overlay_mode": "fill",
    "points": [],  # LPS points picked for measurement
    "last_pick": None,
    "result_dir": None,  # str path of the run shown as overlay
    "run_id": None,  # results-store id of that run
    "box": None,  # (col0, row0, col1, row1) prompt, raw-slice pixels
    "box_at": None,  # (view, slice index) the box was drawn on
    "viewport_mode": "browser",  # the interactive browser viewport, or server-rendered images
    "viewport_seq": 0,  # last viewport action handled
    "measures": [],  # distances measured in the viewport: (display voxel a, display voxel b)
}


def init() -> None:
    """Initialise this session's state once."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value if not isinstance(value, (list, dict)) else type(value)())


@st.cache_resource
def favicon() -> Any:
    """A small local page icon (an axial ring on dark), so the browser fetches nothing remote."""
    from PIL import Image, ImageDraw

    icon = Image.new("RGB", (64, 64), (20, 24, 32))
    draw = ImageDraw.Draw(icon)
    draw.ellipse((10, 6, 54, 58), outline=(235, 235, 235), width=5)
    draw.ellipse((22, 20, 42, 44), fill=(230, 159, 0))
    return icon


def sources() -> list[tuple[Path, str]]:
    return [*((Path(f), "local") for f in st.session_state.folders), *workstation.default_sources()]


@st.cache_data(max_entries=16, show_spinner="Indexing DICOM headers…", ttl=600)
def studies(source_key: tuple[tuple[str, str], ...]) -> tuple[list[workstation.StudyRow], list[tuple[str, str]]]:
    return workstation.catalog([(Path(p), s) for p, s in source_key])


def current_studies() -> tuple[list[workstation.StudyRow], list[tuple[str, str]]]:
    return studies(tuple((str(p), s) for p, s in sources()))


def selected() -> tuple[workstation.StudyRow | None, SeriesEntry | None]:
    """The open study and series, if any."""
    rows, _ = current_studies()
    study = next((r for r in rows if r.study_uid == st.session_state.study_uid), None)
    if study is None:
        return None, None
    series = next((s for s in study.series if s.series_uid == st.session_state.series_uid), None)
    return study, series


@st.cache_resource(max_entries=3, show_spinner="Loading series…")
def loaded(series_uid: str, files: tuple[str, ...]) -> viewer.DisplayVolume:
    """The series as a display volume (kept in memory for the session's scrolling); the
    one read ahead when the study was selected, when there is one."""
    return viewer_cache.display(series_uid, files)


def prefetch(study: workstation.StudyRow) -> None:
    """Start reading the selected study's first image series ahead (background thread),
    so that opening one shows it at once (:func:`medai.viewer_cache.prefetch`)."""
    viewer_cache.prefetch(study, study.series)


@st.cache_resource(max_entries=4, show_spinner=False)
def overlay(result_dir: str, series_uid: str, files: tuple[str, ...]) -> np.ndarray:
    """A run's label map in display layout."""
    display = loaded(series_uid, files)
    labels = workstation.load_label_map(Path(result_dir), display.source_shape)
    return display.reorient_labels(labels)


@st.cache_resource(max_entries=3, show_spinner="Preparing the series for the browser…")
def viewport_series(series_uid: str, files: tuple[str, ...], _series: SeriesEntry) -> viewer_cache.CachedSeries:
    """The series as the browser viewport receives it (gzipped NIfTI, window, presets,
    previews), from the on-disk viewer cache without reading DICOM when it is there."""
    return viewer_cache.entry(_series, lambda: loaded(series_uid, files))


@st.cache_resource(max_entries=4, show_spinner=False)
def viewport_labels(result_dir: str, series_uid: str, files: tuple[str, ...]) -> bytes:
    """A run's label map on the viewport's grid (gzipped NIfTI, uint8)."""
    display = loaded(series_uid, files)
    return viewer.nifti_gz(viewer.ras_grid(display, overlay(result_dir, series_uid, files)), labels=True)


@st.cache_data(max_entries=600, show_spinner=False)
def rendered(series_uid: str, files: tuple[str, ...], view: str, index: int, width: float, level: float,
             result_dir: str | None, opacity: float, mode: str, target: int) -> viewer.SliceImage:
    display = loaded(series_uid, files)
    labels = overlay(result_dir, series_uid, files) if result_dir else None
    colours = {e.value: e.colour for e in workstation.legend(Path(result_dir))} if result_dir else None
    return viewer.render(display, view, index, viewer.WindowLevel(width, level), labels=labels,  # type: ignore[arg-type]
                         opacity=opacity, mode=mode, target=target, colours=colours)  # type: ignore[arg-type]


def swatch(colour: tuple[int, int, int]) -> str:
    """A small coloured square for a legend line (inline HTML, nothing fetched)."""
    r, g, b = colour
    return (f"<span style='display:inline-block;width:0.8em;height:0.8em;background:rgb({r},{g},{b});"
            "border-radius:2px;margin-right:0.4em;vertical-align:middle'></span>")


def open_series(study_uid: str, series_uid: str) -> None:
    """Make a series current; views start in the middle of the volume."""
    if st.session_state.series_uid != series_uid:
        st.session_state.slices = {}
        st.session_state.points = []
        st.session_state.measures = []
        st.session_state.last_pick = None
        st.session_state.result_dir = None
        st.session_state.run_id = None
        st.session_state.window = None
        st.session_state.box = None
    st.session_state.study_uid = study_uid
    st.session_state.series_uid = series_uid


def show_run(run: Any) -> None:
    """Make a stored run the overlay of the open series."""
    st.session_state.result_dir = str(run.folder)
    st.session_state.run_id = run.run_id
    st.session_state.overlay_on = True


def open_work_item(item: workstation.WorkItem) -> bool:
    """Open a worklist item's series (its folder joins the listed sources when it is not
    already one of them) with the stored run as overlay; False when its source is gone."""
    if not item.series_uid or not item.run.sources:
        return False
    folder = str(Path(item.run.sources[0]).parent)
    known = [str(p) for p, _ in sources()]
    if not any(folder == k or folder.startswith(k.rstrip("/") + "/") for k in known):
        st.session_state.folders = [*st.session_state.folders, folder]
        studies.clear()
    open_series(item.study_uid, item.series_uid)
    show_run(item.run)
    return True


REVIEW_LABELS = {"new": "to review", "accepted": "accepted", "rejected": "rejected", "sent": "sent",
                 "send_failed": "send failed"}


def review_panel(run: Any, key: str) -> None:
    """Accept / reject (with a comment) and send or retry, for one stored run."""
    from medai import config, review

    st.markdown(f"**Review:** {REVIEW_LABELS.get(run.review, run.review)}"
                + (f" by {run.reviewer}" if run.reviewer else "")
                + (f" — {run.send_error}" if run.send_error else ""))
    if not run.done:
        return
    destination = run.destination or config.get("pacs.destination")
    if run.review == "new":
        comment = st.text_input("Comment (optional)", key=f"comment-{key}")
        accept_col, reject_col = st.columns(2)
        label = "Accept and send" if destination else "Accept"
        if accept_col.button(label, type="primary", icon=":material/check:", key=f"accept-{key}"):
            try:
                review.accept(run.run_id, comment=comment)
            except Exception as exc:  # noqa: BLE001 - shown, page survives
                st.error(str(exc))
            else:
                st.session_state.wl_focus = None  # decided: the Worklist refreshes again
                st.rerun()
        if reject_col.button("Reject", icon=":material/close:", key=f"reject-{key}"):
            try:
                review.reject(run.run_id, comment=comment)
            except Exception as exc:  # noqa: BLE001
                st.error(str(exc))
            else:
                st.session_state.wl_focus = None  # decided: the Worklist refreshes again
                st.rerun()
    elif run.review in ("accepted", "send_failed") and destination:
        if st.button("Retry sending" if run.review == "send_failed" else "Send", icon=":material/send:",
                     key=f"send-{key}"):
            try:
                review.send_run(run.run_id)
            except Exception as exc:  # noqa: BLE001
                st.error(str(exc))
            else:
                st.session_state.wl_focus = None  # decided: the Worklist refreshes again
                st.rerun()
