"""One door from the PACS hook to the audit trail and the egress guard.

The PACS hook runs unattended and touches patient data with nobody watching. Like
every surface it is fail closed: when the trail cannot be written,
:class:`~medai.errors.AuditWriteError` is raised and the reception, run or transfer
does not happen. This module only adds the hook's own policy on top of
:func:`medai.compliance.audit.record` (a detail that overlaps a short patient id is
withheld rather than the event lost).
"""

from __future__ import annotations

import logging
from typing import Any

from medai.compliance import audit, egress
from medai.compliance import pseudonym as _pseudonym
from medai.errors import AuditWriteError

log = logging.getLogger("medai.pacs")


def record(event: str, **kwargs: Any) -> None:
    """``medai.compliance.audit.record``; raises AuditWriteError when it cannot be written."""
    try:
        try:
            audit.record(event, **kwargs)
        except ValueError as exc:
            # The trail refuses a detail in which the patient id/name appears as
            # text; a short id (say "12") can occur inside an address or count.
            # Record the event without its detail rather than lose it.
            if not kwargs.get("detail") or "patient identifier" not in str(exc):
                raise
            audit.record(event, **{**kwargs, "detail": {"detail_withheld": "overlapped a patient identifier"}})
    except AuditWriteError:
        raise
    except OSError as exc:
        raise AuditWriteError(f"audit trail could not be written: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a record the trail refuses is a record not written
        raise AuditWriteError(f"audit record refused: {exc}") from exc


def quiet_pynetdicom() -> None:
    """pynetdicom logs request/response identifiers (patient data) at debug
    level unless told not to; medai never wants them in a log."""
    from pynetdicom import _config as pnd_config

    pnd_config.LOG_REQUEST_IDENTIFIERS = False
    pnd_config.LOG_RESPONSE_IDENTIFIERS = False


def allow_destination(host: str, port: int) -> None:
    """Register a configured destination with the egress guard."""
    egress.allow(host, port)


def key(uid: str) -> str:
    """A log key for a UID: its keyed pseudonym, so logs can be correlated with
    ``medai pacs status --json`` and the audit trail without carrying the UID."""
    return str(_pseudonym(uid))
