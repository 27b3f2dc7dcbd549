"""Session attestations: a signed statement of what medai did on the network.

An attestation covers the audit records in a scope (a session id and/or a time
range) and states: medai and runtime versions, a hash of the resolved settings, the
telemetry switches in force, the configured destinations, network attempts allowed
and blocked by destination class, the events recorded, and a signed audit
checkpoint that covers every record in scope. The statement is signed with the
install's Ed25519 key, so anyone with the exported public key can check it on
another machine (``medai audit verify-attestation FILE --public-key KEY.pem``).

Where the numbers come from: each process writes its network counts into its
Application Stop record; for the process asking for the attestation, the live
counts are used; a session without a stop record (still running or killed) is
listed as ``incomplete`` and only its recorded Security Alerts are counted.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import platform
import socket
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from medai import __version__, config
from medai.compliance import audit, chain, egress, keys, telemetry, trail
from medai.errors import AuditVerificationError

KIND = "medai-session-attestation"
#: Runtime packages whose versions an attestation names (read from metadata, not imported).
PACKAGES = ("onnxruntime", "numpy", "pydicom", "SimpleITK", "highdicom", "pynetdicom", "cryptography",
            "streamlit")


def _versions() -> dict[str, str]:
    out = {"medai": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def config_hash() -> str:
    """SHA-256 of the resolved settings (canonical JSON), so two statements can be
    compared for "same configuration" without revealing it."""
    values = {k: (v if isinstance(v, (str, int, float, bool, list, type(None))) else str(v))
              for k, v in config.resolved().items()}
    return hashlib.sha256(chain.canonical(values)).hexdigest()


def _add(total: dict[str, dict[str, int]], counts: Mapping[str, Mapping[str, int]]) -> None:
    for decision in ("allowed", "blocked"):
        for kind, n in counts.get(decision, {}).items():
            total[decision][kind] = total[decision].get(kind, 0) + int(n)


def statement(flt: audit.Filter = audit.Filter()) -> dict[str, Any]:
    """The unsigned statement for records matching ``flt`` (reading is audited, and a
    checkpoint is signed afterwards so it covers that record too)."""
    records = audit.select(flt, purpose="attest")
    me = audit.session_id()
    sessions: dict[str, dict[str, Any]] = {}
    events: Counter[str] = Counter()
    for rec in records:
        events[rec["event"]] += 1
        actor = rec.get("actor", {})
        info = sessions.setdefault(actor.get("session", "?"), {
            "role": actor.get("role"), "first": rec["time"], "stopped": False, "alerts": Counter()})
        info["last"] = rec["time"]
        detail = rec.get("detail", {})
        if rec["event"] == "application_stop" and isinstance(detail.get("egress"), dict):
            info["stopped"], info["egress"] = True, detail["egress"]
        elif rec["event"] == "security_alert" and "blocked" in detail:
            info["alerts"][str(detail.get("class", "other"))] += 1
    network: dict[str, dict[str, int]] = {"allowed": {}, "blocked": {}}
    incomplete = []
    for sid, info in sessions.items():
        if info["stopped"]:
            _add(network, info["egress"])
        elif sid == me:
            _add(network, egress.counts())
        else:
            incomplete.append(sid)
            _add(network, {"blocked": dict(info["alerts"])})
    if me not in sessions and (not flt.session or flt.session == me):
        _add(network, egress.counts())
    cp = trail.checkpoint()
    scope = {k: v for k, v in flt.__dict__.items() if v and k in ("since", "until", "session", "events")}
    return {
        "type": KIND,
        "issued": trail.utc_now(),
        "host": socket.gethostname(),
        "platform": platform.platform(terse=True),
        "versions": _versions(),
        "config_sha256": config_hash(),
        "telemetry_off": all(telemetry.status().values()),
        "egress_guard": egress.installed(),
        "allowed_destinations": egress.allowed_destinations(),
        "scope": scope,
        "records": len(records),
        "events": dict(sorted(events.items())),
        "sessions": sorted(sessions),
        "incomplete_sessions": sorted(incomplete),
        "network": network,
        "checkpoint": cp.to_json(),
    }


def attest(flt: audit.Filter = audit.Filter()) -> dict[str, Any]:
    """A signed attestation document (JSON-ready)."""
    body = statement(flt)
    key = keys.signing_key()
    pub = key.public_key()
    return {
        "statement": body,
        "key_id": keys.key_id(pub),
        "signature": base64.b64encode(key.sign(chain.canonical(body))).decode("ascii"),
    }


def verify_attestation(doc: Mapping[str, Any], *, public_keys: Path | None = None) -> dict[str, Any]:
    """Check an attestation's signature and the checkpoint inside it; return the
    statement. Raises AuditVerificationError when anything does not check out."""
    keyring = keys.load_public_keys(public_keys) if public_keys else keys.local_public_keys()
    try:
        body = doc["statement"]
        kid, sig = str(doc["key_id"]), base64.b64decode(doc["signature"], validate=True)
        cp = chain.Checkpoint.from_json(body["checkpoint"])
        if body.get("type") != KIND:
            raise ValueError("not a medai session attestation")
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditVerificationError(f"attestation is malformed ({exc})") from None
    keys.verify_signature(keyring, kid, sig, chain.canonical(body), "attestation")
    cp.verify(keyring, "attestation checkpoint")
    return dict(body)
