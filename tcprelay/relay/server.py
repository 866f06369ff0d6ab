"""
The relay: control sessions, service registration, public listeners and
visitor forwarding.

Pieces, from the outside in:

- :class:`RelayService` (a MultiService) holds the named children: the
  control endpoint service, the :class:`~tcprelay.relay.pool.PortPool` and
  the :class:`Relay` itself (the public listeners).  It drains on stop.
- :class:`ControlFactory` builds one :class:`RelaySession` per service
  connection.
- :class:`RelaySession` is a server-role :class:`~tcprelay.protocol.MuxProtocol`;
  the first application stream the service opens is its handshake.
- :class:`Registration` is one registered service: its public port, its
  listener and its visitors.  It is torn down as soon as the session ends.
"""

from __future__ import annotations

import time
from typing import Optional

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay.forward import Splice
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role, SessionClosedError, SessionConfig
from tcprelay.protocol import MuxProtocol, MuxStream
from tcprelay.relay.pool import PoolTimeout, PortPool

__all__ = [
    "RelayConfig",
    "Relay",
    "RelaySession",
    "Registration",
    "ControlFactory",
    "RelayService",
]


@attrs.frozen
class RelayConfig:
    """Everything the relay needs to know, validated by the tap Options."""

    ports: range
    public_interface: str = ""
    public_host: str = "localhost"
    wait_timeout: float = 60.0
    drain_timeout: float = 30.0
    bind_retry: float = 5.0
    session: SessionConfig = SessionConfig()


class Registration:
    """
    One registered service: its session, public port and listener, and the
    visitors currently connected through it.
    """

    log = Logger()

    def __init__(self, relay: Relay, session: RelaySession, port: int) -> None:
        self.relay = relay
        self.session = session
        self.port = port
        self.listener: Optional[interfaces.IListeningPort] = None
        self.visitors: set[Splice] = set()
        self.connected_since = time.time()
        self.bytes_in = 0
        """Bytes from visitors to the service."""
        self.bytes_out = 0
        self.closed = False

    @property
    def address(self) -> str:
        """The public address given to the service (``HOST:PORT``)."""
        return f"{self.relay.config.public_host}:{self.port}"

    def listen(self) -> None:
        """Start the public listener; raises CannotListenError."""
        self.listener = self.relay.reactor.listenTCP(  # type: ignore[attr-defined]
            self.port,
            VisitorFactory(self),
            interface=self.relay.config.public_interface,
        )

    def visitor_connected(self, visitor: Protocol) -> Optional[Splice]:
        """Open a stream for a new visitor; None if the session cannot."""
        splice = Splice(on_done=self._visitor_done)
        try:
            self.session.open_stream(splice.b)
        except SessionClosedError:
            return None
        self.visitors.add(splice)
        self.relay.visitors_accepted += 1
        return splice

    def _visitor_done(self, splice: Splice) -> None:
        self.visitors.discard(splice)
        self.bytes_in += splice.bytes_ab
        self.bytes_out += splice.bytes_ba

    def close(self) -> Deferred[None]:
        """Stop listening and free the port (at once); visitors end with the session."""
        if self.closed:
            return succeed(None)
        self.closed = True
        listener, self.listener = self.listener, None
        if listener is None:
            self.relay.pool.release(self.port)
            return succeed(None)
        d: Deferred[None] = Deferred.fromCoroutine(_stop(listener))
        d.addBoth(lambda _: self.relay.pool.release(self.port))
        return d


async def _stop(listener: interfaces.IListeningPort) -> None:
    await listener.stopListening()  # type: ignore[misc]


class _Visitor(Protocol):
    """Placeholder protocol: the visitor's transport is handed to a Splice."""


class VisitorFactory(Factory):
    """Accepts visitors on one public port and splices each to a new stream."""

    noisy = False

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        reg = self.registration
        if reg.closed or reg.relay.draining:
            reg.relay.visitors_refused += 1
            return None
        splice = reg.visitor_connected(_Visitor())
        if splice is None:
            reg.relay.visitors_refused += 1
            return None
        return splice.a


class HandshakeProtocol(Protocol):
    """
    The original relay's handshake, on the service's first plain stream:
    wait for a port, listen on it, write ``HOST:PORT``, then FIN.
    """

    log = Logger()

    def __init__(self, session: RelaySession) -> None:
        self.session = session
        self._acquiring: Optional[Deferred[int]] = None
        self.done = False

    def connectionMade(self) -> None:
        self.session.relay.sessions_waiting.add(self.session)
        self._next_port()

    def _next_port(self) -> None:
        relay = self.session.relay
        d = relay.pool.acquire(relay.config.wait_timeout, self._queued)
        self._acquiring = d
        d.addCallbacks(self._got_port, self._no_port)

    def _queued(self, position: int) -> None:
        first = self.session.queue_position == 0
        self.session.queue_position = position
        if first:
            self.log.info(
                "service {peer} queued for a public port at position {position}",
                peer=self.session.label,
                position=position,
                session=self.session.label,
            )

    def _got_port(self, port: int) -> None:
        self._acquiring = None
        session = self.session
        relay = session.relay
        if session.session.ended:
            relay.pool.release(port)
            return
        reg = Registration(relay, session, port)
        try:
            reg.listen()
        except CannotListenError as e:
            relay.pool.quarantine(port)
            self.log.warn(
                "cannot listen on public port {port}: {error}",
                port=port,
                error=str(e.socketError),
            )
            self._next_port()
            return
        relay.sessions_waiting.discard(session)
        session.registration = reg
        relay.registrations[port] = reg
        self.done = True
        self.log.info(
            "service {peer} registered at {address}",
            peer=session.label,
            address=reg.address,
            service_port=port,
            session=session.label,
        )
        transport = self.transport
        assert transport is not None
        transport.write(reg.address.encode("ascii"))
        transport.loseWriteConnection()  # type: ignore[attr-defined]

    def _no_port(self, failure: Failure) -> None:
        self._acquiring = None
        session = self.session
        session.relay.sessions_waiting.discard(session)
        if failure.check(CancelledError):
            return
        if failure.check(PoolTimeout):
            self.log.warn(
                "service {peer} refused: {reason}",
                peer=session.label,
                reason=str(failure.value),
                session=session.label,
            )
            session.relay.services_refused += 1
            session.close(ErrorCode.REFUSED_STREAM, str(failure.value))
            return
        self.log.failure("acquiring a port", failure)

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        self.session.relay.sessions_waiting.discard(self.session)


class RelaySession(MuxProtocol):
    """One service's control connection (server role)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(Role.SERVER, relay.reactor, relay.config.session, self._accept_stream)
        self.relay = relay
        self.registration: Optional[Registration] = None
        self.handshake: Optional[HandshakeProtocol] = None
        self.queue_position = 0
        self.started = time.time()

    def _accept_stream(self, stream: MuxStream) -> Optional[Protocol]:
        if self.handshake is None and not self.relay.draining:
            self.handshake = HandshakeProtocol(self)
            return self.handshake
        return None

    def session_started(self) -> None:
        self.relay.sessions.add(self)

    def session_ended(self, event: ev.SessionEnded) -> None:
        relay = self.relay
        relay.sessions.discard(self)
        relay.sessions_waiting.discard(self)
        if event.error_code not in (None, ErrorCode.NO_ERROR):
            relay.protocol_errors[event.error_code] = (
                relay.protocol_errors.get(event.error_code, 0) + 1
            )
        if self.session.heartbeat_timed_out:
            relay.heartbeat_timeouts += 1
        reg = self.registration
        if reg is not None:
            relay.registrations.pop(reg.port, None)
            self.log.info(
                "service {peer} at {address} left: {reason}",
                peer=self.label,
                address=reg.address,
                reason=event.reason,
                service_port=reg.port,
                session=self.label,
            )
            reg.close()
        relay.session_gone()


class ControlFactory(Factory):
    """Builds a :class:`RelaySession` for each service connection."""

    noisy = False

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        if self.relay.draining:
            return None
        return RelaySession(self.relay)


class Relay(Service):
    """
    The registry of sessions, registrations and public listeners, and the
    counters operators read.  ``stopService`` stops every public listener.
    """

    log = Logger()
    name = "public"

    def __init__(self, config: RelayConfig, pool: PortPool, reactor: object) -> None:
        self.config = config
        self.pool = pool
        self.reactor = reactor
        self.sessions: set[RelaySession] = set()
        self.sessions_waiting: set[RelaySession] = set()
        self.registrations: dict[int, Registration] = {}
        self.draining = False
        self.visitors_accepted = 0
        self.visitors_refused = 0
        self.services_refused = 0
        self.heartbeat_timeouts = 0
        self.protocol_errors: dict[int, int] = {}
        self._idle_waiters: list[Deferred[None]] = []

    @property
    def stream_count(self) -> int:
        """Application streams open across every session."""
        return sum(s.session.stream_count for s in self.sessions)

    @property
    def visitor_count(self) -> int:
        """Visitor connections currently spliced."""
        return sum(len(r.visitors) for r in self.registrations.values())

    def factory(self) -> ControlFactory:
        """The control-port factory."""
        return ControlFactory(self)

    def session_gone(self) -> None:
        if not self.sessions:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no session remains."""
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def drain(self) -> Deferred[None]:
        """
        Stop accepting visitors and sessions, send GOAWAY to every session,
        let open streams finish up to the drain timeout, then close what is
        left.  Fires when every session is gone.
        """
        self.draining = True
        stops = [reg.close() for reg in list(self.registrations.values())]
        for session in list(self.sessions):
            session.go_away()
            self._close_when_quiet(session)
        idle = self.when_idle()
        clock = self.reactor
        timer = clock.callLater(self.config.drain_timeout, self._drain_expired)  # type: ignore[attr-defined]

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        idle.addBoth(done)
        return DeferredList([idle, *stops]).addCallback(lambda _: None)

    def _close_when_quiet(self, session: RelaySession) -> None:
        """Close ``session`` as soon as it has no streams left."""
        reg = session.registration
        if session.session.ended:
            return
        if reg is None or not reg.visitors:
            session.close(ErrorCode.NO_ERROR, "relay shutting down")
            return
        for splice in list(reg.visitors):
            previous = splice.on_done

            def finished(s: Splice, previous=previous, session=session) -> None:  # type: ignore[no-untyped-def]
                if previous is not None:
                    previous(s)
                r = session.registration
                if r is not None and not r.visitors and not session.session.ended:
                    session.close(ErrorCode.NO_ERROR, "relay shutting down")

            splice.on_done = finished

    def _drain_expired(self) -> None:
        if self.sessions:
            self.log.warn(
                "drain timeout: closing {count} sessions with open streams",
                count=len(self.sessions),
            )
        for session in list(self.sessions):
            session.close(ErrorCode.NO_ERROR, "drain timeout")

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return self.drain()


class RelayService(MultiService):
    """
    The relay daemon: named children ``control`` (the control endpoint
    service), ``pool`` and ``public`` (the :class:`Relay`).  Stopping it
    stops accepting sessions, then drains.
    """

    def __init__(self, relay: Relay, control: Service) -> None:
        super().__init__()
        self.relay = relay
        relay.pool.setServiceParent(self)
        relay.setServiceParent(self)
        control.setName("control")
        control.setServiceParent(self)
