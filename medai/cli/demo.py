"""``medai demo``: the main job, end to end, on the bundled real T1 study.

What it shows, in order: the study is indexed (headers only), every installed
model whose card accepts one of its series runs on this machine, results are
written as DICOM SEG/SR + NIfTI + JSON, the audit trail is verified, and a signed
attestation of this session (what was attempted on the network, allowed and
blocked) is written beside the results.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_FAILURE, EXIT_PARTIAL, emit


def demo_study() -> Path:
    """Folder of the bundled real T1 study (synthetic headers; see its README)."""
    return Path(str(resources.files("medai") / "data" / "demo-t1"))


def run_demo(study: Path, out: Path) -> dict[str, Any]:
    from medai.compliance import attest, audit
    from medai.compliance.verify import verify
    from medai.dicom.index import scan
    from medai.inference import registry
    from medai.inference.run import run_model
    from medai.routing import best_first, card_accepts

    index = scan([study])
    summary: dict[str, Any] = {
        "study": str(study), "out": str(out),
        "index": {"studies": len(index.studies), "series": len(index.series),
                  "instances": index.instances_indexed, "skipped_files": len(index.skipped)},
        "runs": [], "failures": [], "interactive": [],
    }
    for bundle in registry.list_bundles():
        if bundle.card.accepts_prompt:
            summary["interactive"].append(bundle.id)  # needs a reader's box: `medai ui` or `medai run --box`
            continue
        accepted = [s for s in index.series.values() if card_accepts(bundle.card, s)[0]]
        for entry in best_first(accepted)[:1]:
            try:
                result = run_model(bundle.id, Path(entry.files[0]).parent, out / bundle.id,
                                   series_uid=entry.series_instance_uid)
            except Exception as exc:  # noqa: BLE001 - the demo reports every model's outcome
                summary["failures"].append({"model": bundle.id, "error": f"{type(exc).__name__}: {exc}"})
                continue
            summary["runs"].append({**result.summary(),
                                    "findings": [f.text for f in result.findings],
                                    "qc": result.qc if isinstance(result.qc, dict) else dict(result.qc)})
    report = verify()
    summary["audit"] = {"ok": report.ok, "records": report.records, "problems": list(report.problems)}
    doc = attest.attest(audit.Filter(session=audit.session_id()))
    att_path = out / "attestation.json"
    att_path.parent.mkdir(parents=True, exist_ok=True)
    att_path.write_text(json.dumps(doc, indent=2))
    summary["attestation"] = {"path": str(att_path), "network": doc["statement"]["network"]}
    return summary


def _human(d: dict[str, Any]) -> None:
    from rich.console import Console

    con = Console()
    idx = d["index"]
    con.print(f"[bold]medai demo[/bold] on {d['study']}")
    con.print(f"  indexed {idx['instances']} instances in {idx['series']} series "
              f"({idx['skipped_files']} files skipped)")
    for run in d["runs"]:
        vols = ", ".join(f"{k} {v:.1f} mL" for k, v in run["volumes_ml"].items())
        con.print(f"  [green]{run['model']}[/green] {run['version']} on {run['provider']} in "
                  f"{run['seconds']} s: {vols}")
        for text in run["findings"]:
            con.print(f"    finding: {text}")
        con.print(f"    outputs: {run['out_dir']}")
    for model in d["interactive"]:
        con.print(f"  {model}: interactive (box prompt); try it in `medai ui` or with `medai run --box`")
    for fail in d["failures"]:
        con.print(f"  [red]{fail['model']} failed[/red]: {fail['error']}")
    a = d["audit"]
    con.print(f"  audit trail: {'verified' if a['ok'] else 'PROBLEMS: ' + '; '.join(a['problems'])} "
              f"({a['records']} records)")
    net = d["attestation"]["network"]
    blocked = sum(net.get("blocked", {}).values())
    allowed = {k: v for k, v in net.get("allowed", {}).items()}
    con.print(f"  network this session: allowed {allowed or 'nothing'}, blocked {blocked}; "
              f"signed attestation: {d['attestation']['path']}")
    con.print("  [yellow]Not for diagnostic use.[/yellow]")


def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("medai-demo-output"), "--out", "-o", help="Folder for the results."),
    study: Optional[Path] = typer.Option(None, "--study", exists=True, file_okay=False,
                                         help="Run on this study folder instead of the bundled one."),
) -> None:
    """Run every installed model on the bundled real T1 study and prove nothing left the machine."""
    summary = run_demo(study or demo_study(), out)
    emit(ctx, summary, _human)
    if not summary["runs"]:
        raise typer.Exit(EXIT_FAILURE)
    if summary["failures"] or not summary["audit"]["ok"]:
        raise typer.Exit(EXIT_PARTIAL)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
