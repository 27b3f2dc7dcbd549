"""Worklist: every study with a result from any surface (this page, the PACS hook, triage,
`medai run`), in reader order, with review before results leave."""

from __future__ import annotations

import datetime as dt

import streamlit as st

import state
from medai import workstation

#: Lines shown at once (the store keeps every run; `medai results list` shows them all).
PAGE_SIZE = 50

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


def _line(rank: int, item: workstation.WorkItem) -> None:
    run = item.run
    with st.container(border=True, key=f"wl-item-{run.run_id}"):
        cols = st.columns([0.4, 2.2, 1.4, 1.6, 1.3, 3, 1.3, 1.2], vertical_alignment="center")
        cols[0].markdown(f"**{rank}**")
        cols[1].markdown(f"**{item.patient_name.replace('^', ' ') or '(no name)'}**  \n"
                         f"ID {item.patient_id or '—'}")
        cols[2].markdown(f"{run.study_date or 'no date'}  \n{run.modality or '—'}")
        cols[3].markdown(f"{run.model_id}  \n{run.model_version} · from {run.surface}")
        qc = {"fail": ":red[QC failed]", "warn": ":orange[QC warning]", "pass": "QC passed"}.get(run.qc, "no QC")
        level = run.priority_level or ("failed" if not run.done else "—")
        cols[4].markdown(f"{qc}  \npriority {level}")
        cols[5].markdown(item.findings[:240] or "no findings")
        cols[6].markdown(state.REVIEW_LABELS.get(run.review, run.review))
        if cols[7].button("Open", key=f"open-run-{run.run_id}", icon=":material/visibility:",
                          disabled=not run.done, help="The images with this result over them"):
            if state.open_work_item(item):
                st.switch_page("app_pages/viewer.py")
            st.error("The images of this result are no longer where they were stored.")
        if run.done and cols[7].button("Review", key=f"review-run-{run.run_id}", icon=":material/rate_review:",
                                       help="Accept or reject this result (the list stops refreshing meanwhile)"):
            st.session_state.wl_focus = run.run_id
            st.rerun(scope="app")


focus = st.session_state.get("wl_focus")
if focus:
    # The review happens outside the refreshing list: a refresh in the middle of a click
    # must never swallow an Accept or a Reject.
    current = next((it for it in workstation.worklist() if it.run.run_id == focus), None)
    if current is None:
        st.session_state.wl_focus = None
    else:
        with st.container(border=True, key="wl-review"):
            head, close = st.columns([6, 1], vertical_alignment="center")
            head.markdown(f"**Reviewing** {current.run.model_id} on "
                          f"{current.patient_name.replace('^', ' ') or '(no name)'} · {current.run.study_date} · "
                          f"{current.run.modality}  \n{current.findings[:300] or 'no findings'}")
            if close.button("Close", key="wl-review-close", icon=":material/close:"):
                st.session_state.wl_focus = None
                st.rerun()
            state.review_panel(current.run, key=f"wl-{current.run.run_id}")
        st.caption("The list below stops refreshing while a result is under review; Close to resume.")


@st.fragment(run_every=None if focus else 3)
def listing() -> None:
    """Re-read every few seconds: a study the PACS hook finishes appears without a click."""
    since = (dt.datetime.now().timestamp() - days * 86400) if days else None
    items = workstation.worklist(modality=modality, model=model, review=review, since=since)
    if not items:
        st.info("No results yet. Run a model from a study, let the PACS send studies to `medai pacs listen`, "
                "or run `medai triage`.")
        return
    st.caption(f"{len(items)} result(s)" + (f"; the first {PAGE_SIZE} shown" if len(items) > PAGE_SIZE else ""))
    for rank, item in enumerate(items[:PAGE_SIZE], 1):
        _line(rank, item)


listing()
