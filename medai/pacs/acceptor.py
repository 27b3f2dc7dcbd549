"""The DICOM upper layer, acceptor side, for Storage and Verification (PS3.8, PS3.7):
the server. The bytes-to-values codec it drives is :mod:`medai.pacs.pdu`.

``medai pacs listen`` answers associations with this module, not with
pynetdicom's server. Measured on this project's 2-core machine, a bare
pynetdicom SCP spent about 2.4 ms of CPU per received instance (its state
machine, PDU objects, per-primitive queues and threads) against dcmtk
storescp's 0.3 ms, and that, not the disk, capped ingest at a fifth of
storescp's rate. The protocol a storage SCP needs is small: negotiate the
association, reassemble P-DATA fragments into a command set and a dataset,
answer each C-STORE and C-ECHO, release or abort. This module does exactly
that on a blocking socket per association (one thread each), optionally
inside DICOM TLS (PS3.15 B.1, BCP 195; the context comes from
:mod:`medai.pacs.tls`).

Datasets are never collected in memory: as each piece arrives it goes to the
:class:`DatasetSink` the handler opened for that C-STORE (the listener's
writes it to the instance's temporary file), so what an association holds is
one command set and one piece of at most :data:`medai.pacs.pdu.DATA_PIECE`
bytes, whatever the instance size, PDU length or number of associations.

Strict when writing, tolerant when reading: unknown items and sub-items in an
A-ASSOCIATE-RQ are skipped, every length is checked against what was received,
and anything that breaks the protocol ends the association with an A-ABORT
naming the reason (never an exception out of the server). Patient data never
reaches a log line here: this layer logs AE titles, addresses and protocol
events only.

What is not implemented (an acceptor for storage does not need it):
asynchronous operations windows (requests are answered in order, which a
peer asking for a window must accept), SCP/SCU role selection replies and
extended negotiation replies (the requested defaults apply). pynetdicom stays
medai's SCU (``medai.pacs.sender``).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Protocol, Sequence

from medai.pacs import pdu
from medai.pacs.tls import certificate_subject
from medai.pacs.pdu import (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,  # noqa: F401 - re-exported
                            VERIFICATION_SOP_CLASS, PresentationContext, ProtocolError, UserIdentity)

log = logging.getLogger("medai.pacs")

_SOCKET_BUFFER = 256 * 1024
#: longest wait for a rejected requestor to close its connection (ARTIM, PS3.8 9.1.5)
_ARTIM_MAX = 10.0


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
    def called_ae_not_recognized(cls, why: str = "called AE title not recognised") -> "Rejection":
        return cls(1, 1, 7, why)

    @classmethod
    def user_identity_refused(cls, why: str = "user identity not accepted") -> "Rejection":
        """PS3.7 D.3.3.7: an authorisation failure is a permanent rejection by
        the UL service provider (ACSE related function), no reason given."""
        return cls(1, 2, 1, why)

    @classmethod
    def local_limit_exceeded(cls) -> "Rejection":
        return cls(2, 3, 2, "too many associations")


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
    #: Subject of the peer's TLS certificate ("" without TLS or without a client certificate).
    peer_certificate: str = ""
    user_identity: UserIdentity | None = None


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ's command elements; ``dataset_size`` and ``dropped`` are
    known once its dataset is complete."""

    association: Association
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    #: The negotiated transfer syntax of the dataset's presentation context.
    transfer_syntax: str
    priority: int
    move_originator_ae: str
    dataset_size: int = 0
    #: Why the dataset was not kept (over ``max_dataset_bytes``, or the sink
    #: failed), or "". The handler answers such a request with a failure.
    dropped: str = ""


class DatasetSink(Protocol):
    """Where one C-STORE's dataset goes, piece by piece, as it arrives."""

    def write(self, data: bytes) -> None: ...

    def discard(self) -> None:
        """Drop whatever was written; called once the message is answered or
        abandoned, so it must be harmless after the handler kept the data."""


class BytesDataset:
    """A :class:`DatasetSink` in memory, for handlers that want the bytes
    (tests, benchmarks); bounded only by ``max_dataset_bytes``."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def discard(self) -> None:
        self._parts.clear()

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class _Discard:
    def write(self, data: bytes) -> None:
        pass

    def discard(self) -> None:
        pass


class Handler(Protocol):
    """What the server asks of the application. Every call may raise; the
    server logs it and carries on, failing closed: a failing ``on_connect``
    closes the connection, a failing ``on_request`` refuses the association,
    a failing ``open_dataset`` or ``on_store`` is answered 0x0110."""

    def on_connect(self, address: str) -> bool:
        """Before any byte is read: False closes the connection."""

    def on_tls_failure(self, address: str, why: str) -> None:
        """The TLS handshake failed (no or an untrusted client certificate,
        no common protocol or cipher); the connection is closed."""

    def on_request(self, assoc: Association) -> Rejection | None:
        """After negotiation, before answering the A-ASSOCIATE-RQ."""

    def on_accepted(self, assoc: Association) -> None: ...

    def on_rejected(self, assoc: Association, rejection: Rejection) -> None: ...

    def on_closed(self, assoc: Association) -> None:
        """Once per accepted association, however it ended."""

    def open_dataset(self, request: StoreRequest) -> DatasetSink:
        """A C-STORE-RQ announced a dataset: where its pieces go."""

    def on_store(self, request: StoreRequest, dataset: DatasetSink) -> tuple[int, str]:
        """Keep the instance; return a DICOM status and an error comment ('' for none)."""


class _Closed(Exception):
    """The peer closed the connection (or the server is stopping)."""


# -- the server ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AcceptorConfig:
    """What the acceptor negotiates and how long it waits. The handler judges
    who may associate (calling and called AE titles, user identity)."""

    #: abstract syntax -> transfer syntaxes we accept, in our order of preference
    supported: Mapping[str, Sequence[str]]
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: our maximum PDU length (0: unlimited), advertised and enforced on every P-DATA-TF
    max_pdu: int = 0
    max_associations: int = 16
    #: Largest dataset the handler is given; a larger one is read to its end,
    #: discarded as it arrives, and answered 0xA700 (0: no limit).
    max_dataset_bytes: int = 0
    #: DICOM TLS: every connection is a TLS server connection with this context.
    ssl_context: ssl.SSLContext | None = None
    #: Answer a User Identity sub-item that asked for a positive response (the
    #: handler verifies identities); otherwise it is ignored (PS3.7 D.3.3.7).
    answer_user_identity: bool = False


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
                # The plain socket's shutdown, also under TLS (SSLSocket.shutdown would
                # drop the TLS state): a blocked read returns, answers can still be sent.
                socket.socket.shutdown(conn, socket.SHUT_RD)
            except OSError:
                pass
        for _conn, thread in open_now:
            thread.join(timeout)

    # -- one association ------------------------------------------------------------------------
    def _serve(self, number: int, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not _call("connect", self.handler.on_connect, peer[0]):
                return
            certificate = ""
            if self.cfg.ssl_context is not None:
                conn.settimeout(self.cfg.acse_timeout or None)
                try:
                    conn = self.cfg.ssl_context.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    why = getattr(exc, "reason", None) or type(exc).__name__
                    log.warning("TLS handshake with %s failed: %s", peer[0], why)
                    _call("tls failure", self.handler.on_tls_failure, peer[0], str(why))
                    return
                with self._lock:
                    if number in self._open:
                        self._open[number] = (conn, self._open[number][1])
                certificate = certificate_subject(conn.getpeercert())  # type: ignore[attr-defined]
            _Connection(self, number, conn, peer, certificate).run()
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
    def __init__(self, server: AcceptorServer, number: int, conn: socket.socket, peer: tuple[str, int],
                 certificate: str) -> None:
        self.server, self.cfg, self.handler = server, server.cfg, server.handler
        self.number, self.conn, self.peer, self.certificate = number, conn, peer, certificate
        self.assoc: Association | None = None
        self.rfile = conn.makefile("rb", buffering=_SOCKET_BUFFER)
        self.reader = pdu.MessageReader(self._read, max_pdu=self.cfg.max_pdu)

    # -- I/O --
    def _read(self, n: int) -> bytes:
        """Exactly ``n`` bytes. A timeout propagates (the caller aborts); a
        reset or closed connection is :class:`_Closed`."""
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            raise
        except OSError as exc:
            raise _Closed() from exc
        if len(data) != n:
            raise _Closed()
        return data

    def _send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def _abort(self, reason: int, source: int = 2) -> None:
        try:
            self._send(pdu.encode_abort(source, reason))
        except OSError:
            pass

    def _await_peer_close(self) -> None:
        """PS3.8 9.2 state Sta13: after an A-ASSOCIATE-RJ the requestor closes the
        transport connection; the acceptor waits for that, with the ARTIM timer, and reads
        and drops whatever still arrives. Closing at once instead can race the peer's read of
        the rejection (seen as a dropped connection, not a rejection)."""
        artim = min(self.cfg.acse_timeout or _ARTIM_MAX, _ARTIM_MAX)
        deadline = time.monotonic() + artim
        try:
            while (left := deadline - time.monotonic()) > 0 and not self.server._stopping.is_set():
                self.conn.settimeout(min(left, 0.5))
                try:
                    if not self.conn.recv(65536):
                        return
                except TimeoutError:
                    continue
        except OSError:
            return

    # -- protocol --
    def run(self) -> None:
        self.conn.settimeout(self.cfg.acse_timeout or None)
        slot = False
        sink: list[DatasetSink] = []
        try:
            event = self.reader.next_event()
            if not isinstance(event, pdu.Control) or event.pdu_type != pdu.A_ASSOCIATE_RQ:
                raise ProtocolError(pdu.ABORT_UNEXPECTED_PDU, "first PDU is not an A-ASSOCIATE-RQ")
            slot = self._associate(event.body)
            if slot:
                self._message_loop(sink)
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
            for open_sink in sink:  # a dataset cut off by the end of the association
                _call("discard", open_sink.discard)
            if self.assoc is not None and slot:
                _call("closed", self.handler.on_closed, self.assoc)
            if slot:
                self.server._release_slot()

    def _associate(self, body: bytes) -> bool:
        """Answer the A-ASSOCIATE-RQ; True once accepted (a slot is then held)."""
        request = pdu.parse_associate_rq(body)
        contexts = pdu.negotiate(request, self.cfg.supported)
        self.assoc = assoc = Association(
            number=self.number, calling_ae=pdu.string_value(request.calling_field),
            called_ae=pdu.string_value(request.called_field), address=str(self.peer[0]), port=int(self.peer[1]),
            peer_max_pdu=request.max_pdu, implementation_class_uid=request.implementation_class_uid,
            implementation_version_name=request.implementation_version_name,
            contexts={pc.context_id: pc for pc in contexts if pc.result == pdu.PC_ACCEPTED},
            peer_certificate=self.certificate, user_identity=request.user_identity)
        rejection: Rejection | None
        if not request.protocol_version & 1:
            rejection = Rejection(1, 2, 2, "protocol version not supported")
        elif request.application_context != pdu.APPLICATION_CONTEXT:
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
                self._send(pdu.encode_associate_rj(rejection.result, rejection.source, rejection.reason))
                sent = True
            except OSError:
                sent = False
            _call("rejected", self.handler.on_rejected, assoc, rejection)
            if sent:
                self._await_peer_close()
            return False
        identity = request.user_identity
        # PS3.7 D.3.3.7.2: for username (and passcode) identities the server response is empty.
        answer = (b"" if self.cfg.answer_user_identity and identity is not None
                  and identity.positive_response_requested else None)
        self._send(pdu.encode_associate_ac(request, contexts, self.cfg.max_pdu, user_identity_response=answer))
        self.reader.contexts = frozenset(assoc.contexts)
        _call("accepted", self.handler.on_accepted, assoc)
        return True

    def _message_loop(self, open_sinks: list[DatasetSink]) -> None:
        assert self.assoc is not None
        contexts = self.assoc.contexts
        limit = self.cfg.max_dataset_bytes
        idle_timeout = self.cfg.network_timeout or None
        busy_timeout = self.cfg.dimse_timeout or None
        self.conn.settimeout(idle_timeout)
        request: StoreRequest | None = None
        command: pdu.Command | None = None
        sink: DatasetSink = _Discard()
        received, dropped = 0, ""
        while not self.server._stopping.is_set():
            event = self.reader.next_event()
            if isinstance(event, pdu.DataPiece):
                received += len(event.data)
                if dropped:
                    continue
                if limit and received > limit:
                    dropped = f"dataset over {limit} bytes"
                    _call("discard", sink.discard)  # read on to the end of the message, keep nothing
                    continue
                try:
                    sink.write(event.data)
                except Exception as exc:  # noqa: BLE001 - e.g. a full disk: answered with a failure
                    log.warning("association %d: received dataset could not be kept (%s)", self.number,
                                type(exc).__name__)
                    dropped = "dataset could not be written"
                    _call("discard", sink.discard)
                continue
            if isinstance(event, pdu.DatasetEnd):
                assert command is not None
                self._dispatch(command, request and replace(request, dataset_size=event.size, dropped=dropped), sink)
                _call("discard", sink.discard)
                open_sinks.clear()
                command, request, sink, received, dropped = None, None, _Discard(), 0, ""
                self.conn.settimeout(idle_timeout)
                continue
            if isinstance(event, pdu.Command):
                if not event.has_dataset:
                    self._dispatch(event, None, _Discard())
                    self.conn.settimeout(idle_timeout)
                    continue
                command = event
                request = self._store_request(event, contexts[event.context_id])
                if request is not None:
                    opened = _call("open dataset", self.handler.open_dataset, request)
                    if opened is None:
                        dropped = "dataset could not be opened"
                    else:
                        sink = opened  # type: ignore[assignment]
                        open_sinks.append(sink)
                self.conn.settimeout(busy_timeout)
                continue
            if event.pdu_type == pdu.A_RELEASE_RQ:
                if self.reader.mid_message:
                    raise ProtocolError(pdu.ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ in the middle of a message")
                self._send(pdu.pdu(pdu.A_RELEASE_RP, b"\x00\x00\x00\x00"))
                return
            if event.pdu_type == pdu.A_ABORT:
                log.info("association %d aborted by the peer", self.number)
                return
            raise ProtocolError(pdu.ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{event.pdu_type:02X} in an "
                                "association")
        # Stopping: the message under way (if any) was answered above; end the association.
        self._abort(0, source=0)

    def _store_request(self, command: pdu.Command, context: PresentationContext) -> StoreRequest | None:
        """The C-STORE-RQ a command with a dataset announces (None for any other operation)."""
        assert self.assoc is not None
        elements = command.elements
        if pdu.command_us(elements, 0x0100) != pdu.C_STORE_RQ:
            return None
        return StoreRequest(
            association=self.assoc, message_id=pdu.command_us(elements, 0x0110, 0),
            affected_sop_class_uid=pdu.string_value(elements.get(0x0002)) or context.abstract_syntax,
            affected_sop_instance_uid=pdu.string_value(elements.get(0x1000)),
            transfer_syntax=context.transfer_syntax or "", priority=pdu.command_us(elements, 0x0700, 0),
            move_originator_ae=pdu.string_value(elements.get(0x1030)))

    def _dispatch(self, command: pdu.Command, request: StoreRequest | None, dataset: DatasetSink) -> None:
        """Answer one complete message."""
        assert self.assoc is not None
        elements = command.elements
        context = self.assoc.contexts[command.context_id]
        command_field = pdu.command_us(elements, 0x0100)
        message_id = pdu.command_us(elements, 0x0110, 0)
        if request is not None:
            result = _call("store", self.handler.on_store, request, dataset)
            status, comment = result if isinstance(result, tuple) else (pdu.PROCESSING_FAILURE, "internal error")
            answer = pdu.response(pdu.C_STORE_RSP, message_id, request.affected_sop_class_uid, status,
                                  comment=comment, sop_instance=request.affected_sop_instance_uid)
        elif command_field == pdu.C_STORE_RQ:
            answer = pdu.response(pdu.C_STORE_RSP, message_id, pdu.string_value(elements.get(0x0002)), 0xC000,
                                  comment="C-STORE-RQ without a dataset",
                                  sop_instance=pdu.string_value(elements.get(0x1000)))
        elif command_field == pdu.C_ECHO_RQ:
            answer = pdu.response(pdu.C_ECHO_RSP, message_id,
                                  pdu.string_value(elements.get(0x0002)) or VERIFICATION_SOP_CLASS, 0)
        elif command_field == pdu.C_CANCEL_RQ or command_field & 0x8000:
            return  # nothing of ours to cancel; responses are not ours to receive
        else:
            answer = pdu.response(command_field | 0x8000, message_id, pdu.string_value(elements.get(0x0002)),
                                  pdu.UNRECOGNIZED_OPERATION)
        self._send(pdu.encode_pdata(context.context_id, answer, command=True, peer_max_pdu=self.assoc.peer_max_pdu))
