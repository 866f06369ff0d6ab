"""
Example: a real tcprelay relay inside a pytest(-twisted) test.

Copy this into your own suite.  pytest-twisted runs the reactor but has no
``reactor`` fixture, so the module defines one (or put it in your
conftest.py).  Run it with ``pytest`` (pytest-twisted installed).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from tcprelay.testing import RelayFixture


@pytest.fixture
def reactor():  # type: ignore[no-untyped-def]
    """The reactor pytest-twisted runs."""
    from twisted.internet import reactor

    return reactor


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


@pytest_twisted.ensureDeferred
async def test_greeter_sees_the_visitor_address(reactor) -> None:  # type: ignore[no-untyped-def]
    """A factory served through a real relay greets a visitor with that visitor's own address and echoes its bytes."""
    relay = await RelayFixture.start(reactor)
    try:
        port = await relay.serve(Factory.forProtocol(Greeter))
        public = port.getHost()
        endpoint = TCP4ClientEndpoint(reactor, public.host, public.port, timeout=5)
        visitor = Visitor()
        await connectProtocol(endpoint, visitor)
        local = visitor.transport.getHost()  # type: ignore[union-attr]
        greeting = f"hello {local.host}:{local.port}\n".encode()
        visitor.transport.write(b"ping")  # type: ignore[union-attr]
        # every wait bounded: pytest-twisted has no timeout of its own
        received = await visitor.wait_for(len(greeting) + 4).addTimeout(5, reactor)
        assert received == greeting + b"ping"
        visitor.transport.loseConnection()  # type: ignore[union-attr]
        await visitor.closed.addTimeout(5, reactor)
    finally:
        await relay.stop()
