"""The tests' and benches' dcmtk peers are dcmtk's programs even when pynetdicom's
same-named console scripts come first on PATH (an activated virtual environment)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_peers import dcmtk, needs_dcmtk

VENV_BIN = Path(sys.executable).parent


@pytest.mark.skipif(not needs_dcmtk, reason="dcmtk not installed")
@pytest.mark.parametrize("program", ["storescu", "storescp", "echoscu"])
def test_dcmtk_is_found_past_pynetdicoms_look_alikes(program: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    look_alike = VENV_BIN / program
    assert look_alike.is_file() and look_alike.read_bytes()[:2] == b"#!", \
        f"expected pynetdicom's {program} script in {VENV_BIN} (the trap this guards against)"
    path = dcmtk(program)
    assert path is not None and Path(path).is_absolute() and Path(path).parent != VENV_BIN
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    assert "dcmtk" in version.stdout.lower(), version.stdout


def test_a_missing_program_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dcmtk("no-such-dcmtk-program") is None
