"""What gets audited, and the one call every part of medai uses: :func:`record`.

Events follow DICOM PS3.15 Annex A.5 (coding scheme DCM). A record holds the UTC
time, event code and action, outcome indicator, the actor (OS user, process role,
pid, session, AE title when acting as a DICOM node), the host, and participant
objects. Patient identifiers never appear in clear: the record holds a keyed HMAC
pseudonym (for matching) and the clear values sealed with AES-256-GCM under the
install data key (for an authorised auditor: ``medai audit show --reveal``).
Study and series UIDs are kept as they are (DICOM audit messages carry them); the
SOP Instance UIDs are reduced to a count and a SHA-256 digest.

``record`` is fail-closed: when the record cannot be written durably it raises
``AuditWriteError`` and the caller must not touch the patient data.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import datetime as dt
import functools
import getpass
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medai.compliance import keys, trail
from medai.errors import AuditVerificationError

DCM = "DCM"  # DICOM controlled terminology (PS3.16)
#: Local coding scheme for events DICOM does not define (documented in docs/compliance.md).
MEDAI_SCHEME = "urn:medai:audit"


@dataclass(frozen=True)
class EventType:
    """How one medai event name maps to a DICOM audit event."""

    name: str
    code: str
    scheme: str
    display: str
    action: str  # EventActionCode: C create, R read, U update, D delete, E execute
    subtype: tuple[str, str] | None = None  # EventTypeCode (code, display), DCM


EVENTS: dict[str, EventType] = {e.name: e for e in [
    EventType("application_start", "110100", DCM, "Application Activity", "E", ("110120", "Application Start")),
    EventType("application_stop", "110100", DCM, "Application Activity", "E", ("110121", "Application Stop")),
    EventType("audit_log_used", "110101", DCM, "Audit Log Used", "R"),
    EventType("instances_accessed", "110103", DCM, "DICOM Instances Accessed", "R"),
    EventType("instances_transferred", "110104", DCM, "DICOM Instances Transferred", "R"),
    EventType("export", "110106", DCM, "Export", "R"),
    EventType("import", "110107", DCM, "Import", "C"),
    EventType("query", "110112", DCM, "Query", "E"),
    EventType("security_alert", "110113", DCM, "Security Alert", "E"),
    EventType("model_run", "MEDAI-001", MEDAI_SCHEME, "AI Model Run", "E"),
    EventType("result_review", "MEDAI-002", MEDAI_SCHEME, "AI Result Review", "U"),
    EventType("result_reused", "MEDAI-003", MEDAI_SCHEME, "AI Result Reused", "R"),
]}

#: EventOutcomeIndicator values (PS3.15 A.5.3.1).
OUTCOMES = {"success": 0, "minor_failure": 4, "failure": 8, "serious_failure": 8, "major_failure": 12}

#: Security Alert event type codes medai uses (DCM, PS3.16 CID 403).
ALERT_NETWORK = ("110128", "Network Configuration")
ALERT_SECURITY_CONFIG = ("110129", "Security Configuration")
ALERT_RESTRICTED = ("110132", "Use of Restricted Function")

_process: dict[str, Any] = {"role": "python", "ae_title": None}
_lock = threading.Lock()


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # a fork while another thread held it must not deadlock the child


os.register_at_fork(after_in_child=_after_fork)
_started: dict[str, Any] = {"pid": None, "session": None}
_capture: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("medai_audit_capture",
                                                                                     default=None)
#: Same function as ``medai.compliance.pseudonym`` (handy next to ``record``).
pseudonym = keys.pseudonym


def set_role(role: str, *, ae_title: str | None = None) -> None:
    """Name this process in the actor of its records (cli, ui, pacs, worker...)."""
    _process["role"] = role
    _process["ae_title"] = ae_title


def session_id() -> str:
    """Random id of this process's session (new after fork)."""
    if _started["pid"] != os.getpid():
        _started["pid"], _started["session"] = os.getpid(), secrets.token_hex(8)
        _started["announced"] = None
    return str(_started["session"])


def _actor() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid:{os.getuid()}"
    actor = {"user": user, "role": _process["role"], "pid": os.getpid(), "session": session_id()}
    if _process["ae_title"]:
        actor["ae_title"] = _process["ae_title"]
    return actor


def _seal(clear: Mapping[str, str]) -> str:
    """AES-256-GCM of the clear identifiers: ``<key id>:<base64 nonce||ciphertext>``."""
    kid, key = keys.data_key()
    nonce = secrets.token_bytes(12)
    data = AESGCM(key).encrypt(nonce, json.dumps(dict(clear), sort_keys=True).encode(), kid.encode())
    return f"{kid}:{base64.b64encode(nonce + data).decode('ascii')}"


def unseal(sealed: str) -> dict[str, str]:
    """Clear identifiers of a sealed participant (needs the data key that sealed it)."""
    try:
        kid, blob = sealed.split(":", 1)
        raw = base64.b64decode(blob)
        clear = AESGCM(keys.data_key_by_id(kid)).decrypt(raw[:12], raw[12:], kid.encode())
    except AuditVerificationError:
        raise
    except Exception as exc:  # InvalidTag, bad base64, bad split
        raise AuditVerificationError(f"sealed identifier cannot be opened ({type(exc).__name__})") from None
    return dict(json.loads(clear))


def instances_digest(uids: Iterable[str]) -> dict[str, Any]:
    """Count and SHA-256 of the sorted SOP Instance UIDs (order-independent)."""
    items = sorted({str(u).strip() for u in uids if str(u).strip()})
    digest = hashlib.sha256("\n".join(items).encode("ascii", "replace")).hexdigest()
    return {"count": len(items), "sha256": digest}


def _participants(patient_id: str | None, patient_name: str | None, study_uid: str | None,
                  series_uid: str | None, instance_uids: Sequence[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if patient_id or patient_name:
        clear = {k: str(v) for k, v in (("id", patient_id), ("name", patient_name)) if v}
        patient: dict[str, Any] = {"type": "patient", "sealed": _seal(clear)}
        if patient_id:
            patient["pseudonym"] = keys.pseudonym(str(patient_id))
        if patient_name:
            patient["name_pseudonym"] = keys.pseudonym(str(patient_name))
        out.append(patient)
    if study_uid or series_uid or instance_uids:
        study: dict[str, Any] = {"type": "study"}
        if study_uid:
            study["study_uid"] = str(study_uid)
        if series_uid:
            study["series_uid"] = str(series_uid)
        if instance_uids:
            study["instances"] = instances_digest(instance_uids)
        out.append(study)
    return out


def _check_detail(detail: Mapping[str, Any] | None, secrets_: Sequence[str | None]) -> dict[str, Any]:
    """``detail`` as plain JSON data; refuses one that contains the patient's ID or name
    as a token (case-insensitive; IDs under 3 characters cannot be told from numbers)."""
    if detail is None:
        return {}
    if not isinstance(detail, Mapping):
        raise TypeError("audit detail must be a mapping")
    text = json.dumps(detail, sort_keys=True, default=str)
    plain = json.dumps(detail, sort_keys=True, default=str, ensure_ascii=False)
    for value in secrets_:
        token = str(value or "").strip()
        if len(token) < 3:
            continue
        pattern = re.compile(rf"(?<![0-9A-Za-z]){re.escape(token)}(?![0-9A-Za-z])", re.IGNORECASE)
        if pattern.search(text) or pattern.search(plain):
            raise ValueError("audit detail contains a patient identifier in clear; pass it as "
                             "patient_id/patient_name so it is pseudonymised")
    return json.loads(text)


def build(event: str, *, outcome: str = "success", patient_id: str | None = None,
          patient_name: str | None = None, study_uid: str | None = None, series_uid: str | None = None,
          instance_uids: Sequence[str] = (), detail: Mapping[str, Any] | None = None,
          subtype: tuple[str, str] | None = None, time: str | None = None) -> dict[str, Any]:
    """The record body (before sealing into the chain). Raises ValueError on a bad event,
    outcome or a detail that would leak an identifier."""
    try:
        etype = EVENTS[event]
    except KeyError:
        raise ValueError(f"unknown audit event {event!r}; one of {', '.join(EVENTS)}") from None
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; one of {', '.join(OUTCOMES)}")
    if isinstance(instance_uids, str):
        instance_uids = (instance_uids,)
    body: dict[str, Any] = {
        "v": 1,
        "time": time or trail.utc_now(),
        "event": event,
        "code": {"code": etype.code, "scheme": etype.scheme, "display": etype.display},
        "action": etype.action,
        "outcome": OUTCOMES[outcome],
        "outcome_text": outcome,
        "actor": _actor(),
        "host": socket.gethostname(),
        "participants": _participants(patient_id, patient_name, study_uid, series_uid, instance_uids),
        "detail": _check_detail(detail, (patient_id, patient_name)),
    }
    sub = subtype or etype.subtype
    if sub is not None:
        body["subtype"] = {"code": sub[0], "scheme": DCM, "display": sub[1]}
    return body


def _torn_record(length: int, digest: str) -> Mapping[str, Any]:
    return build("security_alert", outcome="minor_failure", subtype=ALERT_SECURITY_CONFIG,
                 detail={"reason": "incomplete last record (crash during write) was cut off",
                         "bytes": length, "sha256": digest})


def _start_detail() -> dict[str, str]:
    return {"argv0": os.path.basename(sys.argv[0]) if sys.argv else ""}


def record(event: str, *, outcome: str = "success", patient_id: str | None = None,
           patient_name: str | None = None, study_uid: str | None = None, series_uid: str | None = None,
           instance_uids: Sequence[str] = (), detail: Mapping[str, Any] | None = None,
           subtype: tuple[str, str] | None = None, checkpoint: bool = False) -> None:
    """Durably append one audit record; raise AuditWriteError if it cannot be written.

    The first record of a process is preceded by its Application Start record."""
    sink = _capture.get()
    if sink is not None:  # a cluster worker: the coordinator writes it (see capture)
        if event not in EVENTS or outcome not in OUTCOMES:
            raise ValueError(f"unknown audit event/outcome {event!r}/{outcome!r}")
        call = {"event": event, "outcome": outcome, "patient_id": patient_id, "patient_name": patient_name,
                "study_uid": study_uid, "series_uid": series_uid, "instance_uids": tuple(instance_uids),
                "detail": dict(detail) if detail else None, "subtype": subtype}
        sink.append({k: v for k, v in call.items() if v not in (None, ())})
        return
    body = build(event, outcome=outcome, patient_id=patient_id, patient_name=patient_name,
                 study_uid=study_uid, series_uid=series_uid, instance_uids=instance_uids,
                 detail=detail, subtype=subtype)
    with _lock:
        bodies = [body]
        where = str(trail.trail_path())
        first = _started.get("announced") != where and event != "application_start"
        if first:
            bodies.insert(0, build("application_start", time=body["time"], detail=_start_detail()))
        trail.append(bodies, on_torn=_torn_record, checkpoint=checkpoint)
        _started["announced"] = where


def announce() -> None:
    """Write this process's Application Start record now if it has not been written: work that
    starts ahead of the first access to patient data (sessions prepared in the background while
    a series is read) calls this first, so that a trail that cannot be written stops the
    operation before anything has started. Raises AuditWriteError like :func:`record`."""
    if _capture.get() is None and not started():
        record("application_start", detail=_start_detail())


@contextlib.contextmanager
def capture(sink: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Collect ``record`` calls as keyword dicts instead of writing them, for workers on
    another machine (a cluster) whose coordinator replays them with
    ``record(**call)`` into its own trail. The dicts hold clear identifiers: keep them
    in memory only, and write them promptly."""
    token = _capture.set(sink)
    try:
        yield sink
    finally:
        _capture.reset(token)


def started() -> bool:
    """Whether this process has written its Application Start record (to this trail)."""
    session_id()
    return _started.get("announced") == str(trail.trail_path())


# -- reading -------------------------------------------------------------------------------

def iter_records(path: os.PathLike[str] | None = None) -> Iterator[dict[str, Any]]:
    """Records of the trail in order, each checked against its own hash (not the chain:
    that is ``verify``'s job). Damaged lines raise AuditVerificationError."""
    for lineno, line in enumerate(trail.iter_lines(Path(path) if path else None), 1):
        try:
            yield trail.chain.open_line(line, lineno).record
        except trail.chain.ChainError as exc:
            raise AuditVerificationError(f"{path or trail.trail_path()}: {exc}") from None


@dataclass(frozen=True)
class Filter:
    """Selection for ``show``/``export``/``attest``; every field optional."""

    events: tuple[str, ...] = ()
    since: str | None = None  # ISO UTC, inclusive
    until: str | None = None  # ISO UTC, exclusive
    patient: str | None = None  # a pseudonym, or a clear id (pseudonymised before matching)
    outcome: str | None = None
    session: str | None = None

    def matches(self, rec: Mapping[str, Any]) -> bool:
        """Whether ``rec`` is selected (times compare as normalised UTC strings)."""
        if self.events and rec.get("event") not in self.events:
            return False
        t = str(rec.get("time", ""))
        if self.since and t < normalise_time(self.since):
            return False
        if self.until and t >= normalise_time(self.until):
            return False
        if self.outcome and rec.get("outcome_text") != self.outcome:
            return False
        if self.session and rec.get("actor", {}).get("session") != self.session:
            return False
        if self.patient:
            wanted = {self.patient, _pseudonym_cached(self.patient, str(keys.keys_dir()))}
            found = {p.get("pseudonym") for p in rec.get("participants", ())}
            if not wanted & found:
                return False
        return True


@functools.lru_cache(maxsize=64)
def _pseudonym_cached(text: str, install: str) -> str:  # ``install`` keys the cache per MEDAI_HOME
    return keys.pseudonym(text)


@functools.lru_cache(maxsize=64)
def normalise_time(text: str) -> str:
    """Accept ``2026-01-02``, ``2026-01-02T10:00`` or full ISO; compare as UTC strings."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def select(flt: Filter = Filter(), *, limit: int | None = None, reveal: bool = False,
           purpose: str = "show") -> list[dict[str, Any]]:
    """Matching records (newest last). Reading the trail is itself audited (110101);
    ``reveal`` opens sealed identifiers and is recorded as such."""
    out = [rec for rec in iter_records() if flt.matches(rec)]
    if limit is not None:
        out = out[-limit:] if limit > 0 else []
    if reveal:
        for rec in out:
            for part in rec.get("participants", ()):
                if "sealed" in part:
                    part["clear"] = unseal(part["sealed"])
    shown = {k: v for k, v in flt.__dict__.items() if v}
    if flt.patient:  # never echo a clear patient id into the trail
        shown["patient"] = flt.patient if keys.is_pseudonym(flt.patient) else keys.pseudonym(flt.patient)
    record("audit_log_used", detail={"purpose": purpose, "records": len(out), "revealed": reveal,
                                     "filter": shown})
    return out


def rotate_keys(*, data: bool = False) -> keys.Rotation:
    """Rotate the signing key (and with ``data=True`` the data key) without breaking
    verification: checkpoint with the old key, rotate, record the rotation (with the
    old key's endorsement of the new public key), checkpoint with the new key."""
    trail.checkpoint()
    rot = keys.rotate(data=data)
    detail: dict[str, Any] = {
        "reason": "install key rotated", "old_key_id": rot.old_key_id, "new_key_id": rot.new_key_id,
        "new_public_key": base64.b64encode(rot.new_public_raw).decode("ascii"),
        "endorsement": base64.b64encode(rot.endorsement).decode("ascii"),
    }
    if data:
        detail.update(old_data_key_id=rot.old_data_key_id, new_data_key_id=rot.new_data_key_id)
    record("security_alert", subtype=ALERT_SECURITY_CONFIG, detail=detail, checkpoint=True)
    return rot
