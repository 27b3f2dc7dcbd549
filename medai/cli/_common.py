"""Helpers shared by every command module: output, errors, exit codes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

import typer

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3


@dataclass
class CliState:
    json: bool = False
    verbosity: int = 0


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def emit(ctx: typer.Context, data: Any, human: Callable[[Any], None] | None = None) -> None:
    """Write a command's result: JSON when ``--json`` was given, else ``human(data)``
    (or pretty JSON when no human renderer is provided)."""
    if state(ctx).json or human is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
    else:
        human(data)


def fail(exc: BaseException) -> None:
    """Print an error for the user on stderr (never a traceback, never patient data)."""
    sys.stderr.write(f"error: {exc}\n")
