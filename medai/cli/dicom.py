"""``medai index`` and ``medai convert``: the DICOM foundation on the command line.

Output never carries patient names or IDs: patients appear under their
pseudonymous key, studies and series under their UIDs. Reading headers is an
access to patient data and is recorded in the audit trail (one record per study);
writing a NIfTI file is an export.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_OK, EXIT_PARTIAL, emit

#: Skip kinds that mean "a DICOM file we could not use" (exit code 3), as opposed
#: to files that simply are not DICOM instances.
_PROBLEM_KINDS = {"truncated", "unreadable", "unsafe", "incomplete"}


def _audit(event: str, **kwargs: Any) -> None:
    from medai.compliance import audit

    audit.record(event, **kwargs)


def _print_index(data: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"{data['files_seen']} files, {data['instances_indexed']} instances, "
              f"{len(data['studies'])} studies, {len(data['series'])} series, "
              f"{len(data['skipped'])} skipped\n")
    series = {s["series_instance_uid"]: s for s in data["series"]}
    for study in data["studies"]:
        out.write(f"\npatient {study['patient_key']}  study {study['study_instance_uid']}  "
                  f"{study['study_date']}  {study['description']}\n")
        for uid in study["series"]:
            s = series[uid]
            kind = "image" if s["is_image"] else "object"
            size = f"{s['rows']}x{s['columns']}" if s["rows"] else ""
            out.write(f"  {s['modality'] or '??':<8} {kind:<6} {s['instances']:>5} inst "
                      f"{s['frames']:>5} fr {size:>9}  {s['description'][:40]:<40}  {uid}\n")
    if data["skipped"]:
        out.write("\nskipped:\n")
        for item in data["skipped"]:
            out.write(f"  {item['kind']:<11} {item['path']}: {item['reason']}\n")


def index_command(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., help="Folders and/or files to scan recursively."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Header-parsing processes (default: usable CPUs)."),
) -> None:
    """Index DICOM files from headers only: patients > studies > series, plus every
    skipped file with its reason. Exit 3 when some DICOM files could not be used."""
    from medai.dicom.index import scan

    index = scan(paths, workers=workers)
    for study_uid, study in index.studies.items():
        patient = index.patients[study.patient_key]
        _audit("instances_accessed", patient_id=patient.patient_id or None,
               patient_name=patient.patient_name or None, study_uid=study_uid,
               detail={"action": "index headers", "series": len(study.series_uids)})
    data = index.to_json()
    emit(ctx, data, _print_index)
    problems = [s for s in index.skipped if s.kind in _PROBLEM_KINDS]
    raise typer.Exit(EXIT_PARTIAL if problems else EXIT_OK)


def convert_command(
    ctx: typer.Context,
    series_dir: Path = typer.Argument(..., help="Folder (or file) holding the series."),
    out: Path = typer.Argument(..., help="Output NIfTI file (.nii or .nii.gz)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid",
                                             help="Which series, when the folder holds several."),
    refuse_tilt: bool = typer.Option(False, "--refuse-tilt",
                                     help="Fail on gantry tilt instead of resampling to an orthogonal grid."),
) -> None:
    """Convert one series to NIfTI with SimpleITK-compatible geometry (LPS in
    memory, RAS in the file as NIfTI requires) and exact voxel values."""
    import numpy as np
    import SimpleITK as sitk

    from medai.dicom.index import scan
    from medai.dicom.volume import load_series
    from medai.errors import DicomInputError

    if not str(out).endswith((".nii", ".nii.gz")):
        raise typer.BadParameter("output must end in .nii or .nii.gz", param_hint="OUT")
    index = scan([series_dir], workers=None)
    images = [s for s in index.series.values() if s.is_image]
    if series_uid is None and len(images) == 1:
        series_uid = images[0].series_instance_uid
    entry = index.series.get(series_uid) if series_uid else None
    if entry is None:
        found = ", ".join(s.series_instance_uid for s in images[:5]) or "none"
        raise DicomInputError(series_dir, "choose one image series with --series-uid "
                              f"(image series found: {found})")
    patient = index.patients[entry.patient_key]
    volume = load_series(list(entry.files), series_uid=entry.series_instance_uid,
                         on_tilt="refuse" if refuse_tilt else "resample", float_dtype=np.float64)
    _audit("export", patient_id=patient.patient_id or None, patient_name=patient.patient_name or None,
           study_uid=entry.study_instance_uid, series_uid=entry.series_instance_uid,
           instance_uids=[s.sop_instance_uid for s in volume.sources],
           detail={"format": "nifti", "slices": volume.shape[0]})
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(), str(out), useCompression=str(out).endswith(".gz"))
    result = {"output": str(out), "series_instance_uid": volume.series_instance_uid,
              "shape_kji": list(volume.shape), "dtype": str(volume.array.dtype),
              "origin": list(volume.geometry.origin), "spacing": list(volume.geometry.spacing),
              "direction": list(volume.geometry.direction),
              "gantry_tilt_deg": volume.attributes.get("gantry_tilt_deg")}
    emit(ctx, result, lambda d: sys.stdout.write(
        f"wrote {d['output']}: {d['shape_kji'][2]}x{d['shape_kji'][1]}x{d['shape_kji'][0]} "
        f"{d['dtype']}, spacing {tuple(round(s, 4) for s in d['spacing'])}\n"))


def register(app: typer.Typer) -> None:
    """Top-level commands (not a sub-group): ``medai index`` and ``medai convert``."""
    app.command("index")(index_command)
    app.command("convert")(convert_command)


__all__ = ["register"]
