"""The DICOM C-STORE SCP behind ``medai pacs listen``.

The protocol is :mod:`medai.pacs.acceptor`'s; this module decides what is
accepted and how a received instance is stored.

The store handler is the only place a received instance enters medai. Its
order of operations is the guarantee the PACS relies on: validate the UIDs,
record the import in the audit trail (fail closed), write the Part 10 file
atomically, register it in the queue database, and only then answer success.
Anything that goes wrong is answered with a DICOM failure status and logged
without patient identifiers; the listener itself keeps running.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from medai import config
from medai.errors import AuditWriteError, ConfigError, UnsafeInputError
from medai.dicom.headerscan import walk
from medai.pacs import _audit
from medai.pacs.acceptor import AcceptorConfig, AcceptorServer, Association, DatasetSink, Rejection, StoreRequest
from medai.pacs.pdu import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, USER_IDENTITY_USERNAME,
                            USER_IDENTITY_USERNAME_PASSCODE, VERIFICATION_SOP_CLASS)
from medai.pacs.queue import InstanceRow, PacsDB, SeriesInfo
from medai.pacs.store import RESOURCE_ERRNOS, IncomingFile, StudyStore, file_sha256, validate_uid
from medai.pacs.tls import TlsConfig, server_context

log = logging.getLogger("medai.pacs")

#: C-STORE statuses (PS3.4 Table B.2-1 and PS3.7 C.4.2).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
#: "Data Set does not match SOP Class" (PS3.4 B.2.3), as dcmtk's storescp answers a mismatch.
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
PROCESSING_FAILURE = 0x0110


#: Lossless encodings a sender may keep (no transcoding on its side, the original
#: bytes in our store); preferred over uncompressed ones.
_LOSSLESS_COMPRESSED = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70",
                        "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.201",
                        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.92")
_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")


def transfer_syntax_preference() -> list[str]:
    """Every transfer syntax pynetdicom knows, in the order we accept them.

    The acceptor picks, per presentation context, the first of *our* list that
    the sender proposed. Lossless compressed first (keep what the sender has),
    then uncompressed, and lossy ones last: choosing a lossy syntax while an
    uncompressed one is on offer would make the sender compress with loss."""
    rest = [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _LOSSLESS_COMPRESSED and ts not in _UNCOMPRESSED]
    return [*_LOSSLESS_COMPRESSED, *_UNCOMPRESSED, *rest]


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"  # UI values pad with NUL, SH/AE with space (handled by the caller)
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def part10_header(sop_class: str, sop_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1), encoded directly.

    The elements PS3.10 requires (plus the sender's AE title), without a pydicom
    encoding pass per instance: that pass was about a tenth of the time spent
    per received instance."""
    ae = source_ae.strip().encode("ascii", "replace")[:16]
    ae += b" " * (len(ae) % 2)
    version = IMPLEMENTATION_VERSION_NAME.encode()
    version += b" " * (len(version) % 2)
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class.encode()),
        _meta_element(0x0003, b"UI", sop_uid.encode()),
        _meta_element(0x0010, b"UI", transfer_syntax.encode()),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _meta_element(0x0013, b"SH", version),
        *((_meta_element(0x0016, b"AE", ae),) if ae else ()),
    ))
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


@dataclass(frozen=True)
class ListenerConfig:
    """How the SCP presents itself; defaults come from ``medai.config``."""

    ae_title: str = "MEDAI"
    address: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    #: Binding anything but loopback must be asked for explicitly.
    allow_remote: bool = False
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: Largest PDU we accept (0: unlimited).
    max_pdu: int = 0
    max_associations: int = 16
    #: Refuse instances (0xA700) when less than this is free on the store's disk.
    min_free_bytes: int = 256 * 1024**2
    #: Refuse (0xA700) an instance larger than this (0: no limit). Instances
    #: stream to disk as they arrive: this bounds disk use, not memory.
    max_instance_bytes: int = 2 * 1024**3
    #: Refuse (A-ASSOCIATE-RJ) a called AE title other than ``ae_title``;
    #: off by default, like dcmtk storescp (peers address medai by host and port).
    check_called_ae: bool = False
    #: Require a User Identity (PS3.7 D.3.3.7, username or username and
    #: passcode) naming one of these users; empty: identities are ignored.
    allowed_users: tuple[str, ...] = ()
    #: DICOM TLS: our certificate and key (PEM); with a CA, client certificates are required and verified.
    tls: TlsConfig = TlsConfig()

    @classmethod
    def from_config(cls, **overrides: Any) -> "ListenerConfig":
        values: dict[str, Any] = {
            "ae_title": config.get("pacs.ae_title"),
            "address": config.get("pacs.address"),
            "port": config.get("pacs.port"),
            "allowed_callers": tuple(config.get("pacs.allowed_callers") or ()),
            "allowed_hosts": tuple(config.get("pacs.allowed_hosts") or ()),
            "allow_remote": config.get("pacs.allow_remote"),
            "acse_timeout": config.get("pacs.acse_timeout"),
            "dimse_timeout": config.get("pacs.dimse_timeout"),
            "network_timeout": config.get("pacs.network_timeout"),
            "max_pdu": config.get("pacs.max_pdu"),
            "max_associations": config.get("pacs.max_associations"),
            "min_free_bytes": config.get("pacs.min_free_space"),
            "max_instance_bytes": config.get("pacs.max_instance_size"),
            "check_called_ae": config.get("pacs.check_called_ae"),
            "allowed_users": tuple(config.get("pacs.allowed_users") or ()),
            "tls": TlsConfig(config.get("pacs.tls_certificate"), config.get("pacs.tls_private_key"),
                             config.get("pacs.tls_ca_certificates")),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def check(self) -> None:
        if not self.ae_title or len(self.ae_title) > 16:
            raise ConfigError(f"pacs.ae_title {self.ae_title!r}: an AE title has 1-16 characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"pacs.port {self.port}: not a TCP port")
        if not is_loopback(self.address) and not self.allow_remote:
            raise ConfigError(f"pacs.address {self.address}: not a loopback address; binding it exposes the "
                              "listener to the network, pass --allow-remote (or set pacs.allow_remote) to do so")
        self.tls.check(server=True)


@dataclass
class _AssocLog:
    """What one association delivered, for its instances_transferred record."""

    calling_ae: str
    peer: str
    certificate: str = ""
    studies: dict[str, list[str]] = field(default_factory=dict)
    patient: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def _as_file(dataset: bytes, transfer_syntax: str) -> bytes:
    """A received dataset behind a minimal meta header naming its transfer syntax, for reading."""
    return part10_header("1.2", "1.2", transfer_syntax, "") + dataset


def decode_dataset(dataset: bytes, transfer_syntax: str) -> Dataset:
    """pydicom's reading of a received dataset (deflated ones included)."""
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(_as_file(dataset, transfer_syntax)), force=True)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _series_info(fields: dict[str, str], study_uid: str, series_uid: str, sop_class: str) -> SeriesInfo:
    """What routing reads, from the handler's fields (:data:`_NEEDED`)."""
    return SeriesInfo(study_uid, series_uid, fields["Modality"], fields["BodyPartExamined"],
                      fields["SeriesDescription"], sop_class)


#: The elements the store handler needs, by tag.
_NEEDED = {0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID",
           0x00080016: "SOPClassUID", 0x00080060: "Modality", 0x00180015: "BodyPartExamined",
           0x0008103E: "SeriesDescription", 0x00100020: "PatientID", 0x00100010: "PatientName",
           0x00080005: "SpecificCharacterSet"}
#: Character sets in which an all-ASCII value reads as ASCII (others: pydicom decodes).
_ASCII_COMPATIBLE = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_WIRE = Path("<c-store dataset>")


def _dataset_fields(ds: Dataset) -> dict[str, str]:
    """The handler's elements as pydicom reads them (where :func:`quick_fields` cannot)."""
    return {keyword: _text(ds, keyword) for keyword in _NEEDED.values()}


def quick_fields(dataset: bytes, transfer_syntax: str) -> dict[str, str] | None:
    """The handler's elements read straight from the received bytes, or None
    when pydicom should decode the dataset instead.

    Decoding the whole dataset with pydicom for nine short values was about a
    sixth of the CPU the listener spends per instance. medai's header walker
    (the index's) slices them out; anything it is unsure of -- a structure it
    does not know, non-ASCII text, a character set with escape sequences, a
    multi-valued text -- falls back to pydicom, so the values are the ones
    pydicom would give."""
    buffer = _as_file(dataset, transfer_syntax)
    return head_fields(buffer, len(buffer))


def head_fields(head: bytes, size: int) -> dict[str, str] | None:
    """:func:`quick_fields` from the first bytes (``head``) of a Part 10 file of ``size`` bytes."""
    try:
        header = walk(bytes(head), size, _NEEDED.keys(), _WIRE)
    except Exception:  # noqa: BLE001 - malformed data is pydicom's to judge and report
        return None
    if header is None:
        return None
    fields = {}
    for tag, keyword in _NEEDED.items():
        raw = header.values.get(tag, b"")
        if not raw.isascii() or b"\\" in raw or b"\x1b" in raw:
            return None
        fields[keyword] = raw.decode("ascii").strip(" \x00").strip()
    if fields.pop("SpecificCharacterSet") not in _ASCII_COMPATIBLE:
        return None
    return fields


@dataclass(frozen=True)
class _Refused:
    """The sink of a C-STORE refused before its dataset arrived: the dataset
    is read and dropped, the request answered with ``status``."""

    status: int
    comment: str
    why: str

    def write(self, data: bytes) -> None:
        pass

    def discard(self) -> None:
        pass


def received_fields(head: bytes, size: int, whole: Callable[[], Path | BinaryIO]) -> dict[str, str]:
    """The store handler's elements of a received instance (Part 10 file of
    ``size`` bytes beginning with ``head``), raising what pydicom raises on
    malformed data.

    The fast read of ``head`` (:func:`head_fields`) first; where it cannot
    decide (unusual encoding, or a header longer than the bytes kept in
    memory), pydicom reads the file ``whole()`` returns up to the pixel
    data, leaving large values where they are. The fuzz harness
    (``bench/fuzz_pacs.py``) drives this same function."""
    fields = head_fields(head, size)
    if fields is None:
        import pydicom

        fields = _dataset_fields(pydicom.dcmread(whole(), stop_before_pixels=True, force=True, defer_size=4096))
    return fields


def acceptor_config(cfg: ListenerConfig) -> AcceptorConfig:
    """What the listener negotiates: every storage SOP class in our transfer
    syntax order, Verification uncompressed; timeouts and limits from ``cfg``."""
    syntaxes = transfer_syntax_preference()
    supported: dict[str, Sequence[str]] = {str(cx.abstract_syntax): syntaxes for cx in AllStoragePresentationContexts}
    supported[VERIFICATION_SOP_CLASS] = _UNCOMPRESSED
    return AcceptorConfig(supported=supported, acse_timeout=cfg.acse_timeout, dimse_timeout=cfg.dimse_timeout,
                          network_timeout=cfg.network_timeout, max_pdu=cfg.max_pdu,
                          max_associations=cfg.max_associations, max_dataset_bytes=cfg.max_instance_bytes,
                          ssl_context=server_context(cfg.tls) if cfg.tls.enabled else None,
                          answer_user_identity=bool(cfg.allowed_users))


class Listener:
    """A running (or ready) C-STORE SCP writing into a :class:`StudyStore`.

    The network side is :mod:`medai.pacs.acceptor`; this class is its handler:
    who may connect, what each association delivered (for the audit trail),
    and the store handler itself."""

    def __init__(self, cfg: ListenerConfig, *, store: StudyStore | None = None, db: PacsDB | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.store = store or StudyStore()
        self.db = db or PacsDB()
        self._assocs: dict[int, _AssocLog] = {}
        self._lock = threading.Lock()
        self._server: AcceptorServer | None = None
        self._free, self._free_at = 0, -1.0

    # -- setup --------------------------------------------------------------
    def start(self, *, block: bool = False) -> None:
        """Bind and serve. With ``block=False`` returns once listening."""
        self.store.clean_partial()
        self.reconcile()
        self.db.restart_quiet_periods()
        if not is_loopback(self.cfg.address):
            # Approved (and audited as a Security Alert) by the egress guard, which
            # otherwise refuses any non-loopback listening socket.
            from medai.compliance import egress

            egress.check_bind((self.cfg.address, self.cfg.port), explicit=self.cfg.allow_remote)
        self._server = AcceptorServer((self.cfg.address, self.cfg.port), acceptor_config(self.cfg), self)
        self._server.start()
        tls = self.cfg.tls
        log.info("listening ae_title=%s address=%s port=%d tls=%s", self.cfg.ae_title, self.cfg.address, self.port,
                 ("on, client certificates required" if tls.ca_certificates else "on") if tls.enabled else "off")
        if block:
            self.wait()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server is not None else self.cfg.port

    def wait(self) -> None:
        while self._server is not None:
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop accepting, finish the messages under way, abort the associations, flush their audit records."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        with self._lock:
            pending = list(self._assocs)
        for assoc_id in pending:
            self._flush(assoc_id)
        log.info("listener stopped")

    # -- reconciliation ------------------------------------------------------
    def reconcile(self) -> int:
        """Register stored files the database does not know: the listener was
        killed between the rename and the commit (never acknowledged, but
        intact and part of its study), or a power cut took the last commits
        (``synchronous=NORMAL``), acknowledged ones included. Files are named
        by pseudonyms, so the known ones are recognised by the pseudonyms of
        the SOP Instance UIDs the database holds; the UIDs and what routing
        needs (modality, body part, description, SOP class) of the others are
        read back from each file's own header, so the study routes as if it
        had been registered on arrival. A file whose header cannot give its
        UIDs stays where it is (nothing received is deleted) and is counted
        in the log."""
        import pydicom

        known = {self.store.name_for(sop) for sop in self.db.known_sops()}
        rows = []
        unreadable = 0
        for path in self.store.iter_files():
            if path.stem in known:
                continue
            try:
                fields = _dataset_fields(pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                                         defer_size=4096))
                study, series, sop = (validate_uid(fields[k]) for k in
                                      ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
                if self.store.path_for(study, series, sop) != path:
                    raise UnsafeInputError(None, "header UIDs do not match the stored file's place")
            except Exception as exc:  # noqa: BLE001 - a file we wrote; leave it in place whatever it holds
                unreadable += 1
                log.warning("stored instance left unregistered during reconciliation (%s)", type(exc).__name__)
                continue
            info = _series_info(fields, study, series, fields["SOPClassUID"])
            stat = path.stat()
            rows.append(InstanceRow(sop, study, series, info.sop_class_uid, stat.st_size,
                                    file_sha256(path), info, "scp", stat.st_mtime))
        if rows:
            self.db.record_instances(rows)
            log.info("reconciled %d stored instances missing from the queue database", len(rows))
        if unreadable:
            log.warning("%d stored instances could not be reconciled; they stay in the store", unreadable)
        return len(rows)

    # -- association bookkeeping (the acceptor's handler interface) ---------
    def on_connect(self, host: str) -> bool:
        """Host filter: a peer not on the list is refused before any DICOM is read (TCP close)."""
        if not self.cfg.allowed_hosts or host in self.cfg.allowed_hosts:
            return True
        log.warning("connection refused: host not allowed")
        self.db.bump("rejected_associations")
        try:
            _audit.record("security_alert", outcome="failure",
                          detail={"reason": "calling host not on pacs.allowed_hosts", "peer": host,
                                  "ae_title": self.cfg.ae_title})
        except AuditWriteError as exc:
            log.error("could not audit a refused connection: %s", exc)
        return False

    def on_tls_failure(self, host: str, why: str) -> None:
        self.db.bump("rejected_associations")
        try:
            _audit.record("security_alert", outcome="failure",
                          detail={"reason": f"TLS handshake failed: {why}"[:200], "peer": host,
                                  "ae_title": self.cfg.ae_title})
        except AuditWriteError as exc:
            log.error("could not audit a failed TLS handshake: %s", exc)

    def on_request(self, assoc: Association) -> Rejection | None:
        if self.cfg.check_called_ae and assoc.called_ae != self.cfg.ae_title:
            return Rejection.called_ae_not_recognized("called AE title is not pacs.ae_title (pacs.check_called_ae)")
        if self.cfg.allowed_callers and assoc.calling_ae not in self.cfg.allowed_callers:
            return Rejection.calling_ae_not_recognized("calling AE title not on pacs.allowed_callers")
        if self.cfg.allowed_users:
            identity = assoc.user_identity
            if identity is None:
                return Rejection.user_identity_refused("no user identity (pacs.allowed_users requires one)")
            if (identity.identity_type not in (USER_IDENTITY_USERNAME, USER_IDENTITY_USERNAME_PASSCODE)
                    or identity.primary.decode("utf-8", "replace") not in self.cfg.allowed_users):
                return Rejection.user_identity_refused("user identity not on pacs.allowed_users")
        return None

    def on_accepted(self, assoc: Association) -> None:
        with self._lock:
            self._assocs[assoc.number] = _AssocLog(assoc.calling_ae, assoc.address, assoc.peer_certificate)
        log.info("association accepted calling_ae=%s%s", assoc.calling_ae,
                 f" certificate={assoc.peer_certificate}" if assoc.peer_certificate else "")

    def on_rejected(self, assoc: Association, rejection: Rejection) -> None:
        log.warning("association rejected calling_ae=%s reason=%s", assoc.calling_ae, rejection.why)
        self.db.bump("rejected_associations")
        try:
            _audit.record("security_alert", outcome="failure",
                          detail={"reason": rejection.why, "calling_ae": assoc.calling_ae, "peer": assoc.address,
                                  **({"peer_certificate": assoc.peer_certificate} if assoc.peer_certificate
                                     else {})})
        except AuditWriteError as exc:
            log.error("could not audit a rejected association: %s", exc)

    def on_closed(self, assoc: Association) -> None:
        self._flush(assoc.number)

    def _flush(self, assoc_id: int) -> None:
        with self._lock:
            entry = self._assocs.pop(assoc_id, None)
        if entry is None:
            return
        for study_uid, sops in entry.studies.items():
            patient_id, patient_name = entry.patient.get(study_uid, (None, None))
            try:
                _audit.record("instances_transferred", patient_id=patient_id, patient_name=patient_name,
                              study_uid=study_uid, instance_uids=tuple(sops),
                              detail={"direction": "received", "calling_ae": entry.calling_ae, "peer": entry.peer,
                                      "count": len(sops),
                                      **({"peer_certificate": entry.certificate} if entry.certificate else {})})
            except AuditWriteError as exc:
                log.error("could not audit %d received instances of study %s: %s", len(sops),
                          _audit.key(study_uid), exc)
            log.info("association closed study=%s instances=%d calling_ae=%s", _audit.key(study_uid), len(sops),
                     entry.calling_ae)

    def _free_bytes(self) -> int:
        """Free space on the store's disk, sampled at most every half second."""
        now = time.monotonic()
        if now - self._free_at > 0.5:
            self._free, self._free_at = self.store.free_bytes(), now
        return self._free

    # -- the store handler -------------------------------------------------
    def open_dataset(self, request: StoreRequest) -> DatasetSink:
        """Where a C-STORE's dataset goes as it arrives: the instance's
        temporary file in the store, behind the Part 10 header made from the
        request (checked against the dataset in :meth:`on_store`)."""
        try:
            validate_uid(request.affected_sop_class_uid, "Affected SOP Class UID")
            validate_uid(request.affected_sop_instance_uid, "Affected SOP Instance UID")
        except UnsafeInputError as exc:
            return _Refused(CANNOT_UNDERSTAND, exc.reason, exc.reason)
        if self._free_bytes() < self.cfg.min_free_bytes:
            return _Refused(OUT_OF_RESOURCES, "storage full", "store disk below pacs.min_free_space")
        return self.store.incoming(part10_header(request.affected_sop_class_uid, request.affected_sop_instance_uid,
                                                 request.transfer_syntax, request.association.calling_ae))

    def on_store(self, request: StoreRequest, dataset: DatasetSink) -> tuple[int, str]:
        """C-STORE: the instance is on disk, fsynced and registered before
        success is returned; every failure becomes a DICOM status."""
        try:
            return self._store(request, dataset)
        except Exception:  # noqa: BLE001 - the listener must outlive any one dataset
            log.exception("unexpected error storing an instance")
            self.db.bump("failed_stores")
            return PROCESSING_FAILURE, "internal error while storing"

    def _store(self, request: StoreRequest, incoming: DatasetSink) -> tuple[int, str]:
        if isinstance(incoming, _Refused):
            self.db.bump("failed_stores")
            log.error("instance refused: %s", incoming.why)
            return incoming.status, incoming.comment
        if request.dropped:
            self.db.bump("failed_stores")
            log.error("instance refused: %s", request.dropped)
            if request.dropped.startswith("dataset over"):
                return OUT_OF_RESOURCES, "instance larger than pacs.max_instance_size"
            return OUT_OF_RESOURCES, "could not write the instance"
        assert isinstance(incoming, IncomingFile)
        try:
            fields = received_fields(incoming.head, incoming.size, lambda: (incoming.flush(), incoming.tmp)[1])
            sop_uid = validate_uid(fields["SOPInstanceUID"], "SOP Instance UID")
            study_uid = validate_uid(fields["StudyInstanceUID"], "Study Instance UID")
            series_uid = validate_uid(fields["SeriesInstanceUID"], "Series Instance UID")
            sop_class = validate_uid(fields["SOPClassUID"], "SOP Class UID")
            command_sop = validate_uid(request.affected_sop_instance_uid, "Affected SOP Instance UID")
            if command_sop != sop_uid:
                raise UnsafeInputError(None, "SOP Instance UID differs from the C-STORE request's")
            if sop_class != request.affected_sop_class_uid:
                self.db.bump("failed_stores")
                log.warning("instance refused: SOP Class UID differs from the C-STORE request's")
                return DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the C-STORE request's"
            info = _series_info(fields, study_uid, series_uid, sop_class)
            patient = (fields["PatientID"] or None, fields["PatientName"] or None)
        except UnsafeInputError as exc:
            self.db.bump("failed_stores")
            log.warning("instance refused: %s", exc.reason)
            return CANNOT_UNDERSTAND, exc.reason
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed data
            self.db.bump("failed_stores")
            log.warning("instance refused: dataset cannot be decoded (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND, "dataset cannot be decoded"

        if self._free_bytes() < self.cfg.min_free_bytes:
            self.db.bump("failed_stores")
            log.error("instance refused: store disk below pacs.min_free_space")
            return OUT_OF_RESOURCES, "storage full"

        assoc = request.association
        with self._lock:
            entry = self._assocs.get(assoc.number)
            first_of_study = entry is not None and study_uid not in entry.studies
            if entry is not None and first_of_study:
                entry.studies[study_uid] = []
                entry.patient[study_uid] = patient
        if entry is None or first_of_study:
            try:
                _audit.record("import", patient_id=patient[0], patient_name=patient[1], study_uid=study_uid,
                              series_uid=series_uid,
                              detail={"phase": "begin", "calling_ae": assoc.calling_ae, "peer": assoc.address,
                                      "via": "c-store"})
            except AuditWriteError as exc:
                with self._lock:
                    if entry is not None:
                        entry.studies.pop(study_uid, None)
                self.db.bump("failed_stores")
                log.error("instance refused: %s", exc)
                return OUT_OF_RESOURCES, "audit trail unavailable"

        try:
            stored = incoming.commit(study_uid, series_uid, sop_uid)
            self.db.record_instance(sop_uid=sop_uid, study_uid=study_uid, series_uid=series_uid,
                                    sop_class_uid=sop_class, size=stored.size, sha256=stored.sha256, series=info)
        except OSError as exc:
            self.db.bump("failed_stores")
            code = OUT_OF_RESOURCES if exc.errno in RESOURCE_ERRNOS else PROCESSING_FAILURE
            log.error("instance not stored: %s", exc.strerror or type(exc).__name__)
            return code, "could not write the instance"
        if entry is not None:
            with self._lock:
                entry.studies.setdefault(study_uid, []).append(sop_uid)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stored study=%s outcome=%s bytes=%d", _audit.key(study_uid), stored.outcome, stored.size)
        return SUCCESS, ""
