"""The hash chain: how one audit record becomes one line, and how lines are checked.

A line is canonical JSON (sorted keys, no spaces, ASCII only) of the record body,
which carries ``seq`` (0, 1, 2, ...) and ``prev`` (the previous line's hash; 64 zeros
for the first), followed by its own hash as the last member::

    {"event":"query",...,"prev":"<64 hex>","seq":7,"hash":"<64 hex>"}\\n

``hash`` is SHA-256 of the exact bytes of the line with the ``,"hash":"..."`` member
removed. So a changed byte anywhere breaks the record's own hash or the next record's
``prev``; a deleted, inserted or swapped record breaks ``seq``/``prev``; and a cut
tail shows against a signed checkpoint (``count`` records ending in ``head``).

This module does no file I/O; ``trail`` does.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medai.compliance import keys

GENESIS = "0" * 64
_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')


def canonical(data: Mapping[str, Any]) -> bytes:
    """The one serialisation that is hashed and signed."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def seal(body: Mapping[str, Any], *, seq: int, prev: str) -> tuple[bytes, str]:
    """Line bytes (with trailing newline) and hash for ``body`` at position ``seq``."""
    if "hash" in body or "seq" in body or "prev" in body:
        raise ValueError("record body must not set hash/seq/prev")
    text = canonical({**body, "seq": seq, "prev": prev})
    digest = hashlib.sha256(text).hexdigest()
    return text[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n', digest


@dataclass(frozen=True)
class Entry:
    """One checked line: its position, hash and parsed record (``hash`` included)."""

    seq: int
    prev: str
    hash: str
    record: dict[str, Any]


class ChainError(ValueError):
    """A line that does not check out; ``lineno`` is 1-based."""

    def __init__(self, lineno: int, reason: str) -> None:
        self.lineno = lineno
        self.reason = reason
        super().__init__(f"line {lineno}: {reason}")


def open_line(line: bytes, lineno: int) -> Entry:
    """Check a line's own hash and parse it (without chain context)."""
    if not line.endswith(b"\n"):
        raise ChainError(lineno, "record not terminated by a newline (cut or torn)")
    line = line[:-1]
    match = _TAIL.search(line)
    if match is None:
        raise ChainError(lineno, "not a sealed audit record (no trailing hash)")
    text = line[: match.start()] + b"}"
    digest = match.group(1).decode("ascii")
    if hashlib.sha256(text).hexdigest() != digest:
        raise ChainError(lineno, "record content does not match its hash (modified)")
    try:
        record = json.loads(text)
        seq, prev = record["seq"], record["prev"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ChainError(lineno, f"unreadable record ({exc})") from None
    if not isinstance(seq, int) or not isinstance(prev, str):
        raise ChainError(lineno, "bad seq/prev fields")
    record["hash"] = digest
    return Entry(seq, prev, digest, record)


@dataclass
class ChainState:
    """Running state of a verification: records seen and the hashes checkpoints need."""

    count: int = 0
    head: str = GENESIS
    wanted: set[int] = field(default_factory=set)  # counts whose head hash we must remember
    heads: dict[int, str] = field(default_factory=dict)

    def feed(self, line: bytes) -> Entry:
        entry = open_line(line, self.count + 1)
        if entry.seq != self.count:
            raise ChainError(self.count + 1, f"sequence {entry.seq} where {self.count} was expected "
                                             "(record deleted, inserted or reordered)")
        if entry.prev != self.head:
            raise ChainError(self.count + 1, "previous-hash link broken (record before it changed, "
                                             "deleted, inserted or reordered)")
        self.count += 1
        self.head = entry.hash
        if self.count in self.wanted:
            self.heads[self.count] = entry.hash
        return entry


def walk(lines: Iterable[bytes], wanted: Iterable[int] = ()) -> ChainState:
    """Check every line in order; raise ChainError at the first problem."""
    state = ChainState(wanted=set(wanted))
    for line in lines:
        state.feed(line)
    return state


# -- checkpoints: signed (count, head) statements -----------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    count: int
    head: str
    time: str
    host: str
    key_id: str
    signature: str  # base64

    def payload(self) -> bytes:
        return canonical({"type": "medai-audit-checkpoint", "count": self.count, "head": self.head,
                          "time": self.time, "host": self.host, "key_id": self.key_id})

    def to_json(self) -> dict[str, Any]:
        return {"type": "medai-audit-checkpoint", "count": self.count, "head": self.head, "time": self.time,
                "host": self.host, "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Checkpoint":
        if data.get("type") != "medai-audit-checkpoint":
            raise ValueError("not a medai audit checkpoint")
        return cls(int(data["count"]), str(data["head"]), str(data["time"]), str(data["host"]),
                   str(data["key_id"]), str(data["signature"]))

    def verify(self, keyring: dict[str, Ed25519PublicKey], what: str) -> None:
        keys.verify_signature(keyring, self.key_id, base64.b64decode(self.signature), self.payload(), what)


def sign_checkpoint(key: Ed25519PrivateKey, *, count: int, head: str, time: str, host: str) -> Checkpoint:
    unsigned = Checkpoint(count, head, time, host, keys.key_id(key.public_key()), "")
    signature = base64.b64encode(key.sign(unsigned.payload())).decode("ascii")
    return Checkpoint(count, head, time, host, unsigned.key_id, signature)
