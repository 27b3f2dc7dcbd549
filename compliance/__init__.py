"""medai's trust boundary: audit trail, egress guard and telemetry switches,
session attestation, keys. Small and free of ML imports on purpose, so an
auditor can read it in one sitting. Installed as ``medai.compliance``.

Modules, in reading order:

- ``telemetry``: environment switches that keep libraries from phoning home.
- ``egress``: the audit hook that refuses non-loopback connections and lookups.
- ``keys``: install keys (Ed25519 signing, HMAC pseudonyms, AES-GCM sealing).
- ``chain``: how a record becomes a hash-chained line; signed checkpoints.
- ``trail``: the append-only file, locking, durability, checkpoints on disk.
- ``audit``: the events (DICOM PS3.15 A.5) and :func:`audit.record`.
- ``verify``: checking a trail against its chain and checkpoints.
- ``fhir``: FHIR R4 AuditEvent export.
- ``attest``: signed statements of what a session did on the network.
"""

from __future__ import annotations


def pseudonym(value: str) -> str:
    """Keyed HMAC-SHA256 pseudonym (16 hex digits) of a patient identifier, stable for
    this install; safe in logs, worklists, file names and caches."""
    from medai.compliance import keys

    return keys.pseudonym(value)


def is_pseudonym(text: str) -> bool:
    """Whether ``text`` has the form of a :func:`pseudonym` (16 lower-case hex digits)."""
    from medai.compliance import keys

    return keys.is_pseudonym(text)


__all__ = ["is_pseudonym", "pseudonym"]
