"""Event-driven reactors for pynetdicom acceptor associations.

pynetdicom 3 runs two polling loops per association: the DUL thread sleeps
1 ms whenever it has nothing to do, and the association thread sleeps 1 ms
before every look at its DIMSE queue. A C-STORE crosses both loops twice
(request in, response out), so on a busy machine each instance waits for
several timer wake-ups that have nothing to do with the work. That was the
largest single cost of ``medai pacs listen`` against dcmtk's storescp.

The subclasses here keep pynetdicom's state machine, PDU and DIMSE code and
change only *how they wait*: the DUL thread blocks in ``select`` on its socket
and a wake-up pipe (written whenever a primitive is queued for sending or the
thread is told to stop), the association thread blocks on an event set
whenever a DIMSE message or an ACSE primitive arrives. Both still wake at
least every :data:`MAX_IDLE_WAIT` seconds to check timers, so timeouts behave
as before (to that granularity).

:func:`install` swaps them in through pynetdicom's public ``request_handler``
hook of the association server. When the pynetdicom in use lacks an internal
they rely on, nothing is swapped and pynetdicom's own loops run.
"""

from __future__ import annotations

import copy
import logging
import queue
import select
import socket
import threading
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import RequestHandler
from pynetdicom.utils import make_target

log = logging.getLogger("medai.pacs")

#: Longest wait before a reactor re-checks its timers and kill flags (seconds).
MAX_IDLE_WAIT = 0.05


class _SignalQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``notify`` after every put (the consumer's wake-up)."""

    def __init__(self, notify: Any) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class EventDrivenDUL(DULServiceProvider):
    """The DUL provider, waiting in ``select`` instead of sleeping 1 ms."""

    def _adopt(self, on_user_primitive: Any) -> None:
        """Turn a stock provider (not yet started) into this one, keeping its
        socket, timers and queued events."""
        # Socket objects, not raw pipe fds: once closed their send fails
        # instead of writing into whatever file reuses the descriptor number.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.to_provider_queue = _moved(self.to_provider_queue, _SignalQueue(self.wake))
        self.to_user_queue = _moved(self.to_user_queue, _SignalQueue(on_user_primitive))
        # Thread.__init__ bound the stock loop as the thread's target.
        self._target = make_target(self.run_reactor)  # type: ignore[attr-defined]

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\x00")
        except OSError:  # buffer full (a wake-up is already pending) or closed
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
        return True

    def _idle_wait(self) -> None:
        """Block until the socket is readable, something is queued to send,
        the thread is killed, or MAX_IDLE_WAIT passes."""
        fds: list[Any] = [self._wake_r]
        transport = self.socket
        raw = getattr(transport, "socket", None) if transport is not None else None
        if raw is not None and getattr(transport, "_is_connected", False):
            if getattr(raw, "pending", None) is not None and raw.pending():
                return  # TLS: decrypted bytes already buffered, select would not see them
            fds.append(raw)
        try:
            ready, _, _ = select.select(fds, [], [], MAX_IDLE_WAIT)
        except (OSError, ValueError):  # socket closed under us: let the state machine see it
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def run_reactor(self) -> None:
        """Same order of work as pynetdicom's loop; only the idle wait differs."""
        self._idle_timer.start()
        idle = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    idle = True
                if idle:
                    self._idle_wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:  # noqa: BLE001 - mirror pynetdicom: abort the association
                    log.error("DUL reactor failed (%s); aborting the association", type(exc).__name__)
                    abort = A_ABORT_RQ()
                    abort.source = 0x02
                    abort.reason_diagnostic = 0x00
                    try:
                        self.socket.send(abort.encode())  # type: ignore[union-attr]
                    except Exception:  # noqa: BLE001 - the connection may already be gone
                        pass
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            self.assoc._medai_activity.set()  # the association reactor sees the DUL gone at once
            self._wake_r.close()
            self._wake_w.close()


class EventDrivenAssociation(Association):
    """An acceptor association whose reactor waits on an event, not a 1 ms sleep."""

    _medai_activity: threading.Event

    @classmethod
    def adopt(cls, assoc: Association) -> bool:
        """Switch a freshly built acceptor (thread not started) to the
        event-driven reactors; False (and untouched) where this pynetdicom
        lacks an internal they use."""
        if not _SUPPORTED or assoc.is_alive() or assoc.dul.is_alive() or type(assoc) is not Association:
            return False
        assoc.__class__ = cls
        assert isinstance(assoc, EventDrivenAssociation)
        assoc._medai_activity = threading.Event()
        assoc.dul.__class__ = EventDrivenDUL
        assert isinstance(assoc.dul, EventDrivenDUL)
        assoc.dul._adopt(assoc._medai_activity.set)
        assoc.dimse.msg_queue = _moved(assoc.dimse.msg_queue, _SignalQueue(assoc._medai_activity.set))
        return True

    def kill(self) -> None:
        self._medai_activity.set()
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._medai_activity.wait(MAX_IDLE_WAIT)
            self._medai_activity.clear()
            # Pause point for send_*() from handlers (as in pynetdicom).
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            while True:  # serve every complete message before sleeping again
                context_id, msg = self.dimse.get_msg(block=False)
                if not msg:
                    break
                self._serve_request(msg, context_id)
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released by the peer")
                self.is_released = True
                self.is_established = False
                _trigger(self, "EVT_RELEASED")
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # EVT_ACSE_RECV for subscribers, as pynetdicom does
                self.is_aborted = True
                self.is_established = False
                _trigger(self, "EVT_ABORTED")
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _trigger(assoc: Association, name: str) -> None:
    from pynetdicom import evt

    evt.trigger(assoc, getattr(evt, name), {})


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler; the association it builds gets the
    event-driven reactors before its thread starts."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        EventDrivenAssociation.adopt(assoc)
        return assoc


class ContextList(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts, cheap to deep-copy.

    pynetdicom deep-copies the server's context list for every association it
    accepts; with every storage SOP class times every transfer syntax that is
    about 170 contexts of 45 UIDs, a quarter of a second of CPU on a loaded
    machine before the first byte of DICOM is answered. UIDs are immutable
    strings, so a copy of each context and of its transfer syntax list is just
    as independent as pynetdicom's deep copy."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for cx in self:
            dup = copy.copy(cx)
            dup._transfer_syntax = list(cx._transfer_syntax)
            copies.append(dup)
        return copies


def _moved(old: "queue.Queue[Any]", new: "queue.Queue[Any]") -> "queue.Queue[Any]":
    """``new`` holding whatever ``old`` held, in order."""
    while True:
        try:
            item = old.get_nowait()
        except queue.Empty:
            return new
        queue.Queue.put(new, item)


#: The pynetdicom internals the reactors above call; checked once.
_SUPPORTED = all(hasattr(DULServiceProvider, name) for name in (
    "_process_recv_primitive", "_is_transport_event", "idle_timer_expired", "receive_pdu", "kill_dul")) and all(
    hasattr(Association, name) for name in ("_serve_request", "_run_reactor", "kill", "release", "abort"))
if not _SUPPORTED:
    log.warning("this pynetdicom lacks internals medai.pacs._reactor uses; "
                "associations keep pynetdicom's polling loops")
