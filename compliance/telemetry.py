"""Telemetry and "phone home" switches, thrown before the libraries that read them load.

Most libraries read these variables once, at import time, so :func:`disable` must run
first in every entry point (``egress.install_for_entry_point`` calls it). Values are
forced, not defaulted: a user environment cannot turn telemetry back on for medai.
The egress guard still blocks any connection a library makes regardless; these
switches keep libraries from trying (and from filling the trail with alerts).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("medai.compliance")

#: Variable -> value. Why each one is here is in docs/compliance.md.
SWITCHES: dict[str, str] = {
    "ORT_DISABLE_TELEMETRY": "1",                    # ONNX Runtime (Windows ETW events)
    "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",  # Streamlit usage stats from the browser
    "HF_HUB_OFFLINE": "1",                           # Hugging Face hub: no downloads
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",                             # consoledonottrack.com convention
    "RAY_USAGE_STATS_ENABLED": "0",                  # Ray usage stats
    "GRADIO_ANALYTICS_ENABLED": "False",
    "WANDB_MODE": "disabled",
    "ANONYMIZED_TELEMETRY": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",                 # update check on import
}


#: Modules that phone home as they are imported, with no switch that stops them, and that
#: medai never uses: their import is refused (``None`` in ``sys.modules`` makes Python raise
#: ImportError, which the parent package catches). ``import openvino`` imports the model
#: converter, ``openvino.tools.ovc``, whose package set-up starts Google Analytics telemetry
#: with the opt-in dialog turned off, so that a missing consent file counts as consent: it
#: writes a client ID to ``~/intel/openvino_ga_cid`` and a usage counter, and sends an event
#: on every import. medai reads ONNX with the runtime and never converts a model.
BLOCKED_IMPORTS: tuple[str, ...] = ("openvino.tools.ovc",)


def disable() -> dict[str, str]:
    """Force every switch in :data:`SWITCHES`, refuse the imports in :data:`BLOCKED_IMPORTS`;
    if ONNX Runtime is already imported, also call its ``disable_telemetry_events()``.
    Idempotent; returns what was set."""
    for name, value in SWITCHES.items():
        os.environ[name] = value
    for module in BLOCKED_IMPORTS:
        if sys.modules.get(module, None) is not None:  # already imported: too late here
            log.warning("%s was imported before medai's telemetry switches; its telemetry may have run", module)
        else:
            sys.modules[module] = None  # type: ignore[assignment]
    ort = sys.modules.get("onnxruntime")
    if ort is not None:
        switch = getattr(ort, "disable_telemetry_events", None)
        if callable(switch):
            try:
                switch()
            except Exception as exc:  # never let a telemetry switch break start-up
                log.warning("onnxruntime.disable_telemetry_events failed: %s", exc)
    return dict(SWITCHES)


def status() -> dict[str, bool]:
    """Which switches are in force in this process (for ``medai doctor`` and attestations);
    a blocked import is listed as ``import:<module>``."""
    state = {name: os.environ.get(name) == value for name, value in SWITCHES.items()}
    state.update({f"import:{module}": module in sys.modules and sys.modules[module] is None
                  for module in BLOCKED_IMPORTS})
    return state
