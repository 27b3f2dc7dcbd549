"""`medai models ...` and `medai doctor` through the real CLI entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medai.cli import main
from medai.inference import registry


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code = main(["--json", *argv])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else None)


def test_models_list_show_verify(capsys: pytest.CaptureFixture[str]) -> None:
    code, rows = _json(capsys, "models", "list")
    assert code == 0
    assert {"id": "brain-extraction", "trust": "pinned", "ok": True}.items() <= rows[0].items()  # type: ignore[index]
    code, card = _json(capsys, "models", "show", "brain-extraction")
    assert code == 0 and card["card"]["license"]["spdx"] == "MIT"  # type: ignore[index]
    names = {m["name"] for m in card["card"]["metrics"]}  # type: ignore[index]
    assert {"dice_vs_reference_deepbet", "dice_vs_reference_mask"} <= names
    code, _ = _json(capsys, "models", "verify", "brain-extraction")
    assert code == 0


def test_verify_a_tampered_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "brain-extraction"
    shutil.copytree(registry.shipped_dir() / "brain-extraction", folder)
    with open(folder / "bbox.onnx", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    code, rows = _json(capsys, "models", "verify", str(folder))
    assert code == 1
    assert "bbox.onnx" in rows[0]["error"]  # type: ignore[index]


def test_rollback_without_history_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "rollback", "brain-extraction"]) == 1
    assert "no previous installed version" in capsys.readouterr().err


@pytest.mark.slow
def test_doctor_reports_hardware_providers_and_parity(capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _json(capsys, "doctor")
    assert code == 0
    assert report["cpu"]["physical"] >= 1 and report["memory"]["total_gib"] > 0  # type: ignore[index]
    assert "AzureExecutionProvider" not in report["runtime"]["providers_usable"]  # type: ignore[index]
    parity = [p for p in report["parity"] if p["model"] == "brain-extraction"]  # type: ignore[index]
    assert {p["graph"] for p in parity} == {"bbox", "main"}
    assert all(p["passed"] and p["dice"] >= 0.99 for p in parity)
    assert all(p["passed"] for p in report["parity"]), report["parity"]  # type: ignore[index]
