"""Sending results out: C-STORE to the configured destination AE, a copy into a
folder, or an upload into the followed Orthanc.

A destination exists only because it was configured (``pacs.destination``, a
CLI flag, or ``pacs.orthanc_url``); constructing one registers it with the
egress guard, and nothing else is ever contacted. Every transfer is audited as
Export with the destination, before (fail closed: no trail, no transfer) and
after (outcome).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import pydicom

from medai import config
from medai.errors import ConfigError, PacsError
from medai.pacs import _audit
from medai.pacs.store import validate_uid, write_atomic
from medai.pacs.tls import TlsConfig

log = logging.getLogger("medai.pacs")

_AE_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


class Destination(Protocol):
    """Somewhere results can go."""

    def describe(self) -> str: ...

    def send(self, paths: Sequence[Path]) -> Mapping[str, str] | None:
        """Deliver every file or raise :class:`PacsError` (nothing partial is
        reported as success). May return details for the audit record (the
        peer certificate's subject of a DICOM TLS destination)."""


@dataclass(frozen=True)
class DicomDestination:
    ae_title: str
    host: str
    port: int
    calling_ae: str = "MEDAI"
    timeout: float = 30.0
    #: DICOM TLS (BCP 195): the destination's certificate is verified, ours presented when configured.
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        _audit.allow_destination(self.host, self.port)

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls is not None else ''}"

    def send(self, paths: Sequence[Path]) -> Mapping[str, str] | None:
        from pynetdicom import AE

        from medai.pacs.tls import certificate_subject, client_context

        _audit.quiet_pynetdicom()
        datasets = [pydicom.dcmread(p) for p in paths]
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        seen: set[tuple[str, str]] = set()
        for ds in datasets:
            key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
            if key not in seen:
                seen.add(key)
                ae.add_requested_context(key[0], [key[1]])
        tls_args = (client_context(self.tls), self.host) if self.tls is not None else None
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            raise PacsError(f"{self.describe()}: association not accepted (rejected, aborted, unreachable"
                            f"{', or the TLS handshake failed' if tls_args else ''})")
        details: dict[str, str] = {}
        if tls_args is not None:
            sock = getattr(assoc.dul.socket, "socket", None)
            details["peer_certificate"] = certificate_subject(sock.getpeercert() if sock is not None else None)
        try:
            for path, ds in zip(paths, datasets):
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status is not None else -1
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise PacsError(f"{self.describe()}: C-STORE of {path.name} failed with status "
                                    f"{'none' if code < 0 else hex(code)}")
        finally:
            if assoc.is_established:
                assoc.release()
        return details


@dataclass(frozen=True)
class FolderDestination:
    path: Path

    def describe(self) -> str:
        return f"folder:{self.path}"

    def send(self, paths: Sequence[Path]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for src in paths:
            ds = pydicom.dcmread(src, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            name = f"{validate_uid(ds.SOPInstanceUID, 'SOP Instance UID')}.dcm"
            try:
                write_atomic(self.path / name, src.read_bytes())
            except OSError as exc:
                raise PacsError(f"{self.path}: could not write {name}: {exc.strerror or exc}") from exc


def parse_destination(text: str, *, calling_ae: str | None = None) -> Destination:
    """``AE@host:port`` (C-STORE), ``orthanc`` (the followed Orthanc) or a folder path."""
    text = text.strip()
    if not text:
        raise ConfigError("pacs.destination is empty")
    if text == "orthanc":
        from medai.pacs.orthanc import OrthancClient

        return OrthancClient.from_config()
    match = _AE_RE.match(text)
    if match:
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ConfigError(f"pacs.destination {text!r}: not a TCP port")
        tls = None
        if config.get("pacs.destination_tls"):
            tls = TlsConfig(config.get("pacs.tls_certificate"), config.get("pacs.tls_private_key"),
                            config.get("pacs.tls_ca_certificates"))
        return DicomDestination(match["ae"].strip(), match["host"].strip("[]"), port,
                                calling_ae=calling_ae or config.get("pacs.ae_title"), tls=tls)
    if "@" in text:
        raise ConfigError(f"pacs.destination {text!r}: expected AE@host:port, 'orthanc' or a folder path")
    return FolderDestination(Path(text).expanduser())


def send_audited(dest: Destination, paths: Sequence[Path], *, study_uid: str | None) -> None:
    """Send with an Export audit record before (fail closed) and after."""
    instance_uids = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "StudyInstanceUID"])
        instance_uids.append(str(ds.SOPInstanceUID))
        study_uid = study_uid or str(ds.get("StudyInstanceUID", "")) or None
    where = dest.describe()
    _audit.record("export", study_uid=study_uid, instance_uids=tuple(instance_uids),
                  detail={"destination": where, "phase": "begin", "count": len(paths)})
    try:
        details = dest.send(paths) or {}
    except Exception as exc:
        try:
            _audit.record("export", outcome="failure", study_uid=study_uid, instance_uids=tuple(instance_uids),
                          detail={"destination": where, "phase": "end", "error": str(exc)[:200]})
        except Exception as audit_exc:  # noqa: BLE001
            log.error("could not audit a failed transfer: %s", audit_exc)
        raise
    _audit.record("export", study_uid=study_uid, instance_uids=tuple(instance_uids),
                  detail={"destination": where, "phase": "end", "count": len(paths), **details})
    log.info("sent files=%d destination=%s", len(paths), where)


def copy_tree_files(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into the DICOM files below them (for ``medai pacs send``)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


__all__ = ["Destination", "DicomDestination", "FolderDestination", "parse_destination", "send_audited",
           "copy_tree_files"]
