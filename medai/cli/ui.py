"""``medai ui``: the clinician's workstation page on this machine."""

from __future__ import annotations

import json
import sys

import typer

from medai import config
from medai.cli._common import state
from medai.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("ui")
    def ui_command(
        ctx: typer.Context,
        port: int = typer.Option(None, "--port", "-p", help="Port to serve on (default: setting ui.port, 8501)."),
        address: str = typer.Option(None, "--address",
                                    help="Address to bind (default: setting ui.address, 127.0.0.1). "
                                    "A non-loopback address exposes patient images to the network."),
    ) -> None:
        """Start the workstation page on localhost and print its URL (Ctrl-C stops it).

        Opens no browser and contacts nothing outside this machine: usage statistics
        are off, the egress guard is on, and requests addressed to any host other
        than this one are refused.
        """
        from medai.ui import server

        bind = str(config.get("ui.address", address))
        chosen = int(config.get("ui.port", port))
        if not 1 <= chosen <= 65535:
            raise ConfigError(f"ui.port: {chosen} is not a TCP port (1-65535)")
        if not server.is_loopback(bind):
            sys.stderr.write(f"warning: binding {bind}: the page is reachable from other machines.\n")

        as_json = state(ctx).json

        def announce(url: str) -> None:
            sys.stdout.write((json.dumps({"event": "serving", "url": url}) if as_json else url) + "\n")
            sys.stdout.flush()
            sys.stderr.write("medai ui: serving on this machine only; press Ctrl-C to stop.\n")

        try:
            server.serve(bind, chosen, on_ready=announce)
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
            pass
        sys.stderr.write("medai ui: stopped.\n")
