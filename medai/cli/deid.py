"""``medai deid``: de-identified export (DICOM PS3.15 Annex E Basic Profile)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_FAILURE, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, emit
from medai.errors import ConfigError


def _rules(values: list[str]) -> list[Any]:
    from medai.dicom.deid import PixelRule

    rules = []
    for value in values:
        path = Path(value)
        try:
            if path.is_file():
                data = json.loads(path.read_text())
                items = data if isinstance(data, list) else [data]
                rules.extend(PixelRule.from_json(item) for item in items)
            else:
                rules.append(PixelRule.parse(value))
        except (ValueError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--confirm-pixel-rule {value}: {exc}") from exc
    return rules


def deid(
    ctx: typer.Context,
    paths: list[Path] = typer.Argument(..., metavar="SRC... DST",
                                       help="Source files/folders, then the destination folder."),
    profile: str = typer.Option("basic", "--profile", help="Confidentiality profile (basic)."),
    options: str = typer.Option("", "--options",
                                help="Comma-separated options: retain-uids, retain-longitudinal-dates "
                                     "(shifted dates), retain-longitudinal-full-dates, "
                                     "retain-patient-characteristics, retain-device-identity, "
                                     "retain-institution-identity, retain-safe-private, clean-descriptors."),
    key: Optional[Path] = typer.Option(None, "--key", help="Key file for UID remapping and date shifts "
                                       "(default: this installation's key under MEDAI_HOME/deid/key)."),
    confirm_pixel_rule: list[str] = typer.Option(
        [], "--confirm-pixel-rule",
        help="Confirmed pixel-cleaning rule: a JSON file {manufacturer, model, rectangles: list of x,y,w,h} "
             "(a list of them is fine), or inline 'MANUFACTURER|MODEL|x,y,w,h;x,y,w,h'. Matching images that "
             "may carry burned-in text are blanked there and exported instead of quarantined."),
) -> None:
    """Export a de-identified copy of DICOM files: every attribute handled per PS3.15 Table E.1-1,
    UIDs remapped consistently, burned-in-text risks quarantined, a JSON report in DST."""
    from medai.dicom.deid import deidentify_study, load_key

    if len(paths) < 2:
        sys.stderr.write("error: give at least one SRC and a DST\n")
        raise typer.Exit(EXIT_USAGE)
    *sources, dst = paths
    report = deidentify_study(
        sources, dst, [o.strip() for o in options.split(",") if o.strip()],
        load_key(key), pixel_rules=_rules(confirm_pixel_rule), profile=profile,
    )
    data = report.to_json()
    data["report_path"] = str(report.report_path)
    data["quarantine_dir"] = None if report.quarantine_dir is None else str(report.quarantine_dir)

    def human(d: dict[str, Any]) -> None:
        sys.stdout.write(f"export {d['export_id']}: {d['exported']} exported, {d['quarantined']} quarantined, "
                         f"{d['skipped']} skipped, {d['failed']} failed\nreport: {d['report_path']}\n")
        if d["quarantine_dir"]:
            sys.stdout.write(f"quarantine: {d['quarantine_dir']}\n")
            for f in d["files"]:
                if f["status"] == "quarantined":
                    sys.stdout.write(f"  input #{f['input']} ({f['modality'] or '?'}): {f['reason']}\n")

    emit(ctx, data, human)
    if report.exported == 0 and (report.failed or report.quarantined):
        raise typer.Exit(EXIT_FAILURE)
    raise typer.Exit(EXIT_PARTIAL if (report.failed or report.quarantined) else EXIT_OK)


def register(app: typer.Typer) -> None:
    app.command("deid", no_args_is_help=True)(deid)
