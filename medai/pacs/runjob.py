"""One model run for the PACS worker, in its own process.

The worker starts ``python -m medai.pacs.runjob`` per job so a model that
crashes, leaks or is killed for memory can never take the listener down, and
so a SIGTERM to the service can stop a run cleanly. :func:`run` is the single
place the PACS hook calls inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def run(model_id: str, source: Path, out_dir: Path, *, series_uid: str | None) -> dict[str, Any]:
    """Run ``model_id`` on ``source`` into ``out_dir``; returns a short summary."""
    from medai.inference.run import run_model

    result = run_model(model_id, source, out_dir, series_uid=series_uid)
    summary: dict[str, Any] = {"model_id": model_id}
    for attr in ("priority", "provider"):
        value = getattr(result, attr, None)
        if value is not None:
            summary[attr] = str(value)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medai.pacs.runjob")
    parser.add_argument("--model", required=True)
    parser.add_argument("--source", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--series", default=None)
    args = parser.parse_args(argv)
    try:
        from medai.compliance import egress

        egress.install_for_entry_point("pacs")
    except ModuleNotFoundError:
        pass
    from medai.errors import MedaiError

    try:
        summary = run(args.model, args.source, args.out, series_uid=args.series)
    except MedaiError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
