"""Worklist: every study with a result from any surface (this page, the PACS hook, triage,
`medai run`), in reader order, with review before results leave."""

from __future__ import annotations

import datetime as dt

import streamlit as st

import state
from medai import workstation

st.title("Worklist")
st.caption("Results from every surface on this machine, QC failures and out-of-range findings first. "
           + workstation.NOT_FOR_DIAGNOSTIC_USE)

filters = st.columns(4)
modality = filters[0].multiselect("Modality", ["CT", "MR", "PT", "CR", "DX", "US", "NM"], key="wl_modality")
model = filters[1].multiselect("Model", sorted({b.id for b in workstation.installed_models()}), key="wl_model")
review = filters[2].multiselect("Status", list(state.REVIEW_LABELS), format_func=state.REVIEW_LABELS.get,
                                key="wl_review")
days = filters[3].selectbox("Since", [0, 1, 7, 30, 365], index=0, key="wl_days",
                            format_func=lambda d: "any time" if d == 0 else f"last {d} day(s)")


@st.fragment(run_every=3)
def listing() -> None:
    """Re-read every few seconds: a study the PACS hook finishes appears without a click."""
    since = (dt.datetime.now().timestamp() - days * 86400) if days else None
    items = workstation.worklist(modality=modality, model=model, review=review, since=since)
    if not items:
        st.info("No results yet. Run a model from a study, let the PACS send studies to `medai pacs listen`, "
                "or run `medai triage`.")
        return
    rows = [{
        "#": i + 1, "Patient": it.patient_name.replace("^", " ") or "(no name)", "Patient ID": it.patient_id,
        "Date": it.run.study_date, "Modality": it.run.modality, "Model": it.run.model_id,
        "QC": it.run.qc or "—", "Priority": it.run.priority_level or ("failed" if not it.run.done else "—"),
        "Findings": it.findings[:160], "Status": state.REVIEW_LABELS.get(it.run.review, it.run.review),
        "From": it.run.surface,
    } for i, it in enumerate(items)]
    event = st.dataframe(rows, hide_index=True, width="stretch", on_select="rerun",
                         selection_mode="single-row", key="worklist_table")
    picked = event.selection.rows[0] if event and event.selection.rows else None
    if picked is None:
        st.caption("Select a line to open or review it.")
        return
    item = items[picked]
    st.session_state.worklist_pick = item.run.run_id
    left, right = st.columns([1, 2], vertical_alignment="top")
    with left:
        if st.button("Open in the Viewer", type="primary", icon=":material/visibility:",
                     key=f"open-run-{item.run.run_id}"):
            if state.open_work_item(item):
                st.switch_page("app_pages/viewer.py")
            st.error("The images of this result are no longer where they were stored.")
    with right:
        state.review_panel(item.run, key=f"wl-{item.run.run_id}")


listing()
