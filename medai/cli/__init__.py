"""The ``medai`` command line.

Conventions for every command: ``--help`` everywhere; data (or ``--json``) on
stdout, logs and progress on stderr; exit codes 0 ok, 1 failure, 2 usage,
3 partial (some items failed). ``--json``, ``-v`` and ``-q`` are accepted before
or after any command (:class:`medai.cli._common.MedaiGroup` gives them to every
command); under ``--json`` a failure is also a JSON document on stdout. Each
command group lives in its own module of this package and exposes
``register(app)``; this module only wires them.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

import typer

from medai import __version__
from medai.cli._common import EXIT_FAILURE, MedaiGroup, fail
from medai.errors import MedaiError

#: Command-group modules, in help order. Each defines ``register(app: typer.Typer)``.
COMMAND_MODULES = ("demo", "dicom", "models", "run", "results", "triage", "pacs", "deid", "audit", "ui", "doctor")

app = typer.Typer(
    name="medai",
    help="Privacy-first medical imaging AI on this machine: index DICOM, run models, "
    "send DICOM SEG/SR, and prove nothing left the machine.",
    cls=MedaiGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"medai {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Root options; the shared ones (--json, -v, -q) come from MedaiGroup, as on every command."""


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Entry point: guard egress first, then dispatch."""
    _install_guards()
    try:
        app(args=argv, prog_name="medai")
    except SystemExit as exc:  # click's standalone mode ends every command this way
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_FAILURE)
    except MedaiError as exc:
        fail(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("Aborted.\n")
        return 130
    return 0


def entry(argv: list[str] | None = None) -> NoReturn:
    """The ``medai`` console script: :func:`main`, then :func:`medai.quick_exit.leave` (no
    interpreter teardown: about a second of a ``medai run`` on a 2-core machine). Tests call
    :func:`main` in-process and never reach this."""
    from medai.quick_exit import ends_with_leave, leave

    ends_with_leave()
    leave(main(argv))


def _install_guards() -> None:
    """Telemetry off and egress guard on, before anything else is imported."""
    from medai.compliance import egress

    egress.install_for_entry_point("cli")


if __name__ == "__main__":  # pragma: no cover
    entry()


__all__ = ["app", "entry", "main", "EXIT_FAILURE"]
