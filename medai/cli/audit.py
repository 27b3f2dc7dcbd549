"""``medai audit``: read, verify, checkpoint, export and attest the audit trail.

Every command that reads the trail is itself recorded (Audit Log Used, 110101).
Output is pseudonymised unless ``--reveal`` is given (which needs this install's
data key and is recorded as a reveal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from medai.cli._common import EXIT_FAILURE, emit, state
from medai.compliance import attest as _attest
from medai.compliance import audit as _audit
from medai.compliance import fhir, keys, trail
from medai.compliance import verify as _verify
from medai.errors import AuditVerificationError

audit_app = typer.Typer(help="The tamper-evident audit trail: show, verify, checkpoint, export, attest.",
                        no_args_is_help=True)
keys_app = typer.Typer(help="Install keys: export the public key, rotate.", no_args_is_help=True)
audit_app.add_typer(keys_app, name="keys")

_EVENT_HELP = "Event name (repeatable): " + ", ".join(_audit.EVENTS)


def _filter(event: list[str], since: Optional[str], until: Optional[str], patient: Optional[str] = None,
            outcome: Optional[str] = None, session: Optional[str] = None) -> _audit.Filter:
    for name in event:
        if name not in _audit.EVENTS:
            raise typer.BadParameter(f"unknown event {name!r}; {_EVENT_HELP}", param_hint="--event")
    for hint, value in (("--since", since), ("--until", until)):
        try:
            if value:
                _audit.normalise_time(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not an ISO 8601 time (e.g. 2026-11-25T14:00)",
                                     param_hint=hint) from None
    if outcome and outcome not in _audit.OUTCOMES:
        raise typer.BadParameter(f"one of {', '.join(_audit.OUTCOMES)}", param_hint="--outcome")
    return _audit.Filter(tuple(event), since, until, patient, outcome, session)


def _write_text(path: Optional[Path], text: str) -> None:
    """To stdout, or to a private (0600) file: exports may hold identifiers."""
    if path is None:
        sys.stdout.write(text)
    else:
        keys.write_secret(path.resolve(), text.encode("utf-8"))


def _write(path: Optional[Path], data: Any) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@audit_app.command("show")
def show(
    ctx: typer.Context,
    event: list[str] = typer.Option([], "--event", "-e", help=_EVENT_HELP),
    since: Optional[str] = typer.Option(None, help="From this UTC time (ISO 8601, inclusive)."),
    until: Optional[str] = typer.Option(None, help="Until this UTC time (exclusive)."),
    patient: Optional[str] = typer.Option(None, help="Patient ID or its pseudonym."),
    outcome: Optional[str] = typer.Option(None, help="success, minor_failure, serious_failure, major_failure."),
    session: Optional[str] = typer.Option(None, help="Session id (one medai process)."),
    limit: int = typer.Option(50, help="Show at most the last N matches (0: all)."),
    reveal: bool = typer.Option(False, "--reveal", help="Decrypt patient identifiers (recorded)."),
) -> None:
    """Show audit records, newest last, pseudonymised unless --reveal."""
    records = _audit.select(_filter(event, since, until, patient, outcome, session),
                            limit=limit or None, reveal=reveal, purpose="show")

    def human(recs: list[dict[str, Any]]) -> None:
        for rec in recs:
            parts = []
            for p in rec.get("participants", ()):
                if p.get("type") == "patient":
                    clear = p.get("clear")
                    parts.append(f"patient={json.dumps(clear) if clear else p.get('pseudonym', p.get('name_pseudonym'))}")
                elif p.get("study_uid"):
                    parts.append(f"study={p['study_uid']}")
            actor = rec.get("actor", {})
            sys.stdout.write(f"{rec['seq']:>7} {rec['time']} {rec['event']:<22} {rec['outcome_text']:<15} "
                             f"{actor.get('user')}/{actor.get('role')} {' '.join(parts)} "
                             f"{json.dumps(rec.get('detail') or {}, sort_keys=True)}\n")

    emit(ctx, records, human)


@audit_app.command("verify")
def verify(
    ctx: typer.Context,
    anchor: list[Path] = typer.Option([], "--anchor", help="Exported checkpoint file(s) to check against."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="PEM public key(s) (default: this install's)."),
    trail_file: Optional[Path] = typer.Option(None, "--trail", help="Verify a copied trail.jsonl instead of this install's."),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="checkpoints.jsonl belonging to --trail."),
) -> None:
    """Check every record's hash and links and every signed checkpoint; exit 1 on any problem."""
    report = _verify.verify(trail_file=trail_file, checkpoints_file=checkpoints, anchors=tuple(anchor),
                            public_keys=public_key)
    if trail_file is None:
        _audit.record("audit_log_used", outcome="success" if report.ok else "serious_failure",
                      detail={"purpose": "verify", "records": report.records, "ok": report.ok,
                              "problems": list(report.problems)[:20]})

    def human(d: dict[str, Any]) -> None:
        state = "OK" if d["ok"] else "FAILED"
        sys.stdout.write(f"audit trail {state}: {d['records']} records, {d['checkpoints']} signed checkpoints "
                         f"(last covers {d['last_checkpoint']})\n")
        for problem in d["problems"]:
            sys.stdout.write(f"  problem: {problem}\n")

    emit(ctx, report.to_json(), human)
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@audit_app.command("checkpoint")
def checkpoint(
    ctx: typer.Context,
    export: Optional[Path] = typer.Option(None, "--export", help="Also write the signed checkpoint to FILE "
                                          "(keep it elsewhere; 'verify --anchor FILE' detects a cut tail)."),
) -> None:
    """Sign a checkpoint (record count + head hash) of the trail now."""
    cp = trail.checkpoint()
    data = cp.to_json()
    if export is not None:
        _write(export, data)
    emit(ctx, data, lambda d: sys.stdout.write(f"checkpoint: {d['count']} records, head {d['head']}, "
                                              f"key {d['key_id']}" + (f", exported to {export}" if export else "") + "\n"))


@audit_app.command("export")
def export(
    ctx: typer.Context,
    fmt: str = typer.Option("fhir", "--format", help="fhir (FHIR R4 AuditEvent bundle) or jsonl."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: stdout)."),
    event: list[str] = typer.Option([], "--event", "-e", help=_EVENT_HELP),
    since: Optional[str] = typer.Option(None, help="From this UTC time (inclusive)."),
    until: Optional[str] = typer.Option(None, help="Until this UTC time (exclusive)."),
    reveal: bool = typer.Option(False, "--reveal", help="Include clear patient identifiers (recorded)."),
) -> None:
    """Export audit records (pseudonymised unless --reveal)."""
    if fmt not in ("fhir", "jsonl"):
        raise typer.BadParameter("use fhir or jsonl", param_hint="--format")
    records = _audit.select(_filter(event, since, until), reveal=reveal, purpose=f"export-{fmt}")
    if fmt == "fhir":
        _write(out, fhir.bundle(records))
    elif out is None and state(ctx).json:
        _write(None, records)  # one JSON document instead of JSON lines
    else:
        _write_text(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    if out is not None:
        emit(ctx, {"out": str(out), "format": fmt, "records": len(records)},
             lambda d: sys.stderr.write(f"{d['records']} records written to {d['out']} ({d['format']})\n"))


@audit_app.command("attest")
def attest(
    ctx: typer.Context,
    since: Optional[str] = typer.Option(None, help="From this UTC time (inclusive)."),
    until: Optional[str] = typer.Option(None, help="Until this UTC time (exclusive)."),
    session: Optional[str] = typer.Option(None, help="Only this session id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the attestation to FILE."),
) -> None:
    """Sign a statement of network attempts (allowed/blocked) and events for a scope."""
    doc = _attest.attest(_filter([], since, until, session=session))
    if out is not None:
        _write(out, doc)
    body = doc["statement"]

    def human(_: Any) -> None:
        if out is None:
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        else:
            sys.stdout.write(f"attestation written to {out}: {body['records']} records, network "
                             f"{json.dumps(body['network'], sort_keys=True)}, key {doc['key_id']}\n")

    emit(ctx, doc, human)


@audit_app.command("verify-attestation")
def verify_attestation(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Attestation JSON written by 'medai audit attest'."),
    public_key: Optional[Path] = typer.Option(None, "--public-key", help="PEM public key(s) to trust."),
) -> None:
    """Check an attestation's signature (works on any machine with the public key)."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AuditVerificationError(f"{file}: cannot read attestation ({exc})") from exc
    body = _attest.verify_attestation(doc, public_keys=public_key)
    blocked = sum(body["network"]["blocked"].values())
    emit(ctx, {"ok": True, "key_id": doc["key_id"], "statement": body},
         lambda d: sys.stdout.write(f"attestation OK (key {d['key_id']}): {body['records']} records, "
                                    f"{blocked} blocked network attempts, issued {body['issued']}\n"))


@keys_app.command("export")
def keys_export(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the PEM to FILE (default: stdout)."),
) -> None:
    """Export the public signing key(s) (current first, then retired) as PEM."""
    pem = keys.export_public_keys()
    if out is not None:
        out.write_bytes(pem)
    if state(ctx).json:
        emit(ctx, {"out": str(out), "pem": None} if out is not None else {"out": None, "pem": pem.decode("ascii")})
    elif out is None:
        sys.stdout.write(pem.decode("ascii"))
    else:
        sys.stderr.write(f"public keys written to {out}\n")


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    data_key: bool = typer.Option(False, "--data-key", help="Also rotate the AES key sealing identifiers."),
) -> None:
    """Replace the signing key (old public key kept for verification); audited."""
    rot = _audit.rotate_keys(data=data_key)
    data = {"old_key_id": rot.old_key_id, "new_key_id": rot.new_key_id,
            "old_data_key_id": rot.old_data_key_id, "new_data_key_id": rot.new_data_key_id}
    emit(ctx, data, lambda d: sys.stdout.write(
        f"signing key rotated: {d['old_key_id']} -> {d['new_key_id']}; re-export the public keys "
        "('medai audit keys export') for verifiers elsewhere\n"))


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
