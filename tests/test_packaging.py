"""What a fresh clone meets first: the install's licence metadata and the bundled demo study."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medai.data import demo_t1_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_editable_install_metadata_has_spdx_licence_and_no_licence_warning(tmp_path: Path) -> None:
    """``pip install -e .`` builds its metadata without setuptools' licence deprecation
    (a TOML-table ``project.license`` becomes an error after 2027-02-18).

    Built offline with the test extra's setuptools (``--no-build-isolation``), as a dry
    run: nothing is installed or changed in this environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--dry-run", "--disable-pip-version-check", "-v", "-e", str(REPO)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    lines = [line for line in output.splitlines() if "licen" in line.lower()]
    problems = [line for line in lines if any(w in line.lower() for w in ("deprecat", "warning", "error"))]
    assert not problems, "\n".join(problems)
    # The licence files really are part of the metadata (setuptools says which it adds).
    assert any("adding license file 'LICENSE'" in line for line in lines), output[-3000:]
    assert any("demo-t1.LICENSE" in line for line in lines), output[-3000:]


def test_pyproject_declares_an_spdx_licence_expression() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    for pattern in project["project"]["license-files"]:
        assert list(REPO.glob(pattern)), f"license-files pattern {pattern!r} matches nothing"
    # PEP 639 fields need setuptools 77 or newer to build at all.
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_demo_series_folder_holds_only_dicom_files() -> None:
    folder = demo_t1_dir()
    files = sorted(p for p in folder.iterdir())
    assert len(files) == 181
    for path in files:
        with path.open("rb") as fh:
            assert fh.read(132)[128:] == b"DICM", f"{path.name} in the demo series folder is not a DICOM file"
    licence = folder.parent / "demo-t1.LICENSE"
    assert "BSD-3-clause" in licence.read_text()


def test_demo_and_ui_report_no_skipped_files() -> None:
    """`medai demo` counts index.skipped; the UI's study list shows catalog()'s skipped files."""
    from medai import workstation
    from medai.cli.demo import demo_study
    from medai.dicom.index import scan

    index = scan([demo_study()])
    assert [s.to_json() for s in index.skipped] == []
    assert index.instances_indexed == 181
    studies, skipped = workstation.catalog(workstation.default_sources())
    assert skipped == []
    assert any(row.source == "demo" for row in studies)
