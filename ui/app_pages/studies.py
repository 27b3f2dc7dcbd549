"""Studies: local folders and PACS-received studies; open one."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import state
from medai import workstation

head, refresh = st.columns([6, 1], vertical_alignment="bottom")
head.title("Studies")
if refresh.button("Refresh", icon=":material/refresh:", key="refresh-studies",
                  help="Look again for studies the PACS sent since the list was made"):
    state.studies.clear()

with st.form("add-folder", clear_on_submit=True, border=False):
    cols = st.columns([5, 1], vertical_alignment="bottom")
    folder = cols[0].text_input("Add a local study folder", placeholder="/path/to/DICOM folder", key="folder_input")
    if cols[1].form_submit_button("Add", icon=":material/add:", width="stretch") and folder:
        path = Path(folder).expanduser()
        if not path.is_dir():
            st.error(f"{path}: not a folder")
        elif str(path) not in st.session_state.folders:
            st.session_state.folders = [*st.session_state.folders, str(path)]
            st.rerun()

if not state.sources():
    st.info("No studies yet: add a local folder above, or let the PACS send studies to `medai pacs listen`.")
    st.stop()

try:
    studies, skipped = state.current_studies()
except Exception as exc:  # noqa: BLE001 - show the reason, keep the page alive
    st.error(f"Could not index the study folders: {exc}")
    st.stop()

if not studies:
    st.warning("No image series found in the listed folders.")
rows = [{
    "Patient": s.patient_name.replace("^", " "), "Patient ID": s.patient_id, "Date": s.study_date,
    "Study": s.description, "Modality": s.modalities, "Series": len(s.series), "Images": s.n_images,
    "Model runs": workstation.study_status(s), "Source": s.source,
} for s in studies]
event = st.dataframe(rows, hide_index=True, width="stretch", on_select="rerun",
                     selection_mode="single-row", key="study_table")
if not studies:
    st.stop()
labels = [f"{s.study_date or '—'} · {s.description or '(no description)'} · {s.modalities} · {s.source}"
          for s in studies]
picked = event.selection.rows[0] if event and event.selection.rows else None
if picked is None:
    wanted = st.session_state.get("browse_uid") or st.session_state.study_uid
    current = next((i for i, s in enumerate(studies) if s.study_uid == wanted), 0)
    picked = st.selectbox("Study", range(len(studies)), index=current, format_func=labels.__getitem__,
                          help="Or select a row in the table")
st.session_state.browse_uid = studies[picked].study_uid
study = studies[picked]
state.prefetch(study)  # its first image series are read ahead, so Open shows them at once
st.subheader(f"Series of {study.description or 'the selected study'}")
for series in study.series:
    cols = st.columns([1, 4, 2, 2, 2], vertical_alignment="center")
    cols[0].markdown(f"**{series.modality}**")
    cols[1].markdown(f"{series.description or '(no description)'}")
    cols[2].markdown(f"{series.n_images} images")
    cols[3].markdown(", ".join(workstation.run_status([series]).get(series.series_uid, [])) or "—")
    if cols[4].button("Open", key=f"open-{series.series_uid}", icon=":material/visibility:",
                      type="primary" if series.series_uid == st.session_state.series_uid else "secondary"):
        state.open_series(study.study_uid, series.series_uid)
        st.switch_page("app_pages/viewer.py")

if skipped:
    with st.expander(f"{len(skipped)} files skipped"):
        st.dataframe([{"File": p, "Reason": r} for p, r in skipped], hide_index=True)
