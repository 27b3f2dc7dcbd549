"""Configuration, resolved in one place.

Precedence, highest first: a CLI flag (passed in by the caller), a ``MEDAI_*``
environment variable, the ``medai.toml`` file, the built-in default.

The file is ``$MEDAI_CONFIG`` when set, else ``$MEDAI_HOME/medai.toml``. Dotted
keys map to TOML tables and to environment variables with ``_``:
``pacs.ae_title`` is ``[pacs] ae_title`` in the file and ``MEDAI_PACS_AE_TITLE``
in the environment. All state (audit trail, keys, study store, caches, queues)
lives under ``MEDAI_HOME``.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from medai.errors import ConfigError


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_size(text: str | int) -> int:
    """Parse a memory size such as ``"4G"``, ``"512MiB"`` or ``1048576`` into bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2,
             "MIB": 1024**2, "G": 1024**3, "GB": 1024**3, "GIB": 1024**3, "T": 1024**4,
             "TB": 1024**4, "TIB": 1024**4}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    if unit not in units or not number:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return int(float(number) * units[unit])


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "MEDAI_" + self.key.upper().replace(".", "_")


def _default_home() -> str:
    import platformdirs

    return platformdirs.user_data_dir("medai", appauthor=False)


#: Every setting medai knows. Add new ones here, nowhere else.
SETTINGS: dict[str, Setting] = {
    s.key: s
    for s in [
        Setting("home", None, str, "Directory holding all medai state (default: platformdirs user data dir)."),
        Setting("log_level", "WARNING", str, "Log level for the CLI/UI/servers."),
        Setting("device", "auto", str, "Inference device: auto, cpu, cuda, tensorrt, rocm, openvino (openvino-cpu, -gpu, -npu), coreml, directml, qnn."),
        Setting("precision", "auto", str, "Inference precision: auto (this machine's tuned choice, see medai doctor --tune), fp32, bf16, fp16, int8."),
        Setting("threads", 0, int, "Intra-op threads for inference (0: number of physical cores)."),
        Setting("tune_on_first_use", "background", str, "A model's first run on an untuned machine: background (start a bounded, lowest-priority `medai doctor --tune`), upfront (tune before the run, bounded), off."),
        Setting("max_memory", None, parse_size, "Memory budget for one inference run (e.g. 4G)."),
        Setting("allow_unsigned", False, _parse_bool, "Development only: load unsigned model bundles (audited)."),
        Setting("egress.allow", [], _parse_list, "Extra host:port destinations the egress guard allows."),
        Setting("ui.address", "127.0.0.1", str, "Address the UI binds to."),
        Setting("ui.port", 8501, int, "Port of the UI."),
        Setting("pacs.ae_title", "MEDAI", str, "Our AE title as a C-STORE SCP."),
        Setting("pacs.address", "127.0.0.1", str, "Address the C-STORE SCP binds to."),
        Setting("pacs.port", 11112, int, "Port of the C-STORE SCP."),
        Setting("pacs.allowed_callers", [], _parse_list, "Calling AE titles allowed to connect (empty: any)."),
        Setting("pacs.allowed_hosts", [], _parse_list, "Peer addresses allowed to connect (empty: any)."),
        Setting("pacs.stable_seconds", 60.0, float, "Quiet period after which a received study is complete."),
        Setting("pacs.destination", None, str, "Where results go: AE@host:port, or a folder path."),
        Setting("pacs.orthanc_url", None, str, "Orthanc REST base URL to follow (loopback)."),
        Setting("pacs.allow_remote", False, _parse_bool, "Allow the C-STORE SCP to bind a non-loopback address (audited)."),
        Setting("pacs.acse_timeout", 30.0, float, "Seconds to wait for association negotiation messages."),
        Setting("pacs.dimse_timeout", 60.0, float, "Seconds to wait for DIMSE messages."),
        Setting("pacs.network_timeout", 60.0, float, "Seconds an idle association is kept open."),
        Setting("pacs.max_pdu", 0, int, "Largest PDU the SCP accepts in bytes (0: unlimited)."),
        Setting("pacs.max_associations", 16, int, "Concurrent associations the SCP accepts."),
        Setting("pacs.min_free_space", 256 * 1024**2, parse_size, "Refuse instances (0xA700) below this much free disk."),
        Setting("pacs.max_instance_size", 2 * 1024**3, parse_size, "Refuse (0xA700) a received instance larger than this (streamed to disk as it arrives; 0: no limit)."),
        Setting("pacs.check_called_ae", False, _parse_bool, "Reject associations whose called AE title is not pacs.ae_title (off, like storescp)."),
        Setting("pacs.allowed_users", [], _parse_list, "User identities (PS3.7 D.3.3.7 usernames) allowed to associate; empty: identities are ignored."),
        Setting("pacs.tls_certificate", None, str, "DICOM TLS: our certificate (PEM); with tls_private_key the listener speaks TLS only, the sender presents it."),
        Setting("pacs.tls_private_key", None, str, "DICOM TLS: the private key (PEM) of pacs.tls_certificate."),
        Setting("pacs.tls_ca_certificates", None, str, "DICOM TLS: CA certificates (PEM); the listener then requires client certificates they issued, the sender verifies the destination against them."),
        Setting("pacs.destination_tls", False, _parse_bool, "Send to pacs.destination over DICOM TLS (BCP 195)."),
        Setting("pacs.send_policy", "after-review", str, "When results go to pacs.destination: after-review (a clinician accepts each one in the Worklist) or immediate (as soon as the model ran)."),
        Setting("review.reader", "", str, "Name recorded as VerifyingObserverName when a clinician accepts a result (default: the OS account)."),
        Setting("review.organization", "", str, "VerifyingOrganization of an accepted result's SR (default: this host's name)."),
        Setting("pacs.routes", [], json.loads, "Routing rules: [[pacs.routes]] tables (model, modality, body_part, series_description, sop_class); JSON in the environment. Empty: each model's card rules."),
        Setting("pacs.max_attempts", 5, int, "Attempts for a job or a result transfer before it is marked failed."),
        Setting("pacs.retry_seconds", 5.0, float, "First retry delay of a failed transfer (doubles each time, capped at 5 min)."),
        Setting("pacs.job_timeout", 1800.0, float, "Longest one model run of the PACS worker may take (seconds)."),
        Setting("pacs.orthanc_poll_seconds", 1.0, float, "How often the Orthanc changes feed is polled when idle."),
        Setting("triage.workers", 1, int, "Parallel studies in triage."),
    ]
}


def home(cli: str | os.PathLike[str] | None = None) -> Path:
    """The MEDAI_HOME directory (created if missing, mode 0700)."""
    value = get("home", cli) or _default_home()
    path = Path(value).expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def config_file() -> Path | None:
    explicit = os.environ.get("MEDAI_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    env_home = os.environ.get("MEDAI_HOME")
    base = Path(env_home).expanduser() if env_home else Path(_default_home())
    return base / "medai.toml"


@lru_cache(maxsize=8)
def _read_file(path: str, mtime: float) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _file_values() -> dict[str, Any]:
    path = config_file()
    if path is None or not path.is_file():
        return {}
    return _read_file(str(path), path.stat().st_mtime)


def _lookup(table: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = table
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def get(key: str, cli: Any = None) -> Any:
    """Resolve one setting: CLI value > environment > medai.toml > default."""
    try:
        setting = SETTINGS[key]
    except KeyError:
        raise ConfigError(f"unknown setting {key!r}") from None
    if cli is not None:
        return cli
    raw = os.environ.get(setting.env)
    if raw is not None and raw != "":
        try:
            return setting.parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"environment variable {setting.env}: {exc}") from exc
    found, value = _lookup(_file_values(), key)
    if found:
        if isinstance(value, str) and setting.parse not in (str,):
            try:
                return setting.parse(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{config_file()}: {key}: {exc}") from exc
        return value
    return setting.default


def resolved() -> dict[str, Any]:
    """Every setting with its resolved value (for ``medai doctor`` and attestations)."""
    return {key: get(key) for key in SETTINGS}
