"""Helpers shared by every command module: output, errors, exit codes, and the
options every command accepts.

``--json``, ``-v/--verbose`` and ``-q/--quiet`` work before or after any command
name (``medai --json models list`` and ``medai models list --json`` are the same):
:class:`MedaiGroup` copies one prototype of each into every command of the tree,
so no command declares them itself. It also reflows help text, so docstrings
wrapped in the source read as sentences at any terminal width.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import typer
from typer.core import TyperGroup

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

#: Help panel the shared options are listed under in every command's ``--help``.
GLOBAL_PANEL = "Global options (before or after the command)"


@dataclass
class CliState:
    """What the shared options asked for, merged over every place they were given."""

    json: bool = False
    verbose: int = 0
    quiet: bool = False

    @property
    def verbosity(self) -> int:
        """-1 quiet, 0 warnings, 1 info, 2+ debug."""
        return -1 if self.quiet else self.verbose


def state(ctx: typer.Context) -> CliState:
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState()
    return root.obj


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


def emit_error(exc: BaseException, exit_code: int) -> None:
    """Under ``--json`` a failure is a JSON document on stdout too, so a script that
    parses stdout gets the reason instead of nothing (the stderr line stays)."""
    doc = {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": exit_code}}
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def configure_logging(st: CliState) -> None:
    """One stderr handler on the ``medai`` logger at the level the options ask for
    (libraries stay quiet: the CLI decides)."""
    level = (logging.ERROR if st.quiet else logging.INFO if st.verbose == 1
             else logging.DEBUG if st.verbose > 1 else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("medai")
    root.handlers = [h for h in root.handlers if isinstance(h, logging.NullHandler)] + [handler]
    root.setLevel(level)


# --- the shared options -------------------------------------------------------

def _shared_options(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                help="More log output on stderr (-vv for debug)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout (errors too)."),
) -> None:
    """Prototype only: typer builds these options once, :class:`MedaiGroup` copies them."""


def _merge(ctx: typer.Context, param: Any, value: Any) -> None:
    """Option callback: fold a shared option given at this level into the one CliState."""
    if not value:
        return
    st = state(ctx)
    if param.name == "json_out":
        st.json = True
    elif param.name == "verbose":
        st.verbose += int(value)
    elif param.name == "quiet":
        st.quiet = True
    configure_logging(st)


def shared_params() -> list[Any]:
    """Fresh copies of the shared options, ready to append to one command."""
    proto = typer.Typer(add_completion=False)
    proto.command()(_shared_options)
    out = []
    for param in typer.main.get_command(proto).params:
        p = copy.copy(param)
        p.expose_value = False
        p.callback = _merge
        p.rich_help_panel = GLOBAL_PANEL
        out.append(p)
    return out


def walk(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the tree under ``cmd`` (groups included), with its name path."""
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from walk(sub, (*path, name))


# --- help text ----------------------------------------------------------------

#: A line that starts a list item keeps its own line.
_LIST_ITEM = re.compile(r"^([-*\u2022]|\d+[.)])\s")


def reflow(text: str | None) -> str | None:
    """Join the lines of each paragraph: a docstring wrapped at 80-100 columns in the
    source would otherwise keep those breaks at every terminal width ("plus every /
    skipped file"). Blank lines (paragraphs), list items and click's ``\\b``
    (keep this paragraph as written) survive."""
    if not text:
        return text
    paragraphs = re.split(r"\n[ \t]*\n", inspect.cleandoc(text))
    out = []
    for para in paragraphs:
        if para.startswith("\b"):
            out.append(para)
            continue
        lines: list[str] = []
        for line in para.splitlines():
            line = line.strip()
            if lines and not _LIST_ITEM.match(line):
                lines[-1] = f"{lines[-1]} {line}"
            else:
                lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(out)


class MedaiGroup(TyperGroup):
    """The root ``medai`` group: at build time it gives every command of the tree the
    shared options and reflowed help; at run time it reports a failure as JSON under
    ``--json``."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        names = {"--json", "--verbose", "-v", "--quiet", "-q"}
        for path, cmd in walk(self):
            clash = [opt for p in cmd.params for opt in getattr(p, "opts", []) if opt in names]
            if clash:
                raise TypeError(f"medai {' '.join(path)}: declares {', '.join(clash)} itself; "
                                "the shared options come from medai.cli._common")
            cmd.params.extend(shared_params())
            cmd.help = reflow(cmd.help)
            cmd.short_help = reflow(cmd.short_help)
            for p in cmd.params:
                if getattr(p, "help", None):
                    p.help = reflow(p.help)

    def invoke(self, ctx: typer.Context) -> Any:
        configure_logging(state(ctx))
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from medai.errors import MedaiError

            if isinstance(exc, MedaiError) and state(ctx).json:
                emit_error(exc, exc.exit_code)
            raise
