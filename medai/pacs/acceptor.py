"""The DICOM upper layer, acceptor side, for Storage and Verification (PS3.8, PS3.7).

``medai pacs listen`` answers associations with this module, not with
pynetdicom's server. Measured on this project's 2-core machine, a bare
pynetdicom SCP spent about 2.4 ms of CPU per received instance (its state
machine, PDU objects, per-primitive queues and threads) against dcmtk
storescp's 0.3 ms, and that, not the disk, capped ingest at a fifth of
storescp's rate. The protocol a storage SCP needs is small: negotiate the
association, reassemble P-DATA fragments into a command set and a dataset,
answer each C-STORE and C-ECHO, release or abort. This module does exactly
that on a blocking socket per association (one thread each), with the
received dataset kept as the bytes the sender encoded.

Strict when writing, tolerant when reading: unknown items and sub-items in an
A-ASSOCIATE-RQ are skipped, every length is checked against what was received,
and anything that breaks the protocol ends the association with an A-ABORT
naming the reason (never an exception out of the server). Payload lengths are
read in bounded pieces, so a length field cannot make the server allocate
memory the peer did not send. Patient data never reaches a log line here: this
layer logs AE titles, addresses and protocol events only.

What is not implemented (an acceptor for storage does not need it):
asynchronous operations windows (requests are answered in order, which a
peer asking for a window must accept), SCP/SCU role selection replies, user
identity and extended negotiation replies (the requested defaults apply), TLS.
pynetdicom stays medai's SCU (``medai.pacs.sender``).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import medai

log = logging.getLogger("medai.pacs")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: medai's Implementation Class UID (PS3.7 D.3.3.2): a UUID-derived UID (PS3.5 B.2), fixed for medai.
IMPLEMENTATION_CLASS_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "https://medai.invalid/implementation").int)
IMPLEMENTATION_VERSION_NAME = f"MEDAI_{medai.__version__}"[:16]

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
#: Status for a DIMSE operation this acceptor does not provide (PS3.7 C.4.4).
UNRECOGNIZED_OPERATION = 0x0211
PROCESSING_FAILURE = 0x0110

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTED, PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

# A-ABORT reasons when the source is the service provider (PS3.8 9.3.8)
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 1, 2, 6

#: Pieces in which payloads are read: a lying length costs no more memory than was sent.
_READ_PIECE = 4 * 1024 * 1024
#: Longest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing 128
#: presentation contexts is about 15 kB).
MAX_CONTROL_PDU = 1024 * 1024
_SOCKET_BUFFER = 256 * 1024


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason."""

    result: int
    source: int
    reason: int
    why: str

    @classmethod
    def calling_ae_not_recognized(cls, why: str = "calling AE title not recognised") -> "Rejection":
        return cls(1, 1, 3, why)

    @classmethod
    def local_limit_exceeded(cls) -> "Rejection":
        return cls(2, 3, 2, "too many associations")


@dataclass(frozen=True)
class PresentationContext:
    """A negotiated presentation context; ``transfer_syntax`` is None unless accepted."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str | None
    result: int


@dataclass
class Association:
    """One association as the handlers see it (what the requestor said of itself)."""

    number: int
    calling_ae: str
    called_ae: str
    address: str
    port: int
    #: The requestor's maximum PDU length (0: unlimited), which bounds what we send.
    peer_max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    contexts: dict[int, PresentationContext] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreRequest:
    """A complete C-STORE-RQ: command elements and the dataset as received."""

    association: Association
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    #: The negotiated transfer syntax of the dataset's presentation context.
    transfer_syntax: str
    priority: int
    move_originator_ae: str
    dataset: bytes
    #: Why the dataset was not kept (over ``max_dataset_bytes``; ``dataset`` is
    #: then empty), or "". The handler answers such a request with a failure.
    dropped: str = ""


class Handler(Protocol):
    """What the server asks of the application. Every call may raise; the
    server logs it and carries on, failing closed: a failing ``on_connect``
    closes the connection, a failing ``on_request`` refuses the association,
    a failing ``on_store`` is answered 0x0110."""

    def on_connect(self, address: str) -> bool:
        """Before any byte is read: False closes the connection."""

    def on_request(self, assoc: Association) -> Rejection | None:
        """After negotiation, before answering the A-ASSOCIATE-RQ."""

    def on_accepted(self, assoc: Association) -> None: ...

    def on_rejected(self, assoc: Association, rejection: Rejection) -> None: ...

    def on_closed(self, assoc: Association) -> None:
        """Once per accepted association, however it ended."""

    def on_store(self, request: StoreRequest) -> tuple[int, str]:
        """Store the instance; return a DICOM status and an error comment ('' for none)."""


class ProtocolError(Exception):
    """The peer broke PS3.8; the association ends with an A-ABORT carrying ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection (or the server is stopping)."""


# -- encoding helpers ---------------------------------------------------------------------------

def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_value(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode_command(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, Implicit VR Little Endian) from
    (element number, encoded value) pairs in ascending order; the group length
    is computed here."""
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a received command set."""
    out: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "command set element outside group 0000 or too long")
        out[element] = data[offset:offset + length]
        offset += length
    return out


def _us(elements: dict[int, bytes], element: int, default: int | None = None) -> int:
    raw = elements.get(element)
    if raw is None or len(raw) != 2:
        if default is not None:
            return default
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"command element (0000,{element:04X}) missing or not US")
    return int.from_bytes(raw, "little")


def _string(raw: bytes | None) -> str:
    return (raw or b"").decode("ascii", "replace").strip(" \x00")


def _parse_items(data: bytes, start: int, what: str) -> list[tuple[int, bytes]]:
    """(type, value) of the variable items (or sub-items) in ``data[start:]``."""
    items, offset, end = [], start, len(data)
    while offset < end:
        if offset + 4 > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"{what} ends inside an item header")
        item_type = data[offset]
        (length,) = struct.unpack_from(">H", data, offset + 2)
        offset += 4
        if offset + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"{what} item 0x{item_type:02X} longer than its PDU")
        items.append((item_type, data[offset:offset + length]))
        offset += length
    return items


@dataclass(frozen=True)
class AssociateRequest:
    """The parts of an A-ASSOCIATE-RQ an acceptor answers to."""

    protocol_version: int
    called_field: bytes
    calling_field: bytes
    application_context: str
    #: (context id, abstract syntax, proposed transfer syntaxes) in the order proposed
    contexts: tuple[tuple[int, str, tuple[str, ...]], ...]
    max_pdu: int
    implementation_class_uid: str
    implementation_version_name: str


def parse_associate_rq(body: bytes) -> AssociateRequest:
    if len(body) < 68:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    app_context, max_pdu, impl_uid, impl_version = "", 0, "", ""
    contexts: list[tuple[int, str, tuple[str, ...]]] = []
    for item_type, value in _parse_items(body, 68, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            app_context = _string(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "presentation context item too short")
            abstract, syntaxes = "", []
            for sub_type, sub in _parse_items(value, 4, "presentation context"):
                if sub_type == 0x30:
                    abstract = _string(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_string(sub))
            contexts.append((value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub in _parse_items(value, 0, "user information"):
                if sub_type == 0x51 and len(sub) == 4:
                    (max_pdu,) = struct.unpack(">I", sub)
                elif sub_type == 0x52:
                    impl_uid = _string(sub)
                elif sub_type == 0x55:
                    impl_version = _string(sub)
    return AssociateRequest(version, body[4:20], body[20:36], app_context, tuple(contexts), max_pdu, impl_uid,
                            impl_version)


def negotiate(request: AssociateRequest,
              supported: Mapping[str, Sequence[str]]) -> list[PresentationContext]:
    """One result per proposed context: accepted with the first transfer syntax
    of *our* preference that the requestor proposed, else the reason."""
    results = []
    for context_id, abstract, proposed in request.contexts:
        ours = supported.get(abstract)
        if ours is None:
            results.append(PresentationContext(context_id, abstract, None, PC_ABSTRACT_SYNTAX_NOT_SUPPORTED))
            continue
        chosen = next((ts for ts in ours if ts in proposed), None)
        results.append(PresentationContext(context_id, abstract, chosen,
                                           PC_ACCEPTED if chosen else PC_TRANSFER_SYNTAXES_NOT_SUPPORTED))
    return results


def encode_associate_ac(request: AssociateRequest, contexts: Sequence[PresentationContext], max_pdu: int) -> bytes:
    proposed = {cid: syntaxes for cid, _, syntaxes in request.contexts}
    items = [_item(0x10, _uid_value(APPLICATION_CONTEXT))]
    for pc in contexts:
        # A rejected context still carries one transfer syntax sub-item, which is not
        # significant (PS3.8 9.3.3.2); we echo the first proposed.
        syntax = pc.transfer_syntax or next(iter(proposed.get(pc.context_id) or ()), "1.2.840.10008.1.2")
        items.append(_item(0x21, bytes((pc.context_id, 0, pc.result, 0)) + _item(0x40, _uid_value(syntax))))
    user = (_item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid_value(IMPLEMENTATION_CLASS_UID))
            + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")))
    items.append(_item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + request.called_field + request.calling_field + b"\x00" * 32
    return _pdu(A_ASSOCIATE_AC, fixed + b"".join(items))


def encode_associate_rj(rejection: Rejection) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, rejection.result, rejection.source, rejection.reason)))


def encode_abort(source: int, reason: int) -> bytes:
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def encode_pdata(context_id: int, data: bytes, *, command: bool, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``data`` as PDVs no longer than the peer accepts."""
    piece = len(data) if peer_max_pdu <= 0 else max(1, peer_max_pdu - 6)
    out = []
    for start in range(0, max(len(data), 1), piece):
        chunk = data[start:start + piece]
        last = start + piece >= len(data)
        header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
        out.append(_pdu(P_DATA_TF, pdv))
    return b"".join(out)


def response(command_field: int, message_id: int, sop_class: str, status: int, *, comment: str = "",
             sop_instance: str = "") -> bytes:
    """A DIMSE response command set (no dataset): the affected SOP class and
    instance when known, an error comment with a failure status."""
    elements = [(0x0002, _uid_value(sop_class))] if sop_class else []
    elements += [(0x0100, struct.pack("<H", command_field)), (0x0120, struct.pack("<H", message_id)),
                 (0x0800, struct.pack("<H", NO_DATASET)), (0x0900, struct.pack("<H", status))]
    if comment and status != 0:
        elements.append((0x0902, _text_value(comment[:64])))
    if sop_instance:
        elements.append((0x1000, _uid_value(sop_instance)))
    return encode_command(elements)


# -- the server ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AcceptorConfig:
    """What the acceptor negotiates and how long it waits. The called AE
    title is not checked (peers address medai by host and port; the calling
    AE title is the handler's to judge)."""

    #: abstract syntax -> transfer syntaxes we accept, in our order of preference
    supported: Mapping[str, Sequence[str]]
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: our maximum PDU length (0: unlimited)
    max_pdu: int = 0
    max_associations: int = 16
    #: Largest dataset kept for the handler; a larger one is read to its end,
    #: dropped, and answered 0xA700 (0: no limit).
    max_dataset_bytes: int = 0


class AcceptorServer:
    """Listens on one address; one thread per association."""

    def __init__(self, address: tuple[str, int], cfg: AcceptorConfig, handler: Handler) -> None:
        self.cfg = cfg
        self.handler = handler
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind(address)
            self._sock.listen(64)
        except BaseException:
            self._sock.close()
            raise
        self.server_address = self._sock.getsockname()
        self._lock = threading.Lock()
        #: association number -> its socket and thread, while the connection is open
        self._open: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._accepted = 0
        self._max_connections = max(64, 4 * cfg.max_associations)
        self._numbers = iter(range(1, 1 << 62))
        self._stopping = threading.Event()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="dicom-acceptor", daemon=True)

    def start(self) -> None:
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.2)  # wakes to notice shutdown; an arriving connection is taken at once
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                log.exception("accept failed")
                continue
            with self._lock:
                crowded = len(self._open) >= self._max_connections
            if crowded:
                # Connections still negotiating count too: a flood of idle TCP
                # connections must not become a flood of threads.
                log.warning("connection refused: %d connections open", self._max_connections)
                conn.close()
                continue
            number = next(self._numbers)
            thread = threading.Thread(target=self._serve, args=(number, conn, peer), name=f"dicom-assoc-{number}",
                                      daemon=True)
            with self._lock:
                self._open[number] = (conn, thread)
            thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting; each open association finishes the message it is
        handling (a store under way completes and is answered), then is aborted."""
        self._stopping.set()
        if self._accept_thread.is_alive():
            self._accept_thread.join(timeout)
        self._sock.close()
        with self._lock:
            open_now = list(self._open.values())
        for conn, _thread in open_now:
            try:
                conn.shutdown(socket.SHUT_RD)  # a blocked read returns; answers can still be sent
            except OSError:
                pass
        for _conn, thread in open_now:
            thread.join(timeout)

    # -- one association ------------------------------------------------------------------------
    def _serve(self, number: int, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            _Connection(self, number, conn, peer).run()
        except Exception:  # noqa: BLE001 - one association never takes the server down
            log.exception("association %d ended with an internal error", number)
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._lock:
                self._open.pop(number, None)

    def _claim_slot(self) -> bool:
        with self._lock:
            if self._accepted >= self.cfg.max_associations > 0:
                return False
            self._accepted += 1
            return True

    def _release_slot(self) -> None:
        with self._lock:
            self._accepted -= 1


def _call(what: str, fn: Callable[..., object], *args: object) -> object:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a handler's failure is logged, the association goes on
        log.exception("%s handler failed", what)
        return None


class _Connection:
    def __init__(self, server: AcceptorServer, number: int, conn: socket.socket, peer: tuple[str, int]) -> None:
        self.server, self.cfg, self.handler = server, server.cfg, server.handler
        self.number, self.conn, self.peer = number, conn, peer
        self.assoc: Association | None = None
        self.rfile = conn.makefile("rb", buffering=_SOCKET_BUFFER)

    # -- I/O --
    def _read(self, n: int) -> bytes:
        if n <= _READ_PIECE:
            data = self.rfile.read(n)
            if len(data) != n:
                raise _Closed()
            return data
        parts = []
        while n:
            part = self.rfile.read(min(n, _READ_PIECE))
            if not part:
                raise _Closed()
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    def _read_pdu(self) -> tuple[int, bytes]:
        """(type, body) of the next PDU. A timeout propagates (the caller
        aborts); a reset or closed connection is :class:`_Closed`."""
        try:
            header = self._read(6)
            pdu_type, _, length = struct.unpack(">BBI", header)
            if pdu_type not in range(A_ASSOCIATE_RQ, A_ABORT + 1):
                raise ProtocolError(ABORT_UNRECOGNIZED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
            if pdu_type == P_DATA_TF and self.cfg.max_pdu and length > self.cfg.max_pdu:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF longer than our maximum PDU length")
            if pdu_type != P_DATA_TF and length > MAX_CONTROL_PDU:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU type 0x{pdu_type:02X} of {length} bytes")
            return pdu_type, self._read(length)
        except TimeoutError:
            raise
        except OSError as exc:
            raise _Closed() from exc

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def _abort(self, reason: int, source: int = 2) -> None:
        try:
            self._send(encode_abort(source, reason))
        except OSError:
            pass

    # -- protocol --
    def run(self) -> None:
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not _call("connect", self.handler.on_connect, self.peer[0]):
            return
        self.conn.settimeout(self.cfg.acse_timeout or None)
        slot = False
        try:
            pdu_type, body = self._read_pdu()
            if pdu_type != A_ASSOCIATE_RQ:
                raise ProtocolError(ABORT_UNEXPECTED_PDU, "first PDU is not an A-ASSOCIATE-RQ")
            slot = self._associate(body)
            if slot:
                self._message_loop()
        except _Closed:
            if self.server._stopping.is_set():
                self._abort(0, source=0)
        except TimeoutError:
            log.warning("association %d timed out", self.number)
            self._abort(0)
        except ProtocolError as exc:
            log.warning("association %d aborted: %s", self.number, exc)
            self._abort(exc.reason)
        finally:
            if self.assoc is not None and slot:
                _call("closed", self.handler.on_closed, self.assoc)
            if slot:
                self.server._release_slot()

    def _associate(self, body: bytes) -> bool:
        """Answer the A-ASSOCIATE-RQ; True once accepted (a slot is then held)."""
        request = parse_associate_rq(body)
        contexts = negotiate(request, self.cfg.supported)
        self.assoc = assoc = Association(
            number=self.number, calling_ae=_string(request.calling_field), called_ae=_string(request.called_field),
            address=str(self.peer[0]), port=int(self.peer[1]), peer_max_pdu=request.max_pdu,
            implementation_class_uid=request.implementation_class_uid,
            implementation_version_name=request.implementation_version_name,
            contexts={pc.context_id: pc for pc in contexts if pc.result == PC_ACCEPTED})
        rejection: Rejection | None
        if not request.protocol_version & 1:
            rejection = Rejection(1, 2, 2, "protocol version not supported")
        elif request.application_context != APPLICATION_CONTEXT:
            rejection = Rejection(1, 1, 2, "application context name not supported")
        else:
            try:
                rejection = self.handler.on_request(assoc)
            except Exception:  # noqa: BLE001 - an association the handler could not judge is refused
                log.exception("request handler failed")
                rejection = Rejection(2, 1, 1, "internal error while judging the association")
        if rejection is None and not self.server._claim_slot():
            rejection = Rejection.local_limit_exceeded()
        if rejection is not None:
            try:
                self._send(encode_associate_rj(rejection))
            except OSError:
                pass
            _call("rejected", self.handler.on_rejected, assoc, rejection)
            return False
        self._send(encode_associate_ac(request, contexts, self.cfg.max_pdu))
        _call("accepted", self.handler.on_accepted, assoc)
        return True

    def _message_loop(self) -> None:
        assert self.assoc is not None
        contexts = self.assoc.contexts
        command: list[bytes] = []
        data: list[bytes] = []
        data_bytes, limit = 0, self.cfg.max_dataset_bytes
        command_set: dict[int, bytes] | None = None
        message_context = -1
        idle_timeout = self.cfg.network_timeout or None
        busy_timeout = self.cfg.dimse_timeout or None
        self.conn.settimeout(idle_timeout)
        while not self.server._stopping.is_set():
            pdu_type, body = self._read_pdu()
            if pdu_type == A_RELEASE_RQ:
                self._send(_pdu(A_RELEASE_RP, b"\x00\x00\x00\x00"))
                return
            if pdu_type == A_ABORT:
                log.info("association %d aborted by the peer", self.number)
                return
            if pdu_type != P_DATA_TF:
                raise ProtocolError(ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu_type:02X} in an association")
            view, offset, end = memoryview(body), 0, len(body)
            while offset < end:
                if offset + 6 > end:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF ends inside a PDV header")
                length, context_id, header = struct.unpack_from(">IBB", body, offset)
                if length < 2 or offset + 4 + length > end:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "PDV length does not fit its PDU")
                fragment = view[offset + 6:offset + 4 + length]
                offset += 4 + length
                if context_id not in contexts:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDV on presentation context {context_id}, "
                                        "which was not accepted")
                if message_context not in (-1, context_id):
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "one message's PDVs on two presentation contexts")
                message_context = context_id
                if header & 0x01:  # command fragment
                    if command_set is not None:
                        raise ProtocolError(ABORT_INVALID_PARAMETER, "command fragment inside a dataset")
                    command.append(bytes(fragment))
                    if sum(map(len, command)) > MAX_CONTROL_PDU:
                        raise ProtocolError(ABORT_INVALID_PARAMETER, "command set longer than 1 MiB")
                    if header & 0x02:
                        command_set = parse_command(b"".join(command))
                        command.clear()
                        if _us(command_set, 0x0800, NO_DATASET) == NO_DATASET:
                            self._dispatch(contexts[context_id], command_set, b"")
                            command_set, message_context = None, -1
                else:
                    if command_set is None:
                        raise ProtocolError(ABORT_INVALID_PARAMETER, "dataset fragment before its command")
                    data_bytes += len(fragment)
                    if not limit or data_bytes <= limit:
                        data.append(fragment)  # a view of this PDU's bytes: copied once, at the join
                    elif data:
                        data.clear()  # too large: read on to the end of the message, keep nothing
                    if header & 0x02:
                        oversized = bool(limit) and data_bytes > limit
                        dataset = b"".join(data)
                        data.clear()
                        self._dispatch(contexts[context_id], command_set, dataset,
                                       dropped=f"dataset over {limit} bytes" if oversized else "")
                        command_set, message_context, data_bytes = None, -1, 0
            self.conn.settimeout(busy_timeout if (command or command_set is not None) else idle_timeout)
        # Stopping: the message under way (if any) was answered above; end the association.
        self._abort(0, source=0)

    def _dispatch(self, context: PresentationContext, elements: dict[int, bytes], dataset: bytes,
                  dropped: str = "") -> None:
        """Answer one complete message (``dropped``: see :class:`StoreRequest`)."""
        assert self.assoc is not None
        command_field = _us(elements, 0x0100)
        message_id = _us(elements, 0x0110, 0)
        if command_field == C_STORE_RQ:
            request = StoreRequest(
                association=self.assoc, message_id=message_id,
                affected_sop_class_uid=_string(elements.get(0x0002)) or context.abstract_syntax,
                affected_sop_instance_uid=_string(elements.get(0x1000)),
                transfer_syntax=context.transfer_syntax or "", priority=_us(elements, 0x0700, 0),
                move_originator_ae=_string(elements.get(0x1030)), dataset=dataset, dropped=dropped)
            result = _call("store", self.handler.on_store, request)
            status, comment = result if isinstance(result, tuple) else (PROCESSING_FAILURE, "internal error")
            answer = response(C_STORE_RSP, message_id, request.affected_sop_class_uid, status, comment=comment,
                              sop_instance=request.affected_sop_instance_uid)
        elif command_field == C_ECHO_RQ:
            answer = response(C_ECHO_RSP, message_id, _string(elements.get(0x0002)) or VERIFICATION_SOP_CLASS, 0)
        elif command_field == C_CANCEL_RQ or command_field & 0x8000:
            return  # nothing of ours to cancel; responses are not ours to receive
        else:
            answer = response(command_field | 0x8000, message_id, _string(elements.get(0x0002)),
                              UNRECOGNIZED_OPERATION)
        self._send(encode_pdata(context.context_id, answer, command=True, peer_max_pdu=self.assoc.peer_max_pdu))
