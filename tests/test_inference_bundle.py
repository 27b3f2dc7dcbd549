"""Signed model bundles: verification, tamper refusal with audit records, trust store,
install/rollback and bring-your-own import. Uses the real shipped brain-extraction bundle."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medai.errors import ModelIntegrityError, ModelNotFoundError
from medai.inference import registry, trust
from medai.inference.bundle import load_bundle, seal
from medai.inference.card import parse_card

SHIPPED = registry.shipped_dir() / "brain-extraction"


def _alerts() -> list[dict]:
    from medai.compliance import audit

    return [r for r in audit.iter_records() if r["event"] == "security_alert"]


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "brain-extraction"
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("__pycache__", "build.py", "*.template.toml"))
    return dst


def _template(version: str) -> str:
    """The shipped card without its generated [files] table, at another version."""
    text = (SHIPPED / "card.toml").read_text()
    text = text[: text.index("\n[files]")]
    return text.replace('version = "1.0.2+medai.1"', f'version = "{version}"')


def test_shipped_bundle_is_pinned_and_verifies() -> None:
    bundle = registry.get_bundle("brain-extraction")
    assert bundle.trust == "pinned"
    assert set(bundle.card.files) == {"bbox.onnx", "main.onnx", "LICENSE"}
    assert bundle.card.pipeline == "brain_extraction"
    assert "MIT" in (SHIPPED / "LICENSE").read_text()
    with pytest.raises(ModelIntegrityError, match="not listed"):
        bundle.file("build.py")


def test_one_flipped_byte_is_refused_and_audited(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    onnx = folder / "main.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"main\.onnx has SHA-256 .* the card says"):
        load_bundle(folder, origin="shipped", pinned=registry.pins())
    alert = _alerts()[-1]
    assert alert["outcome_text"] == "major_failure"
    assert "main.onnx" in alert["detail"]["reason"]


def test_a_file_changed_after_a_remembered_verification_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Listings remember each file's digest by (inode, size, mtime, ctime); an
    in-place change of one byte, same size, still forces a fresh hash."""
    import time

    from medai.inference import bundle as bundle_mod

    folder = _copy(tmp_path)
    later = time.time_ns() + 5_000_000_000  # as if the copy were older than the "just changed" window
    monkeypatch.setattr(bundle_mod.time, "time_ns", lambda: later)
    load_bundle(folder, origin="shipped", pinned=registry.pins())
    load_bundle(folder, origin="shipped", pinned=registry.pins())  # remembered
    with open(folder / "LICENSE", "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0x20]))
    with pytest.raises(ModelIntegrityError, match=r"LICENSE has SHA-256"):
        load_bundle(folder, origin="shipped", pinned=registry.pins())


def test_edited_card_is_refused_and_audited(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    card = folder / "card.toml"
    card.write_text(card.read_text().replace("threshold = 0.5", "threshold = 0.4", 1))
    with pytest.raises(ModelIntegrityError, match="signature does not verify"):
        load_bundle(folder, origin="shipped", pinned=registry.pins())
    assert "signature" in _alerts()[-1]["detail"]["reason"]


def test_resigned_card_is_not_the_pinned_one(tmp_path: Path) -> None:
    """Someone edits the card and signs it with their own key: the pin still refuses it."""
    folder = _copy(tmp_path)
    seal(folder, _template("1.0.2+medai.1").replace("threshold = 0.5", "threshold = 0.1", 1),
         ["bbox.onnx", "main.onnx", "LICENSE"], Ed25519PrivateKey.generate())
    with pytest.raises(ModelIntegrityError, match="not the one pinned"):
        load_bundle(folder, origin="shipped", pinned=registry.pins())


def test_unsigned_refused_unless_allowed_and_audited(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "signature.json").unlink()
    with pytest.raises(ModelIntegrityError, match="unsigned"):
        load_bundle(folder, origin="path")
    bundle = load_bundle(folder, origin="path", allow_unsigned=True)
    assert bundle.trust == "unsigned"
    alert = _alerts()[-1]
    assert alert["outcome_text"] == "minor_failure" and "allow-unsigned" in alert["detail"]["what"]


def test_allow_unsigned_never_accepts_corrupt_files(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    (folder / "LICENSE").write_text("changed")
    with pytest.raises(ModelIntegrityError, match="LICENSE"):
        load_bundle(folder, origin="path", allow_unsigned=True)


def test_install_needs_a_trusted_key_then_rollback(tmp_path: Path) -> None:
    stranger = _copy(tmp_path / "a")
    (stranger / "card.toml").unlink()
    seal(stranger, _template("2.0.0"), ["bbox.onnx", "main.onnx", "LICENSE"], Ed25519PrivateKey.generate())
    with pytest.raises(ModelIntegrityError, match="not in the trust store"):
        registry.install(stranger)

    key = trust.local_key()
    for version in ("2.0.0", "2.1.0"):
        folder = _copy(tmp_path / version)
        seal(folder, _template(version), ["bbox.onnx", "main.onnx", "LICENSE"], key)
        installed = registry.install(folder)
        assert installed.version == version and installed.trust.startswith("signed:")
    assert registry.get_bundle("brain-extraction").version == "2.1.0"  # installed shadows shipped
    assert registry.rollback("brain-extraction").version == "2.0.0"
    assert registry.rollback("brain-extraction").version == "2.1.0"
    # tampering with an installed version is caught on load, too
    current = registry.get_bundle("brain-extraction").path
    (current / "LICENSE").write_text("x")
    with pytest.raises(ModelIntegrityError):
        registry.get_bundle("brain-extraction")


def test_import_signs_with_local_key(tmp_path: Path) -> None:
    card = tmp_path / "card.toml"
    text = _template("0.1.0").replace('id = "brain-extraction"', 'id = "my-bbox"')
    # a one-graph card: keep only the bbox graph
    start = text.index("[input.graphs.main]")
    end = text.index("[[preprocessing]]")
    card.write_text(text[:start] + text[end:])
    bundle = registry.import_onnx(SHIPPED / "bbox.onnx", card, extra_files=(SHIPPED / "LICENSE",))
    assert bundle.id == "my-bbox" and bundle.trust.startswith("signed:")
    assert bundle.card.files["bbox.onnx"] == registry.get_bundle("brain-extraction").card.files["bbox.onnx"]
    assert [b.id for b in registry.list_bundles()].count("my-bbox") == 1


def test_unknown_model_and_bad_cards() -> None:
    with pytest.raises(ModelNotFoundError, match="brain-extraction"):
        registry.get_bundle("no-such-model")
    good = (SHIPPED / "card.toml").read_text()
    with pytest.raises(ModelIntegrityError, match="not valid TOML"):
        parse_card("id = ")
    with pytest.raises(ModelIntegrityError, match="schema"):
        parse_card(good.replace("schema = 1", "schema = 7"))
    with pytest.raises(ModelIntegrityError, match="not a plain relative path"):
        parse_card(good + '"../evil.onnx" = "' + "0" * 64 + '"\n')
    with pytest.raises(ModelIntegrityError, match="memory_arena must be true or false"):
        parse_card(good.replace('output = "logit"', 'output = "logit"\nmemory_arena = "yes"', 1))
    assert tomllib.loads(good)["license"]["spdx"] == "MIT"


def test_install_from_archives_and_refuse_escaping_members(tmp_path: Path) -> None:
    import tarfile
    import zipfile

    folder = _copy(tmp_path / "src")
    (folder / "card.toml").unlink()
    seal(folder, _template("3.0.0"), ["bbox.onnx", "main.onnx", "LICENSE"], trust.local_key())
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname="brain-extraction")
    assert registry.install(archive).version == "3.0.0"

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../outside.txt", "x")
        zf.writestr("card.toml", "schema = 1")
    with pytest.raises(ModelIntegrityError, match="escapes"):
        registry.install(evil)
    assert not (tmp_path / "outside.txt").exists()
