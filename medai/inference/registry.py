"""Where bundles live, and installing, rolling back and importing them.

Two places, searched in this order:

* installed: ``$MEDAI_HOME/models/<id>/versions/<version>-<card sha256[:12]>/``, with
  ``$MEDAI_HOME/models/<id>/current`` (and ``previous``) naming the active version
  folder. Installing writes the new version beside the old one and then replaces
  the ``current`` pointer with one ``os.replace`` (atomic: a crash leaves either the
  old or the new version active, never a half-written one). Rollback swaps
  ``current`` and ``previous``.
* shipped: folders with a ``card.toml`` inside the ``medai.models`` package
  (repository ``models/``), trusted by the digests pinned in
  :mod:`medai.inference.pinned`.

:func:`get_bundle` is what everything else calls; it returns a verified
:class:`~medai.inference.bundle.Bundle` or raises.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medai import config, home
from medai.errors import ModelIntegrityError, ModelNotFoundError
from medai.compliance import audit as _audit
from medai.inference import trust
from medai.inference.bundle import Bundle, load_bundle, seal
from medai.inference.card import CARD_NAME, parse_card


def shipped_dir() -> Path:
    import medai.models

    return Path(medai.models.__file__).resolve().parent


def installed_dir() -> Path:
    return home.models_dir()


def pins() -> dict[str, tuple[str, ...]]:
    from medai.inference.pinned import PINNED

    return PINNED


@dataclass(frozen=True)
class Entry:
    """One bundle location as found on disk, before or after verification."""

    id: str
    path: Path
    origin: str
    bundle: Bundle | None
    error: str | None


def _installed_current(model_id: str, pointer: str = "current") -> Path | None:
    base = installed_dir() / model_id
    ptr = base / pointer
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise ModelIntegrityError(f"{ptr}: damaged pointer")
    return base / "versions" / name


def _locations() -> list[tuple[str, Path, str]]:
    found: list[tuple[str, Path, str]] = []
    home_models = installed_dir()
    for base in sorted(p for p in home_models.iterdir() if p.is_dir() and not p.name.startswith(".")):
        current = _installed_current(base.name)
        if current is not None:
            found.append((base.name, current, "installed"))
    root = shipped_dir()
    for card in sorted(root.glob(f"*/{CARD_NAME}")):
        found.append((card.parent.name, card.parent, "shipped"))
    return found


def _allow(allow_unsigned: bool | None) -> bool:
    return bool(config.get("allow_unsigned", allow_unsigned or None))


def scan(*, allow_unsigned: bool | None = None) -> list[Entry]:
    """Every bundle location with its verification outcome (for ``medai models list``)."""
    entries = []
    for folder_id, path, origin in _locations():
        try:
            bundle = load_bundle(path, origin=origin, pinned=pins(), allow_unsigned=_allow(allow_unsigned))  # type: ignore[arg-type]
            entries.append(Entry(bundle.id, path, origin, bundle, None))
        except ModelIntegrityError as exc:
            entries.append(Entry(folder_id, path, origin, None, str(exc)))
    return entries


def list_bundles(*, allow_unsigned: bool | None = None) -> list[Bundle]:
    """Verified bundles, installed versions shadowing shipped ones of the same id."""
    seen: dict[str, Bundle] = {}
    for entry in scan(allow_unsigned=allow_unsigned):
        if entry.bundle is not None and entry.id not in seen:
            seen[entry.id] = entry.bundle
    return list(seen.values())


def get_bundle(model_id: str, *, allow_unsigned: bool | None = None) -> Bundle:
    """The verified bundle for ``model_id`` (installed first, then shipped)."""
    installed = _installed_current(model_id) if (installed_dir() / model_id).is_dir() else None
    if installed is not None:
        return load_bundle(installed, origin="installed", pinned=pins(), allow_unsigned=_allow(allow_unsigned))
    shipped = shipped_dir() / model_id
    if (shipped / CARD_NAME).is_file():
        return load_bundle(shipped, origin="shipped", pinned=pins(), allow_unsigned=_allow(allow_unsigned))
    known = sorted({loc[0] for loc in _locations()})
    raise ModelNotFoundError(f"no model {model_id!r}; installed models: {', '.join(known) or 'none'}")


def _write_pointer(path: Path, value: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(value + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _safe_extract(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                target = (dest / name).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise ModelIntegrityError(f"{archive}: member {name!r} escapes the bundle folder")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    else:
        raise ModelIntegrityError(f"{archive}: not a bundle folder, .zip or .tar archive")


def _bundle_root(folder: Path) -> Path:
    if (folder / CARD_NAME).is_file():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / CARD_NAME).is_file():
        return subs[0]
    raise ModelIntegrityError(f"{folder}: no {CARD_NAME} at the top of the bundle")


def install(source: str | Path, *, allow_unsigned: bool | None = None) -> Bundle:
    """Verify a bundle (folder or archive) against the trust store and make it current."""
    source = Path(source)
    staging_root = installed_dir() / ".staging"
    staging_root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root) as tmp:
        work = Path(tmp) / "bundle"
        if source.is_dir():
            shutil.copytree(_bundle_root(source), work, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            extracted = Path(tmp) / "x"
            extracted.mkdir()
            _safe_extract(source, extracted)
            shutil.move(str(_bundle_root(extracted)), work)
        bundle = load_bundle(work, origin="installed", pinned=pins(), allow_unsigned=_allow(allow_unsigned))
        base = installed_dir() / bundle.id
        versions = base / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        name = f"{bundle.version}-{bundle.card_sha256[:12]}"
        final = versions / name
        if not final.exists():
            os.replace(work, final)
        old = _installed_current(bundle.id)
        if old is not None and old.name != name:
            _write_pointer(base / "previous", old.name)
        _write_pointer(base / "current", name)
    _audit.record("import", detail={"what": "model bundle installed", "model": bundle.id,
                                    "version": bundle.version, "card_sha256": bundle.card_sha256,
                                    "trust": bundle.trust})
    return get_bundle(bundle.id, allow_unsigned=allow_unsigned)


def rollback(model_id: str) -> Bundle:
    """Make the previously installed version current again (and the current one previous)."""
    base = installed_dir() / model_id
    prev = _installed_current(model_id, "previous") if base.is_dir() else None
    cur = _installed_current(model_id) if base.is_dir() else None
    if prev is None or not prev.is_dir():
        raise ModelNotFoundError(f"model {model_id!r} has no previous installed version to roll back to")
    load_bundle(prev, origin="installed")  # refuse to roll back onto something tampered
    _write_pointer(base / "current", prev.name)
    if cur is not None:
        _write_pointer(base / "previous", cur.name)
    _audit.record("import", detail={"what": "model bundle rolled back", "model": model_id, "to": prev.name})
    return get_bundle(model_id)


def import_onnx(onnx_path: str | Path, card_path: str | Path, *, extra_files: tuple[Path, ...] = ()) -> Bundle:
    """Bring your own model: bundle ``onnx_path`` with the user's card, sign with the local key, install.

    The card template names the ONNX file by its base name in ``[input.graphs.*]``
    and must not contain ``[files]`` (generated here).
    """
    onnx_path, card_path = Path(onnx_path), Path(card_path)
    template = card_path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=installed_dir()) as tmp:
        folder = Path(tmp) / "bundle"
        folder.mkdir()
        names = [onnx_path.name]
        shutil.copy2(onnx_path, folder / onnx_path.name)
        for extra in extra_files:
            shutil.copy2(extra, folder / extra.name)
            names.append(extra.name)
        seal(folder, template, names, trust.local_key())
        parse_card((folder / CARD_NAME).read_bytes(), source=card_path)
        return install(folder)


def pin(model_id: str, card_sha256: str) -> Path:
    """Build-time: record ``card_sha256`` as the shipped card of ``model_id`` in ``pinned.py``.

    Rewrites the generated module, keeping every other model's pin. Bundle build
    scripts call this after sealing a shipped bundle.
    """
    import importlib

    from medai.inference import pinned

    importlib.reload(pinned)
    pins = dict(pinned.PINNED)
    pins[model_id] = (card_sha256,)
    path = Path(pinned.__file__)
    text = path.read_text()
    head = text[: text.index("PINNED")]
    body = "".join(f'    "{k}": ("{v[0]}",),\n' for k, v in sorted(pins.items()))
    path.write_text(f"{head}PINNED: dict[str, tuple[str, ...]] = {{\n{body}}}\n")
    importlib.reload(pinned)
    return path
