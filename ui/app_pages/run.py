"""Run model: models whose card accepts the open series, card first, results beside the images."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

import state
from medai import viewer, workstation

st.title("Run model")
study, series = state.selected()
if series is None:
    st.info("Open a series from the Studies page first.")
    st.page_link("app_pages/studies.py", label="Go to Studies", icon=":material/folder_open:")
    st.stop()

try:
    choices = workstation.models_for(series)
except Exception as exc:  # noqa: BLE001
    st.error(f"Cannot list the installed models: {exc}")
    st.stop()
if not choices:
    st.warning("No model is installed. See `medai models list` and `medai models install`.")
    st.stop()

ss = st.session_state
labels = {m.model_id: f"{m.name} ({m.version})" + ("" if m.accepts else " — does not accept this series")
          for m in choices}
model_id = st.selectbox("Model", list(labels), format_func=labels.get, key="run_model_id")
choice = next(m for m in choices if m.model_id == model_id)
card = workstation.card_summary(choice.card)

left, right = st.columns([3, 2], gap="large")
with right:
    st.subheader("Model card")
    st.markdown(card["summary"])
    if card["intended_use"]:
        st.markdown("**Intended use**")
        st.markdown(card["intended_use"])
    if card["limitations"]:
        st.markdown("**Limits (out of scope)**")
        for item in card["limitations"]:
            st.markdown(f"- {item}")
    for title, rows in (("Agreement with the original model", card["metrics_agreement"]),
                        ("Accuracy against reference masks", card["metrics_accuracy"])):
        if rows:
            st.markdown(f"**{title}**")
            st.dataframe(rows, hide_index=True, width="stretch")
    if card["metrics_agreement"] or card["metrics_accuracy"]:
        st.caption(workstation.DICE_NOTE)
    if card["license"]:
        st.caption("Licence: " + card["license"])
    st.caption(workstation.NOT_FOR_DIAGNOSTIC_USE)

with left:
    if not choice.accepts:
        st.warning(workstation.refusal_text(choice, series))
    try:
        display = state.loaded(series.series_uid, tuple(str(f) for f in series.files))
    except Exception as exc:  # noqa: BLE001
        st.error(f"Cannot load this series: {exc}")
        st.stop()
    for warning in workstation.scope_warnings(choice.card, display.volume):
        st.warning(warning, icon=":material/warning:")
    prompt = None
    if choice.interactive:
        view = ss.get("view") or "axial"
        index = int(ss.get(f"slice-{series.series_uid}-{view}", viewer.slice_count(display, view) // 2 + 1)) - 1
        if ss.box is not None and ss.box_at is not None:
            view, index = ss.box_at
        if ss.box is None:
            st.info(workstation.viewer_hint([choice], series.modality) or "Draw a box in the Viewer first.")
            st.page_link("app_pages/viewer.py", label="Draw the box in the Viewer", icon=":material/crop_free:")
        else:
            st.markdown(f"Box prompt on **{view}** slice {index + 1}: "
                        f"{workstation.box_extent_text(display, ss.box)} (edit in pixels of that slice below).")
        box = ss.box or (0, 0, 0, 0)
        rows_n, cols_n = viewer.raw_slice(display, view, index).shape
        cols = st.columns(4)
        c0 = cols[0].number_input("left", 0, cols_n - 1, min(int(box[0]), cols_n - 1))
        r0 = cols[1].number_input("top", 0, rows_n - 1, min(int(box[1]), rows_n - 1))
        c1 = cols[2].number_input("right", 0, cols_n - 1, min(int(box[2]), cols_n - 1))
        r1 = cols[3].number_input("bottom", 0, rows_n - 1, min(int(box[3]), rows_n - 1))
        propagate = st.checkbox("Propagate to neighbouring slices", value=True, key="prompt_propagate")
        if c1 > c0 and r1 > r0:
            try:
                prompt = workstation.box_prompt(display, view, index, (c0, r0, c1, r1), propagate=propagate)
            except Exception as exc:  # noqa: BLE001 - a box that cannot be used is explained
                st.error(f"Box not usable: {exc}")
    disabled = not choice.accepts or (choice.interactive and prompt is None)
    if st.button("Run " + choice.name, type="primary", icon=":material/play_arrow:", disabled=disabled,
                 key="run-button"):
        with st.status(f"Running {choice.name} on this machine…", expanded=True) as status:
            st.write("Verifying the signed model bundle and loading the series…")
            try:
                stored, reused = workstation.run(model_id, display.volume, series, study, prompt=prompt)
            except Exception as exc:  # noqa: BLE001 - shown to the clinician, page survives
                status.update(label="Run failed", state="error")
                st.error(str(exc))
                st.stop()
            if reused:
                st.write(f"This model already ran on this series ({stored.surface}); its stored result is shown.")
            else:
                st.write(f"Inference on {stored.summary.get('provider', '')} in "
                         f"{stored.summary.get('seconds', 0):.1f} s; results stored.")
            status.update(label="Done", state="complete", expanded=False)
        state.show_run(stored)
        state.rendered.clear()
    if not ss.run_id:
        stored_runs = [r for r in workstation.runs_for(series) if r.model_id == model_id]
        if stored_runs:
            st.info(f"A stored result of this model on this series exists ({stored_runs[0].surface}, "
                    f"{state.REVIEW_LABELS.get(stored_runs[0].review, stored_runs[0].review)}).")
            if st.button("Show the stored result", key="show-stored"):
                state.show_run(stored_runs[0])
                st.rerun()

    current = next((r for r in workstation.runs_for(series) if r.run_id == ss.run_id), None)
    if ss.result_dir and current is not None:
        result = workstation.read_result(Path(ss.result_dir))
        st.subheader("Result")
        img_col, num_col = st.columns([3, 2])
        view = ss.get("view") or "axial"
        index = int(ss.get(f"slice-{series.series_uid}-{view}", viewer.slice_count(display, view) // 2 + 1)) - 1
        window = viewer.named_window(ss.window, display.volume) if ss.window not in (None, "manual") \
            else viewer.default_window(display.volume)
        image = state.rendered(series.series_uid, tuple(str(f) for f in series.files), view, index,
                               window.width, window.level, ss.result_dir, float(ss.opacity), ss.overlay_mode, 512)
        img_col.image(viewer.annotate(image), caption=f"{view} slice {index + 1} with segmentation")
        with num_col:
            result_card = workstation.card_for_result(Path(ss.result_dir))
            for entry in workstation.legend(Path(ss.result_dir)):
                if entry.volume_ml is not None:
                    st.metric(f"{entry.name} volume", f"{entry.volume_ml:.1f} mL")
                    st.caption(workstation.volume_text(entry.name, entry.volume_ml, result_card))
            caveats = [str(c) for c in result.get("caveats") or []]
            for caveat in caveats:  # beside the volumes they qualify (e.g. a template-space demo study)
                st.warning(caveat, icon=":material/info:")
            for finding in result.get("findings") or []:
                text = str(finding.get("text") or finding.get("description") or finding)
                if text.removeprefix("Caveat: ") not in caveats:  # volumetry repeats them as findings
                    st.markdown(f"- {text}")
            qc = result.get("qc") or {}
            if qc:
                st.markdown("**Quality checks**")
                try:
                    mask = workstation.load_label_map(Path(ss.result_dir), display.source_shape)
                except Exception:  # noqa: BLE001 - the checks are still shown, without the mask's extent
                    mask = None
                st.dataframe(workstation.qc_rows(qc, card=result_card, labels=mask, volume=display.volume),
                             hide_index=True, width="stretch")
            st.caption(workstation.NOT_FOR_DIAGNOSTIC_USE)
            st.caption(f"Model {result['model'].get('id', model_id)} {result['model'].get('version', '')} · "
                       f"{result['backend']['provider']} · {result['timings_s'].get('total', 0)} s")
        state.review_panel(current, key=f"run-{current.run_id}")
        st.page_link("app_pages/viewer.py", label="Review in the Viewer", icon=":material/view_in_ar:")
        st.page_link("app_pages/send.py", label="Send or save the result", icon=":material/outbox:")
