"""Entry file of the medai workstation page: navigation and the frame around pages."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# Streamlit runs this file as a script: make the sibling modules importable both
# from the repository (ui/) and from the installed package (medai/ui/).
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import state  # noqa: E402

from medai import workstation  # noqa: E402

# The icon is drawn here: a ":material/..." page icon would be fetched from a font CDN.
st.set_page_config(page_title="medai workstation", page_icon=state.favicon(), layout="wide",
                   initial_sidebar_state="expanded")
state.init()

PAGES = _HERE / "app_pages"
navigation = st.navigation([
    st.Page(PAGES / "worklist.py", title="Worklist", icon=":material/checklist:", default=True),
    st.Page(PAGES / "studies.py", title="Studies", icon=":material/folder_open:"),
    st.Page(PAGES / "viewer.py", title="Viewer", icon=":material/view_in_ar:"),
    st.Page(PAGES / "run.py", title="Run model", icon=":material/play_circle:"),
    st.Page(PAGES / "send.py", title="Send / save", icon=":material/outbox:"),
    st.Page(PAGES / "audit.py", title="Audit & privacy", icon=":material/verified_user:"),
])

with st.sidebar:
    st.markdown("### medai workstation")
    st.error(workstation.NOT_FOR_DIAGNOSTIC_USE, icon=":material/warning:")
    study, series = state.selected()
    if series is not None and study is not None:
        # who this is, on every page: the guard against reading the wrong patient's images
        st.caption("Open series")
        st.markdown(f"**{study.patient_name.replace('^', ' ') or '(no name)'}**  \n"
                    f"ID {study.patient_id or '—'} · {study.study_date or 'no date'}  \n"
                    f"**{series.modality}** · {series.description or '(no description)'}  \n"
                    f"{series.n_images} images")
    st.caption("Runs on this machine only · nothing leaves it unless you send it.")

navigation.run()
