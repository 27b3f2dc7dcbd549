"""``medai run``: run one model on a study/series folder and write SEG, mask and result.json.

A DICOM run lands in the results store like every surface's (``medai results``), and
its files are copied into ``--out``; when the same model version already ran on the
same series content (from the UI, the PACS hook or triage), that result is reused.
An image file (NIfTI, NRRD, MHA) has no DICOM identity: it runs straight into --out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import emit


def _prompt(plane: Optional[str], slice_index: Optional[int], box: Optional[str], propagate: bool,
            window: Optional[str] = None, slice_range: Optional[str] = None) -> dict[str, Any] | None:
    if plane is None and slice_index is None and box is None and not propagate:
        return None
    prompt: dict[str, Any] = {"plane": plane or "axial", "propagate": propagate}
    if window is not None:
        prompt["window"] = window
    if slice_range is not None:
        prompt["slice_range"] = slice_range
    if slice_index is not None:
        prompt["slice"] = slice_index
    if box is not None:
        prompt["box"] = box
    return prompt


def run_command(
    ctx: typer.Context,
    source: Path = typer.Argument(..., exists=True, help="DICOM study/series folder or file (or a NIfTI file)."),
    model: str = typer.Option(..., "--model", "-m", help="Model id (see `medai models list`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID (default: best match by the card's rules)."),
    all_series: bool = typer.Option(False, "--all-series", help="Run on every matching series (one subfolder each)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, tensorrt, rocm, openvino "
                                         "(openvino-cpu, -gpu, -npu), coreml, directml, qnn."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto (this machine's tuned choice, "
                                            "`medai doctor --tune`), fp32, bf16, fp16, int8."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 4G."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: physical cores)."),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Development only: run an unsigned bundle (audited)."),
    plane: Optional[str] = typer.Option(None, "--plane", help="Prompt plane for promptable models: axial, coronal, sagittal."),
    slice_index: Optional[int] = typer.Option(None, "--slice", help="Prompt slice index in that plane."),
    box: Optional[str] = typer.Option(None, "--box", help="Prompt box X0,Y0,X1,Y1 in slice pixels."),
    propagate: bool = typer.Option(False, "--propagate", help="Carry a prompted segmentation to neighbouring slices."),
    window: Optional[str] = typer.Option(None, "--window", help="CT window for box prompts: soft_tissue, liver, lung, "
                                         "bone, brain, or LEVEL,WIDTH in HU (MR uses percentiles)."),
    slice_range: Optional[str] = typer.Option(None, "--slice-range", help="FIRST,LAST: slices propagation may "
                                              "reach (inclusive), the structure's extent as the reader sees it."),
    force: bool = typer.Option(False, "--force", help="Run again even when this model version already ran on "
                               "the same series content (see `medai results`)."),
) -> None:
    """Run MODEL on SOURCE: writes seg.dcm, mask.nii.gz and result.json into --out."""
    from medai.errors import MedaiError
    from medai.inference import run as runner

    prompt = _prompt(plane, slice_index, box, propagate, window, slice_range)
    kwargs: dict[str, Any] = {"device": device, "max_memory": max_memory, "threads": threads,
                              "allow_unsigned": allow_unsigned or None, "precision": precision}
    if all_series and series:
        raise typer.BadParameter("--series and --all-series exclude each other")
    if source.is_file() and source.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
        result = runner.run_model(model, source, out, prompt=prompt, **kwargs)
        emit(ctx, result.summary(), _human_one)
        return
    from medai.inference import registry

    # The model's sessions start now, in the background (compiling a graph is native code):
    # they overlap the DICOM reader's import, the index and the read (see runner.prepare).
    # When the result turns out to be one already stored, the process ends with them unused:
    # a trade measured on the demo study, a new run 0.1 s faster (median of 12 pairs), a reused
    # result 0.18 s slower (0.52 -> 0.70 s, 8 pairs: the compile thread's imports compete with
    # the index's), since whether a result is stored is only known after the index.
    runner.prepare(registry.get_bundle(model, allow_unsigned=allow_unsigned or None), device=device,
                   threads=threads, precision=precision)
    from medai.results import copy_outputs, obtain, request_from_source

    if all_series:
        reqs = _every_series(source, model)
        if not reqs:
            raise MedaiError(f"{source}: no series matches model {model}")
    else:
        reqs = [request_from_source(source, model, "cli", series_uid=series)]
    import gc

    from medai.quick_exit import cycle_collection_paused

    rows = []
    for number, (req, patient) in enumerate(reqs):
        if number:
            gc.collect()  # the previous series' reference cycles, before the next series
        with cycle_collection_paused():  # one run at a time (see medai.quick_exit)
            stored, reused = obtain(req, patient=patient, prompt=prompt, force=force, **kwargs)
        target = copy_outputs(stored, out / stored.series_key if all_series else out)
        rows.append(_summary(stored, target, reused))
        for text in stored.summary.get("findings") or []:
            sys.stderr.write(f"finding: {text}\n")
    emit(ctx, rows if all_series else rows[0], _human_many if all_series else _human_one)


def _every_series(source: Path, model: str) -> list[Any]:
    from medai.dicom.index import scan
    from medai.inference import registry
    from medai.results import request_for
    from medai.routing import accepts, best_first, site_routes

    bundle = registry.get_bundle(model)
    index = scan([source])
    routes = site_routes()
    out = []
    for entry in best_first(e for e in index.series.values() if accepts(bundle, e, routes)[0]):
        person = index.patients.get(entry.patient_key)
        patient = (person.patient_id or None, person.patient_name or None) if person else (None, None)
        out.append((request_for(entry, bundle.id, str(bundle.version), "cli",
                                study_date=index.studies[entry.study_instance_uid].study_date), patient))
    return out


def _summary(stored: Any, target: Path, reused: bool) -> dict[str, Any]:
    s = stored.summary
    return {"model": stored.model_id, "version": stored.model_version, "run_id": stored.run_id,
            "reused": reused, "series_key": stored.series_key, "out_dir": str(target),
            "seg": str(target / stored.outputs["seg"]) if stored.outputs.get("seg") else None,
            "mask": str(target / stored.outputs["mask"]) if stored.outputs.get("mask") else None,
            "result": str(target / stored.outputs["result"]),
            "sr": str(target / stored.outputs["sr"]) if stored.outputs.get("sr") else None,
            "volumes_ml": dict(s.get("volumes_ml") or {}), "priority": stored.priority_level,
            "qc": stored.qc, "provider": s.get("provider", ""), "precision": s.get("precision", ""),
            "seconds": s.get("seconds", 0.0)}


def _human_one(s: dict[str, Any]) -> None:
    vols = ", ".join(f"{k} {v:.1f} mL" for k, v in s["volumes_ml"].items())
    where = f"series {s['series_key']}" if s.get("series_key") else "image file"
    again = " (stored result reused)" if s.get("reused") else ""
    sys.stdout.write(f"{s['model']} {s['version']} on {where}: {vols}; priority {s['priority']}; "
                     f"{s['provider']} {s.get('precision', '')}; {s['seconds']} s{again}\n  -> {s['out_dir']}\n")


def _human_many(rows: list[dict[str, Any]]) -> None:
    for s in rows:
        _human_one(s)


def register(app: typer.Typer) -> None:
    app.command("run", help="Run a model on a study or series: DICOM SEG + mask + result.json.")(run_command)

