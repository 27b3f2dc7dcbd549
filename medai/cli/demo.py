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
    from medai.results import copy_outputs, obtain, request_for
    from medai.routing import decide

    index = scan([study])
    summary: dict[str, Any] = {
        "study": str(study), "out": str(out),
        "index": {"studies": len(index.studies), "series": len(index.series),
                  "instances": index.instances_indexed, "skipped_files": len(index.skipped)},
        "runs": [], "failures": [], "interactive": [],
    }
    for study_uid, entry in index.studies.items():
        chosen, why = decide(index.series_of_study(study_uid))
        summary["interactive"] += [m for m, reason in why.items() if "prompt" in reason]
        person = index.patients.get(entry.patient_key)
        patient = (person.patient_id or None, person.patient_name or None) if person else (None, None)
        for decision in chosen:
            req = request_for(decision.series, decision.model_id, decision.model_version, "cli",
                              study_date=entry.study_date)
            try:
                stored, reused = obtain(req, patient=patient)
                target = copy_outputs(stored, out / decision.model_id)
            except Exception as exc:  # noqa: BLE001 - the demo reports every model's outcome
                summary["failures"].append({"model": decision.model_id, "error": f"{type(exc).__name__}: {exc}"})
                continue
            s = stored.summary
            summary["runs"].append({"model": stored.model_id, "version": stored.model_version,
                                    "run_id": stored.run_id, "reused": reused, "out_dir": str(target),
                                    "provider": s.get("provider", ""), "seconds": s.get("seconds", 0.0),
                                    "volumes_ml": dict(s.get("volumes_ml") or {}),
                                    "findings": list(s.get("findings") or []), "qc": dict(s.get("qc") or {}),
                                    "caveats": list(s.get("caveats") or []), "priority": stored.priority_level})
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
        again = " (stored result of an earlier run reused)" if run.get("reused") else ""
        con.print(f"  [green]{run['model']}[/green] {run['version']} on {run['provider']} in "
                  f"{run['seconds']} s: {vols}{again}")
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
