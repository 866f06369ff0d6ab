"""
:class:`tcprelay.forward.Splice` on a real loopback TCP connection: the
socket side gets TCP_NODELAY whichever way it was made (accepted by the
relay, or connected with ``connectTCP`` as ``tcprelay expose`` does for the
local service), and a side on a transport without TCP options is left alone.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

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
