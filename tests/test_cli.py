from __future__ import annotations

import subprocess
import sys

from medai import __version__
from medai.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"medai {__version__}"


def test_unknown_option_is_usage_error():
    assert main(["--no-such-option"]) == 2


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "medai", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "medai" in out.stdout
