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

import signal
import sys
import time
from secrets import token_hex
from typing import Optional, Sequence

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import interfaces
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay._fastio import listen_eager
from tcprelay._reactor import DEFAULT_BUSY_POLL, own_process, tune_reactor
from tcprelay._signals import calm_repeated_signals
from tcprelay.forward import Splice
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role, SessionClosedError, SessionConfig
from tcprelay.protocol import MuxProtocol, MuxStream
from tcprelay.relay.pool import PoolTimeout, PortPool

PUBLIC_BACKLOG = 4096
"""listen() backlog of public ports (the kernel caps it at somaxconn)."""
SYN_HOLD = 0.001
"""Seconds a visitor's SYN may wait for the visitor's first bytes when it
had sent none by the time it was accepted (see Registration.visitor_connected)."""

FIN_HOLD = 0.0002
"""Seconds a visitor's FIN (its half-close or close) may wait on the
service's session for other frames to leave with it.  A client that closes
one connection and opens the next (sequential requests, health checks)
otherwise has the FIN wake the service on its own just as the next SYN
follows it: sequential connect + 1-byte echo, p50 323 against 387 us
(lower in ten of ten alternating rounds), and less relay CPU.  A service
that waits for a visitor's end-of-file before answering answers at most
this much later."""

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, float("inf"))
"""Upper bounds (seconds) of the handshake-duration histogram."""

__all__ = [
    "FIN_HOLD",
    "HANDSHAKE_BUCKETS",
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

    ports: Sequence[int]
    public_interface: str = ""
    public_host: str = "localhost"
    wait_timeout: float = 60.0
    drain_timeout: float = 30.0
    bind_retry: float = 5.0
    handshake_timeout: float = 30.0
    """Seconds a new session has to ask for a port before it is closed."""
    lease: float = 60.0
    """Seconds a lost extended session's port stays reserved for its lease."""
    secrets: tuple[bytes, ...] = ()
    """Accepted shared secrets; empty means no authentication."""
    secrets_file: Optional[str] = None
    """Where more secrets come from; re-read by :meth:`Relay.reload_secrets`."""
    secrets_inline: tuple[bytes, ...] = ()
    """The ``--secret`` ones (kept across reloads)."""
    session: SessionConfig = SessionConfig()


class Registration:
    """
    One registered service: its session, public port and listener, and the
    visitors currently connected through it.
    """

    log = Logger()

    def __init__(
        self,
        relay: Relay,
        session: RelaySession,
        port: int,
        extended: bool = False,
        proxy: bool = False,
    ) -> None:
        self.relay = relay
        self.session = session
        self.port = port
        self.extended = extended
        """Visitor streams are typed (VISITOR_STREAM_TYPE)."""
        self.proxy = proxy
        """Visitor streams start with a PROXY v2 header."""
        self.lease_token: Optional[str] = None
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
        self.listener = listen_eager(
            self.relay.reactor,
            self.port,
            VisitorFactory(self),
            PUBLIC_BACKLOG,
            self.relay.config.public_interface,
        )

    def visitor_connected(self, addr: interfaces.IAddress, first: bytes = b"") -> Optional[Splice]:
        """
        Open a stream for a new visitor that has already sent ``first``;
        None if the session cannot.  Without a PROXY header to put first,
        the SYN and those bytes leave in one write before anything else is
        set up (a silent visitor's SYN waits up to SYN_HOLD for its bytes).
        With one, the header needs the visitor's transport: SYN and header
        leave together once it exists, ``first`` right after them.
        """
        if len(self.visitors) >= self.relay.config.session.max_streams:
            return None
        session = self.session
        stream_type = hs.VISITOR_STREAM_TYPE if self.extended else 0
        if not self.proxy:
            try:
                stream = session.open_stream(None, stream_type, flush=False)
            except SessionClosedError:
                return None
            stream.fin_hold = FIN_HOLD
            if first:
                stream.write(first)  # SYN, window and bytes: one write
                if stream.disconnected:
                    return None
            else:
                # Most clients speak first: their bytes usually arrive within
                # microseconds, and the SYN leaves with them (any flush of the
                # session sends it); a service that speaks first hears of the
                # visitor at most SYN_HOLD later.
                session.flush_within(SYN_HOLD)
            splice = Splice(on_done=self._visitor_done)
            splice.bytes_ab = len(first)
            stream.attach(splice.b)
        else:

            def preamble(transport: interfaces.ITransport) -> bytes:
                # The address the visitor actually dialled, not the bound one.
                host = transport.getHost()
                return hs.encode_proxy_v2(
                    hs.ProxyHeader(
                        addr.host,  # type: ignore[attr-defined]
                        addr.port,  # type: ignore[attr-defined]
                        host.host,  # type: ignore[attr-defined]
                        host.port,  # type: ignore[attr-defined]
                    )
                )

            splice = Splice(on_done=self._visitor_done, preamble=preamble)
            try:
                # The SYN waits for the header, which needs the visitor's
                # transport; ``first`` follows them.
                session.open_stream(splice.b, stream_type, flush=False).fin_hold = FIN_HOLD
            except SessionClosedError:
                return None

            def connected(side: Protocol) -> None:
                if first:
                    side.dataReceived(first)
                session.flush()

            splice.connected = connected
        self.visitors.add(splice)
        self.relay.visitors_accepted += 1
        return splice

    def _visitor_done(self, splice: Splice) -> None:
        self.visitors.discard(splice)
        self.bytes_in += splice.bytes_ab
        self.bytes_out += splice.bytes_ba
        self.relay.bytes_to_service += splice.bytes_ab
        self.relay.bytes_to_visitor += splice.bytes_ba

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes to the service and to visitors so far, open visitors included."""
        return (
            self.bytes_in + sum(s.bytes_ab for s in self.visitors),
            self.bytes_out + sum(s.bytes_ba for s in self.visitors),
        )

    def close(self, hold_lease: bool = False) -> Deferred[None]:
        """
        Stop listening, then free the port at once, or hold it for the
        lease when ``hold_lease``.  Visitors end with the session's streams.
        """
        if self.closed:
            return succeed(None)
        self.closed = True
        listener, self.listener = self.listener, None
        relay = self.relay

        def free(_: object) -> None:
            if hold_lease and self.lease_token and not relay.draining:
                relay.hold_lease(self.lease_token, self.port)
            else:
                relay.pool.release(self.port)

        if listener is None:
            free(None)
            return succeed(None)
        d = maybeDeferred(listener.stopListening)
        d.addBoth(free)
        return d


class VisitorFactory(Factory):
    """Accepts visitors on one public port and splices each to a new stream."""

    noisy = False

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        return self.build_eager(addr, b"")

    def build_eager(self, addr: interfaces.IAddress, first: bytes) -> Optional[Protocol]:
        """A visitor accepted by the EagerPort, with what it already sent."""
        reg = self.registration
        if reg.closed or reg.relay.draining:
            reg.relay.visitors_refused += 1
            return None
        splice = reg.visitor_connected(addr, first)
        if splice is None:
            reg.relay.visitors_refused += 1
            return None
        return splice.a


class _Handshake(Protocol):
    """
    What both dialects share on the service's first stream: find a port
    (a resumed lease, a requested free port, or the pool's queue), listen
    on it, and report the address.  Subclasses speak the dialect.
    """

    log = Logger()
    extended = False
    leaving = False
    """The agent said it is leaving for good (its port is not held)."""

    def __init__(self, session: RelaySession) -> None:
        self.session = session
        self._acquiring: Optional[Deferred[int]] = None
        self.done = False
        self.proxy = False
        self.lease_token: Optional[str] = None

    def register(self, wanted: Optional[int] = None, lease: Optional[str] = None) -> None:
        """Find a port for the service and report it (or queue, or refuse)."""
        relay = self.session.relay
        self.session.handshake_started()
        relay.sessions_waiting.add(self.session)
        self._started = relay.reactor.seconds()  # type: ignore[attr-defined]
        held = relay.resume_lease(lease) if lease else None
        if held is not None:
            self._got_port(held)
            return
        if wanted and relay.pool.take(wanted):
            self._got_port(wanted)
            return
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
        self.report_position(position)

    def _got_port(self, port: int) -> None:
        self._acquiring = None
        session = self.session
        relay = session.relay
        if session.session.ended or self.transport is None or session.relay.draining:
            relay.pool.release(port)
            return
        reg = Registration(relay, session, port, self.extended, self.proxy)
        try:
            reg.listen()
        except CannotListenError as e:
            relay.pool.quarantine(port)
            self.log.warn(
                "cannot listen on public port {port}: {error}",
                port=port,
                error=str(e.socketError),
                service_port=port,
            )
            self._next_port()
            return
        relay.sessions_waiting.discard(session)
        session.registration = reg
        session.queue_position = 0
        relay.registrations[port] = reg
        relay.record_handshake(
            relay.reactor.seconds() - self._started  # type: ignore[attr-defined]
        )
        self.done = True
        self.log.info(
            "service {peer} registered at {address}",
            peer=session.label,
            address=reg.address,
            service_port=port,
            session=session.label,
            dialect="extended" if self.extended else "legacy",
        )
        self.report_address(reg)

    def _no_port(self, failure: Failure) -> None:
        self._acquiring = None
        session = self.session
        session.relay.sessions_waiting.discard(session)
        if failure.check(CancelledError):
            return
        if failure.check(PoolTimeout):
            self.refuse(str(failure.value), ErrorCode.REFUSED_STREAM)
            return
        self.log.failure("acquiring a port", failure)

    def refuse(self, reason: str, code: int) -> None:
        """Turn the service away: one log line, then GOAWAY."""
        session = self.session
        self.log.warn(
            "service {peer} refused: {reason}",
            peer=session.label,
            reason=reason,
            session=session.label,
        )
        session.relay.services_refused += 1
        self.report_refusal(reason, code)
        session.close(code, reason)

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        self.session.relay.sessions_waiting.discard(self.session)

    # -- dialect -----------------------------------------------------------

    def report_position(self, position: int) -> None:
        """Tell the service its place in the queue (if the dialect can)."""

    def report_address(self, reg: Registration) -> None:
        """Tell the service its public address."""
        raise NotImplementedError

    def report_refusal(self, reason: str, code: int) -> None:
        """Tell the service why it is refused (if the dialect can)."""


class LegacyHandshake(_Handshake):
    """
    The original relay's handshake, on a plain first stream: write
    ``HOST:PORT`` in ASCII, then FIN.
    """

    def connectionMade(self) -> None:
        if self.session.relay.secrets:
            self.session.relay.auth_failures += 1
            self.refuse(
                "authentication required: untyped (legacy) handshake refused",
                ErrorCode.REFUSED_STREAM,
            )
            return
        self.register()

    def report_address(self, reg: Registration) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(reg.address.encode("ascii"))
        transport.loseWriteConnection()  # type: ignore[attr-defined]


class ExtendedHandshake(_Handshake):
    """
    tcprelay's own handshake on a :data:`CONTROL_STREAM_TYPE` stream: hello
    (nonce, auth) -> register (mac, port, lease, proxy) -> queued* ->
    ready | refused.  See :mod:`tcprelay.handshake`.
    """

    extended = True

    def __init__(self, session: RelaySession) -> None:
        super().__init__(session)
        self._reader = hs.MessageReader()
        self._nonce = hs.make_nonce()
        self._registered = False

    def connectionMade(self) -> None:
        self._send(
            "hello", nonce=self._nonce, auth=bool(self.session.relay.secrets)
        )

    def _send(self, kind: str, **fields: object) -> None:
        transport = self.transport
        if transport is not None and not self.session.session.ended:
            transport.write(hs.encode_message(kind, **fields))

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except hs.HandshakeError as e:
            self.refuse(f"bad handshake: {e}", ErrorCode.PROTOCOL_ERROR)
            return
        for message in messages:
            kind = message.get("type")
            if kind == "register" and not self._registered:
                self._registered = True
                self._on_register(message)
                if self.session.session.ended:
                    return
            elif kind == "leave":
                # The agent is stopping on purpose: its lease ends with it.
                self.leaving = True

    def _on_register(self, message: dict[str, object]) -> None:
        relay = self.session.relay
        if relay.secrets and not hs.check_mac(relay.secrets, self._nonce, message.get("mac")):
            relay.auth_failures += 1
            self.refuse("authentication failed", ErrorCode.REFUSED_STREAM)
            return
        port = message.get("port")
        lease = message.get("lease")
        self.proxy = message.get("proxy") is True
        wanted = port if isinstance(port, int) and port in relay.pool.ports else None
        self.register(wanted, lease if isinstance(lease, str) else None)

    def report_position(self, position: int) -> None:
        self._send("queued", position=position)

    def report_address(self, reg: Registration) -> None:
        relay = self.session.relay
        reg.lease_token = relay.new_lease_token()
        self._send(
            "ready",
            address=reg.address,
            host=relay.config.public_host,
            port=reg.port,
            lease=reg.lease_token,
            lease_seconds=relay.config.lease,
        )

    def report_refusal(self, reason: str, code: int) -> None:
        retry = not reason.startswith("authentication")
        self._send("refused", reason=reason, code=code, retry=retry)


class RelaySession(MuxProtocol):
    """One service's control connection (server role)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(Role.SERVER, relay.reactor, relay.config.session, self._accept_stream)
        self.relay = relay
        self.registration: Optional[Registration] = None
        self.handshake: Optional[_Handshake] = None
        self.queue_position = 0
        self.started = time.time()
        self._handshake_deadline: Optional[IDelayedCall] = None

    def _accept_stream(self, stream: MuxStream) -> Optional[Protocol]:
        if self.handshake is not None or self.relay.draining:
            return None
        if stream.stream_type == hs.CONTROL_STREAM_TYPE:
            self.handshake = ExtendedHandshake(self)
        else:
            self.handshake = LegacyHandshake(self)
        return self.handshake

    def session_started(self) -> None:
        self.relay.sessions.add(self)
        self._handshake_deadline = self.clock.callLater(
            self.relay.config.handshake_timeout, self._handshake_expired
        )

    def handshake_started(self) -> None:
        """The service asked for a port: the handshake deadline is met."""
        deadline, self._handshake_deadline = self._handshake_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _handshake_expired(self) -> None:
        self._handshake_deadline = None
        if self.session.ended:
            return
        self.log.warn(
            "session {session} sent no handshake within {seconds:g}s; closing it",
            session=self.label,
            seconds=self.relay.config.handshake_timeout,
        )
        self.close(ErrorCode.PROTOCOL_ERROR, "no handshake in time")

    def session_ended(self, event: ev.SessionEnded) -> None:
        relay = self.relay
        self.handshake_started()
        relay.sessions_waiting.discard(self)
        refused_by_us = not event.remote and event.error_code == ErrorCode.REFUSED_STREAM
        if event.error_code not in (None, ErrorCode.NO_ERROR) and not refused_by_us:
            relay.protocol_errors[event.error_code] = (
                relay.protocol_errors.get(event.error_code, 0) + 1
            )
        if self.session.heartbeat_timed_out:
            relay.heartbeat_timeouts += 1
        self._unregister(f"left: {event.reason}", reason=event.reason)

    def goaway_received(self, event: ev.GoAwayReceived) -> None:
        """
        The service is going away: no new visitor can get a stream, so its
        public port closes now, and the session closes once its visitors are
        done.  The port is held for an extended agent's lease unless the
        agent said it is leaving for good (a GOAWAY alone may be an agent
        whose heartbeat timed out and that will be back).
        """
        reg = self.registration
        if reg is not None and not reg.closed:
            self._unregister("is going away; public port closed")
        self.relay._close_when_quiet(self, "service went away")

    def _unregister(self, what: str, **fields: object) -> None:
        """
        Log ``what`` happened to the service and close its public port
        (idempotent): the port is freed, or held for an extended agent's
        lease unless the agent said it is leaving.
        """
        reg = self.registration
        if reg is None:
            return
        self.relay.registrations.pop(reg.port, None)
        self.log.info(
            "service {peer} at {address} {what}",
            peer=self.label,
            address=reg.address,
            what=what,
            service_port=reg.port,
            session=self.label,
            **fields,
        )
        leaving = self.handshake is not None and self.handshake.leaving
        reg.close(hold_lease=reg.extended and not leaving)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        """The socket is closed: only now is the session gone for good."""
        super().connectionLost(reason)
        self.relay.sessions.discard(self)
        self.relay.session_gone()


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
        self.auth_failures = 0
        self.bytes_to_service = 0
        self.bytes_to_visitor = 0
        self.handshake_buckets = [0] * len(HANDSHAKE_BUCKETS)
        self.handshake_sum = 0.0
        self.secrets: list[bytes] = list(config.secrets)
        self.leases: dict[str, tuple[int, IDelayedCall]] = {}
        self._idle_waiters: list[Deferred[None]] = []

    def record_handshake(self, seconds: float) -> None:
        """Count one handshake's duration into the histogram."""
        self.handshake_sum += seconds
        for index, bound in enumerate(HANDSHAKE_BUCKETS):
            if seconds <= bound:
                self.handshake_buckets[index] += 1
                break

    def bytes_relayed(self) -> tuple[int, int]:
        """Payload bytes relayed to services and to visitors, open visitors included."""
        to_service, to_visitor = self.bytes_to_service, self.bytes_to_visitor
        for reg in self.registrations.values():
            for splice in reg.visitors:
                to_service += splice.bytes_ab
                to_visitor += splice.bytes_ba
        return to_service, to_visitor

    def reload_secrets(self) -> bool:
        """
        Re-read the secrets file (SIGHUP).  A file that cannot be read or
        holds no secret is refused with a log line and the old secrets stay.
        Sessions are untouched either way.
        """
        path = self.config.secrets_file
        if path is None:
            self.log.info("SIGHUP: no --secrets-file to reload")
            return False
        from tcprelay.tap import read_secrets

        try:
            fresh = read_secrets(path)
        except (OSError, ValueError) as e:
            self.log.warn(
                "SIGHUP: secrets file {path} refused ({error}); keeping {count} old secrets",
                path=path,
                error=str(e),
                count=len(self.secrets),
            )
            return False
        self.secrets = list(self.config.secrets_inline) + fresh
        self.log.info(
            "SIGHUP: reloaded {count} secrets from {path}", count=len(self.secrets), path=path
        )
        return True

    def new_lease_token(self) -> str:
        """A fresh, unguessable lease token."""
        return token_hex(16)

    def hold_lease(self, token: str, port: int) -> None:
        """Keep ``port`` out of the pool for the lease time."""
        timer = self.reactor.callLater(  # type: ignore[attr-defined]
            self.config.lease, self._lease_expired, token
        )
        self.leases[token] = (port, timer)
        self.log.info(
            "port {service_port} held for its lease for {seconds}s",
            service_port=port,
            seconds=self.config.lease,
        )

    def resume_lease(self, token: str) -> Optional[int]:
        """The port held for ``token``, taken off hold; None if unknown."""
        held = self.leases.pop(token, None)
        if held is None:
            return None
        port, timer = held
        if timer.active():
            timer.cancel()
        return port

    def _lease_expired(self, token: str) -> None:
        held = self.leases.pop(token, None)
        if held is not None:
            self.pool.release(held[0])

    def release_leases(self) -> None:
        """Give every held port back (on shutdown)."""
        for token in list(self.leases):
            port, timer = self.leases.pop(token)
            if timer.active():
                timer.cancel()
            self.pool.release(port)

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
        self.release_leases()
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

    def _close_when_quiet(
        self, session: RelaySession, reason: str = "relay shutting down"
    ) -> None:
        """Close ``session`` as soon as it has no visitors left."""
        reg = session.registration
        if session.session.ended:
            return
        if reg is None or not reg.visitors:
            session.close(ErrorCode.NO_ERROR, reason)
            return
        for splice in list(reg.visitors):
            previous = splice.on_done

            def finished(s: Splice, previous=previous) -> None:  # type: ignore[no-untyped-def]
                if previous is not None:
                    previous(s)
                r = session.registration
                if r is not None and not r.visitors and not session.session.ended:
                    session.close(ErrorCode.NO_ERROR, reason)

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
    The relay daemon: named children ``pool``, ``public`` (the
    :class:`Relay`), ``control`` (the control endpoint service), and when
    configured ``metrics`` and ``systemd``.  Starting it raises the
    open-files limit and installs the SIGHUP handler; stopping it stops
    accepting sessions (control first), then drains.
    """

    log = Logger()

    def __init__(
        self,
        relay: Relay,
        control: Service,
        metrics: Optional[Service] = None,
        notifier: Optional[Service] = None,
        log_observer: Optional[object] = None,
        busy_poll: float = DEFAULT_BUSY_POLL,
        daemon: bool = False,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.busy_poll = busy_poll
        """Seconds to keep polling after activity (see tcprelay._reactor)."""
        self.daemon = daemon
        """The daemon owns its process: on start, its tunings
        (:func:`tcprelay._reactor.own_process`)."""
        self.log_observer = log_observer
        relay.pool.setServiceParent(self)
        relay.setServiceParent(self)
        if metrics is not None:
            metrics.setName("metrics")
            metrics.setServiceParent(self)
        control.setName("control")
        control.setServiceParent(self)
        if notifier is not None:
            notifier.setServiceParent(self)
        self._previous_sighup: object = None

    def setServiceParent(self, parent: object) -> None:  # type: ignore[override]
        """
        Attached to twistd's Application: hand it our log observer (twistd
        uses an ILogObserver component of the application when present).
        """
        super().setServiceParent(parent)  # type: ignore[arg-type]
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)

    def privilegedStartService(self) -> None:
        """Listen (control, metrics): a failure is one line on stderr and exit 1."""
        raise_open_files_limit(self.log)
        try:
            super().privilegedStartService()
        except Exception as e:  # noqa: BLE001 - any listen failure, reported plainly
            what = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
            sys.stderr.write(f"tcprelay: cannot listen ({what})\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    def startService(self) -> None:
        raise_open_files_limit(self.log)  # ``twist`` skips privilegedStartService
        tune_reactor(self.relay.reactor, self.busy_poll)
        super().startService()
        if hasattr(signal, "SIGHUP"):
            reactor = self.relay.reactor

            def on_hup(signum: int, frame: object) -> None:
                reactor.callFromThread(self.relay.reload_secrets)  # type: ignore[attr-defined]

            self._previous_sighup = signal.signal(signal.SIGHUP, on_hup)
        if self.daemon:
            own_process(self.relay.reactor)
        call_when_running = getattr(self.relay.reactor, "callWhenRunning", None)
        if call_when_running is not None:
            call_when_running(self._calm_repeated_signals)

    def _calm_repeated_signals(self) -> None:
        """A second SIGTERM/SIGINT while draining is ignored."""
        calm_repeated_signals(self.relay.reactor, lambda: self.relay.draining)

    def stopService(self) -> Deferred[None]:
        """
        Stop every child (control first, then the drain).  A completed drain
        is a clean shutdown: forget the SIGTERM/SIGINT that twistd and twist
        would otherwise re-raise on exit, so the daemon exits 0.
        """
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)  # type: ignore[arg-type]
            self._previous_sighup = None
        d: Deferred[None] = super().stopService()
        d.addCallback(self._clean_exit)
        return d

    def _clean_exit(self, _: object) -> None:
        reactor = self.relay.reactor
        if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            reactor._exitSignal = None  # type: ignore[attr-defined]


def raise_open_files_limit(log: Logger) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; say so if it stays low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-files limit raised from {soft} to {limit}", soft=soft, limit=target)
    except (ValueError, OSError) as e:
        log.warn(
            "cannot raise the open-files limit above {soft} (hard {hard}): {error}",
            soft=soft,
            hard=hard,
            error=str(e),
        )
