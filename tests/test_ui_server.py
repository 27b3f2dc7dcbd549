"""`medai ui` as a real server: loopback only, every route refuses a foreign Host
header (DNS-rebinding defence), clean shutdown on Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medai.ui import server
from netcheck import ipv4_hex, listening, non_loopback_ipv4, wait_listening

REPO = Path(__file__).resolve().parents[1]
MEDAI = Path(sys.executable).with_name("medai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(port: int, request: bytes, *, address: str = "127.0.0.1") -> bytes:
    """Send bytes on a fresh TCP connection and return what comes back (first 4 KiB)."""
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(request)
        data = b""
        while len(data) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and b"Upgrade:" in request:
                break
        return data


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@contextlib.contextmanager
def running_ui(home: Path, *extra: str, port: int | None = None) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`medai ui` in a subprocess on a free loopback port, stopped with Ctrl-C (SIGINT)."""
    port = port or free_port()
    env = {**os.environ, "MEDAI_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(MEDAI), "ui", "--port", str(port), *extra], cwd=str(home), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        assert url == f"http://127.0.0.1:{port}", (url, proc.stderr.read() if proc.poll() is not None else "")
        deadline = time.monotonic() + 60
        while True:
            try:
                if status_of(raw_request(port, b"GET /_stcore/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                b"Connection: close\r\n\r\n")) == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "medai ui did not come up"
            time.sleep(0.2)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # pragma: no cover - reported by the test below
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------ the guard on its own


@pytest.mark.parametrize("header,expected", [
    ("localhost", "localhost"), ("LOCALHOST:8501", "localhost"), ("127.0.0.1:8501", "127.0.0.1"),
    ("[::1]:8501", "::1"), ("[::1]", "::1"), ("attacker.example", "attacker.example"),
    ("127.0.0.1.attacker.example:80", "127.0.0.1.attacker.example"),
    ("localhost:abc", None), ("[::1", None), ("user@localhost", None), ("", None), ("[::1]x", None),
])
def test_host_name_parsing(header, expected):
    assert server.host_name(header) == expected


def _call(guard: server.LoopbackHostGuard, scope: dict) -> tuple[list[dict], bool]:
    sent: list[dict] = []
    reached = []

    async def app(scope, receive, send):
        reached.append(True)

    guard.app = app

    async def receive():  # pragma: no cover - never awaited by the guard
        return {}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return sent, bool(reached)


@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_guard_refuses_foreign_missing_and_duplicate_hosts(kind):
    guard = server.LoopbackHostGuard(None, allowed=server.LOOPBACK_NAMES)  # type: ignore[arg-type]
    for headers in ([(b"host", b"attacker.example")], [], [(b"host", b"localhost"), (b"host", b"evil.example")]):
        sent, reached = _call(guard, {"type": kind, "headers": headers, "client": ("127.0.0.1", 5)})
        assert not reached
        if kind == "http":
            assert sent[0]["status"] == 403
        else:
            assert sent == [{"type": "websocket.close", "code": 1008}]
    sent, reached = _call(guard, {"type": kind, "headers": [(b"host", b"127.0.0.1:8501")]})
    assert reached and not sent
    assert _call(guard, {"type": "lifespan"})[1]


def test_a_refusal_is_recorded_as_a_security_alert(medai_home):
    from medai.compliance import audit

    server._note_refusal("websocket")
    alerts = [r for r in audit.iter_records() if r["event"] == "security_alert"]
    assert alerts and "foreign Host" in alerts[-1]["detail"]["reason"]


def test_non_loopback_bind_is_allowed_only_as_its_own_host():
    assert server.allowed_host_names("127.0.0.1") == server.LOOPBACK_NAMES
    assert "10.1.2.3" in server.allowed_host_names("10.1.2.3")
    assert server.allowed_host_names("0.0.0.0") == server.LOOPBACK_NAMES
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and not server.is_loopback("0.0.0.0")


def test_streamlit_options_keep_protections_on():
    opts = server.streamlit_options("127.0.0.1", 8501)
    assert opts["server.enableXsrfProtection"] is True and opts["server.enableCORS"] is True
    assert opts["browser.gatherUsageStats"] is False and opts["server.headless"] is True
    assert opts["server.address"] == "127.0.0.1"


# ------------------------------------------------------------------ the real server


@pytest.mark.slow
def test_medai_ui_refuses_foreign_host_on_every_route_and_stops_on_ctrl_c(tmp_path):
    with running_ui(tmp_path) as (proc, port):
        # only 127.0.0.1 listens (0100007F in /proc/net/tcp byte order)
        assert listening(port) == {"0100007F"}
        assert os.path.basename(MEDAI) == "medai"
        routes = ["/", "/_stcore/health", "/_stcore/host-config", "/static/js/does-not-matter.js",
                  "/media/abc.png", "/favicon.png", "/component/streamlit_image_coordinates/index.html"]
        for route in routes:
            bad = raw_request(port, f"GET {route} HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n"
                              .encode())
            assert status_of(bad) == 403, (route, bad[:200])
            assert b"only answers requests addressed to localhost" in bad
        # the same routes with a loopback Host are served (or 404 for the made-up names), never 403
        assert status_of(raw_request(port, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")) == 200
        ok = raw_request(port, b"GET /_stcore/health HTTP/1.1\r\nHost: [::1]:1\r\nConnection: close\r\n\r\n")
        assert status_of(ok) == 200
        # HTTP/1.0 without Host
        assert status_of(raw_request(port, b"GET /_stcore/health HTTP/1.0\r\n\r\n")) == 403
        # WebSocket handshake to Streamlit's stream with a rebinding Host: refused before upgrade
        upgrade = ("GET /_stcore/stream HTTP/1.1\r\nHost: attacker.example:{p}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nOrigin: http://attacker.example:{p}\r\n\r\n").format(p=port)
        ws = raw_request(port, upgrade.encode())
        assert status_of(ws) == 403, ws[:200]
        good_ws = upgrade.replace(f"attacker.example:{port}", f"127.0.0.1:{port}")
        assert status_of(raw_request(port, good_ws.encode())) == 101
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read() if proc.stderr else ""
        assert "Traceback" not in err and "stopped" in err


@pytest.mark.slow
def test_non_loopback_listen_only_when_asked(medai_home):
    addr = non_loopback_ipv4()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    port = free_port()
    proc = subprocess.Popen([str(MEDAI), "ui", "--port", str(port), "--address", addr], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == f"http://{addr}:{port}"
        # Only the kernel's table is read: tests send nothing to a non-loopback address.
        wait_listening(port, addr, lambda: proc.poll() is None)
        assert listening(port) == {ipv4_hex(addr)}
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    err = proc.stderr.read() if proc.stderr else ""
    assert "reachable from other machines" in err
    from medai.compliance import audit

    alerts = [r for r in audit.iter_records() if r["event"] == "security_alert"]  # same MEDAI_HOME
    assert any(f"{addr}:{port}" in str(r.get("detail")) for r in alerts)


def test_busy_port_is_refused_before_any_url_is_printed(medai_home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(MEDAI), "ui", "--port", str(port)], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ))
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"cannot serve on 127.0.0.1:{port}" in done.stderr
