"""``medai triage``: a ranked worklist from many studies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai import config
from medai.cli._common import emit, state


def _progress_callback(enabled: bool) -> tuple[Any, Any]:
    """A rich progress bar on stderr (studies/s and ETA), or nothing when stderr is not a TTY."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} studies/s" if task.speed else "-- studies/s")

    progress = Progress(TextColumn("triage"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False)
    task = progress.add_task("studies", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def _table(report: Any, *, limit: int | None, stderr: bool) -> None:
    """The ranked studies (pseudonymous keys only: no patient data on the terminal) and,
    on stderr, the counts by status."""
    from rich.console import Console
    from rich.table import Table

    stream = sys.stderr if stderr else sys.stdout
    console = Console(stderr=stderr, width=None if stream.isatty() else 140)
    rows = report.rows if limit is None else report.rows[:limit]
    title = f"Worklist: {len(report.rows)} studies" + (f", top {len(rows)}" if len(rows) < len(report.rows) else "")
    table = Table(title=title + " (not for diagnostic use)")
    for col in ("#", "study", "status", "priority", "qc", "measurements / findings"):
        table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=60)
    for i, row in enumerate(rows, 1):
        table.add_row(str(i), row.study_key, row.status, row.priority, row.qc,
                      "; ".join(x for x in (row.measurements, row.findings) if x))
    console.print(table)
    if stderr:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(report.status_counts().items()))
        console.print(f"{counts}; {report.ran} model runs ({report.skipped_done} already done, "
                      f"{report.failed} failed), {report.workers} at once, {report.seconds:.1f} s")
        if report.unattributed_files:
            console.print(f"{report.unattributed_files} damaged file(s) could not be traced to a study "
                          "(see `medai dicom index`)")


def triage_cmd(
    ctx: typer.Context,
    dirs: list[Path] = typer.Argument(..., exists=True, help="Folders (or files) holding DICOM studies."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Worklist file (.csv or .json); "
                                       "optional with --format table."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv, json or table (table: print only)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model ids "
                                         "(default: every installed model that needs no prompt)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Studies processed at once "
                                          "(capped by the memory budget)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Memory budget for all runs at once, "
                                             "e.g. 8G (default: 80% of available memory)."),
    force: bool = typer.Option(False, "--force", help="Redo studies already done."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry studies that failed before."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Run on Dask: 'local' (a loopback-only "
                                          "cluster on this machine) or dask://host:port."),
) -> None:
    """Run the installed models over every study and write a ranked worklist.

    Results land in the results store every surface shares (`medai results list`, the UI's Worklist); a series another surface already ran the same model on is not run again.

    Resumable: rerun the same command after an interruption and only the rest runs.

    Exit codes: 0 all studies done, 3 some failed, 1 nothing could run, 2 usage."""
    from medai import triage

    fmt_l = (fmt or (out.suffix.lstrip(".") if out else "") or "csv").lower()
    if fmt_l not in {"csv", "json", "table"}:
        raise typer.BadParameter("--format must be csv, json or table")
    if out is None and fmt_l != "table":
        raise typer.BadParameter("--out is required unless --format table")
    n = config.get("triage.workers", workers)
    if int(n) < 1:
        raise typer.BadParameter("--workers must be at least 1")
    budget = config.get("max_memory", max_memory)
    budget = config.parse_size(budget) if budget is not None else None
    progress, update = _progress_callback(sys.stderr.isatty())
    try:
        if progress:
            progress.start()
        report = triage.triage(dirs, models=models.split(",") if models else None,
                               workers=int(n), max_memory=budget, force=force, retry_failed=retry_failed,
                               cluster=cluster, progress=update)
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        sys.stderr.write("interrupted: finished studies are kept; run the same command again to continue\n")
        raise typer.Exit(130) from None
    finally:
        if progress:
            progress.stop()
    if out is not None and fmt_l != "table":
        triage.write_worklist(report.rows, out, fmt_l)
    summary = {"worklist": str(out) if out is not None and fmt_l != "table" else None,
               "studies": len(report.rows), "by_status": report.status_counts(), "jobs_run": report.ran,
               "jobs_already_done": report.skipped_done, "jobs_failed": report.failed,
               "workers": report.workers, "seconds": round(report.seconds, 1), "exit_code": report.exit_code}
    if fmt_l == "table" and not state(ctx).json:  # under --json stdout holds only the JSON summary
        _table(report, limit=None, stderr=False)
    _table(report, limit=20, stderr=True)
    if fmt_l != "table" or state(ctx).json:
        emit(ctx, summary, lambda d: typer.echo(
            f"{d['studies']} studies, {d['jobs_run']} model runs ({d['jobs_already_done']} already done, "
            f"{d['jobs_failed']} failed) in {d['seconds']} s" + (f"; worklist: {d['worklist']}" if d["worklist"] else "")))
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    app.command("triage")(triage_cmd)
