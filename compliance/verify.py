"""``medai audit verify``: is the trail exactly what was written?

Checks, in one streaming pass:

1. every line's own SHA-256 (a modified byte),
2. ``seq``/``prev`` links (a deleted, inserted or reordered record),
3. every signed checkpoint in ``audit/checkpoints.jsonl``, the local anchor
   ``MEDAI_HOME/audit-anchor.json`` and any anchor file passed in: its Ed25519
   signature, and that record ``count`` of the trail ends in ``head`` (a cut tail
   or a rewritten history shows as a mismatch or as too few records).

Keys come from this install (current and retired public keys) or from a PEM file
exported elsewhere, so a copied trail can be verified on another machine.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from medai.compliance import chain, keys, trail
from medai.errors import AuditVerificationError


@dataclass(frozen=True)
class Report:
    """Outcome of a verification. ``ok`` is False when any problem was found."""

    ok: bool
    records: int
    head: str
    checkpoints: int
    last_checkpoint: int
    problems: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "records": self.records, "head": self.head, "checkpoints": self.checkpoints,
                "last_checkpoint": self.last_checkpoint, "problems": list(self.problems)}


def verify(*, trail_file: Path | None = None, checkpoints_file: Path | None = None,
           anchors: tuple[Path, ...] = (), public_keys: Path | None = None,
           local_anchor: bool = True) -> Report:
    """Verify a trail (this install's by default). Never raises for a bad trail: the
    report lists the problems; raises AuditVerificationError only for unusable input
    (no key to check signatures with, an unreadable anchor file)."""
    keyring: dict[str, Ed25519PublicKey] = dict(keys.load_public_keys(public_keys) if public_keys
                                                 else keys.local_public_keys())
    problems: list[str] = []
    checkpoints: list[tuple[str, chain.Checkpoint]] = []
    cp_file = checkpoints_file or (trail.checkpoints_path() if trail_file is None else None)
    if cp_file is not None:
        try:
            checkpoints += [(f"{cp_file} #{i}", cp) for i, cp in enumerate(trail.read_checkpoints(cp_file), 1)]
        except (ValueError, KeyError) as exc:
            problems.append(f"{cp_file}: unreadable checkpoint ({exc})")
    sources = list(anchors)
    if local_anchor and trail_file is None and trail.anchor_path().is_file():
        sources.append(trail.anchor_path())
    for path in sources:
        try:
            checkpoints += [(str(path), cp) for cp in trail.read_checkpoints(Path(path))]
        except (OSError, ValueError, KeyError) as exc:
            raise AuditVerificationError(f"{path}: not a readable checkpoint ({exc})") from exc
    state = chain.ChainState(wanted={cp.count for _, cp in checkpoints})
    path = trail_file or trail.trail_path()
    broken = False
    try:
        for line in trail.iter_lines(trail_file):
            entry = state.feed(line)
            if entry.record.get("event") == "security_alert" and "endorsement" in entry.record.get("detail", {}):
                problem = _follow_rotation(keyring, entry.record["detail"])
                if problem:
                    problems.append(f"{path}: line {state.count}: {problem}")
    except chain.ChainError as exc:
        problems.append(f"{path}: {exc}")
        broken = True
    except OSError as exc:
        problems.append(f"{path}: cannot read ({exc.strerror or exc})")
        broken = True

    valid: list[tuple[str, chain.Checkpoint]] = []
    for where, cp in checkpoints:
        try:
            cp.verify(keyring, where)
            valid.append((where, cp))
        except AuditVerificationError as exc:
            problems.append(str(exc))

    for where, cp in valid:
        if cp.count > state.count:
            if not broken:  # past a break the records are unchecked, not missing
                problems.append(f"{where}: checkpoint covers {cp.count} records but the trail has only "
                                f"{state.count} (records removed from the end)")
        elif cp.count and state.heads.get(cp.count) != cp.head:
            problems.append(f"{where}: record {cp.count} does not end in the signed head hash "
                            "(history rewritten)")
    last = max((cp.count for _, cp in valid), default=0)
    return Report(not problems, state.count, state.head, len(valid), last, tuple(problems))


def _follow_rotation(keyring: dict[str, Ed25519PublicKey], detail: dict[str, object]) -> str | None:
    """Trust a rotated-in key when a key already trusted endorsed it (a rotation
    record), so a verifier holding only an older public key can check newer
    checkpoints. Returns a problem text, or None."""
    old = str(detail.get("old_key_id"))
    if old not in keyring:
        return None  # cannot judge; checkpoints signed by the new key will say so
    try:
        raw = base64.b64decode(str(detail["new_public_key"]))
        keys.verify_signature(keyring, old, base64.b64decode(str(detail["endorsement"])),
                              keys.ROTATION_CONTEXT + raw, "key rotation record")
        new = Ed25519PublicKey.from_public_bytes(raw)
    except (AuditVerificationError, KeyError, ValueError) as exc:
        return f"key rotation endorsement invalid ({exc})"
    keyring.setdefault(keys.key_id(new), new)
    return None
