"""Install keys of the audit trail, kept under ``MEDAI_HOME/keys`` with mode 0600.

Three secrets, each with one job:

``audit-signing.key`` / ``audit-signing.pub``
    Ed25519 key that signs audit checkpoints and session attestations. The public
    half can be exported (``medai audit keys export``) to verify on another machine.
    Rotation keeps retired public keys in ``keys/retired/`` so old checkpoints still
    verify; the retired private key is deleted.
``pseudonym.key``
    32 random bytes for the keyed HMAC-SHA256 pseudonyms of patient identifiers.
    Never rotated: a new key would break matching of old records to new ones.
``data.key``
    AES-256-GCM key that seals the clear patient identifiers inside audit records
    so an authorised auditor can reveal them. Rotation moves the old key to
    ``keys/retired/data-<id>.key`` (still needed to reveal old records).

Keys are generated on first use. If the audit trail already holds records but a
key is missing, nothing is generated: that is an error (fail closed), because a
fresh key would silently orphan the existing pseudonyms and signatures.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import secrets
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medai import config, home
from medai.errors import AuditVerificationError, AuditWriteError

SIGNING_KEY = "audit-signing.key"
SIGNING_PUB = "audit-signing.pub"
PSEUDONYM_KEY = "pseudonym.key"
DATA_KEY = "data.key"
RETIRED = "retired"
#: Domain-separation prefix of the message an old key signs to endorse its successor.
ROTATION_CONTEXT = b"medai-key-rotation\0"


_homes: dict[tuple[str | None, str | None], Path] = {}
_secrets: dict[str, tuple[tuple[int, int, int], bytes]] = {}


def medai_home() -> Path:
    """``config.home()``, resolved once per MEDAI_HOME/MEDAI_CONFIG value (the trail
    asks for it on every record)."""
    ident = (os.environ.get("MEDAI_HOME"), os.environ.get("MEDAI_CONFIG"))
    found = _homes.get(ident)
    if found is None:
        found = _homes[ident] = config.home()
    return found


def keys_dir() -> Path:
    return medai_home() / home.KEYS


def _trail_has_records() -> bool:
    trail = medai_home() / home.AUDIT / "trail.jsonl"
    try:
        return trail.stat().st_size > 0
    except OSError:
        return False


@contextmanager
def _locked() -> Iterator[Path]:
    """Serialise key creation and rotation between processes."""
    directory = keys_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditWriteError(f"{directory}: cannot open the key store ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory
    finally:
        os.close(fd)


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (never readable by others,
    not even for an instant)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure() -> None:
    """Create whichever install keys are missing, but only while the audit trail is
    still empty; afterwards a missing key is an error (fail closed)."""
    makers = {SIGNING_KEY: _new_signing_pem, PSEUDONYM_KEY: lambda: secrets.token_bytes(32),
              DATA_KEY: lambda: secrets.token_bytes(32)}
    if all((keys_dir() / name).exists() for name in makers):
        return
    with _locked() as directory:
        missing = [name for name in makers if not (directory / name).exists()]
        if not missing:
            return
        if _trail_has_records():
            raise AuditWriteError(
                f"{directory / missing[0]}: key missing while the audit trail already has records; "
                "restore it from backup (a new key would orphan existing records)")
        for name in missing:
            try:
                data = makers[name]()
                write_secret(directory / name, data)
                if name == SIGNING_KEY:
                    key = serialization.load_pem_private_key(data, password=None)
                    write_secret(directory / SIGNING_PUB, _public_pem(key.public_key()))  # type: ignore[arg-type]
            except OSError as exc:
                raise AuditWriteError(f"{directory / name}: cannot create key ({exc.strerror or exc})") from exc


def _read(name: str) -> bytes:
    path = keys_dir() / name
    for attempt in (1, 2):
        try:
            st = os.stat(path)
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = _secrets.get(str(path))
            if cached is not None and cached[0] == ident:
                return cached[1]
            data = path.read_bytes()
            _secrets[str(path)] = (ident, data)
            return data
        except FileNotFoundError:
            if attempt == 1:
                ensure()
        except OSError as exc:
            raise AuditWriteError(f"{path}: cannot read key ({exc.strerror or exc})") from exc
    raise AuditWriteError(f"{path}: key missing")


def key_id(public: Ed25519PublicKey) -> str:
    """Short identifier of a public key: first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _new_signing_pem() -> bytes:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signing_key() -> Ed25519PrivateKey:
    """The current Ed25519 install key (created on first use)."""
    pem = _read(SIGNING_KEY)
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditWriteError(f"{keys_dir() / SIGNING_KEY}: not an Ed25519 private key")
    return key


def pseudonym_key() -> bytes:
    return _read(PSEUDONYM_KEY)


def data_key_id(key: bytes) -> str:
    return hashlib.sha256(b"medai-data-key\0" + key).hexdigest()[:16]


def data_key() -> tuple[str, bytes]:
    """(id, key) of the current AES-256-GCM key sealing clear identifiers."""
    key = _read(DATA_KEY)
    return data_key_id(key), key


def data_key_by_id(wanted: str) -> bytes:
    """Current or retired data key with id ``wanted`` (for revealing old records)."""
    current_id, current = data_key()
    if current_id == wanted:
        return current
    path = keys_dir() / RETIRED / f"data-{wanted}.key"
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuditVerificationError(f"{path}: data key {wanted} not available ({exc.strerror or exc})") from exc


def pseudonym(value: str) -> str:
    """Stable keyed pseudonym of an identifier: first 16 hex digits of
    HMAC-SHA256(install pseudonym key, value stripped of padding). Without the key it
    cannot be reversed or recomputed, so it is safe in logs, worklists and file names."""
    text = str(value).strip()
    return hmac.new(pseudonym_key(), text.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def is_pseudonym(text: str) -> bool:
    """Whether ``text`` has the form :func:`pseudonym` gives (16 lower-case hex digits)."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


# -- public keys: the keyring used to verify --------------------------------------------

def load_public_keys(path: str | os.PathLike[str]) -> dict[str, Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (one or several concatenated blocks)."""
    text = Path(path).read_bytes()
    found: dict[str, Ed25519PublicKey] = {}
    marker = b"-----END PUBLIC KEY-----"
    for block in text.split(marker):
        if b"-----BEGIN PUBLIC KEY-----" not in block:
            continue
        try:
            key = serialization.load_pem_public_key(block.strip() + b"\n" + marker + b"\n")
        except ValueError as exc:
            raise AuditVerificationError(f"{path}: not a PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise AuditVerificationError(f"{path}: not an Ed25519 public key")
        found[key_id(key)] = key
    if not found:
        raise AuditVerificationError(f"{path}: no public key found")
    return found


def local_public_keys() -> dict[str, Ed25519PublicKey]:
    """The current and every retired public key of this install, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    directory = keys_dir()
    for path in [directory / SIGNING_PUB, *sorted((directory / RETIRED).glob("*.pub"))]:
        if path.is_file():
            keys.update(load_public_keys(path))
    if (directory / SIGNING_KEY).is_file():  # the private key is the authority on "current"
        pub = signing_key().public_key()
        keys[key_id(pub)] = pub
    return keys


def export_public_keys() -> bytes:
    """PEM text of the current and retired public keys, current first."""
    current = signing_key().public_key()
    out = [_public_pem(current)]
    for kid, pub in local_public_keys().items():
        if kid != key_id(current):
            out.append(_public_pem(pub))
    return b"".join(out)


def verify_signature(keyring: dict[str, Ed25519PublicKey], kid: str, signature: bytes, message: bytes,
                     what: str) -> None:
    """Raise AuditVerificationError unless ``signature`` over ``message`` is valid under key ``kid``."""
    pub = keyring.get(kid)
    if pub is None:
        raise AuditVerificationError(f"{what}: signed with unknown key {kid}; pass its public key")
    try:
        pub.verify(signature, message)
    except InvalidSignature:
        raise AuditVerificationError(f"{what}: signature does not verify with key {kid}") from None


@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str
    endorsement: bytes  # old key's signature over the new public key (raw bytes)
    new_public_raw: bytes
    old_data_key_id: str | None = None
    new_data_key_id: str | None = None


def rotate(*, data: bool = False) -> Rotation:
    """Replace the signing key (and with ``data=True`` the data key). The old signing
    key endorses the new public key; the old public key (and old data key) move to
    ``keys/retired/``; the old private signing key is deleted. Callers (the audit
    module) checkpoint before and after so the chain spans the change."""
    old = signing_key()
    old_pub = old.public_key()
    with _locked() as directory:
        retired = directory / RETIRED
        retired.mkdir(exist_ok=True, mode=0o700)
        old_kid = key_id(old_pub)
        write_secret(retired / f"{old_kid}.pub", _public_pem(old_pub))
        new_pem = _new_signing_pem()
        new = serialization.load_pem_private_key(new_pem, password=None)
        assert isinstance(new, Ed25519PrivateKey)
        raw = new.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        endorsement = old.sign(ROTATION_CONTEXT + raw)
        write_secret(directory / SIGNING_KEY, new_pem)
        write_secret(directory / SIGNING_PUB, _public_pem(new.public_key()))
        old_did = new_did = None
        if data:
            old_did, old_data = data_key()
            write_secret(retired / f"data-{old_did}.key", old_data)
            fresh = secrets.token_bytes(32)
            write_secret(directory / DATA_KEY, fresh)
            new_did = data_key_id(fresh)
    return Rotation(old_kid, key_id(new.public_key()), endorsement, raw, old_did, new_did)
