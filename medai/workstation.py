"""What the workstation page shows, computed without Streamlit.

The UI pages call these functions and only lay out their results. This module
decides which studies are listed (local folders the clinician added, studies
the PACS pushed into ``MEDAI_HOME/store``, the bundled demo study), and what the
page may say about a run. Runs land in the results store shared with every other
surface (:mod:`medai.results`), so a study the PACS hook or triage processed shows
its result here without running the model again. Patient names and IDs read here
are returned for display only and never logged: log lines and file names use
pseudonyms.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medai import home
from medai.dicom.index import SeriesEntry
from medai.results import ResultsStore, StoredRun
from medai.routing import Offer

log = logging.getLogger("medai.ui")

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use: research and decision support only; a clinician reads the images."


@dataclass(frozen=True)
class StudyRow:
    """One study as listed to the clinician: the index's study with its image series
    (:class:`~medai.dicom.index.SeriesEntry`, the one series record) and the patient
    fields for display only."""

    study_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    description: str
    source: str  # "local", "pacs" or "demo"
    series: tuple[SeriesEntry, ...] = field(default_factory=tuple)

    @property
    def modalities(self) -> str:
        return ", ".join(sorted({s.modality for s in self.series if s.modality}))

    @property
    def n_images(self) -> int:
        return sum(s.n_images for s in self.series)


def demo_dir() -> Path | None:
    """The bundled real T1 demo study, when this build ships one."""
    import medai

    path = Path(medai.__file__).resolve().parent / "data" / "demo-t1"
    return path if path.is_dir() else None


def default_sources() -> list[tuple[Path, str]]:
    """Folders listed without the clinician adding them: PACS store and demo."""
    out: list[tuple[Path, str]] = []
    store = home.store_dir()
    if any(store.glob("studies/*")):
        out.append((store, "pacs"))
    demo = demo_dir()
    if demo is not None:
        out.append((demo, "demo"))
    return out


def catalog(sources: Iterable[tuple[Path, str]]) -> tuple[list[StudyRow], list[tuple[str, str]]]:
    """Index the given folders (headers only) into studies with their image series.

    Returns the studies (local folders, then PACS, then demo; newest first within
    each) and the files skipped with the reason.
    """
    from medai.dicom.index import scan

    rows: dict[str, StudyRow] = {}
    skipped: list[tuple[str, str]] = []
    for folder, source in sources:
        index = scan([folder])
        skipped.extend((str(item.path), item.reason) for item in index.skipped)
        for study_uid, study in index.studies.items():
            patient = index.patients.get(study.patient_key)
            series = [e for e in index.series_of_study(study_uid) if e.is_image]
            if not series:
                continue
            if study_uid in rows:  # the same study found in two folders: merge its series
                known = {s.series_uid for s in rows[study_uid].series}
                series = [*rows[study_uid].series, *(s for s in series if s.series_uid not in known)]
            series.sort(key=lambda s: (s.number if s.number is not None else 1 << 30, s.description))
            rows[study_uid] = StudyRow(study_uid, patient.patient_name if patient else "",
                                       patient.patient_id if patient else "", study.study_date,
                                       study.description, source, tuple(series))
    # the clinician's own folders first, then PACS arrivals, then the demo; newest first within each
    rank = {"local": 0, "pacs": 1, "demo": 2}
    studies = sorted(rows.values(), key=lambda r: (r.study_date, r.study_uid), reverse=True)
    studies.sort(key=lambda r: rank.get(r.source, 3))
    return studies, skipped


def key_for(uid: str) -> str:
    """The pseudonymous key of a UID (what the results store and file names use)."""
    from medai.results import key

    return key(uid)


def runs_for(series: SeriesEntry) -> list[StoredRun]:
    """The newest finished run of each model on this series' content, from any surface."""
    with ResultsStore() as store:
        found = store.runs(series_key=key_for(series.series_instance_uid), status="done")
    return [r for r in found if r.content_digest == series.content_digest and r.files_present()]


def run_status(series: Sequence[SeriesEntry]) -> dict[str, list[str]]:
    """Model ids with a finished result, per series UID."""
    out: dict[str, list[str]] = {}
    for s in series:
        done = sorted({r.model_id for r in runs_for(s)})
        if done:
            out[s.series_instance_uid] = done
    return out


def study_status(study: StudyRow) -> str:
    """One-line status of model runs for a study's series."""
    done = run_status(study.series)
    models = sorted({m for ms in done.values() for m in ms})
    return ", ".join(models) if models else "not run"


@dataclass(frozen=True)
class WorkItem:
    """One worklist line: a stored run with what the clinician needs to recognise the study
    (patient fields for display only)."""

    run: StoredRun
    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str

    @property
    def findings(self) -> str:
        s = self.run.summary
        parts = list(s.get("findings") or [])
        if not self.run.done:
            parts.insert(0, f"failed: {self.run.reason}")
        return "; ".join(parts)


def worklist(*, modality: Sequence[str] = (), model: Sequence[str] = (), review: Sequence[str] = (),
             since: float | None = None, limit: int = 500) -> list[WorkItem]:
    """Every study with a result from any surface, newest run per series and model, in reader
    order (QC failures and out-of-range findings first, as triage ranks)."""
    from medai.results import rank
    from medai.review import identity

    with ResultsStore() as store:
        runs = store.runs(limit=5000)
    picked = [r for r in runs if (not modality or r.modality in modality) and (not model or r.model_id in model)
              and (not review or r.review in review) and (since is None or r.created >= since)]
    items = []
    for run in rank(picked)[:limit]:
        try:
            ids = identity(run)
        except (OSError, ValueError) as exc:  # the source was moved away: still listed, not openable
            log.info("run %s: source not readable (%s)", run.run_id, type(exc).__name__)
            ids = {}
        items.append(WorkItem(run, str(ids.get("patient_name") or ""), str(ids.get("patient_id") or ""),
                              str(ids.get("study_uid") or ""), str(ids.get("series_uid") or "")))
    return items


def read_result(folder: Path) -> dict[str, Any]:
    """The ``result.json`` a run wrote (volumes, findings, QC, provenance)."""
    path = folder / "result.json"
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def load_label_map(folder: Path, volume_shape: tuple[int, int, int]) -> Any:
    """The run's label map (``mask.nii.gz``) as an array in the source layout
    ``[k, j, i]``; refuses a map whose shape differs from the volume's."""
    import numpy as np
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
    if tuple(array.shape) != tuple(volume_shape):
        from medai.errors import DicomInputError

        raise DicomInputError(folder / "mask.nii.gz",
                              f"label map shape {tuple(array.shape)} differs from the series {tuple(volume_shape)}")
    return np.asarray(array)


def audit(event: str, *, study: StudyRow | None = None, series: SeriesEntry | None = None,
          outcome: str = "success", detail: dict[str, Any] | None = None) -> None:
    """Record a workstation action on patient data in the audit trail.

    Fail closed: :class:`~medai.errors.AuditWriteError` propagates, and the page
    must not show or send the data. Without the compliance layer installed the
    workstation refuses patient data altogether.
    """
    from medai.compliance import audit as trail

    trail.record(event, outcome=outcome,
                 patient_id=(study.patient_id or None) if study else None,
                 patient_name=(study.patient_name or None) if study else None,
                 study_uid=(study.study_uid if study else None) or (series.study_uid if series else None),
                 series_uid=series.series_uid if series else None,
                 detail={"component": "ui", **(detail or {})})


def installed_models() -> list[Any]:
    """The installed model bundles (for filters and lists)."""
    from medai.inference import registry

    return list(registry.list_bundles())


def models_for(series: SeriesEntry) -> list[Offer]:
    """Installed models, those the routing decision gives ``series`` first (the same
    decision as ``medai run``, triage and the PACS hook)."""
    from medai.routing import offers

    return offers(series)


#: Metric names a clinician reads (the card keeps its machine names).
_METRIC_NAMES = {
    "dice": "Dice overlap",
    "dice2d": "Dice overlap per slice",
    "stage_parity_onnx_vs_torchscript": "Each converted stage vs the original network (Dice)",
    "parity_onnx_vs_pytorch_dice": "Converted model vs the original PyTorch model (Dice)",
    "dice_vs_reference_deepbet": "Whole pipeline vs the original deepbet (Dice)",
    "dice_vs_reference_mask": "Dice overlap with a reference mask",
}

#: What a Dice value means, said once under each metrics table.
DICE_NOTE = "Dice: overlap of two masks, from 0 (none) to 1 (identical)."


def _is_agreement(metric: Mapping[str, Any]) -> bool:
    """Whether a card metric compares the shipped model with the original it was
    converted from (agreement), rather than with reference masks (accuracy)."""
    name = str(metric.get("name", "")).lower()
    note = f"{metric.get('note', '')} {metric.get('data', '')}".lower()
    return any(k in name for k in ("parity", "onnx_vs", "vs_pytorch", "vs_torch", "precision_", "vs_reference_deepbet",
                                   "vs_original")) or any(k in note for k in ("vs fp32", "vs pytorch", "vs deepbet"))


def metric_name(name: str) -> str:
    """A card metric's name in words (``dice_vs_reference_mask`` -> ``Dice overlap with a reference mask``)."""
    if name in _METRIC_NAMES:
        return _METRIC_NAMES[name]
    if name.startswith("precision_"):
        _, precision, graph = (name.split("_", 2) + ["", ""])[:3]
        return f"{precision} arithmetic vs fp32, {graph} network (Dice)".strip()
    if name.startswith("dice2d_"):
        return f"Dice overlap per slice ({name[len('dice2d_'):].replace('_', ' ')} resizing)"
    words = " ".join(_WORDS.get(w, w) for w in name.split("_")).strip()
    return words[:1].upper() + words[1:]


#: Abbreviations in card metric names, spelled out.
_WORDS = {"gm": "grey matter", "wm": "white matter", "csf": "CSF", "icv": "intracranial volume",
          "percent": "(%)", "dice3d": "3-D Dice overlap", "dice": "Dice overlap", "vs": "vs", "bpf":
          "brain parenchymal fraction", "ml": "(mL)"}


def _metric_row(m: Mapping[str, Any]) -> dict[str, Any]:
    value = m.get("value", "")
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    data = m.get("case") or m.get("data") or m.get("dataset", "")
    return {"Measure": metric_name(str(m.get("name", ""))), "Value": shown, "Data": str(data),
            "N": str(m.get("n", "")), "Note": str(m.get("note") or m.get("reference", ""))}


def _sentence(text: Any) -> str:
    text = str(text).strip()
    return text if not text or text.endswith(".") else text + "."


def card_summary(card: Any) -> dict[str, Any]:
    """What the clinician reads before running, in words: intended use as text,
    limits, the card's metrics split into agreement with the original model and
    accuracy against reference masks, training data, licence.

    No raw field names reach the page: a card without an intended-use ``text``
    has its other intended-use entries joined as sentences.
    """
    use = {str(k): v for k, v in dict(card.intended_use).items()}
    limits = use.pop("out_of_scope", None) or use.pop("limitations", None) or card.raw.get("limitations")
    text = use.pop("text", "") or " ".join(_sentence(v) for v in use.values() if v)
    metrics = list(card.metrics)
    training = card.raw.get("training_data", {})
    licence = dict(card.license)
    licence_text = " · ".join(str(v) for k, v in licence.items() if k in ("spdx", "attribution") and v)
    return {
        "summary": card.summary,
        "task": card.task,
        "intended_use": text,
        "limitations": limits if isinstance(limits, list) else ([limits] if limits else []),
        "metrics_agreement": [_metric_row(m) for m in metrics if _is_agreement(m)],
        "metrics_accuracy": [_metric_row(m) for m in metrics if not _is_agreement(m)],
        "training_data": training.get("text", "") if isinstance(training, Mapping) else str(training),
        "labels": [label.name for label in card.labels],
        "license": licence_text,
    }


def reference_range_ml(card: Any, segment: str) -> tuple[float, float] | None:
    """The card's plausible volume range for a segment (mL), when it states one.

    ``postprocessing.plausible_volume_ml`` applies to a one-label model's label;
    ``postprocessing.reference_ranges_ml`` (``{name: [low, high]}``) names labels.
    """
    if card is None:
        return None
    post = dict(card.postprocessing or {})
    named = post.get("reference_ranges_ml") or {}
    if segment in named:
        low, high = named[segment]
        return float(low), float(high)
    plausible = post.get("plausible_volume_ml")
    if plausible and len(card.labels) == 1 and card.labels[0].name == segment:
        return float(plausible[0]), float(plausible[1])
    return None


def volume_text(segment: str, volume_ml: float | None, card: Any) -> str:
    """A segment's volume with the card's reference range, or saying there is none."""
    if volume_ml is None:
        return "volume not measured"
    span = reference_range_ml(card, segment)
    if span is None:
        return f"{volume_ml:.0f} mL (no reference range)"
    where = "within" if span[0] <= volume_ml <= span[1] else "OUTSIDE"
    return f"{volume_ml:.0f} mL ({where} the model card's range {span[0]:.0f}–{span[1]:.0f} mL)"


def card_for_result(result_dir: Path) -> Any:
    """The installed card of the model that wrote a result, or ``None``."""
    from medai.inference import registry

    try:
        model_id = (read_result(result_dir).get("model") or {}).get("id") or result_dir.name
        return registry.get_bundle(model_id).card
    except Exception:  # noqa: BLE001 - an uninstalled model: its numbers are shown without ranges
        return None


def _thickness_mm(volume: Any) -> float:
    from medai import viewer

    return viewer.slice_thickness_mm(volume)


def scope_warnings(card: Any, volume: Any) -> list[str]:
    """Reasons, in words, why this series is outside what the card says the model is for.

    Today: slice thickness at or over the limit the card's out-of-scope text
    states (``thick-slice (>3 mm)``); a series exactly at the limit is warned too,
    since "over 3 mm" read at the 3 mm boundary is where results start to degrade.
    """
    import re

    use = dict(card.intended_use)
    text = " ".join(str(v) for v in (use.get("out_of_scope"), use.get("limitations"), card.raw.get("limitations")) if v)
    out = []
    found = re.search(r"(?:thick[- ]slice|slice thickness)[^0-9>]*[>≥]\s*(\d+(?:\.\d+)?)\s*mm", text, re.I) \
        or re.search(r"[>≥]\s*(\d+(?:\.\d+)?)\s*mm\)?[^.;]*?(?:thick|slice)", text, re.I)
    if found:
        limit = float(found.group(1))
        thickness = _thickness_mm(volume)
        if thickness >= limit - 1e-6:
            out.append(f"This series has {thickness:.1f} mm slices: at or over the model card's limit for thick "
                       f"slices ({limit:g} mm). The result is outside the model's intended use.")
    return out


def refusal_text(choice: Offer, series: SeriesEntry) -> str:
    """Why a model does not take the open series, in a sentence a clinician reads."""
    sel = getattr(choice.card, "selection", None)
    wanted = ", ".join(getattr(sel, "modality", ()) or ())
    if choice.reason.startswith("modality") and wanted:
        return (f"{choice.name} is made for {wanted} series; this is a {series.modality or 'unlabelled'} series, "
                "so it is not offered.")
    return f"{choice.name} does not take this series: {choice.reason}."


def viewer_hint(choices: Sequence[Offer], modality: str) -> str | None:
    """What the viewer says when no automatic model takes the series: which prompted
    model can, and how to prompt it (draw a box in the viewport)."""
    automatic = [c for c in choices if c.accepts and not c.interactive]
    prompted = [c for c in choices if c.accepts and c.interactive]
    if automatic:
        return None
    if prompted:
        return (f"No automatic model for this {modality or ''} series. To segment a structure with "
                f"{prompted[0].name}: choose 'Box prompt' above the image, drag a box around the structure on the "
                "axial plane (left), then open Run model.").replace("  ", " ")
    return f"No installed model takes this {modality or ''} series; the images can still be read here.".replace("  ", " ")


def corner_text(study: StudyRow | None, series: SeriesEntry, volume: Any = None, *,
                thickness_mm: float | None = None) -> dict[str, Any]:
    """The viewport's four-corner overlay: patient and study (top left), series
    (top right); the viewport adds W/L (bottom left) and slice position (bottom right)
    with this series' slice thickness (``thickness_mm``, else the volume's). Shown on
    this screen only, never logged."""
    date = study.study_date if study else ""
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    number = f"Series {series.number}" if series.number is not None else "Series"
    return {
        "tl": [x for x in ((study.patient_name.replace("^", " ").strip() if study else ""),
                           (f"ID {study.patient_id}" if study and study.patient_id else ""), date) if x],
        "tr": [x for x in (series.description, f"{number} · {series.modality} · {series.n_images} images") if x],
        "thickness": f"{thickness_mm if thickness_mm is not None else _thickness_mm(volume):.1f} mm",
    }


def box_extent_text(display: Any, box: tuple[int, int, int, int]) -> str:
    """A prompt box (axial display pixels) as its size in mm and pixels."""
    x0, y0, x1, y1 = box
    sx, sy, _ = display.spacing
    w, h = x1 - x0 + 1, y1 - y0 + 1
    return f"{w * sx:.0f} × {h * sy:.0f} mm ({w} × {h} pixels)"


def mask_extent_text(labels: Any, volume: Any) -> str:
    """Where a mask lies, in words: its size in mm along right-left, front-back and
    head-foot, and the axial slices it spans (numbered as the viewer numbers them)."""
    import numpy as np

    from medai import viewer

    display = viewer.to_display(volume)
    lab = display.reorient_labels(np.asarray(labels)) > 0
    if not lab.any():
        return "empty mask"
    z, y, x = (np.flatnonzero(lab.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3))
    sx, sy, sz = display.spacing
    return (f"{(x[-1] - x[0] + 1) * sx:.0f} mm right-left × {(y[-1] - y[0] + 1) * sy:.0f} mm front-back × "
            f"{(z[-1] - z[0] + 1) * sz:.0f} mm head-foot; axial slices {z[0] + 1}–{z[-1] + 1} of {display.shape[0]}")


def qc_rows(qc: Mapping[str, Any], *, card: Any = None, labels: Any = None, volume: Any = None) -> list[dict[str, str]]:
    """A run's quality checks as rows a clinician reads (check, result).

    Raw index boxes are replaced by the mask's real extent in mm and slices
    (computed from the mask when it is given), numbers carry their unit and what
    they mean, nested check reports become one row per check.
    """
    rows: list[dict[str, str]] = []
    for key, value in qc.items():
        if key == "box":
            if labels is not None and volume is not None:
                rows.append({"Check": "Mask extent", "Result": mask_extent_text(labels, volume)})
            continue
        if key == "brain_volume_ml":
            rows.append({"Check": "Brain volume", "Result": volume_text("Brain", float(value), card)})
        elif key == "mask_touches_edges":
            rows.append({"Check": "Mask reaches the image edge",
                         "Result": ("no (the head is inside the field of view)" if not value else
                                    f"yes, at the {', '.join(value)} edge: the head may be cut off")})
        elif key == "intensity_quantiles":
            lo, hi = (float(v) for v in value)
            rows.append({"Check": "Image intensity range used by the model",
                         "Result": f"{lo:.0f} to {hi:.0f} (the 0.5th and 99.5th percentiles of this image; "
                                   "the model's input is scaled to this range)"})
        elif key == "propagated":
            rows.append({"Check": "Carried to neighbouring slices", "Result": "yes" if value else "no, prompted slice only"})
        elif key == "stopped":
            for side, why in dict(value).items():
                rows.append({"Check": f"Propagation stopped ({side})", "Result": str(why)})
        elif key == "slices":
            rows.append({"Check": "Slices segmented", "Result": str(len(value))})
        elif key == "image_quality" and isinstance(value, Mapping):
            for check in value.get("checks", []):
                rows.append({"Check": f"Image quality: {str(check.get('name', '')).replace('_', ' ')}",
                             "Result": f"{check.get('status', '')}: {check.get('message', '')}".strip(": ")})
        elif value in (None, [], {}):
            continue
        elif isinstance(value, (list, dict)):
            continue  # machine detail stays in result.json, not on the card
        else:
            rows.append({"Check": key.replace("_", " ").capitalize(), "Result": str(value)})
    return rows


#: Audit event names as the Audit page shows them.
EVENT_LABELS = {
    "application_start": "Workstation started",
    "application_stop": "Workstation stopped",
    "audit_log_used": "Audit trail read",
    "instances_accessed": "Images opened",
    "instances_transferred": "Images sent or received",
    "export": "Results exported",
    "import": "Images imported",
    "query": "Search of studies",
    "security_alert": "Security alert",
    "model_run": "AI model run",
}


def event_label(event: str) -> str:
    """A readable name for an audit event (the trail keeps the DICOM event code)."""
    return EVENT_LABELS.get(event, event.replace("_", " ").capitalize())


def detail_text(detail: Mapping[str, Any]) -> str:
    """An audit record's detail as short readable text (no JSON, no internal keys)."""
    parts = []
    for key, value in detail.items():
        if key in ("component",) or value in (None, "", [], {}):
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "; ".join(parts)[:160]


@dataclass(frozen=True)
class LegendEntry:
    """One segment of a run as the overlay draws it."""

    value: int
    name: str
    colour: tuple[int, int, int]
    volume_ml: float | None


def legend(result_dir: Path) -> list[LegendEntry]:
    """Label values, names, overlay colours (the card's, else the viewer
    palette) and volumes of one run."""
    from medai import viewer
    from medai.inference import registry

    result = read_result(result_dir)
    volumes = {str(k): float(v) for k, v in (result.get("volumes_ml") or {}).items()}
    model_id = (result.get("model") or {}).get("id") or result_dir.name
    try:
        labels = registry.get_bundle(model_id).card.labels
    except Exception:  # noqa: BLE001 - an uninstalled model still has its volumes shown
        labels = ()
    if labels:
        return [LegendEntry(int(lb.value), lb.name, tuple(lb.color) if lb.color else viewer.label_colour(int(lb.value)),
                            volumes.get(lb.name)) for lb in labels]  # type: ignore[arg-type]
    return [LegendEntry(i, name, viewer.label_colour(i), ml) for i, (name, ml) in enumerate(volumes.items(), 1)]


def box_prompt(display: Any, view: str, index: int, box: tuple[int, int, int, int], *,
               propagate: bool) -> dict[str, Any]:
    """A box drawn (or typed) on the viewer's slice as the prompt an interactive
    model takes: plane, source slice index and box in that slice's pixel grid."""
    from medai.inference.pipelines.medsam_lite import prompt_from_display

    plane, source_index, source_box = prompt_from_display(display, view, index, box)
    x0, y0, x1, y1 = (int(round(v)) for v in source_box.as_list())
    return {"plane": plane, "slice_index": source_index, "box": (x0, y0, x1, y1), "propagate": propagate}


def run(model_id: str, volume: Any, series: SeriesEntry, study: StudyRow | None = None, *,
        prompt: dict[str, Any] | None = None, force: bool = False) -> tuple[StoredRun, bool]:
    """The result of a model on the open series: a stored run of the same model version on
    the same series content from any surface (reused, audited), else a new run of the
    volume already in memory, stored. Returns (run, reused)."""
    from medai.inference import registry
    from medai.results import obtain, request_for

    bundle = registry.get_bundle(model_id)
    req = request_for(series, bundle.id, str(bundle.version), "ui", study_date=study.study_date if study else "")
    patient = ((study.patient_id or None), (study.patient_name or None)) if study else (None, None)
    return obtain(req, volume=volume, patient=patient, prompt=prompt, force=force)


#: Result files a clinician can send or save, by kind.
RESULT_FILES = {"SEG": "seg.dcm", "SR": "sr.dcm", "JSON": "result.json"}


def available_outputs(result_dir: Path) -> dict[str, Path]:
    """The result files of one run that exist, by kind (SEG, SR, JSON)."""
    return {kind: result_dir / name for kind, name in RESULT_FILES.items() if (result_dir / name).is_file()}


def save_to_folder(result_dir: Path, kinds: Sequence[str], folder: Path, *, study: StudyRow | None,
                   series: SeriesEntry) -> list[Path]:
    """Copy chosen result files into ``folder`` (audited as an export first:
    when the trail cannot be written nothing is copied). File names carry the
    model id and a series key, never patient data."""
    import shutil

    files = available_outputs(result_dir)
    chosen = [files[k] for k in kinds if k in files]
    if not chosen:
        raise ValueError("no result file selected")
    folder.mkdir(parents=True, exist_ok=True)
    audit("export", study=study, series=series,
          detail={"destination": "folder", "files": [p.name for p in chosen], "model": result_dir.name})
    out = []
    for path in chosen:
        target = folder / f"{result_dir.name}-{key_for(series.series_uid)[:12]}-{path.name}"
        shutil.copyfile(path, target)
        out.append(target)
    return out


def send_to_destination(result_dir: Path, kinds: Sequence[str], destination: str, *,
                        study: StudyRow | None, series: SeriesEntry) -> str:
    """Send the chosen DICOM results (SEG/SR) to the configured destination
    (audited by the sender, fail closed). JSON is not DICOM and is not sent."""
    from medai.pacs.sender import parse_destination, send_audited

    files = available_outputs(result_dir)
    chosen = [files[k] for k in kinds if k in files and files[k].suffix == ".dcm"]
    if not chosen:
        raise ValueError("choose a DICOM result (SEG or SR) to send")
    dest = parse_destination(destination)
    send_audited(dest, chosen, study_uid=study.study_uid if study else series.study_uid)
    return f"{len(chosen)} file(s) to {dest.describe()}"


def export_deidentified(result_dir: Path | None, kinds: Sequence[str], series: SeriesEntry, folder: Path,
                        options: Sequence[str] = ()) -> dict[str, Any]:
    """A de-identified copy (PS3.15 Annex E basic profile, :mod:`medai.dicom.deid`) of the
    open series and the chosen DICOM results, for a second opinion or teaching. UIDs are
    remapped with the install's key, so the SEG still points at the exported images.
    Images that may carry burned-in text are quarantined, not exported. Audited by the
    de-identifier (fail closed). Returns the export's summary (no original values)."""
    from medai.dicom.deid import deidentify_study

    sources: list[Path] = list(series.files)
    if result_dir is not None:
        files = available_outputs(result_dir)
        sources += [files[k] for k in kinds if k in files and files[k].suffix == ".dcm"]
    report = deidentify_study(sources, folder, options)
    return {"exported": report.exported, "quarantined": report.quarantined, "skipped": report.skipped,
            "failed": report.failed, "report": str(folder / report.report_path.name),
            "quarantine": report.quarantine_dir is not None}


@dataclass(frozen=True)
class PrivacyStatus:
    """What the Audit & privacy page shows at the top."""

    chain_ok: bool
    records: int
    checkpoints: int
    problems: tuple[str, ...]
    network: dict[str, dict[str, int]]
    egress_guard: bool
    telemetry: dict[str, bool]

    @property
    def allowed_total(self) -> int:
        return sum(self.network.get("allowed", {}).values())

    @property
    def blocked_total(self) -> int:
        return sum(self.network.get("blocked", {}).values())


def privacy_status() -> PrivacyStatus:
    """Chain verification of this install's trail and this process's network counts."""
    from medai.compliance import egress, telemetry, verify

    report = verify.verify()
    return PrivacyStatus(report.ok, report.records, report.checkpoints, tuple(report.problems),
                         egress.counts(), egress.installed(), telemetry.status())


def session_events(limit: int = 500) -> list[dict[str, Any]]:
    """This process's audit records as table rows (pseudonyms only, never clear
    identifiers); reading them is itself audited."""
    from medai.compliance import audit as trail

    rows = []
    for rec in trail.select(trail.Filter(session=trail.session_id()), limit=limit, purpose="ui-session-view"):
        participants = rec.get("participants", ())
        rows.append({
            "Time (UTC)": str(rec.get("time", ""))[:19].replace("T", " "),
            "Event": event_label(str(rec.get("event", ""))),
            "Outcome": rec.get("outcome_text", ""),
            "Patient (pseudonym)": ", ".join(sorted({str(p["pseudonym"]) for p in participants
                                                     if p.get("pseudonym")})),
            "Detail": detail_text(rec.get("detail") or {}),
        })
    return rows


def write_attestation(folder: Path | None = None) -> Path:
    """Sign an attestation of this session and write it under ``MEDAI_HOME/attestations``."""
    from medai.compliance import attest
    from medai.compliance import audit as trail

    doc = attest.attest(trail.Filter(session=trail.session_id()))
    out = folder or home.attestations_dir()
    out.mkdir(parents=True, exist_ok=True)
    stamp = doc["statement"]["issued"].replace(":", "").replace("-", "").split(".")[0]
    path = out / f"attestation-{stamp}-{trail.session_id()[:8]}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
    return path
