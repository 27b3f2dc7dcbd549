"""Send / save: the open series' results to a folder or the configured PACS."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import state
from medai import config, home, workstation

st.title("Send / save results")
st.error(workstation.NOT_FOR_DIAGNOSTIC_USE, icon=":material/warning:")
study, series = state.selected()
ss = st.session_state
if series is None or not ss.result_dir:
    st.info("Run a model on an open series first; its results appear here.")
    st.page_link("app_pages/run.py", label="Go to Run model", icon=":material/play_circle:")
    st.stop()

result_dir = Path(ss.result_dir)
files = workstation.available_outputs(result_dir)
st.markdown(f"Results of **{result_dir.name}** for {series.modality} · {series.description or 'series'}")
kinds = st.multiselect("Files", list(files), default=[k for k in ("SEG", "SR") if k in files] or list(files),
                       format_func=lambda k: f"{k} ({files[k].name}, {files[k].stat().st_size // 1024} KiB)",
                       key="send_kinds")

to_folder, to_pacs = st.columns(2, gap="large")
with to_folder:
    st.subheader("Save to a folder")
    folder = st.text_input("Folder", value=str(home.exports_dir()), key="export_folder")
    if st.button("Save", icon=":material/save:", disabled=not kinds, key="save-button"):
        try:
            written = workstation.save_to_folder(result_dir, kinds, Path(folder).expanduser(),
                                                 study=study, series=series)
        except Exception as exc:  # noqa: BLE001
            st.error(f"Not saved: {exc}")
        else:
            st.success("Saved (audited as an export):\n\n" + "\n".join(f"- `{p}`" for p in written))

with to_pacs:
    st.subheader("Send to the PACS")
    destination = config.get("pacs.destination")
    if not destination:
        st.caption("No PACS destination is configured (setting `pacs.destination`, e.g. `PACS@10.0.0.5:104`).")
    else:
        st.markdown(f"Destination: `{destination}`")
        if st.button("Send", icon=":material/send:", type="primary", disabled=not kinds, key="send-button"):
            try:
                report = workstation.send_to_destination(result_dir, kinds, str(destination),
                                                         study=study, series=series)
            except Exception as exc:  # noqa: BLE001
                st.error(f"Not sent: {exc}")
            else:
                st.success(f"Sent (audited): {report}")

st.divider()
st.subheader("De-identified copy (second opinion, teaching)")
st.caption("The open series and the chosen SEG/SR, with every identifying attribute handled by the "
           "DICOM PS3.15 Annex E basic profile. UIDs are remapped consistently, so the SEG still "
           "points at the exported images. Images that may carry burned-in text are held in "
           "quarantine, not exported.")
deid_folder = st.text_input("Folder for the de-identified copy", value=str(home.exports_dir() / "deidentified"), key="deid_folder")
keep_dates = st.checkbox("Keep intervals between dates (shift dates per patient)", key="deid_dates")
if st.button("Export de-identified copy", icon=":material/shield_person:", key="deid-button"):
    try:
        summary = workstation.export_deidentified(
            result_dir, kinds, series, Path(deid_folder).expanduser(),
            ["retain-longitudinal-dates"] if keep_dates else [])
    except Exception as exc:  # noqa: BLE001
        st.error(f"Not exported: {exc}")
    else:
        st.success(f"{summary['exported']} file(s) exported, {summary['quarantined']} quarantined, "
                   f"{summary['failed'] + summary['skipped']} not usable. Report: `{summary['report']}`")
