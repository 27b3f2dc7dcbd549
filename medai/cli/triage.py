"""``medai triage``: a ranked worklist from many studies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai import config
from medai.cli._common import emit


def _progress_callback(enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar on stderr (studies/s and ETA), or nothing when stderr is not a TTY."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} jobs/s" if task.speed else "-- jobs/s")

    progress = Progress(TextColumn("triage"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    task = progress.add_task("jobs", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _summary_table(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Worklist ({len(report.rows)} studies; not for diagnostic use)")
    for col in ("#", "study", "status", "priority", "qc", "findings"):
        table.add_column(col)
    for i, row in enumerate(report.rows, 1):
        table.add_row(str(i), row.study_key, row.status[:60], row.priority, row.qc, row.findings[:80])
    Console(stderr=True).print(table)


def triage_cmd(
    ctx: typer.Context,
    dirs: list[Path] = typer.Argument(..., exists=True, help="Folders (or files) holding DICOM studies."),
    out: Path = typer.Option(..., "--out", "-o", help="Worklist file (.csv or .json)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, json or table (table: print only)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model ids (default: all installed)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Studies processed at once."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget, e.g. 8G."),
    results: Optional[Path] = typer.Option(None, "--results", help="Where per-study results go "
                                           "(default: <worklist>.results/)."),
    force: bool = typer.Option(False, "--force", help="Redo studies already done."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry studies that failed before."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Run on Dask: 'local' or dask://host:port."),
) -> None:
    """Run the installed models over every study and write a ranked worklist.

    Exit codes: 0 all studies done, 3 some failed, 1 nothing could run, 2 usage."""
    from medai import triage

    fmt_l = (fmt or out.suffix.lstrip(".") or "csv").lower()
    if fmt_l not in {"csv", "json", "table"}:
        raise typer.BadParameter("--format must be csv, json or table")
    n = config.get("triage.workers", workers)
    budget = config.get("max_memory", max_memory)
    budget = config.parse_size(budget) if budget is not None else None
    results_dir = results or out.with_name(out.name + ".results")
    progress, update = _progress_callback(sys.stderr.isatty())
    try:
        if progress:
            progress.start()
        report = triage.triage(dirs, models=models.split(",") if models else None, results_dir=results_dir,
                               workers=int(n), max_memory=budget, force=force, retry_failed=retry_failed,
                               cluster=cluster, progress=update)
    finally:
        if progress:
            progress.stop()
    if fmt_l != "table":
        triage.write_worklist(report.rows, out, fmt_l)
    summary = {"worklist": None if fmt_l == "table" else str(out), "studies": len(report.rows),
               "jobs_run": report.ran, "jobs_already_done": report.skipped_done, "jobs_failed": report.failed,
               "seconds": round(report.seconds, 1), "exit_code": report.exit_code}
    if fmt_l == "table" or sys.stderr.isatty():
        _summary_table(report)
    emit(ctx, summary, lambda d: typer.echo(
        f"{d['studies']} studies, {d['jobs_run']} model runs ({d['jobs_already_done']} already done, "
        f"{d['jobs_failed']} failed) in {d['seconds']} s" + (f"; worklist: {d['worklist']}" if d["worklist"] else "")))
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    app.command("triage")(triage_cmd)

