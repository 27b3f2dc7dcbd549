"""``medai results``: the results store every surface shares (list, show, review, send)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from medai.cli._common import emit


def register(app: typer.Typer) -> None:
    results = typer.Typer(help="Every model run from the UI, the PACS hook, triage and `medai run`, in one "
                          "store: list and show runs, accept or reject them, send accepted ones.",
                          no_args_is_help=True)
    app.add_typer(results, name="results")

    @results.command("list")
    def list_cmd(
        ctx: typer.Context,
        model: Optional[str] = typer.Option(None, "--model", help="Only this model id."),
        review: Optional[str] = typer.Option(None, "--review", help="Only this review state: new, accepted, "
                                             "rejected, sent or send_failed."),
        surface: Optional[str] = typer.Option(None, "--surface", help="Only runs asked for by cli, ui, pacs or triage."),
        limit: int = typer.Option(100, "--limit", min=1, help="At most this many runs."),
    ) -> None:
        """Runs in reader order: QC failures first, then by priority (pseudonymous keys only)."""
        from medai.results import ResultsStore, rank

        with ResultsStore() as store:
            runs = rank(store.runs(model_id=model, review=review, surface=surface))[:limit]
        rows = [r.to_json() for r in runs]

        def human(items: list[dict[str, Any]]) -> None:
            if not items:
                typer.echo("no results yet")
            for r in items:
                typer.echo(f"{r['run_id']}  {r['model']} {r['version']:<6} {r['status']:<6} qc {r['qc'] or '-':<4} "
                           f"{r['priority'] or '-':<7} {r['review']:<11} {r['surface']:<6} study {r['study_key']}")

        emit(ctx, rows, human)

    @results.command("show")
    def show_cmd(ctx: typer.Context, run_id: str = typer.Argument(..., help="Run id (see `medai results list`).")) -> None:
        """One run: model, QC, findings, volumes, review and its files."""
        from medai.results import ResultsStore

        with ResultsStore() as store:
            run = store.get(run_id).to_json()
        emit(ctx, run, None)

    @results.command("accept")
    def accept_cmd(
        ctx: typer.Context,
        run_id: str = typer.Argument(..., help="Run id."),
        comment: str = typer.Option("", "--comment", help="The reader's comment (kept with the review)."),
        no_send: bool = typer.Option(False, "--no-send", help="Accept only; send later with `medai results send`."),
    ) -> None:
        """Accept a result as its reader (a verified SR naming review.reader, else the OS account), then send it to pacs.destination when one is configured."""
        from medai import review

        run = review.accept(run_id, comment=comment, send=not no_send)
        emit(ctx, run.to_json(), lambda d: typer.echo(f"{d['run_id']}: {d['review']}"
                                                      + (f" ({d['send_error']})" if d["send_error"] else "")))

    @results.command("reject")
    def reject_cmd(
        ctx: typer.Context,
        run_id: str = typer.Argument(..., help="Run id."),
        comment: str = typer.Option("", "--comment", help="Why (kept with the review)."),
    ) -> None:
        """Reject a result: it is never sent."""
        from medai import review

        run = review.reject(run_id, comment=comment)
        emit(ctx, run.to_json(), lambda d: typer.echo(f"{d['run_id']}: {d['review']}"))

    @results.command("send")
    def send_cmd(
        ctx: typer.Context,
        run_id: str = typer.Argument(..., help="Run id."),
        to: Optional[str] = typer.Option(None, "--to", help="AE@host:port or a folder (default: pacs.destination)."),
    ) -> None:
        """Send an accepted result (or retry a failed send)."""
        from medai import review

        run = review.send_run(run_id, destination=to)
        emit(ctx, run.to_json(), lambda d: typer.echo(f"{d['run_id']}: {d['review']}"
                                                      + (f" ({d['send_error']})" if d["send_error"] else "")))
