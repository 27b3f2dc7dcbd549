"""One model run for the PACS worker, in its own process.

The worker starts ``python -m medai.pacs.runjob`` per job so a model that
crashes, leaks or is killed for memory can never take the listener down, and
so a SIGTERM to the service can stop a run cleanly. The run lands in the results
store (or a stored run of the same model on the same series content is reused);
the last line on stdout is a JSON object with its ``run_id`` and ``folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

#: Environment variable carrying the Series Instance UID to run on (not an argument: see the worker).
SERIES_ENV = "MEDAI_RUNJOB_SERIES"


def run(model_id: str, source: Path, *, series_uid: str | None) -> dict[str, Any]:
    """Run ``model_id`` on ``source`` into the results store; returns the stored run's summary."""
    from medai.results import obtain, request_from_source

    req, patient = request_from_source(source, model_id, "pacs", series_uid=series_uid)
    stored, reused = obtain(req, patient=patient)
    return {"run_id": stored.run_id, "folder": str(stored.folder), "reused": reused,
            "priority": stored.priority_level, "model_id": model_id}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medai.pacs.runjob")
    parser.add_argument("--model", required=True)
    parser.add_argument("--source", required=True, type=Path)
    args = parser.parse_args(argv)
    from medai.compliance import egress

    egress.install_for_entry_point("pacs")
    from medai.errors import MedaiError
    from medai.quick_exit import cycle_collection_paused

    try:
        with cycle_collection_paused():  # a one-shot process: see medai.quick_exit
            summary = run(args.model, args.source, series_uid=os.environ.get(SERIES_ENV) or None)
    except MedaiError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from medai.quick_exit import ends_with_leave, leave

    ends_with_leave()
    leave(main())
