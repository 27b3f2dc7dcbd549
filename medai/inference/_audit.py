"""One door from inference to the audit trail (``medai.compliance.audit``).

Every record goes through :func:`record`, so the contract lives in one place.
An :class:`~medai.errors.AuditWriteError` from the trail propagates: the
operation on patient data then does not happen (fail closed).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

log = logging.getLogger("medai.inference")


def record(event: str, **kwargs: Any) -> None:
    try:
        audit = importlib.import_module("medai.compliance.audit")
    except ModuleNotFoundError as exc:
        if exc.name not in {"medai.compliance.audit", "medai.compliance"}:
            raise
        # The compliance package is built in parallel; until it exists there is no trail.
        log.warning("audit trail unavailable (medai.compliance.audit missing); %s not recorded", event)
        return
    audit.record(event, **kwargs)
