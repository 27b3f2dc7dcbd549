"""The DICOM upper layer codec (PS3.8 9.3) and DIMSE command sets (PS3.7 E):
bytes in, values out, and back. No sockets, no threads, no files.

:mod:`medai.pacs.acceptor` is the server that drives this codec over a
connection; the fuzz harness (``bench/fuzz_pacs.py``) drives it over bytes in
memory. Everything a peer controls is parsed here, so everything here is
strict about lengths: every length is checked against what the enclosing
structure holds, nothing is allocated from a length field before the bytes
are there, and every violation is a :class:`ProtocolError` carrying the
A-ABORT reason to answer with.

:class:`MessageReader` reads PDUs from any ``read(n)`` callable and turns
P-DATA-TF into DIMSE messages: a command set (at most
:data:`MAX_CONTROL_PDU`, kept in memory) and a dataset handed on in pieces
of at most :data:`DATA_PIECE` bytes as they arrive, so the memory one
association needs does not depend on the size of an instance or of a PDU.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import medai

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
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

# User identity types (PS3.7 D.3.3.7.1)
USER_IDENTITY_USERNAME, USER_IDENTITY_USERNAME_PASSCODE = 1, 2

#: Longest PDU other than P-DATA-TF we read, and longest command set (an
#: A-ASSOCIATE-RQ proposing 128 presentation contexts is about 15 kB).
MAX_CONTROL_PDU = 1024 * 1024
#: Largest piece of a dataset handed on at once, whatever the PDU or PDV length.
DATA_PIECE = 1024 * 1024


class ProtocolError(Exception):
    """The peer broke PS3.8; the association ends with an A-ABORT carrying ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StreamEnded(Exception):
    """The byte stream ended (the peer closed the connection) in the middle of a PDU."""


# -- encoding -------------------------------------------------------------------------------------

def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def text_value(text: str) -> bytes:
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


def command_us(elements: Mapping[int, bytes], element: int, default: int | None = None) -> int:
    """An US element of a command set (the default when absent, if one is given)."""
    raw = elements.get(element)
    if raw is None or len(raw) != 2:
        if default is not None:
            return default
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"command element (0000,{element:04X}) missing or not US")
    return int.from_bytes(raw, "little")


def string_value(raw: bytes | None) -> str:
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
class UserIdentity:
    """A User Identity sub-item (PS3.7 D.3.3.7.1): who the requestor says it is."""

    identity_type: int
    positive_response_requested: bool
    primary: bytes
    secondary: bytes


def _parse_user_identity(value: bytes) -> UserIdentity:
    if len(value) < 4:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "user identity sub-item too short")
    identity_type, wants_response = value[0], value[1]
    (primary_len,) = struct.unpack_from(">H", value, 2)
    if 4 + primary_len + 2 > len(value):
        raise ProtocolError(ABORT_INVALID_PARAMETER, "user identity primary field longer than its sub-item")
    primary = value[4:4 + primary_len]
    (secondary_len,) = struct.unpack_from(">H", value, 4 + primary_len)
    start = 6 + primary_len
    if start + secondary_len != len(value):
        raise ProtocolError(ABORT_INVALID_PARAMETER, "user identity secondary field does not fit its sub-item")
    return UserIdentity(identity_type, wants_response == 1, primary, value[start:])


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
    user_identity: UserIdentity | None = None


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """An A-ASSOCIATE-RQ's body (after the PDU header).

    Unknown items and sub-items are skipped (PS3.8 9.3.1: tolerant of what a
    later edition may add). Presentation context IDs must be odd and unique
    (PS3.8 9.3.2.2): two contexts under one ID would make every PDV on it
    ambiguous, so either is an A-ABORT (invalid PDU parameter)."""
    if len(body) < 68:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    app_context, max_pdu, impl_uid, impl_version = "", 0, "", ""
    identity: UserIdentity | None = None
    contexts: list[tuple[int, str, tuple[str, ...]]] = []
    seen: set[int] = set()
    for item_type, value in _parse_items(body, 68, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            app_context = string_value(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "presentation context item too short")
            context_id = value[0]
            if not context_id % 2:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"presentation context ID {context_id} is not odd")
            if context_id in seen:
                raise ProtocolError(ABORT_INVALID_PARAMETER, f"presentation context ID {context_id} proposed twice")
            seen.add(context_id)
            abstract, syntaxes = "", []
            for sub_type, sub in _parse_items(value, 4, "presentation context"):
                if sub_type == 0x30:
                    abstract = string_value(sub)
                elif sub_type == 0x40:
                    syntaxes.append(string_value(sub))
            contexts.append((context_id, abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub in _parse_items(value, 0, "user information"):
                if sub_type == 0x51 and len(sub) == 4:
                    (max_pdu,) = struct.unpack(">I", sub)
                elif sub_type == 0x52:
                    impl_uid = string_value(sub)
                elif sub_type == 0x55:
                    impl_version = string_value(sub)
                elif sub_type == 0x58:
                    if identity is not None:
                        raise ProtocolError(ABORT_INVALID_PARAMETER, "two user identity sub-items")
                    identity = _parse_user_identity(sub)
    return AssociateRequest(version, body[4:20], body[20:36], app_context, tuple(contexts), max_pdu, impl_uid,
                            impl_version, identity)


@dataclass(frozen=True)
class PresentationContext:
    """A negotiated presentation context; ``transfer_syntax`` is None unless accepted."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str | None
    result: int


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


def encode_associate_rq(calling_ae: str, called_ae: str, contexts: Sequence[tuple[int, str, Sequence[str]]], *,
                        max_pdu: int = 0, user_identity: UserIdentity | None = None) -> bytes:
    """An A-ASSOCIATE-RQ (requestor side: benchmarks, tests and fuzz seeds)."""
    def ae(title: str) -> bytes:
        return title.encode("ascii")[:16].ljust(16)

    items = [item(0x10, uid_value(APPLICATION_CONTEXT))]
    for context_id, abstract, syntaxes in contexts:
        sub = item(0x30, uid_value(abstract)) + b"".join(item(0x40, uid_value(ts)) for ts in syntaxes)
        items.append(item(0x20, bytes((context_id, 0, 0, 0)) + sub))
    user = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, uid_value(IMPLEMENTATION_CLASS_UID))
    if user_identity is not None:
        user += item(0x58, bytes((user_identity.identity_type, int(user_identity.positive_response_requested)))
                     + struct.pack(">H", len(user_identity.primary)) + user_identity.primary
                     + struct.pack(">H", len(user_identity.secondary)) + user_identity.secondary)
    items.append(item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + ae(called_ae) + ae(calling_ae) + b"\x00" * 32
    return pdu(A_ASSOCIATE_RQ, fixed + b"".join(items))


def encode_associate_ac(request: AssociateRequest, contexts: Sequence[PresentationContext], max_pdu: int, *,
                        user_identity_response: bytes | None = None) -> bytes:
    """The A-ASSOCIATE-AC; ``user_identity_response`` adds the User Identity
    sub-item of the AC (PS3.7 D.3.3.7.2) when the requestor asked for one and
    the identity was accepted."""
    items = [item(0x10, uid_value(APPLICATION_CONTEXT))]
    for pc in contexts:
        # A rejected context still carries one transfer syntax sub-item, which is not
        # significant (PS3.8 9.3.3.2): Implicit VR Little Endian, never an echo of what
        # the requestor proposed (which may not even be ASCII; found by fuzzing).
        syntax = pc.transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN
        items.append(item(0x21, bytes((pc.context_id, 0, pc.result, 0)) + item(0x40, uid_value(syntax))))
    user = (item(0x51, struct.pack(">I", max_pdu)) + item(0x52, uid_value(IMPLEMENTATION_CLASS_UID))
            + item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")))
    if user_identity_response is not None:
        user += item(0x59, struct.pack(">H", len(user_identity_response)) + user_identity_response)
    items.append(item(0x50, user))
    fixed = struct.pack(">HH", 1, 0) + request.called_field + request.calling_field + b"\x00" * 32
    return pdu(A_ASSOCIATE_AC, fixed + b"".join(items))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    return pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def encode_abort(source: int, reason: int) -> bytes:
    return pdu(A_ABORT, bytes((0, 0, source, reason)))


def encode_pdata(context_id: int, data: bytes, *, command: bool, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``data`` as PDVs no longer than the peer accepts."""
    piece = len(data) if peer_max_pdu <= 0 else max(1, peer_max_pdu - 6)
    out = []
    for start in range(0, max(len(data), 1), piece):
        chunk = data[start:start + piece]
        last = start + piece >= len(data)
        header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, header) + chunk
        out.append(pdu(P_DATA_TF, pdv))
    return b"".join(out)


def response(command_field: int, message_id: int, sop_class: str, status: int, *, comment: str = "",
             sop_instance: str = "") -> bytes:
    """A DIMSE response command set (no dataset): the affected SOP class and
    instance when known, an error comment with a failure status."""
    elements = [(0x0002, uid_value(sop_class))] if sop_class else []
    elements += [(0x0100, struct.pack("<H", command_field)), (0x0120, struct.pack("<H", message_id)),
                 (0x0800, struct.pack("<H", NO_DATASET)), (0x0900, struct.pack("<H", status))]
    if comment and status != 0:
        elements.append((0x0902, text_value(comment[:64])))
    if sop_instance:
        elements.append((0x1000, uid_value(sop_instance)))
    return encode_command(elements)


# -- reading a stream -----------------------------------------------------------------------------

def parse_pdu_header(header: bytes, max_pdu: int) -> tuple[int, int]:
    """(type, length) of a PDU from its 6-byte header, refusing unknown types,
    control PDUs over :data:`MAX_CONTROL_PDU` and P-DATA-TF over ``max_pdu``
    (our advertised maximum; 0: unlimited)."""
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in range(A_ASSOCIATE_RQ, A_ABORT + 1):
        raise ProtocolError(ABORT_UNRECOGNIZED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
    if pdu_type == P_DATA_TF:
        if max_pdu and length > max_pdu:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"P-DATA-TF of {length} bytes, over our maximum PDU "
                                f"length {max_pdu}")
    elif length > MAX_CONTROL_PDU:
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU type 0x{pdu_type:02X} of {length} bytes")
    return pdu_type, length


@dataclass(frozen=True)
class Control:
    """A PDU other than P-DATA-TF, with its body."""

    pdu_type: int
    body: bytes


@dataclass(frozen=True)
class Command:
    """A complete command set on an accepted presentation context."""

    context_id: int
    elements: dict[int, bytes]
    has_dataset: bool


@dataclass(frozen=True)
class DataPiece:
    """The next bytes of the current message's dataset (at most :data:`DATA_PIECE`)."""

    data: bytes


@dataclass(frozen=True)
class DatasetEnd:
    """The current message's dataset is complete (``size`` bytes in all)."""

    size: int


Event = Control | Command | DataPiece | DatasetEnd


class MessageReader:
    """PDUs from a byte stream, P-DATA-TF reassembled into DIMSE messages.

    ``read(n)`` returns exactly ``n`` bytes or raises :class:`StreamEnded`.
    ``contexts`` are the accepted presentation context IDs (set once the
    association is accepted); a PDV on any other is a protocol error, as are
    one message's PDVs on two contexts, a dataset fragment before its command,
    and a command fragment inside a dataset. Memory held: one command set
    (bounded by :data:`MAX_CONTROL_PDU`) and one piece (:data:`DATA_PIECE`)."""

    def __init__(self, read: Callable[[int], bytes], *, max_pdu: int = 0, piece: int = DATA_PIECE) -> None:
        self._read = read
        self.max_pdu = max_pdu
        self.piece = piece
        self.contexts: frozenset[int] = frozenset()
        self._pdu_left = 0        # bytes of the current P-DATA-TF not yet read
        self._pdv_left = 0        # dataset bytes of the current PDV not yet read
        self._pdv_last = False    # the current dataset PDV is the message's last
        self._command: list[bytes] = []
        self._command_size = 0
        self._in_dataset = False  # a command announcing a dataset was delivered
        self._context = -1        # the current message's presentation context
        self._dataset_size = 0

    @property
    def mid_message(self) -> bool:
        """Part of a message has arrived (a command or dataset not yet complete)."""
        return bool(self._command) or self._in_dataset

    def next_event(self) -> Event:
        while True:
            if self._pdv_left:
                n = min(self._pdv_left, self.piece)
                data = self._read(n)
                self._pdv_left -= n
                self._pdu_left -= n
                self._dataset_size += n
                return DataPiece(data)
            if self._in_dataset and self._pdv_last:
                size = self._dataset_size
                self._in_dataset, self._pdv_last, self._context, self._dataset_size = False, False, -1, 0
                return DatasetEnd(size)
            if self._pdu_left == 0:
                pdu_type, length = parse_pdu_header(self._read(6), self.max_pdu)
                if pdu_type != P_DATA_TF:
                    return Control(pdu_type, self._read(length))
                if length == 0:
                    raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF without a PDV")
                self._pdu_left = length
            event = self._pdv()
            if event is not None:
                return event

    def _pdv(self) -> Command | None:
        """Read one PDV header (and a command fragment's value)."""
        if self._pdu_left < 6:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF ends inside a PDV header")
        length, context_id, header = struct.unpack(">IBB", self._read(6))
        self._pdu_left -= 6
        if length < 2 or length - 2 > self._pdu_left:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "PDV length does not fit its PDU")
        size = length - 2
        if context_id not in self.contexts:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDV on presentation context {context_id}, "
                                "which was not accepted")
        if self._context not in (-1, context_id):
            raise ProtocolError(ABORT_INVALID_PARAMETER, "one message's PDVs on two presentation contexts")
        self._context = context_id
        last = bool(header & 0x02)
        if header & 0x01:
            if self._in_dataset:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "command fragment inside a dataset")
            self._command_size += size
            if self._command_size > MAX_CONTROL_PDU:
                raise ProtocolError(ABORT_INVALID_PARAMETER, "command set longer than 1 MiB")
            self._command.append(self._read(size))
            self._pdu_left -= size
            if not last:
                return None
            elements = parse_command(b"".join(self._command))
            self._command.clear()
            self._command_size = 0
            has_dataset = command_us(elements, 0x0800, NO_DATASET) != NO_DATASET
            if has_dataset:
                self._in_dataset = True
            else:
                self._context = -1
            return Command(context_id, elements, has_dataset)
        if not self._in_dataset:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "dataset fragment before its command")
        if self._pdv_last:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "dataset fragment after the last one")
        self._pdv_left, self._pdv_last = size, last
        return None
