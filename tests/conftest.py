"""Shared fixtures. Every test gets its own MEDAI_HOME so no state leaks between tests
or into the user's real home."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
#: External real test data fetched by scripts/fetch-test-data (not kept in the repo).
TESTDATA = REPO / ".cache" / "testdata"


@pytest.fixture(autouse=True)
def medai_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("medai-home")
    monkeypatch.setenv("MEDAI_HOME", str(home))
    monkeypatch.delenv("MEDAI_CONFIG", raising=False)
    # A model's first run would start a background tuner (issue 17): tests that want it say so.
    monkeypatch.setenv("MEDAI_TUNE_ON_FIRST_USE", "off")
    return home


def testdata(*parts: str) -> Path:
    """Path inside the fetched external test data; skips nothing: a missing file is a setup error."""
    path = TESTDATA.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: run scripts/fetch-test-data")
    return path


def build_script(model: str) -> Any:
    """``models/<model>/build.py`` as a module, so a test measures or rewrites with the very
    code the bundle was built with (the card's figures and the tests cannot drift apart)."""
    import importlib.util

    path = REPO / "models" / model / "build.py"
    spec = importlib.util.spec_from_file_location(f"{model.replace('-', '_')}_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: Real peers the suite drives; scripts/setup --test installs them (Debian packages).
REQUIRED_TOOLS = ("storescu", "storescp", "echoscu", "dciodvfy", "Orthanc", "strace", "chromium", "unshare")
#: Those that pynetdicom shadows with same-named console scripts in the venv.
DCMTK_TOOLS = ("storescu", "storescp", "echoscu")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI a missing peer is a set-up error, not a reason to skip: fail at once."""
    import os
    import shutil

    from pacs_peers import dcmtk  # dcmtk's programs, not pynetdicom's same-named scripts

    if os.environ.get("CI"):
        missing = [tool for tool in REQUIRED_TOOLS
                   if (dcmtk(tool) if tool in DCMTK_TOOLS else shutil.which(tool)) is None]
        if missing:
            raise pytest.UsageError(f"CI: missing test peers {', '.join(missing)}; scripts/setup --test installs them")
