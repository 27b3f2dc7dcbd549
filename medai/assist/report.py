"""One-page summary of a brain volumetry result, for the reader (PNG and PDF).

matplotlib (Agg, no display, no network) rather than PIL: the page needs text layout,
a table and a normative plot, and the same figure gives a vector PDF for free.

Layout: a header (model, not-for-diagnostic-use banner, QC status), three key slices
(axial, coronal, sagittal through the brain's centre) with the tissue overlay, the
measurement table, the brain parenchymal fraction against the reference percentile
band for the patient's sex across age, the image-quality checks and the findings.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medai.dicom.volume import Volume
    from medai.inference.card import ModelCard
    from medai.inference.pipeline import PipelineOutput

_COLOURS = {1: (0.0, 0.47, 1.0), 2: (1.0, 0.55, 0.0), 3: (0.94, 0.94, 0.63)}
_STATUS_COLOUR = {"pass": "#2e7d32", "warn": "#ef6c00", "fail": "#c62828", "not_assessed": "#757575"}
_NAMES = {"intracranial_volume_ml": "Intracranial volume (ICV)", "parenchyma_volume_ml": "Brain parenchyma (GM+WM)",
          "gm_volume_ml": "Grey matter", "wm_volume_ml": "White matter", "csf_volume_ml": "CSF",
          "brain_parenchymal_fraction": "Brain parenchymal fraction",
          "brain_parenchymal_fraction_percentile": "BPF percentile for age and sex"}


def _slices(volume: "Volume", labels: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """Axial, coronal, sagittal slices through the centre of the labelled brain, in the
    radiological convention (patient's right on the left, anterior/superior up or left)."""
    from medai.inference.steps import reorientation

    orient = reorientation(volume.geometry.direction, "RAS")
    img = orient.apply(volume.array.astype(np.float32, copy=False))  # axes x=R, y=A, z=S
    lab = orient.apply(labels)
    sx, sy, sz = (float(volume.geometry.spacing[orient.perm[a]]) for a in range(3))
    inside = lab > 0 if lab.any() else img > np.percentile(img, 60)
    cx, cy, cz = (int(np.mean(np.nonzero(inside.any(axis=tuple(b for b in range(3) if b != a)))[0]))
                  for a in range(3))

    def view(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T[::-1, ::-1])

    return [("axial", view(img[:, :, cz]), view(lab[:, :, cz]), sy / sx),
            ("coronal", view(img[:, cy, :]), view(lab[:, cy, :]), sz / sx),
            ("sagittal", view(img[cx, :, :]), view(lab[cx, :, :]), sz / sy)]


def _overlay(ax: Any, image: np.ndarray, labels: np.ndarray, aspect: float, title: str) -> None:
    lo, hi = np.percentile(image, [1, 99.5])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
    rgba = np.zeros(labels.shape + (4,), dtype=np.float32)
    for value, colour in _COLOURS.items():
        sel = labels == value
        rgba[sel, :3] = colour
        rgba[sel, 3] = 0.35
    ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _normative_plot(ax: Any, qc: Mapping[str, Any], card: "ModelCard") -> None:
    from medai.assist.normative import load_measures

    measures = load_measures(card.raw.get("normative"))
    m = measures.get("brain_parenchymal_fraction")
    comp = next((c for c in qc.get("normative", []) if c.get("measure") == "brain_parenchymal_fraction"), None)
    ax.set_title("Brain parenchymal fraction vs. age (reference)", fontsize=9)
    ax.tick_params(labelsize=7)
    if m is None or comp is None or "z" not in comp:
        note = (comp or {}).get("note") or ("not measurable on this series: no volumes" if comp is None
                                            else "no normative comparison")
        ax.text(0.5, 0.5, textwrap.fill(note, 45), ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_axis_off()
        return
    sex = qc.get("sex") or "F"
    ages = np.linspace(m.age_min, m.age_max, 60)
    for lo_p, hi_p, alpha in ((5, 95, 0.18), (25, 75, 0.3)):
        ax.fill_between(ages, [m.quantile(a, sex, lo_p) for a in ages], [m.quantile(a, sex, hi_p) for a in ages],
                        color="#1565c0", alpha=alpha, lw=0, label=f"{lo_p}th-{hi_p}th pct")
    ax.plot(ages, [m.mean(a, sex) for a in ages], color="#1565c0", lw=1, label="reference mean")
    age = qc.get("age_years")
    ax.plot([age], [comp["value"]], marker="o", color="#c62828", ms=6,
            label=f"this scan: pct {comp['percentile']:.0f}")
    ax.set_xlabel(f"age (years), sex {sex}", fontsize=8)
    ax.set_ylabel("BPF", fontsize=8)
    ax.legend(fontsize=6, loc="lower left")


def render_summary(volume: "Volume", output: "PipelineOutput", card: "ModelCard", out_dir: Path) -> list[Path]:
    """Write ``summary.png`` and ``summary.pdf`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    qc = dict(output.qc)
    quality = qc.get("image_quality", {})
    fig = plt.figure(figsize=(8.27, 11.69), dpi=110)  # A4 portrait
    fig.text(0.04, 0.975, card.name, fontsize=13, weight="bold", va="top")
    fig.text(0.04, 0.952, f"{card.id} {card.version} · NOT FOR DIAGNOSTIC USE · assistive measurements for review",
             fontsize=8, color="#c62828", va="top")
    status = quality.get("status", "?")
    headline = f"Image QC: {status.upper()}"
    if qc.get("measurable") is False:  # image QC may pass while the tissue result is refused
        fig.text(0.96, 0.952, headline, fontsize=8, ha="right", va="top", color=_STATUS_COLOUR.get(status, "black"))
        status, headline = "fail", "NOT MEASURABLE"
    fig.text(0.96, 0.975, headline, fontsize=11, weight="bold", ha="right", va="top",
             color=_STATUS_COLOUR.get(status, "black"))
    patient = []
    if qc.get("age_years") is not None:
        patient.append(f"age {qc['age_years']:.0f}")
    if qc.get("sex"):
        patient.append(f"sex {qc['sex']}")
    sx, sy, sz = volume.geometry.spacing
    fig.text(0.04, 0.935, f"Series: {volume.attributes.get('SeriesDescription', '') or '(no description)'} · "
             f"{' '.join(patient) or 'age/sex not in header'} · voxels {sx:.2f}x{sy:.2f}x{sz:.2f} mm",
             fontsize=8, va="top")

    for n, (title, image, labels, aspect) in enumerate(_slices(volume, output.labels)):
        ax = fig.add_axes((0.03 + n * 0.32, 0.665, 0.30, 0.235))
        _overlay(ax, image, labels, aspect, title)
    fig.text(0.04, 0.655, "Overlay: blue CSF, orange grey matter, pale yellow white matter", fontsize=7, va="top")

    ax = fig.add_axes((0.04, 0.42, 0.44, 0.21))
    ax.set_axis_off()
    ax.set_title("Measurements", fontsize=9, loc="left")
    rows = []
    for m in output.measurements:
        if m.unit == "1":
            value = f"{m.value:.3f}"
        elif m.name.endswith("_percentile"):
            value = f"{m.value:.0f}th"
        else:
            value = f"{m.value:.0f} {m.unit}"
        rows.append([_NAMES.get(m.name, m.name), value])
    if not rows:
        rows = [["Not measurable on this series", "no volumes"]]
    table = ax.table(cellText=rows, colLabels=["measure", "value"], loc="upper left", cellLoc="left",
                     colWidths=[0.7, 0.3])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)

    # Beside the volumes: why there are none, or what to keep in mind reading them.
    notes = []
    if qc.get("measurable") is False and qc.get("not_measurable_reason"):
        reason = str(qc["not_measurable_reason"])
        notes.append(("#c62828", reason[:1].upper() + reason[1:]))
    notes += [("#ef6c00", f"Caveat: {c}") for c in qc.get("caveats", [])]
    fig.canvas.draw()  # the table's height is known only once laid out
    y_note = fig.transFigure.inverted().transform(
        table.get_window_extent(fig.canvas.get_renderer()).get_points())[0][1] - 0.008
    for colour, note in notes:
        text = textwrap.fill(note, 80)
        fig.text(0.04, y_note, text, fontsize=7, va="top", color=colour)
        y_note -= 0.012 * (text.count("\n") + 1) + 0.004
    _normative_plot(fig.add_axes((0.57, 0.44, 0.39, 0.18)), qc, card)

    y = 0.38
    fig.text(0.04, y, "Image quality checks", fontsize=9, weight="bold", va="top")
    line = 0.0125
    y -= 0.006
    for check in quality.get("checks", []):
        y -= 0.013
        value = "-" if check.get("value") is None else f"{check['value']:.3g}"
        fig.text(0.05, y, f"{check['status'].upper():>12}", fontsize=7, va="top", family="monospace",
                 color=_STATUS_COLOUR.get(check["status"], "black"))
        text = textwrap.fill(f"{check['name']}: {value} {check['unit']} ({check['threshold']}) — {check['message']}",
                             118)
        fig.text(0.17, y, text, fontsize=7, va="top")
        y -= line * text.count("\n")
    y -= 0.03
    fig.text(0.04, y, "Findings (assistive, for review)", fontsize=9, weight="bold", va="top")
    y -= 0.006
    for f in [f for f in output.findings or () if not f.text.startswith("Caveat: ")]:
        y -= 0.016
        text = textwrap.fill(f"[{f.severity}] {f.text}", 120)
        fig.text(0.05, y, text, fontsize=7.5, va="top")
        y -= line * text.count("\n")
    if output.priority is not None:
        y -= 0.03
        fig.text(0.04, y, f"Worklist priority: {output.priority.level} (score {output.priority.score:.2f})",
                 fontsize=8, va="top")
    sources = sorted({c["source"] for c in qc.get("normative", []) if c.get("source")})
    fig.text(0.04, 0.02, textwrap.fill("Normative source: " + ("; ".join(sources) if sources else "none used"), 170),
             fontsize=6, va="bottom", color="#555555")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "summary.png", out_dir / "summary.pdf"]
    for p in paths:
        # No creation time in the PDF: the same input gives the same bytes.
        fig.savefig(p, metadata={"CreationDate": None} if p.suffix == ".pdf" else None)
    plt.close(fig)
    return paths
