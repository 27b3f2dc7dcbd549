"""A clinician's review of a stored result, and sending what was accepted.

``accept`` writes a verified SR (VerificationFlag ``VERIFIED``, the configured reader
as Verifying Observer, else the OS account) beside the run's other files and, when a
destination is configured, sends the SEG and the verified SR there; ``reject`` marks
the run so that nothing of it is ever sent. Each review is an audit event
(``result_review``) written before the state changes: if the trail cannot be written,
the review does not happen. ``send`` refuses a run that was not accepted while the
send policy is ``after-review``.

States (:data:`medai.results.REVIEW_STATES`): new → accepted | rejected; accepted → sent
| send_failed; send_failed → sent (retry).
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path
from typing import Any

from medai import config
from medai.errors import ConfigError, MedaiError, PacsError
from medai.results import ResultsStore, StoredRun

VERIFIED_SR = "sr-verified.dcm"


def reader_name() -> str:
    """Who is reviewing: ``review.reader``, else the OS account."""
    return str(config.get("review.reader") or "") or getpass.getuser()


def _organization() -> str:
    return str(config.get("review.organization") or "") or socket.gethostname()


def identity(run: StoredRun) -> dict[str, Any]:
    """Study/series UIDs and clear patient identifiers of a run's source (see
    :func:`medai.results.source_identity`); empty when the run has no source."""
    from medai.results import source_identity

    return dict(source_identity(run.sources[0])) if run.sources else {}


def _audit(run: StoredRun, decision: str, *, comment: bool) -> None:
    from medai.compliance import audit

    audit.record("result_review", **identity(run),
                 detail={"decision": decision, "run": run.run_id, "model": run.model_id,
                         "version": run.model_version, "reader": reader_name(), "comment": comment})


def accept(run_id: str, *, comment: str = "", send: bool = True, store: ResultsStore | None = None) -> StoredRun:
    """Accept a run: verified SR, review recorded, then sent to ``pacs.destination`` when one
    is configured and ``send`` (a failed send leaves the run ``send_failed``, retried with
    :func:`send_run`)."""
    own = store is None
    store = store or ResultsStore()
    try:
        run = store.get(run_id)
        if not run.done:
            raise MedaiError(f"run {run_id} failed; there is nothing to accept")
        if run.review in ("rejected",):
            raise MedaiError(f"run {run_id} was rejected; run the model again to review a new result")
        _audit(run, "accepted", comment=bool(comment))
        sr = run.path("sr")
        if sr is not None and sr.is_file():
            from medai.dicom.outputs.verify import verified_sr

            verified_sr(sr, run.folder / VERIFIED_SR, observer=reader_name(), organization=_organization())
        run = store.set_review(run_id, "accepted", reviewer=reader_name(), comment=comment)
        if send and (run.destination or config.get("pacs.destination")):
            run = send_run(run_id, store=store)
        return run
    finally:
        if own:
            store.close()


def reject(run_id: str, *, comment: str = "", store: ResultsStore | None = None) -> StoredRun:
    """Reject a run: recorded and audited; nothing of it is sent, ever."""
    own = store is None
    store = store or ResultsStore()
    try:
        run = store.get(run_id)
        if run.review in ("sent",):
            raise MedaiError(f"run {run_id} was already sent to the PACS; reject it there")
        _audit(run, "rejected", comment=bool(comment))
        return store.set_review(run_id, "rejected", reviewer=reader_name(), comment=comment)
    finally:
        if own:
            store.close()


def outgoing(run: StoredRun) -> list[Path]:
    """The DICOM files an accepted run sends: its SEG and, when there is one, its verified SR."""
    files = [p for p in (run.path("seg"),) if p is not None and p.is_file()]
    verified = run.folder / VERIFIED_SR
    if verified.is_file():
        files.append(verified)
    return files


def send_run(run_id: str, *, destination: str | None = None, store: ResultsStore | None = None) -> StoredRun:
    """Send an accepted run to ``destination`` (default ``pacs.destination``), audited as an
    export by the sender. Under ``after-review`` only accepted runs (or a failed send's
    retry) go; a rejected run never goes."""
    from medai.pacs.sender import parse_destination, send_audited

    own = store is None
    store = store or ResultsStore()
    try:
        run = store.get(run_id)
        if run.review == "rejected":
            raise MedaiError(f"run {run_id} was rejected; it is never sent")
        if run.review == "new" and config.get("pacs.send_policy") != "immediate":
            raise MedaiError(f"run {run_id} is not reviewed yet; accept it first (pacs.send_policy is after-review)")
        target = destination or run.destination or config.get("pacs.destination")
        if not target:
            raise ConfigError("no destination: set pacs.destination (AE@host:port or a folder)")
        files = outgoing(run) if run.review != "new" else [p for p in (run.path("seg"), run.path("sr")) if p]
        if not files:
            raise MedaiError(f"run {run_id} has no DICOM result to send")
        study_uid = identity(run).get("study_uid")
        try:
            send_audited(parse_destination(str(target)), files, study_uid=study_uid)
        except (PacsError, OSError) as exc:
            return store.set_review(run_id, "send_failed", send_error=str(exc)[:500])
        return store.set_review(run_id, "sent")
    finally:
        if own:
            store.close()


__all__ = ["accept", "reject", "send_run", "outgoing", "identity", "reader_name", "VERIFIED_SR"]
