from __future__ import annotations

import pytest

from medai import config
from medai.errors import ConfigError


def test_precedence_cli_env_file_default(medai_home, monkeypatch):
    assert config.get("pacs.port") == 11112
    (medai_home / "medai.toml").write_text("[pacs]\nport = 4242\n")
    assert config.get("pacs.port") == 4242
    monkeypatch.setenv("MEDAI_PACS_PORT", "5000")
    assert config.get("pacs.port") == 5000
    assert config.get("pacs.port", cli=6000) == 6000


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("MEDAI_PACS_PORT", "eleven")
    with pytest.raises(ConfigError, match="MEDAI_PACS_PORT"):
        config.get("pacs.port")


def test_unknown_setting():
    with pytest.raises(ConfigError):
        config.get("no.such.key")


@pytest.mark.parametrize("text,expected", [("512M", 512 * 2**20), ("4G", 4 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("100", 100)])
def test_parse_size(text, expected):
    assert config.parse_size(text) == expected


def test_home_is_private(medai_home):
    assert config.home() == medai_home
