"""The egress guard: nothing leaves this machine unless a user configured where to.

:func:`install_for_entry_point` runs first in every medai process (CLI, UI server,
PACS listener, triage workers). It throws the telemetry switches, then adds a
``sys.addaudithook`` hook that sees every socket operation Python code makes —
including those of HTTP libraries (urllib, requests, httpx, tornado), which all end
in ``socket.connect``/``socket.getaddrinfo``. The hook

* allows Unix sockets, loopback addresses and the name ``localhost``;
* allows destinations configured with :func:`allow` (``egress.allow`` setting and
  the host of ``pacs.destination``);
* denies anything else by raising :class:`~medai.errors.EgressBlocked` *before* the
  operation happens (no packet is sent, no name is resolved), and records a DICOM
  Security Alert (110113, Use of Restricted Function) in the audit trail;
* refuses to let a server listen on a non-loopback address unless
  :func:`check_bind` approved it (an explicit user flag, itself audited).

Name lookups (getaddrinfo and friends) of anything but loopback names, this host's
own name and configured hosts are denied, since a DNS query already leaves the
machine. IP literals resolve locally and are judged at connect time.

Native code (onnxruntime's C++ core, for example) does not pass through Python's
audit hooks; the strace and ``unshare -rn`` tests cover it, and the batch path can
run in a network namespace with no interfaces where the kernel enforces the same.

Counts of allowed and blocked attempts by destination class are kept per process
and written into its Application Stop record; attestations sum them.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import socket
import sys
import threading
from collections import Counter
from typing import Any

from medai.compliance import telemetry
from medai.errors import EgressBlocked, MedaiError

log = logging.getLogger("medai.compliance")

_EVENTS = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                     "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.bind"})
_LOCAL_FAMILIES = {getattr(socket, n) for n in ("AF_UNIX", "AF_NETLINK") if hasattr(socket, n)}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
#: Local-network ranges (RFC 1918, RFC 6598 shared, link-local, IPv6 ULA and link-local).
#: Everything else that is not loopback counts as public (documentation ranges included).
_PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "fc00::/7", "fe80::/10"))
#: Security alerts written per process before further blocks are only counted.
MAX_ALERTS = 100

_state: dict[str, Any] = {"installed": False, "enabled": False, "entry": None, "alerts": 0}
_allowed: set[tuple[str, int | None]] = set()
_resolved: dict[str, set[str]] = {}
_binds: set[tuple[str, int]] = set()
_counts: Counter[tuple[str, str]] = Counter()
_local = threading.local()


def _host_text(host: Any) -> str:
    if isinstance(host, (bytes, bytearray)):
        host = bytes(host).decode("ascii", "replace")
    return "" if host is None else str(host).strip().lower().rstrip(".")


def classify(host: Any) -> str:
    """Destination class of a host: ``loopback``, ``wildcard``, ``private`` (RFC 1918,
    ULA, link-local), ``multicast``, ``public``, or ``name`` (not an address)."""
    text = _host_text(host)
    if text in _LOOPBACK_NAMES or text.endswith(".localhost"):
        return "loopback"
    if text in ("", "*"):
        return "wildcard"
    try:
        addr = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return "name"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        return "wildcard"
    if addr.is_multicast:
        return "multicast"
    if any(addr in net for net in _PRIVATE):
        return "private"
    return "public"


def allow(host: str, port: int | None = None) -> None:
    """Allow connections to ``host`` (a name or address) on ``port`` (any port if None)."""
    name = _host_text(host)
    if not name:
        raise ValueError("egress.allow needs a host")
    _allowed.add((name, None if port is None else int(port)))
    _resolved.pop(name, None)


def allowed_destinations() -> list[str]:
    return sorted(f"{h}:{p if p is not None else '*'}" for h, p in _allowed)


def _is_allowed(host: str, port: int | None) -> bool:
    if (host, port) in _allowed or (host, None) in _allowed:
        return True
    if classify(host) == "name":
        return False
    for name, aport in list(_allowed):  # an address of a configured host name?
        if aport not in (None, port) or classify(name) != "name":
            continue
        if name not in _resolved:
            _local.busy = True  # resolving a configured host is itself allowed
            try:
                _resolved[name] = {info[4][0] for info in socket.getaddrinfo(name, aport)}
            except OSError:
                _resolved[name] = set()
            finally:
                _local.busy = False
        if host in _resolved[name]:
            return True
    return False


def _decide(event: str, args: tuple[Any, ...]) -> tuple[bool, str, str]:
    """(allowed, destination class, destination text) for one audited socket event."""
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"):
        sock, address = args[0], args[1]
        if address is None:
            return True, "connected", "connected socket"  # its connect was judged already
        if getattr(sock, "family", None) in _LOCAL_FAMILIES or isinstance(address, (str, bytes)):
            return True, "unix", "local socket"
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return False, "other", f"family {getattr(sock, 'family', '?')}"
        try:
            host, port = _host_text(address[0]), int(address[1])
        except (TypeError, ValueError, IndexError):
            return False, "other", repr(address)[:60]
        dest, kind = f"{host}:{port}", classify(host)
        if event == "socket.bind":
            ok = kind == "loopback" or port == 0 or (host, port) in _binds
            return ok, kind, dest
        if kind in ("loopback", "wildcard"):  # connecting to 0.0.0.0 reaches this host
            return True, "loopback", dest
        return (True, "configured", dest) if _is_allowed(host, port) else (False, kind, dest)
    # name lookups: getaddrinfo(host, port, ...), gethostbyname(host), gethostbyaddr(ip),
    # getnameinfo((ip, port), flags)
    target = args[0][0] if event == "socket.getnameinfo" else args[0]
    port = args[1] if event == "socket.getaddrinfo" else None
    host, kind = _host_text(target), classify(target)
    if kind in ("loopback", "wildcard") or host == _host_text(socket.gethostname()):
        return True, "loopback", host
    if kind != "name" and event == "socket.getaddrinfo":
        return True, kind, host  # an address literal resolves locally; connect decides
    try:
        port = int(port) if port not in (None, "") else None
    except (TypeError, ValueError):
        port = None
    if _is_allowed(host, port) or (port is None and any(h == host for h, _ in _allowed)):
        return True, "configured", host
    return False, "dns" if kind == "name" else kind, host


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event not in _EVENTS or not _state["enabled"]:
        return
    if getattr(_local, "busy", False):
        return  # our own resolution of a configured host, or recording an alert
    ok, kind, dest = _decide(event, args)
    if ok:
        if kind != "connected":
            _counts[(kind, "allowed")] += 1
        return
    _counts[(kind, "blocked")] += 1
    if event == "socket.bind":
        message = (f"egress guard: refused to listen on {dest} ({kind}); servers listen on 127.0.0.1 unless "
                   "the user asked for this address explicitly and the server approved it with "
                   "egress.check_bind(address, explicit=True)")
    else:
        message = (f"egress guard: refused to reach {dest} ({kind}, {event}); only loopback and "
                   "configured destinations are allowed (setting egress.allow)")
    if not _alert(event, kind, dest):
        message += "; the security alert could not be written to the audit trail"
    raise EgressBlocked(message)


def _alert(event: str, kind: str, dest: str) -> bool:
    if _state["alerts"] >= MAX_ALERTS:
        return True  # counted; the stop record carries the total
    _state["alerts"] += 1
    from medai.compliance import audit

    _local.busy = True
    try:
        audit.record("security_alert", outcome="serious_failure", subtype=audit.ALERT_RESTRICTED,
                     detail={"blocked": event, "destination": dest, "class": kind,
                             "entry_point": _state["entry"]})
        return True
    except Exception as exc:  # the connection stays blocked either way
        log.error("could not record blocked egress: %s", exc)
        return False
    finally:
        _local.busy = False


def check_bind(address: str | tuple[Any, ...], explicit: bool) -> None:
    """Approve a server's listening address. Loopback always passes. Anything else
    needs ``explicit=True`` (a user flag or setting, not a default) and is recorded
    as a Security Alert (Network Configuration); raises EgressBlocked otherwise, and
    AuditWriteError when the record cannot be written (fail closed)."""
    host, port = (address[0], int(address[1])) if isinstance(address, tuple) else (address, 0)
    host = _host_text(host)
    kind = classify(host)
    if kind == "loopback":
        return
    if not explicit:
        raise EgressBlocked(f"refusing to listen on {host}: servers bind 127.0.0.1 unless an address "
                            "is given explicitly")
    from medai.compliance import audit

    audit.record("security_alert", subtype=audit.ALERT_NETWORK,
                 detail={"listen": f"{host}:{port}", "class": kind, "entry_point": _state["entry"]})
    _binds.add((host, port))
    if host in ("", "0.0.0.0", "::"):
        _binds.update({("", port), ("0.0.0.0", port), ("::", port)})


def counts() -> dict[str, dict[str, int]]:
    """Network attempts of this process: ``{"allowed": {class: n}, "blocked": {class: n}}``."""
    out: dict[str, dict[str, int]] = {"allowed": {}, "blocked": {}}
    for (kind, decision), n in sorted(_counts.items()):
        out[decision][kind] = n
    return out


def _config_allowances() -> None:
    from medai import config

    try:
        for item in config.get("egress.allow") or []:
            host, _, port = str(item).rpartition(":")
            if not host:
                raise MedaiError(f"egress.allow entry {item!r} is not host:port")
            allow(host.strip("[]"), None if port == "*" else int(port))
        dest = config.get("pacs.destination")
        if dest and "@" in str(dest):  # AE@host:port; a folder destination needs no network
            host, _, port = str(dest).split("@", 1)[1].rpartition(":")
            allow(host.strip("[]"), int(port))
    except (MedaiError, ValueError) as exc:
        log.warning("egress guard: ignoring unusable destination settings (%s); nothing extra is allowed", exc)


def _at_exit() -> None:
    from medai.compliance import audit

    non_local = any(k not in ("loopback", "unix") for k, _ in _counts)
    if not (audit.started() or non_local):
        return
    try:
        audit.record("application_stop", detail={"entry_point": _state["entry"], "egress": counts()},
                     checkpoint=True)
    except Exception as exc:
        log.error("could not record application stop: %s", exc)


def install_for_entry_point(name: str) -> None:
    """Telemetry off, destinations from settings, audit hook on. Call first in every
    entry point (``cli``, ``ui``, ``pacs``, ``worker``...); safe to call again."""
    telemetry.disable()
    from medai.compliance import audit

    ae_title = None
    if name.startswith("pacs"):  # acting as a DICOM node: records name our AE title
        try:
            from medai import config

            ae_title = config.get("pacs.ae_title")
        except MedaiError:
            ae_title = None
    audit.set_role(name, ae_title=ae_title)
    _state["entry"] = name
    _config_allowances()
    if not _state["installed"]:
        sys.addaudithook(_hook)  # cannot be removed: the guard lasts for the whole process
        atexit.register(_at_exit)
        _state["installed"] = True
    _state["enabled"] = True


def installed() -> bool:
    return bool(_state["installed"] and _state["enabled"])
