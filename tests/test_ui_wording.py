"""What the card, QC, result and audit panels say, in words a clinician reads:
no raw field names, no raw index boxes, no unexplained numbers; volumes with the
card's range or "no reference range"; metrics split into agreement with the
original model and accuracy against reference masks; out-of-scope series warned;
a series without an automatic model says how to prompt. Cards: the shipped bundles."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medai import workstation
from medai.dicom.index import InstanceEntry, SeriesEntry
from medai.dicom.volume import Geometry, Volume
from medai.inference import registry

RAW_NAME = re.compile(r"\b[a-z]+_[a-z_]+\b")  # snake_case field names


def _card(model_id: str):
    return registry.get_bundle(model_id).card


def _series(modality: str = "CT", description: str = "HEAD 3mm", n: int = 40) -> SeriesEntry:
    sop = "1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4"
    instances = tuple(InstanceEntry(Path(f"/nonexistent/{i}.dcm"), sop, f"1.2.3.{i}") for i in range(n))
    return SeriesEntry("1.2.3", "1.2", "p", modality, description, "HEAD", sop, True, instances, series_number=3)


def _volume(thickness: float, modality: str = "MR", shape: tuple[int, int, int] = (4, 6, 5)) -> Volume:
    return Volume(np.zeros(shape, np.float32), Geometry((0.0, 0.0, 0.0), (1.0, 1.0, thickness),
                                                          (1, 0, 0, 0, 1, 0, 0, 0, 1)),
                  modality=modality, attributes={"SliceThickness": f"{thickness}"})


def test_card_splits_agreement_from_accuracy_and_names_things_in_words():
    card = workstation.card_summary(_card("brain-extraction"))
    agreement = [r["Measure"] for r in card["metrics_agreement"]]
    accuracy = [r["Measure"] for r in card["metrics_accuracy"]]
    # the Dice of 1.0 against the original deepbet is agreement, not accuracy
    assert "Whole pipeline vs the original deepbet (Dice)" in agreement
    assert accuracy and all(m == "Dice overlap with a reference mask" for m in accuracy)
    assert {r["Value"] for r in card["metrics_accuracy"]} == {"0.936", "0.968"}
    for row in card["metrics_agreement"] + card["metrics_accuracy"]:
        assert not RAW_NAME.search(row["Measure"]), row
    assert card["intended_use"].startswith("Research and workflow support")
    assert "text:" not in card["intended_use"] and "out_of_scope" not in card["intended_use"]
    assert card["license"].startswith("MIT · deepbet 1.0.2")
    assert "Dice" in workstation.DICE_NOTE and "identical" in workstation.DICE_NOTE


def test_intended_use_without_text_is_joined_as_sentences():
    card = _card("brain-extraction")
    raw = dict(card.raw)
    raw["intended_use"] = {"population": "adults", "setting": "research workstation"}
    bare = replace(card, raw=raw)
    text = workstation.card_summary(bare)["intended_use"]
    assert text == "adults. research workstation."
    assert "population" not in text and "setting" not in text


def test_every_shipped_card_reads_without_raw_field_names():
    for bundle in registry.list_bundles():
        card = workstation.card_summary(bundle.card)
        for row in card["metrics_agreement"] + card["metrics_accuracy"]:
            assert not RAW_NAME.search(row["Measure"]), (bundle.id, row["Measure"])
        assert card["intended_use"] and not RAW_NAME.search(card["intended_use"].split(":")[0])


def test_volumes_carry_the_card_range_or_say_there_is_none():
    card = _card("brain-extraction")
    assert workstation.volume_text("Brain", 1522.3, card) == "1522 mL (within the model card's range 800–2100 mL)"
    assert "OUTSIDE the model card's range 800–2100 mL" in workstation.volume_text("Brain", 612.0, card)
    assert workstation.volume_text("Structure", 12.4, _card("medsam-lite")) == "12 mL (no reference range)"
    assert workstation.volume_text("Brain", 1000.0, None) == "1000 mL (no reference range)"


def test_qc_rows_use_words_and_the_masks_real_extent():
    card = _card("brain-extraction")
    volume = _volume(2.0, shape=(10, 20, 30))
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:7, 4:14, 5:25] = 1  # 5 slices of 2 mm, 10 rows, 20 columns of 1 mm
    qc = {"brain_volume_ml": 1522.3, "box": [[28, 104], [28, 108], [0, 62]], "mask_touches_edges": ["superior"],
          "intensity_quantiles": [0.0, 187.0]}
    rows = {r["Check"]: r["Result"] for r in workstation.qc_rows(qc, card=card, labels=labels, volume=volume)}
    assert rows["Mask extent"] == ("20 mm right-left × 10 mm front-back × 10 mm head-foot; axial slices 3–7 of 10")
    assert rows["Brain volume"].startswith("1522 mL (within the model card's range")
    assert rows["Mask reaches the image edge"].startswith("yes, at the superior edge")
    assert "percentiles of this image" in rows["Image intensity range used by the model"]
    text = " ".join(f"{k} {v}" for k, v in rows.items())
    assert "[[" not in text and "box" not in text.lower() and not RAW_NAME.search(text)


def test_thick_slices_at_the_cards_limit_are_warned_before_the_run():
    card = _card("brain-extraction")  # out of scope: "thick-slice (>3 mm) series"
    warned = workstation.scope_warnings(card, _volume(3.0))
    assert warned and "3.0 mm slices" in warned[0] and "limit for thick slices (3 mm)" in warned[0]
    assert workstation.scope_warnings(card, _volume(1.0)) == []


def test_a_series_without_an_automatic_model_says_how_to_prompt():
    choices = workstation.models_for(_series("CT", "HEAD 3mm"))
    hint = workstation.viewer_hint(choices, "CT")
    assert hint is not None and "No automatic model for this CT series" in hint
    assert "Box prompt" in hint and "drag a box" in hint and "LiteMedSAM" in hint
    refused = next(c for c in choices if c.model_id == "brain-extraction")
    text = workstation.refusal_text(refused, _series("CT"))
    assert text.startswith("Brain extraction") and "made for MR series; this is a CT series" in text


def test_audit_events_have_readable_names_and_details():
    from medai.compliance import audit

    for event in audit.EVENTS:
        label = workstation.event_label(event)
        assert "_" not in label and label[0].isupper(), event
    assert workstation.event_label("instances_accessed") == "Images opened"
    detail = workstation.detail_text({"component": "ui", "action": "view", "files": ["seg.dcm", "sr.dcm"]})
    assert detail == "action: view; files: seg.dcm, sr.dcm"


def test_corner_text_and_box_extent():
    from medai import viewer

    study = workstation.StudyRow("1.2", "DOE^JANE", "P-1", "20240131", "CT HEAD", "local")
    volume = _volume(3.0, "CT")
    corners = workstation.corner_text(study, _series(), volume)
    assert corners["tl"] == ["DOE JANE", "ID P-1", "2024-01-31"]
    assert corners["thickness"] == "3.0 mm"
    display = viewer.to_display(volume)
    assert workstation.box_extent_text(display, (1, 1, 3, 4)) == "3 × 4 mm (3 × 4 pixels)"


@pytest.mark.parametrize("name", ["dice_vs_reference_mask", "gm_volume_error_percent", "precision_int8_bbox"])
def test_metric_names_are_words(name):
    assert not RAW_NAME.search(workstation.metric_name(name))
