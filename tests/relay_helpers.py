"""
Helpers for the in-process relay tests (tests/test_relay.py).

These run on the real reactor over real loopback sockets, through
pytest-twisted:

- the relay is :class:`tcprelay.testing.RelayFixture`, the harness users
  get: built exactly as twistd builds it (``tap.Options`` +
  ``tap.makeService``), on an ephemeral control port and a block of public
  ports probed free.
- :class:`LegacyService` is a service written the way the original Go
  echoserver was: a client-role :class:`~tcprelay.protocol.MuxProtocol` that
  opens one plain stream, reads the public address to EOF, then accepts
  visitor streams and runs :class:`EchoProtocol` on each.
- :class:`Visitor` is a TCP client of a public port.

Both :class:`EchoProtocol` and :class:`Visitor` are :class:`Peer`\\ s: they
record what they read, can stop reading on demand (the pause hook for
backpressure tests), and send bulk data as push producers, so that they
never write faster than their transport accepts.

Every wait is bounded: :func:`bounded` puts a timeout on a Deferred and
:func:`wait_for` polls a condition up to a deadline.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional, TypeVar

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import testing
from tcprelay.testing import RelayFixture
from tcprelay.mux import events as ev
from tcprelay.mux.session import Role, SessionConfig
from tcprelay.protocol import MuxProtocol, MuxStream
from tcprelay.relay.doors.muxado import ControlSession, MuxTunnel

T = TypeVar("T")

WAIT = 5.0
"""Default bound on any single wait, in seconds."""

CHUNK = 65536

SERVICE_CONFIG = SessionConfig(heartbeat=False)
"""A legacy service (like echoserver.go) runs no heartbeat of its own; it
still echoes the relay's."""


# -- bounded waiting ------------------------------------------------------


def bounded(d: Deferred[T], reactor: Any, timeout: float = WAIT) -> Deferred[T]:
    """``d`` with a timeout: fails with twisted's TimeoutError after ``timeout``."""
    return d.addTimeout(timeout, reactor)


def deferred_later(reactor: Any, delay: float) -> Deferred[None]:
    """A Deferred firing after ``delay`` seconds (for polling only)."""
    d: Deferred[None] = Deferred()
    call = reactor.callLater(delay, d.callback, None)
    d.addErrback(lambda f: (call.cancel() if call.active() else None, f)[1])
    return d


async def wait_for(
    reactor: Any,
    predicate: Callable[[], object],
    timeout: float = WAIT,
    what: str = "condition",
    interval: float = 0.005,
) -> float:
    """
    Poll ``predicate`` until it is true; return the seconds it took.
    Raises AssertionError naming ``what`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferred_later(reactor, interval)
    return time.monotonic() - start


async def wait_stable(
    reactor: Any,
    value: Callable[[], object],
    quiet: float = 0.25,
    timeout: float = WAIT,
    what: str = "value",
) -> object:
    """
    Wait until ``value()`` has not changed for ``quiet`` seconds (a transfer
    that has stalled); return it.  Bounded by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    last = value()
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} still changing after {timeout}s (now {last!r})")
        await deferred_later(reactor, 0.01)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


def fd_count() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def free_port_block(size: int) -> range:
    """A block of ``size`` consecutive loopback ports free just now."""
    base = testing.free_port_block(size)
    return range(base, base + size)


# -- the relay ------------------------------------------------------------


def registered_ports(relay: RelayFixture) -> set[int]:
    """Public ports with a registered tunnel."""
    return {t.route.port for t in relay.relay.tunnels()}


def session_for(relay: RelayFixture, port: int) -> ControlSession:
    """The control session of the muxado service at public ``port``."""
    tunnel = relay.tunnel_at(port)
    assert isinstance(tunnel, MuxTunnel), f"no muxado tunnel at {port}"
    return tunnel.control


# -- protocols on both ends ----------------------------------------------


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IPushProducer)
class Peer(Protocol):
    """
    One end of a byte stream under test: records what it reads, can stop
    reading (``pause_reading``), and sends bulk data without overrunning
    its transport (it is the push producer registered on it).

    ``eof`` fires when the peer's FIN arrives; ``lost`` fires when the
    connection is gone (the reason is kept in ``lost_reason``); the Deferred
    returned by ``send`` fires once everything is handed to the transport.
    """

    def __init__(self) -> None:
        self.received = bytearray()
        self.got_eof = False
        self.write_done = False
        self.eof: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.lost_reason: Optional[Failure] = None
        self.user_paused = False
        self.write_blocked = False
        self.write_blocked_count = 0
        self._reading_paused = False
        self._outgoing: Optional[memoryview] = None
        self._outgoing_fin = False
        self._sent_d: Optional[Deferred[None]] = None
        self.bytes_sent = 0
        self._data_waiters: list[tuple[int, Deferred[None]]] = []

    # Protocol

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check_waiters()

    def readConnectionLost(self) -> None:
        self.got_eof = True
        if not self.eof.called:
            self.eof.callback(None)
        if self.write_done:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        # A half-closed TCP transport stays open until told: close once both
        # directions are done.  (A MuxStream closes itself.)
        self.write_done = True
        if self.got_eof:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        self._outgoing = None
        if not self.lost.called:
            self.lost.callback(None)

    # IPushProducer: our transport tells us when it cannot take more

    def pauseProducing(self) -> None:
        self.write_blocked = True
        self.write_blocked_count += 1

    def resumeProducing(self) -> None:
        self.write_blocked = False
        self._pump()

    def stopProducing(self) -> None:
        self._outgoing = None

    # API for tests

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.lost.called

    def pause_reading(self) -> None:
        """Stop reading from the transport (the pause hook)."""
        self.user_paused = True
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        """Read again."""
        self.user_paused = False
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def send(self, data: bytes, fin: bool = False) -> Deferred[None]:
        """
        Write ``data`` (then FIN when ``fin``) as fast as the transport takes
        it; fires once all of it has been handed over.
        """
        assert self._outgoing is None, "one send at a time"
        self._outgoing = memoryview(data)
        self._outgoing_fin = fin
        self._sent_d = Deferred()
        d = self._sent_d
        self._pump()
        return d

    def wait_received(self, count: int) -> Deferred[None]:
        """Fires once at least ``count`` bytes have been read."""
        d: Deferred[None] = Deferred()
        self._data_waiters.append((count, d))
        self._check_waiters()
        return d

    def half_close(self) -> None:
        """Send FIN; keep reading."""
        transport = self.transport
        # Nothing more to produce.  A TCP transport with a paused streaming
        # producer would otherwise never send the FIN.
        transport.unregisterProducer()  # type: ignore[union-attr]
        if self.write_blocked:
            self.write_blocked = False
            self._unblocked()
        transport.loseWriteConnection()  # type: ignore[union-attr]

    def _unblocked(self) -> None:
        """Writes may go on (hook for subclasses)."""

    # internals

    def _pump(self) -> None:
        while self._outgoing is not None and not self.write_blocked:
            out = self._outgoing
            chunk, rest = out[:CHUNK], out[CHUNK:]
            self._outgoing = rest if len(rest) else None
            self.bytes_sent += len(chunk)
            self.transport.write(bytes(chunk))  # type: ignore[union-attr]
            if self._outgoing is None:
                d, self._sent_d = self._sent_d, None
                if self._outgoing_fin:
                    self.half_close()
                if d is not None:
                    d.callback(None)

    def _check_waiters(self) -> None:
        ready = [w for w in self._data_waiters if len(self.received) >= w[0]]
        for w in ready:
            self._data_waiters.remove(w)
            w[1].callback(None)


class EchoProtocol(Peer):
    """
    A visitor stream inside the service: echoes what it reads (without
    overrunning the stream's send window: it stops reading while its writes
    are blocked), and answers the peer's FIN with its own.
    """

    echo = True

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        if self._outgoing is None:
            self.half_close()
        else:
            self._outgoing_fin = True

    def pauseProducing(self) -> None:
        super().pauseProducing()
        self._update_reading()

    def resumeProducing(self) -> None:
        self.write_blocked = False
        self._update_reading()
        self._pump()

    def _unblocked(self) -> None:
        self._update_reading()

    def pause_reading(self) -> None:
        self.user_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        self.user_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        want_paused = self.user_paused or self.write_blocked
        if want_paused == self._reading_paused or self.transport is None:
            return
        self._reading_paused = want_paused
        if want_paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    @property
    def stream(self) -> MuxStream:
        return self.transport  # type: ignore[return-value]


class Visitor(Peer):
    """A TCP client of a public port."""


class _AddressReader(Protocol):
    """The legacy handshake: read the relay's ``HOST:PORT`` to its FIN."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done: Deferred[str] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        # Without IHalfCloseableProtocol the stream closes itself on FIN.
        if self.done.called:
            return
        if reason is not None and reason.check(ConnectionDone):
            self.done.callback(self.data.decode("ascii"))
        else:
            self.done.errback(reason)


class ServiceMux(MuxProtocol):
    """The service's end of its session (client role), recording GOAWAYs."""

    def __init__(self, owner: LegacyService, config: SessionConfig) -> None:
        super().__init__(Role.CLIENT, owner.reactor, config, owner._accept)
        self.goaways: list[ev.GoAwayReceived] = []
        self.socket_lost: Deferred[None] = Deferred()
        self.lost_reason: Optional[Failure] = None

    def goaway_received(self, event: ev.GoAwayReceived) -> None:
        self.goaways.append(event)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        super().connectionLost(reason)
        if not self.socket_lost.called:
            self.socket_lost.callback(None)


class LegacyService:
    """
    A legacy service connected to the relay: the first plain stream is the
    handshake, every later stream a visitor served by ``protocol_factory``.
    It is the in-process stand-in for the Go echoserver, built on the
    library's own MuxProtocol (real backpressure, real half-close); to
    script frames by hand, use :class:`tests.muxpeer.ScriptedPeer`.
    """

    def __init__(
        self,
        reactor: Any,
        protocol_factory: Callable[[], Peer] = EchoProtocol,
        config: SessionConfig = SERVICE_CONFIG,
    ) -> None:
        self.reactor = reactor
        self.protocol_factory = protocol_factory
        self.config = config
        self.mux: Optional[ServiceMux] = None
        self.address = ""
        self.port = 0
        self.streams: list[Peer] = []
        self._stream_waiters: list[tuple[int, Deferred[Peer]]] = []

    async def connect(self, control_port: int, timeout: float = WAIT) -> str:
        """Connect, do the handshake, return the public address."""
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", control_port)
        mux = ServiceMux(self, self.config)
        self.mux = await bounded(connectProtocol(endpoint, mux), self.reactor, timeout)
        reader = _AddressReader()
        mux.open_stream(reader)
        self.address = await bounded(reader.done, self.reactor, timeout)
        host, _, port = self.address.rpartition(":")
        self.port = int(port)
        return self.address

    def _accept(self, stream: MuxStream) -> Peer:
        proto = self.protocol_factory()
        self.streams.append(proto)
        index = len(self.streams)
        for w in [w for w in self._stream_waiters if w[0] <= index]:
            self._stream_waiters.remove(w)
            self.reactor.callLater(0, w[1].callback, self.streams[w[0] - 1])
        return proto

    def stream(self, index: int, timeout: float = WAIT) -> Deferred[Peer]:
        """The ``index``-th (0-based) visitor stream, once it has arrived."""
        if index < len(self.streams):
            d: Deferred[Peer] = Deferred()
            d.callback(self.streams[index])
            return d
        d = Deferred()
        self._stream_waiters.append((index + 1, d))
        return bounded(d, self.reactor, timeout)

    @property
    def transport(self) -> Any:
        assert self.mux is not None
        return self.mux.transport

    @property
    def is_open(self) -> bool:
        return self.mux is not None and not self.mux.socket_lost.called

    async def close(self, timeout: float = WAIT) -> None:
        """Clean close (GOAWAY, then the socket), waiting until the socket is gone."""
        if self.mux is None or self.mux.socket_lost.called:
            return
        self.mux.close()
        await bounded(self.mux.socket_lost, self.reactor, timeout)

    def abort(self) -> None:
        """Drop the connection at once (cleanup)."""
        if self.mux is not None and not self.mux.socket_lost.called:
            self.mux.transport.abortConnection()  # type: ignore[union-attr]


async def connect_visitor(reactor: Any, port: int, timeout: float = WAIT) -> Visitor:
    """A Visitor connected to a public port."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=int(timeout))
    return await bounded(connectProtocol(endpoint, Visitor()), reactor, timeout)


async def echo_once(reactor: Any, port: int, payload: bytes, timeout: float = WAIT) -> bytes:
    """One visitor: send ``payload``, FIN, read the reply to EOF, wait for the close."""
    visitor = await connect_visitor(reactor, port, timeout)
    visitor.send(payload, fin=True)
    await bounded(visitor.eof, reactor, timeout)
    await bounded(visitor.lost, reactor, timeout)
    return bytes(visitor.received)


class Cleanup:
    """Everything a test opened, closed at the end whatever happened."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.relays: list[RelayFixture] = []
        self.services: list[LegacyService] = []
        self.visitors: list[Visitor] = []

    async def relay(self, *args: str, ports: int = 8) -> RelayFixture:
        relay = await bounded(
            RelayFixture.start(self.reactor, *args, ports=ports), self.reactor
        )
        self.relays.append(relay)
        return relay

    async def service(
        self,
        relay: RelayFixture,
        protocol_factory: Callable[[], Peer] = EchoProtocol,
        config: SessionConfig = SERVICE_CONFIG,
    ) -> LegacyService:
        service = LegacyService(self.reactor, protocol_factory, config)
        self.services.append(service)
        await service.connect(relay.control_port)
        return service

    async def visitor(self, port: int) -> Visitor:
        visitor = await connect_visitor(self.reactor, port)
        self.visitors.append(visitor)
        return visitor

    async def echoed(
        self, relay: RelayFixture, first: bytes = b"x"
    ) -> tuple[LegacyService, Visitor, EchoProtocol]:
        """
        An echoing service on ``relay`` and a visitor whose ``first`` bytes
        have come back: the service, the visitor and the service's side of
        the stream.
        """
        service = await self.service(relay)
        visitor = await self.visitor(service.port)
        visitor.send(first)
        await bounded(visitor.wait_received(len(first)), self.reactor)
        echo = await service.stream(0)
        return service, visitor, echo  # type: ignore[return-value]

    async def close(self) -> None:
        """Abort what is still open, stop the relays, and wait for every socket."""
        for visitor in self.visitors:
            if visitor.is_open:
                visitor.transport.abortConnection()  # type: ignore[union-attr]
        for service in self.services:
            service.abort()
        for relay in self.relays:
            await bounded(relay.stop(), self.reactor)
        for visitor in self.visitors:
            if visitor.transport is not None:
                await bounded(visitor.lost, self.reactor)
        for service in self.services:
            if service.mux is not None and service.mux.transport is not None:
                await bounded(service.mux.socket_lost, self.reactor)
        self.visitors.clear()
        self.services.clear()
        self.relays.clear()


__all__ = [
    "WAIT",
    "bounded",
    "wait_for",
    "wait_stable",
    "fd_count",
    "free_port_block",
    "registered_ports",
    "session_for",
    "Peer",
    "EchoProtocol",
    "Visitor",
    "LegacyService",
    "ServiceMux",
    "connect_visitor",
    "echo_once",
    "Cleanup",
]
