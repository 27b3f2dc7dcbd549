"""The egress guard and telemetry switches. Anything that installs the guard runs in a
child process: an audit hook cannot be removed, and the test process must stay clean."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from medai.compliance import audit, egress, telemetry

PROBE = r"""
import json, os, socket, tempfile, urllib.error, urllib.request
from medai.compliance import egress
from medai.errors import EgressBlocked

egress.install_for_entry_point("probe")
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except EgressBlocked as exc:
        out[name] = "blocked"
    except OSError as exc:
        out[name] = f"oserror:{type(exc).__name__}:{exc}"

attempt("public_connect", lambda: socket.socket().connect(("203.0.113.1", 443)))
attempt("public_connect_ex", lambda: socket.socket().connect_ex(("203.0.113.1", 443)))
attempt("private_connect", lambda: socket.socket().connect(("192.168.77.1", 104)))
attempt("ipv6_connect", lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 443)))
attempt("udp_sendto", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("198.51.100.9", 53)))
attempt("dns_lookup", lambda: socket.getaddrinfo("example.org", 443))
attempt("dns_gethostbyname", lambda: socket.gethostbyname("example.org"))
attempt("reverse_lookup", lambda: socket.gethostbyaddr("203.0.113.1"))
try:
    urllib.request.urlopen("http://203.0.113.1/", timeout=2)
    out["urllib"] = "ok"
except urllib.error.URLError as exc:
    out["urllib"] = "blocked" if isinstance(exc.reason, EgressBlocked) else f"other:{exc.reason}"

srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
cli = socket.create_connection(("localhost", port))
conn, _ = srv.accept()
cli.sendall(b"ping")
out["loopback"] = conn.recv(4).decode()
attempt("localhost_lookup", lambda: socket.getaddrinfo("localhost", port))

path = os.path.join(tempfile.mkdtemp(), "s")
u = socket.socket(socket.AF_UNIX)
u.bind(path)
u.listen()
attempt("unix_connect", lambda: socket.socket(socket.AF_UNIX).connect(path))

attempt("wildcard_listen", lambda: socket.socket().bind(("0.0.0.0", 18431)))
attempt("check_bind_default", lambda: egress.check_bind(("0.0.0.0", 18432), explicit=False))
def approved():
    egress.check_bind(("0.0.0.0", 18433), explicit=True)
    socket.socket().bind(("0.0.0.0", 18433))
attempt("explicit_listen", approved)
attempt("ephemeral_client_bind", lambda: socket.socket().bind(("", 0)))
out["counts"] = egress.counts()
print(json.dumps(out))
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None, wrap: list[str] | None = None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*(wrap or []), sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, env=full_env)


def _trail_records() -> list[dict]:
    return list(audit.iter_records())


def test_guard_blocks_non_loopback_and_records_security_alerts():
    proc = _run(PROBE)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("public_connect", "public_connect_ex", "private_connect", "ipv6_connect", "udp_sendto",
                 "dns_lookup", "dns_gethostbyname", "reverse_lookup", "urllib", "wildcard_listen",
                 "check_bind_default"):
        assert out[name] == "blocked", (name, out[name])
    for name in ("localhost_lookup", "unix_connect", "explicit_listen", "ephemeral_client_bind"):
        assert out[name] == "ok", (name, out[name])
    assert out["loopback"] == "ping"
    assert out["counts"]["blocked"]["public"] >= 5
    assert out["counts"]["blocked"]["dns"] == 2
    assert out["counts"]["allowed"]["loopback"] >= 2

    recs = _trail_records()
    alerts = [r for r in recs if r["event"] == "security_alert"]
    blocked = {(a["detail"].get("destination"), a["detail"].get("class")) for a in alerts if "blocked" in a["detail"]}
    assert ("203.0.113.1:443", "public") in blocked
    assert ("192.168.77.1:104", "private") in blocked
    assert ("example.org", "dns") in blocked
    assert all(a["code"]["code"] == "110113" and a["outcome"] == 8 for a in alerts if "blocked" in a["detail"])
    listen = [a for a in alerts if "listen" in a["detail"]]
    assert listen and listen[0]["detail"]["listen"] == "0.0.0.0:18433"
    assert listen[0]["subtype"]["code"] == "110128"
    stop = recs[-1]
    assert stop["event"] == "application_stop" and stop["detail"]["egress"] == out["counts"]


@pytest.mark.skipif(not __import__("shutil").which("strace"), reason="strace not installed")
def test_blocked_connect_never_reaches_the_kernel(tmp_path):
    """The hook refuses before the system call: strace sees no connect to the address."""
    log = tmp_path / "strace.log"
    proc = _run(PROBE, wrap=["strace", "-f", "-qq", "-e", "trace=network", "-o", str(log)])
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "127.0.0.1" in text  # the loopback connection is visible to strace
    for address in ("203.0.113.1", "192.168.77.1", "2001:db8::1", "198.51.100.9"):
        assert address not in text


def test_configured_destinations_are_allowed(monkeypatch):
    monkeypatch.setattr(egress, "_allowed", set())
    monkeypatch.setattr(egress, "_resolved", {})
    monkeypatch.setenv("MEDAI_EGRESS_ALLOW", "203.0.113.7:104,[2001:db8::7]:11112")
    monkeypatch.setenv("MEDAI_PACS_DESTINATION", "PACS@198.51.100.20:4242")
    egress._config_allowances()
    assert egress.allowed_destinations() == ["198.51.100.20:4242", "2001:db8::7:11112", "203.0.113.7:104"]
    sock = socket.socket()
    try:
        assert egress._decide("socket.connect", (sock, ("203.0.113.7", 104))) == (True, "configured", "203.0.113.7:104")
        assert egress._decide("socket.connect", (sock, ("203.0.113.7", 105)))[0] is False
        assert egress._decide("socket.connect", (sock, ("198.51.100.20", 4242)))[0] is True
        assert egress._decide("socket.connect", (sock, ("203.0.113.8", 104)))[0] is False
    finally:
        sock.close()


def test_bad_allow_setting_allows_nothing(monkeypatch, caplog):
    monkeypatch.setattr(egress, "_allowed", set())
    monkeypatch.setenv("MEDAI_EGRESS_ALLOW", "no-port-here")
    egress._config_allowances()
    assert egress.allowed_destinations() == []
    assert "ignoring unusable destination settings" in caplog.text


@pytest.mark.parametrize("host,kind", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"), ("localhost", "loopback"),
    ("LOCALHOST.", "loopback"), ("web.localhost", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("0.0.0.0", "wildcard"), ("", "wildcard"), ("::", "wildcard"), (None, "wildcard"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fe80::1%eth0", "private"),
    ("fd00::5", "private"), ("169.254.1.1", "private"), ("224.0.0.251", "multicast"),
    ("203.0.113.1", "public"), ("8.8.8.8", "public"), ("2001:db8::1", "public"),
    ("example.org", "name"), (b"example.org", "name"),
])
def test_classify(host, kind):
    assert egress.classify(host) == kind


TELEMETRY = r"""
import json, os, sys
os.environ["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "true"   # a user tried to turn it on
os.environ["HF_HUB_OFFLINE"] = "0"
from medai.compliance import egress, telemetry
egress.install_for_entry_point("probe")
import onnxruntime
before = {k: os.environ.get(k) for k in telemetry.SWITCHES}
telemetry.disable()  # with onnxruntime imported: also its Python switch
print(json.dumps({"env": before, "status": telemetry.status(), "ort": "onnxruntime" in sys.modules}))
"""


def test_telemetry_switches_forced_before_imports():
    proc = _run(TELEMETRY)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["env"] == telemetry.SWITCHES
    assert all(out["status"].values()) and out["ort"]
    assert "disable_telemetry_events failed" not in proc.stderr


OPENVINO = r"""
import json, sys
from medai.compliance import egress, telemetry
egress.install_for_entry_point("probe")
from medai.inference import backends
devices = backends.openvino_devices()
print(json.dumps({"devices": devices, "converter": repr(sys.modules.get("openvino.tools.ovc", "absent")),
                  "telemetry_module": "openvino_telemetry" in sys.modules, "status": telemetry.status()}))
"""


def test_openvino_is_imported_without_its_phone_home_converter(tmp_path):
    """import openvino pulls in its model converter, whose set-up writes a Google Analytics
    client ID under ~/intel and sends an event without asking; medai refuses that import and
    the runtime still works."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        pytest.skip("the openvino extra is not installed")
    home = tmp_path / "home"
    home.mkdir()
    proc = _run(OPENVINO, env={"HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "OpenVINO:CPU" in out["devices"]
    assert out["converter"] == "None" and not out["telemetry_module"]
    assert out["status"]["import:openvino.tools.ovc"] and all(out["status"].values())
    assert not any(home.rglob("*")), sorted(str(p) for p in home.rglob("*"))


def test_cli_entry_point_installs_the_guard():
    code = ("import sys, socket\nfrom medai.cli import _install_guards\nfrom medai.compliance import egress\n"
            "_install_guards()\nprint(egress.installed())\n"
            "try:\n    socket.create_connection(('203.0.113.1', 443), timeout=1)\nexcept PermissionError as e:\n"
            "    print('refused', type(e).__name__)\n")
    proc = _run(code)
    assert proc.stdout.split() == ["True", "refused", "EgressBlocked"], proc.stderr


def test_pacs_entry_point_names_its_ae_title_in_records():
    code = ("from medai.compliance import audit, egress\negress.install_for_entry_point('pacs')\n"
            "audit.record('query', detail={'probe': True})\n")
    proc = _run(code, env={"MEDAI_PACS_AE_TITLE": "WORKSTATION7"})
    assert proc.returncode == 0, proc.stderr
    rec = [r for r in _trail_records() if r["event"] == "query"][0]
    assert rec["actor"]["role"] == "pacs" and rec["actor"]["ae_title"] == "WORKSTATION7"
