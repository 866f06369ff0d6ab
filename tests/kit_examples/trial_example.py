"""
Example: a real tcprelay relay inside a Trial test.

Copy this into your own suite and run it with ``trial`` (or ``python -m
twisted.trial``).  Trial itself checks that the test leaves no delayed
calls and no open sockets behind: ``relay.stop`` (added as a cleanup)
closes everything the relay and the served factories opened.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from tcprelay.testing import RelayFixture


class Greeter(Protocol):
    """The service under test: greets each visitor with the address it sees, then echoes."""

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.transport.write(f"hello {peer.host}:{peer.port}\n".encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Visitor(Protocol):
    """A client that keeps what it receives; :meth:`wait_for` fires once enough is in."""

    def __init__(self) -> None:
        self.received = b""
        self._waiting: tuple[int, Deferred[bytes]] | None = None
        self.closed: Deferred[None] = Deferred()

    def wait_for(self, size: int) -> Deferred[bytes]:
        """Fires with everything received once there are at least ``size`` bytes."""
        d: Deferred[bytes] = Deferred()
        self._waiting = (size, d)
        self._check()
        return d

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        if self._waiting is not None and len(self.received) >= self._waiting[0]:
            (_, d), self._waiting = self._waiting, None
            d.callback(self.received)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class GreeterTests(unittest.TestCase):
    """The greeter, served through a real relay on loopback."""

    async def test_greeter_sees_the_visitor_address(self) -> None:
        """A factory served through a real relay greets a visitor with that visitor's own address and echoes its bytes."""
        relay = await RelayFixture.start(reactor)
        self.addCleanup(relay.stop)
        port = await relay.serve(Factory.forProtocol(Greeter))
        public = port.getHost()

        endpoint = TCP4ClientEndpoint(reactor, public.host, public.port, timeout=5)
        visitor = Visitor()
        await connectProtocol(endpoint, visitor)
        local = visitor.transport.getHost()  # type: ignore[union-attr]
        greeting = f"hello {local.host}:{local.port}\n".encode()
        visitor.transport.write(b"ping")  # type: ignore[union-attr]
        self.assertEqual(await visitor.wait_for(len(greeting) + 4), greeting + b"ping")
        visitor.transport.loseConnection()  # type: ignore[union-attr]
        await visitor.closed
