"""
:class:`tcprelay.forward.Splice` on a real loopback TCP connection: the
socket side gets TCP_NODELAY whichever way it was made (accepted by the
relay, or connected with ``connectTCP`` as ``tcprelay expose`` does for the
local service), and a side on a transport without TCP options is left alone.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from tcprelay._fastio import lose_write_now
from tcprelay.forward import Splice
from tests.relay_helpers import bounded


class _Accepted(Protocol):
    def __init__(self, made: Deferred[Any]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self.transport)


@pytest_twisted.ensureDeferred
async def test_connected_tcp_side_gets_nodelay_and_forwards(reactor: Any) -> None:
    """A splice connected out with connectTCP (expose's local side) turns Nagle off and still forwards."""
    made: Deferred[Any] = Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: _Accepted(made)), interface="127.0.0.1")
    splice = Splice()
    stream_side = StringTransport()  # stands in for the mux stream (no TCP options)
    splice.b.makeConnection(stream_side)
    seen: Deferred[Any] = Deferred()
    splice.connected = seen.callback
    try:
        reactor.connectTCP("127.0.0.1", port.getHost().port, _OneShotFactory(splice.a))
        side = await bounded(seen, reactor)
        server_transport = await bounded(made, reactor)
        assert side is splice.a
        assert splice.a.transport.getTcpNoDelay()
        # the other end of the connection is not ours to change
        assert not server_transport.getTcpNoDelay()
        splice.b.dataReceived(b"from the stream")
        assert splice.bytes_ba == len(b"from the stream")
    finally:
        if splice.a.transport is not None:
            splice.a.transport.abortConnection()
        await port.stopListening()


class _OneShotFactory(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance

    def startedConnecting(self, connector: Any) -> None:
        pass

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        pass

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        pass


@implementer(interfaces.IHalfCloseableProtocol)
class _HalfClose(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.write_lost = 0
        self.eof: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        self.write_lost += 1


async def _tcp_pair(reactor: Any) -> tuple[Any, _HalfClose, _HalfClose]:
    made: Deferred[Any] = Deferred()
    server = _HalfClose()
    server.connectionMade = lambda: made.callback(server.transport)  # type: ignore[method-assign]
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    client = _HalfClose()
    reactor.connectTCP("127.0.0.1", port.getHost().port, _OneShotFactory(client))
    await bounded(made, reactor)
    return port, server, client


@pytest_twisted.ensureDeferred
async def test_lose_write_now_sends_fin_at_once_when_nothing_is_queued(reactor: Any) -> None:
    """With nothing queued, the FIN leaves at once: writeConnectionLost before returning, no wait for writability, the peer reads EOF; reading goes on."""
    port, server, client = await _tcp_pair(reactor)
    try:
        transport = server.transport
        lose_write_now(transport)
        assert server.write_lost == 1
        assert transport not in reactor.getWriters()
        await bounded(client.eof, reactor)
        client.transport.write(b"still reading")  # type: ignore[union-attr]
        while bytes(server.received) != b"still reading":
            await bounded(_later(reactor), reactor)
        transport.loseConnection()  # both directions done: closes at once
        assert not transport.connected
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_lose_write_now_with_queued_data_sends_it_all_before_the_fin(reactor: Any) -> None:
    """With data still queued in the transport, the FIN waits for it (Twisted's own path): the peer reads every byte, then EOF."""
    port, server, client = await _tcp_pair(reactor)
    try:
        transport = server.transport
        data = bytes(range(256)) * 40_000  # 10 MB: more than the socket buffers take
        transport.write(data)
        assert transport.dataBuffer or transport._tempDataLen  # queued in Twisted
        lose_write_now(transport)
        assert server.write_lost == 0  # not yet: the data goes first
        await bounded(client.eof, reactor, 20)
        assert bytes(client.received) == data
        assert server.write_lost == 1
        transport.loseConnection()
    finally:
        await port.stopListening()


def _later(reactor: Any) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.005, d.callback, None)
    return d
