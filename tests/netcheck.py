"""Checks of what listens where, without sending a byte to a non-loopback address.

Tests that bind a non-loopback address (only when explicitly asked) read the kernel's
socket tables instead of connecting: traffic from tests goes to loopback only.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine on a real interface, if it has one (read from the
    kernel's routing table: no socket is opened, so the egress guard, when a test has
    installed it in this process, does not matter)."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return None
    for prev, line in zip(lines, lines[1:]):
        if line.strip() == "/32 host LOCAL":
            addr = prev.split("--")[-1].strip()
            if not addr.startswith("127."):
                return addr
    return None


def listening(port: int) -> set[str]:
    """Local addresses (kernel hex form) with a listening TCP socket on ``port``."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr_hex, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.add(addr_hex)
    return found


def ipv4_hex(addr: str) -> str:
    """``addr`` as /proc/net/tcp writes it (little-endian hex)."""
    return socket.inet_aton(addr)[::-1].hex().upper()


def wait_listening(port: int, addr: str, alive, timeout: float = 60) -> None:
    """Wait until ``addr:port`` listens; ``alive()`` False (process died) fails at once."""
    deadline = time.monotonic() + timeout
    while ipv4_hex(addr) not in listening(port):
        assert alive() and time.monotonic() < deadline, f"nothing listens on {addr}:{port}"
        time.sleep(0.2)
