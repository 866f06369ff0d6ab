"""
The shared entrances: one HTTP and one TLS listener for every named route.

A visitor's first bytes are read (at most :data:`~tcprelay.relay.sniff.HEAD_LIMIT`,
within ``--head-timeout``) until its request head names a ``Host`` (HTTP)
or its ClientHello a server name (TLS, which the relay does not
terminate).  The visitor is then spliced to a new stream of the route's
tunnel exactly as a port route's visitor is, with every byte read so far
forwarded first, unchanged.  A name no route serves is answered with a
small HTTP 404 naming the host, or a TLS ``unrecognized_name`` alert; a
head too large or malformed with 400 (or a ``decode_error`` alert); one
too slow with 408 (TLS: the connection is closed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.application.service import Service
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay._fastio import nodelay
from tcprelay.relay.sniff import (
    MORE,
    UNRECOGNIZED_NAME,
    HelloReader,
    HostReader,
    Name,
    Refusal,
    tls_alert,
)

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["NamedEntrance", "NamedVisitorFactory", "SniffingVisitor"]

_REASONS = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 503: "Service Unavailable"}


def http_answer(status: int, text: str) -> bytes:
    """A complete, closing HTTP/1.1 response with a one-line plain-text body."""
    body = (text + "\n").encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


class SniffingVisitor(Protocol):
    """A visitor of a shared entrance, until its name is known."""

    def __init__(self, factory: NamedVisitorFactory, addr: interfaces.IAddress) -> None:
        self.factory = factory
        self.addr = addr
        self.reader: Union[HostReader, HelloReader] = (
            HostReader() if factory.kind == "http" else HelloReader()
        )
        self._timer: Optional[interfaces.IDelayedCall] = None
        self.done = False
        self._waiting: Optional[list[bytes]] = None
        """Bytes read while the cluster is asked which node serves the name."""
        self._gone = False

    def connectionMade(self) -> None:
        nodelay(self.transport)
        relay = self.factory.relay
        self._timer = relay.reactor.callLater(relay.config.head_timeout, self._too_slow)

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            if self._waiting is not None:
                self._waiting.append(data)
            return
        result = self.reader.feed(data)
        if result is MORE:
            return
        self.done = True
        self._stop_timer()
        if isinstance(result, Refusal):
            self._refuse(result.reason, result.status, result.alert)
            return
        assert isinstance(result, Name)
        self._route(result.name)

    def _route(self, name: str) -> None:
        factory = self.factory
        relay = factory.relay
        tunnel = None if factory.closed else relay.find_named(factory.kind, name)
        if tunnel is None and relay.cluster is not None and not factory.closed:
            self._forward(name)
            return
        if tunnel is None:
            relay.stats.visitors_unrouted += 1
            self._answer(404, f"no tunnel for {name}", UNRECOGNIZED_NAME)
            return
        transport = self.transport
        assert transport is not None
        guard = relay.guard
        route = tunnel.route
        if not guard.admit_visitor(route, tunnel, self.addr):
            transport.abortConnection()  # counted and logged; no stream was opened
            return
        protocol = relay.splice_visitor(tunnel, self.addr, bytes(self.reader.data))
        if protocol is None:
            guard.not_spliced(route, self.addr)
            self._answer(503, f"{name} cannot take more visitors now", UNRECOGNIZED_NAME)
            return
        guard.spliced(route, self.addr, protocol.splice)
        # From here the connection is the splice's: it reads the rest.
        transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)

    def _forward(self, name: str) -> None:
        """Not a local route: ask the cluster which node serves it, and hand
        the visitor over to that node (or answer 404)."""
        relay = self.factory.relay
        cluster = relay.cluster
        transport = self.transport
        assert cluster is not None and transport is not None
        self._waiting = []
        transport.pauseProducing()
        kind = self.factory.kind

        def found(nodes: Any) -> None:
            waiting, self._waiting = self._waiting or [], None
            transport = self.transport
            if self._gone or transport is None:
                return
            from tcprelay.relay.cluster import choose_node

            node = choose_node(nodes)
            if node is None:
                relay.stats.visitors_unrouted += 1
                self._answer(404, f"no tunnel for {name}", UNRECOGNIZED_NAME)
                transport.resumeProducing()
                return
            first = bytes(self.reader.data) + b"".join(waiting)
            splice = cluster.forward(kind, name, node, self.addr, transport.getHost(), first)
            protocol = splice.visitor
            transport.protocol = protocol  # type: ignore[attr-defined]
            protocol.makeConnection(transport)
            transport.resumeProducing()

        def failed(failure: Failure) -> None:
            from tcprelay.relay.redislink import RedisUnavailable

            self._waiting = None
            if not failure.check(RedisUnavailable):
                self.factory.log.failure("cluster lookup", failure)
            relay.stats.visitors_refused += 1
            if not self._gone and self.transport is not None:
                self._answer(503, f"{name} cannot be found now (the cluster's registry is unreachable)", UNRECOGNIZED_NAME)
                self.transport.resumeProducing()

        cluster.lookup(kind, name).addCallbacks(found, failed)

    def _refuse(self, reason: str, status: int, alert: int) -> None:
        factory = self.factory
        factory.relay.stats.visitors_refused += 1
        factory.note(self.addr, reason)
        self._answer(status, f"bad request: {reason}", alert)

    def _answer(self, status: int, text: str, alert: int) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.factory.kind == "http":
            transport.write(http_answer(status, text))
        elif status != 408:
            reader = self.reader
            version = reader.record_version if isinstance(reader, HelloReader) else b"\x03\x01"
            transport.write(tls_alert(alert, version))
        transport.loseConnection()

    def _too_slow(self) -> None:
        self._timer = None
        if self.done:
            return
        self.done = True
        factory = self.factory
        factory.relay.stats.visitors_refused += 1
        factory.note(self.addr, "no complete request head in time")
        self._answer(408, "request head too slow", 0)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done = True
        self._gone = True
        self._stop_timer()


class NamedVisitorFactory(Factory):
    """Visitors of the ``kind`` (``http`` or ``tls``) entrance."""

    noisy = False
    log = Logger()

    def __init__(self, relay: Relay, kind: str) -> None:
        self.relay = relay
        self.kind = kind
        self.closed = False
        self._noted: dict[str, float] = {}

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        if self.closed or self.relay.draining:
            return None
        return SniffingVisitor(self, addr)

    def note(self, addr: interfaces.IAddress, reason: str) -> None:
        """One log line per source address per minute about refused visitors."""
        host = str(getattr(addr, "host", addr))
        now = self.relay.reactor.seconds()
        if now - self._noted.get(host, -1e9) < 60:
            return
        if len(self._noted) > 4096:
            self._noted = {h: t for h, t in self._noted.items() if now - t < 60}
        self._noted[host] = now
        self.log.info(
            "{kind} visitor {peer} refused: {reason}",
            kind=self.kind,
            peer=host,
            reason=reason,
        )


class NamedEntrance(Service):
    """The listener of a shared entrance (an endpoint string's), as a service."""

    def __init__(self, endpoint: interfaces.IStreamServerEndpoint, factory: NamedVisitorFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: Optional[Any] = None
        self._listen_started = False
        self.setName(factory.kind)

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listen_started:
            return
        self._listen_started = True
        failures: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port

    def startService(self) -> None:
        if not self._listen_started:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        self.factory.closed = True
        self._listen_started = False
        port, self.port = self.port, None
        if port is None:
            return Deferred.fromCoroutine(_nothing())
        return maybeDeferred(port.stopListening)


async def _nothing() -> None:
    return None
