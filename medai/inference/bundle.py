"""A model bundle: a folder with ``card.toml``, ``signature.json`` and the files the card lists.

Loading a bundle verifies all of it before anything else reads it:

1. the card parses and validates (:mod:`medai.inference.card`);
2. ``signature.json`` verifies over the exact card bytes (Ed25519);
3. the signer is trusted: the card's SHA-256 is pinned in the package
   (shipped bundles) or the key is in the local trust store (installed bundles);
4. every file listed in ``[files]`` exists and has the listed SHA-256.

Any failure raises :class:`ModelIntegrityError` with the bundle path and the
reason, and writes a ``security_alert`` audit record. ``allow_unsigned`` (a
development switch, audited every time it is used) skips steps 2-3 only;
corrupt or missing files are never accepted. Pipelines open files only through
:meth:`Bundle.file`, which refuses names the card does not list.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping

from medai.errors import ModelIntegrityError
from medai.compliance import audit as _audit
from medai.inference import trust
from medai.inference.card import CARD_NAME, ModelCard, parse_card

log = logging.getLogger("medai.inference")

Origin = Literal["shipped", "installed", "path"]


#: Digests already computed in this process, by the file's (device, inode, size, mtime, ctime).
_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


def verified_digest(path: Path) -> str:
    """:func:`sha256_file`, computed once per process for an unchanged file.

    Listing the models (the UI does on every page) verified every ONNX file of
    every bundle each time, 0.4-0.7 s a listing. Any write to the file, or to
    its metadata, changes its ctime, which user space cannot set back, so a
    file that matches all five fields holds the bytes that were hashed. File
    times tick coarsely (a few ms), so a file changed in the last two seconds
    is always hashed afresh and never remembered."""
    st = os.stat(path)
    if time.time_ns() - st.st_ctime_ns < 2_000_000_000:
        return sha256_file(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = sha256_file(path)
    return digest


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle. Only :func:`load_bundle` makes these."""

    path: Path
    card: ModelCard
    card_sha256: str
    #: "pinned", "signed:<key_id>" or "unsigned" (development only).
    trust: str
    origin: Origin

    @property
    def id(self) -> str:
        return self.card.id

    @property
    def version(self) -> str:
        return self.card.version

    def file(self, name: str) -> Path:
        """Path of a file the card lists (and that was verified); anything else is refused."""
        if name not in self.card.files:
            raise ModelIntegrityError(f"{self.path}: file {name!r} is not listed in the card")
        return self.path / name

    def provenance(self) -> dict[str, object]:
        """What a result records about the model that produced it."""
        return {"id": self.id, "version": self.version, "card_sha256": self.card_sha256,
                "trust": self.trust, "files": dict(self.card.files), "pipeline": self.card.pipeline}


def _refuse(path: Path, reason: str, model_id: str | None) -> ModelIntegrityError:
    _audit.record("security_alert", outcome="major_failure",
                  detail={"what": "model bundle refused", "bundle": str(path), "model": model_id,
                          "reason": reason})
    return ModelIntegrityError(f"model bundle {path}: {reason}")


def load_bundle(path: str | Path, *, origin: Origin = "path", pinned: Mapping[str, Iterable[str]] | None = None,
                allow_unsigned: bool = False) -> Bundle:
    """Verify and load the bundle folder ``path`` (see the module docstring for the checks)."""
    path = Path(path)
    card_path = path / CARD_NAME
    try:
        card_bytes = card_path.read_bytes()
    except OSError as exc:
        raise _refuse(path, f"cannot read {CARD_NAME} ({exc.strerror or exc})", None) from None
    try:
        card = parse_card(card_bytes, source=card_path)
    except ModelIntegrityError as exc:
        raise _refuse(path, str(exc), None) from None
    card_digest = hashlib.sha256(card_bytes).hexdigest()

    trust_label = _check_signature(path, card, card_bytes, card_digest, origin, pinned, allow_unsigned)

    for name, expected in sorted(card.files.items()):
        file_path = path / name
        if not file_path.is_file():
            raise _refuse(path, f"file {name} listed in the card is missing", card.id)
        actual = verified_digest(file_path)
        if actual != expected:
            raise _refuse(path, f"file {name} has SHA-256 {actual[:12]}…, the card says {expected[:12]}… "
                                "(modified or corrupt); reinstall the bundle", card.id)
    return Bundle(path=path, card=card, card_sha256=card_digest, trust=trust_label, origin=origin)


def _check_signature(path: Path, card: ModelCard, card_bytes: bytes, card_digest: str, origin: Origin,
                     pinned: Mapping[str, Iterable[str]] | None, allow_unsigned: bool) -> str:
    sig_path = path / trust.SIGNATURE_NAME
    problem: str | None = None
    label = "unsigned"
    if not sig_path.is_file():
        problem = "unsigned (no signature.json)"
    else:
        try:
            signature = trust.read_signature(sig_path)
            trust.verify(card_bytes, signature, where=path)
        except ModelIntegrityError as exc:
            problem = str(exc)
        else:
            pins = set((pinned or {}).get(card.id, ()))
            if card_digest in pins:  # the exact card this release ships, wherever the folder is
                label = "pinned"
            elif origin == "shipped" and pins:
                problem = (f"card SHA-256 {card_digest[:12]}… is not the one pinned in this medai release "
                           "(card edited?)")
            elif signature.key_id in trust.trusted_key_ids():
                label = f"signed:{signature.key_id}"
            else:
                problem = (f"signed by key {signature.key_id}, which is not in the trust store; add it with "
                           "`medai models trust KEYFILE` if you trust its publisher")
    if problem is None:
        return label
    if not allow_unsigned:
        raise _refuse(path, problem, card.id)
    _audit.record("security_alert", outcome="minor_failure",
                  detail={"what": "unsigned/untrusted model bundle allowed (--allow-unsigned)",
                          "bundle": str(path), "model": card.id, "reason": problem})
    log.warning("loading untrusted bundle %s because allow_unsigned is set: %s", path, problem)
    return "unsigned"


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in sorted(names)}


def render_files_table(digests: Mapping[str, str]) -> str:
    lines = ["[files]"] + [f'"{name}" = "{digest}"' for name, digest in sorted(digests.items())]
    return "\n".join(lines) + "\n"


def seal(folder: Path, card_template: str, files: Iterable[str], key: "trust.Ed25519PrivateKey") -> str:
    """Write ``card.toml`` (template + a generated ``[files]`` table) and ``signature.json``.

    The template must not contain a ``[files]`` table. Returns the card SHA-256.
    """
    if "\n[files]" in "\n" + card_template:
        raise ModelIntegrityError(f"{folder}: the card template must not contain [files]; it is generated")
    text = card_template.rstrip("\n") + "\n\n" + render_files_table(file_digests(folder, files))
    parse_card(text, source=folder / CARD_NAME)  # refuse to sign an invalid card
    data = text.encode("utf-8")
    (folder / CARD_NAME).write_bytes(data)
    (folder / trust.SIGNATURE_NAME).write_text(trust.sign(data, key).to_json())
    return hashlib.sha256(data).hexdigest()
