"""Serving the workstation page: Streamlit behind a Host-header check, loopback only.

Why not ``streamlit run``: a page on 127.0.0.1 can still be reached by a hostile
web page through DNS rebinding (``attacker.example`` re-resolving to 127.0.0.1),
and Streamlit's own ``server.allowedHosts`` only guards its WebSocket. Here every
request, HTTP (pages, static assets, media files, health, uploads) and WebSocket
alike, passes :class:`LoopbackHostGuard` before Streamlit sees it, and the server
socket is bound to the configured address only (127.0.0.1 by default).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger("medai.ui")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The entry script Streamlit runs (``ui/app.py``, installed as ``medai/ui/app.py``).
APP_SCRIPT = Path(__file__).with_name("app.py")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str) -> str | None:
    """The host part of a ``Host`` header value, lower-cased, without port or
    IPv6 brackets; ``None`` when the value is malformed."""
    value = header.strip().lower()
    if not value or any(ch in value for ch in " /\\@?#"):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        rest = value[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return value[1:end]
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    return name


def allowed_host_names(bind_address: str) -> frozenset[str]:
    """Host names the page answers to: loopback always, plus the bind address
    when the user explicitly asked for a non-loopback one."""
    names = set(LOOPBACK_NAMES)
    addr = bind_address.strip().lower().strip("[]")
    if addr and addr not in {"0.0.0.0", "::"}:
        names.add(addr)
    return frozenset(names)


class LoopbackHostGuard:
    """ASGI middleware refusing any HTTP or WebSocket request whose ``Host``
    header is not one of ``allowed`` (DNS-rebinding defence).

    HTTP gets ``403``; a WebSocket handshake is closed before it is accepted
    (the server answers ``403``). Lifespan events pass through.
    """

    def __init__(self, app: ASGIApp, allowed: Iterable[str] = LOOPBACK_NAMES) -> None:
        self.app = app
        self.allowed = frozenset(a.lower() for a in allowed)

    def _ok(self, scope: Scope) -> bool:
        hosts = [v for k, v in scope.get("headers", ()) if k.lower() == b"host"]
        if len(hosts) != 1:
            return False
        try:
            name = host_name(hosts[0].decode("latin-1"))
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
            return False
        return name is not None and name in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket") or self._ok(scope):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or ("?", 0)
        log.warning("refused a %s request with a foreign Host header from %s", kind, client[0])
        _note_refusal(kind)
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"Forbidden: this medai page only answers requests addressed to localhost.\n"
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _note_refusal(kind: str) -> None:
    """Record a refused request in the audit trail as a security alert (best
    effort: a refusal must never depend on the trail being writable)."""
    from medai.compliance import audit

    try:
        audit.record("security_alert", outcome="minor_failure", subtype=audit.ALERT_NETWORK,
                     detail={"component": "ui", "reason": f"{kind} request with foreign Host header refused"})
    except Exception:  # noqa: BLE001 - the refusal itself already happened
        log.debug("could not audit a refused request", exc_info=True)


def is_loopback(address: str) -> bool:
    """Whether binding ``address`` keeps the page on this machine."""
    addr = address.strip().strip("[]")
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def check_port(address: str, port: int) -> None:
    """Refuse early, with a clear message, when the port is taken (before the URL is
    printed, so a script never reads the URL of someone else's server)."""
    import socket

    from medai.errors import ConfigError

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot serve on {address}:{port}: {exc.strerror or exc} "
                              "(choose another with --port)") from None


def streamlit_options(address: str, port: int) -> dict[str, Any]:
    """Streamlit settings for the workstation: local, quiet, protected."""
    return {
        "server.address": address,
        "server.port": port,
        "server.headless": True,  # never open a browser or ask for an e-mail
        "server.enableCORS": True,
        "server.enableXsrfProtection": True,
        "server.allowedHosts": sorted(allowed_host_names(address)),
        "server.fileWatcherType": "none",
        "server.runOnSave": False,
        "server.enableStaticServing": False,
        "browser.gatherUsageStats": False,
        "browser.serverAddress": "localhost" if is_loopback(address) else address,
        "global.developmentMode": False,
        "client.toolbarMode": "minimal",
        "client.showErrorDetails": "type",
        "logger.hideWelcomeMessage": True,
        "theme.base": "dark",
    }


def guard_process(address: str, port: int) -> None:
    """Before Streamlit is imported: egress guard on (role ``ui``), telemetry
    switches set, usage statistics off in the environment too (Streamlit's config
    reads it at import), and a non-loopback listen address approved as explicit
    (the egress guard refuses to bind one otherwise, and records the approval)."""
    from medai.compliance import egress

    egress.install_for_entry_point("ui")
    os.environ["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    os.environ["STREAMLIT_SERVER_HEADLESS"] = "true"
    if not is_loopback(address):
        egress.check_bind((address, port), explicit=True)


def serve(address: str, port: int, *, on_ready: Callable[[str], None] | None = None) -> None:
    """Run the workstation page until interrupted (Ctrl-C, SIGTERM).

    Blocks. ``on_ready`` receives the URL once the port is known, before serving.
    """
    guard_process(address, port)
    check_port(address, port)
    from starlette.middleware import Middleware

    import streamlit as st
    from streamlit import config as st_config

    options = streamlit_options(address, port)
    if "server.allowedHosts" not in st_config._config_options_template:  # older Streamlit
        options.pop("server.allowedHosts")
    app = st.App(str(APP_SCRIPT), middleware=[Middleware(LoopbackHostGuard, allowed=allowed_host_names(address))])
    if on_ready is not None:
        host = f"[{address}]" if ":" in address else address
        on_ready(f"http://{'localhost' if address in ('localhost',) else host}:{port}")
    # App.run anchors Streamlit's script directory on argv[0]; point it at the page.
    saved_argv = sys.argv
    sys.argv = [str(APP_SCRIPT)]
    try:
        app.run(config=options)
    finally:
        sys.argv = saved_argv
