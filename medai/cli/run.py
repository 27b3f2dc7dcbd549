"""``medai run``: run one model on a study/series folder and write SEG, mask and result.json."""

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
) -> None:
    """Run MODEL on SOURCE: writes seg.dcm, mask.nii.gz and result.json into --out."""
    from medai.errors import MedaiError
    from medai.inference import run as runner

    prompt = _prompt(plane, slice_index, box, propagate, window, slice_range)
    kwargs: dict[str, Any] = {"device": device, "max_memory": max_memory, "prompt": prompt, "threads": threads,
                              "precision": precision}
    if all_series:
        if series:
            raise typer.BadParameter("--series and --all-series exclude each other")
        results = runner.run_study(model, source, out, allow_unsigned=allow_unsigned or None, **kwargs)
        if not results:
            raise MedaiError(f"{source}: no series matches model {model}")
        emit(ctx, [r.summary() for r in results], _human_many)
        return
    result = runner.run_model(model, source, out, series_uid=series, allow_unsigned=allow_unsigned or None, **kwargs)
    emit(ctx, result.summary(), _human_one)
    if any(f.severity != "info" for f in result.findings):
        for f in result.findings:
            sys.stderr.write(f"{f.severity}: {f.text}\n")


def _human_one(s: dict[str, Any]) -> None:
    vols = ", ".join(f"{k} {v:.1f} mL" for k, v in s["volumes_ml"].items())
    sys.stdout.write(f"{s['model']} {s['version']} on series {s['series_uid'] or '(file)'}: {vols}; priority "
                     f"{s['priority']}; {s['provider']} {s.get('precision', '')}; {s['seconds']} s\n  -> {s['out_dir']}\n")


def _human_many(rows: list[dict[str, Any]]) -> None:
    for s in rows:
        _human_one(s)


def register(app: typer.Typer) -> None:
    app.command("run", help="Run a model on a study or series: DICOM SEG + mask + result.json.")(run_command)

