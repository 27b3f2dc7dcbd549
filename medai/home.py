"""The ``MEDAI_HOME`` layout: every path under it is named here and nowhere else.

::

    MEDAI_HOME/
      medai.toml            settings (medai.config)
      audit/                the audit trail and its checkpoints (medai.compliance.trail)
      audit-anchor.json     newest checkpoint, outside audit/ (medai.compliance.trail)
      keys/                 install keys, mode 0600 (medai.compliance.keys)
      store/                studies received from a PACS (medai.pacs.store)
      pacs/                 the PACS queue database and the listener's status file
      results/              the results store: index.sqlite and one folder per run
      models/               installed model bundles (medai.inference.registry)
      trust/                pinned model signing keys (medai.inference.trust)
      cache/                provider parity verdicts and other caches
      deid/                 de-identification UID maps; quarantine/ for withheld images
      exports/              default folder for files a clinician saves
      attestations/         signed session attestations

Folder and file names under it are pseudonyms or random run ids, never a clear
UID or patient identifier. Each function creates its folder (mode 0700) on first
use, so callers never ``mkdir`` a home path themselves.
"""

from __future__ import annotations

from pathlib import Path

from medai import config


#: Folder and file names the trust boundary (medai.compliance) resolves itself, on every
#: record, against its cached home: named here with the rest of the layout.
AUDIT = "audit"
KEYS = "keys"
AUDIT_ANCHOR = "audit-anchor.json"


def root() -> Path:
    """``MEDAI_HOME`` itself (created if missing, mode 0700)."""
    return config.home()


def _dir(*parts: str) -> Path:
    path = root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def audit_dir() -> Path:
    return _dir(AUDIT)


def audit_anchor() -> Path:
    return root() / AUDIT_ANCHOR


def keys_dir() -> Path:
    return _dir(KEYS)


def store_dir() -> Path:
    """Studies received from a PACS (``store/<study key>/<series key>/<instance>.dcm``)."""
    return _dir("store")


def pacs_dir() -> Path:
    """The PACS queue database and the listener's status file."""
    return _dir("pacs")


def results_dir() -> Path:
    """The results store (:mod:`medai.results`)."""
    return _dir("results")


def results_index() -> Path:
    return results_dir() / "index.sqlite"


def models_dir() -> Path:
    return _dir("models")


def trust_dir() -> Path:
    return _dir("trust", "models")


def cache_dir(name: str = "") -> Path:
    return _dir("cache", name) if name else _dir("cache")


def logs_dir() -> Path:
    """Logs of detached helpers (the background tuner); never patient identifiers."""
    return _dir("logs")


def deid_dir() -> Path:
    return _dir("deid")


def quarantine_dir(export_id: str) -> Path:
    """Where images withheld from one de-identified export go (created by the exporter)."""
    return _dir("quarantine") / export_id


def exports_dir() -> Path:
    return root() / "exports"


def attestations_dir() -> Path:
    return _dir("attestations")


__all__ = ["root", "audit_dir", "audit_anchor", "keys_dir", "store_dir", "pacs_dir", "results_dir",
           "results_index", "models_dir", "trust_dir", "cache_dir", "logs_dir", "deid_dir", "quarantine_dir",
           "exports_dir", "attestations_dir"]
