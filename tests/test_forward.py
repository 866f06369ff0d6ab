"""
The splice's TCP side over real loopback connections: a socket side gets
TCP_NODELAY however it was made (a splice side connected out, as ``tcprelay
expose`` connects to the local service), a side on a transport without TCP
options is left alone, and ``lose_write_now`` half-closes at once when
nothing is queued and after the queued bytes otherwise.

Every connection a test opens is closed, and its end awaited, before the
test returns.
"""

from __future__ import annotations

from typing import Any, Optional

import socket
import struct

import pytest
import pytest_twisted
from twisted.internet import interfaces
from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionRefusedError, TimeoutError
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay._fastio import (
    EagerClient,
    EagerPort,
    NoDelayServer,
    close_finished,
    close_now,
    connect_eager,
    listen_eager,
    lose_write_now,
)
from tcprelay.forward import FEED_READ_SIZE, Splice
from tcprelay.mux.frames import MAX_PAYLOAD
from tests.relay_helpers import bounded, wait_for


@implementer(interfaces.IHalfCloseableProtocol)
class _HalfClose(Protocol):
    """Records what it reads and hears about both directions closing."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.write_lost = 0
        self.made: Deferred[None] = Deferred()
        self.eof: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof.callback(None)

    def writeConnectionLost(self) -> None:
        self.write_lost += 1

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


class _Pair:
    """A listening port and one connection to it: ``server`` and ``client``."""

    def __init__(self, reactor: Any, client: Protocol) -> None:
        self.reactor = reactor
        self.server = _HalfClose()
        self.client = client
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: self.server), interface="127.0.0.1"
        )

    async def connect(self) -> None:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        await bounded(connectProtocol(endpoint, self.client), self.reactor)
        await bounded(self.server.made, self.reactor)

    async def close(self) -> None:
        """Abort whatever is still open, wait for the server side to end (if
        it ever began), and stop listening whatever happened."""
        try:
            for protocol in (self.server, self.client):
                transport = protocol.transport
                if transport is not None and transport.connected:  # type: ignore[attr-defined]
                    transport.abortConnection()  # type: ignore[attr-defined]
            if self.server.transport is not None:
                await bounded(self.server.lost, self.reactor)
        finally:
            await self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connected_tcp_side_gets_nodelay_and_forwards(reactor: Any) -> None:
    """A splice side connected out over TCP turns Nagle off, reads whole muxado frames at a time, and forwards."""
    splice = Splice()
    splice.visitor.makeConnection(StringTransport())  # stands in for the mux stream (no TCP options)
    seen: Deferred[Any] = Deferred()
    splice.on_linked = lambda sp: seen.callback(sp.service)
    pair = _Pair(reactor, splice.service)
    try:
        await pair.connect()
        assert await bounded(seen, reactor) is splice.service
        assert splice.service.transport.getTcpNoDelay()
        assert splice.service.transport.bufferSize == FEED_READ_SIZE == 4 * MAX_PAYLOAD
        splice.visitor.dataReceived(b"from the stream")
        await wait_for(
            reactor, lambda: bytes(pair.server.received) == b"from the stream", what="the bytes"
        )
        assert splice.bytes_to_service == len(b"from the stream")
    finally:
        await pair.close()


@pytest_twisted.async_yield_fixture
async def tcp(reactor: Any):  # type: ignore[no-untyped-def]
    """A connected pair of half-closeable protocols, closed after the test."""
    pair = _Pair(reactor, _HalfClose())
    try:
        await pair.connect()
        yield pair
    finally:
        await pair.close()


@pytest_twisted.ensureDeferred
async def test_lose_write_now_sends_fin_at_once_when_nothing_is_queued(
    reactor: Any, tcp: _Pair
) -> None:
    """With nothing queued, the FIN leaves at once: writeConnectionLost before returning, no wait for writability, the peer reads EOF; reading goes on."""
    server, client, transport = tcp.server, tcp.client, tcp.server.transport
    lose_write_now(transport)
    assert server.write_lost == 1
    assert transport not in reactor.getWriters()
    await bounded(client.eof, reactor)
    client.transport.write(b"still reading")  # type: ignore[union-attr]
    await wait_for(
        reactor, lambda: bytes(server.received) == b"still reading", what="the bytes"
    )
    transport.loseConnection()  # type: ignore[union-attr]
    # both directions were done: Twisted closed it at once
    assert not transport.connected  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_lose_write_now_with_queued_data_sends_it_all_before_the_fin(
    reactor: Any, tcp: _Pair
) -> None:
    """With data still queued in the transport, the FIN waits for it (Twisted's own path): the peer reads every byte, then EOF."""
    server, client, transport = tcp.server, tcp.client, tcp.server.transport
    data = bytes(range(256)) * 40_000  # 10 MB: more than the socket buffers take
    transport.write(data)  # type: ignore[union-attr]
    assert transport.dataBuffer or transport._tempDataLen  # type: ignore[union-attr]
    lose_write_now(transport)
    assert server.write_lost == 0  # not yet: the data goes first
    await bounded(client.eof, reactor, 20)
    assert bytes(client.received) == data
    assert server.write_lost == 1



@pytest_twisted.ensureDeferred
async def test_close_now_after_the_peers_eof_closes_cleanly_at_once(
    reactor: Any, tcp: _Pair
) -> None:
    """Once the peer's EOF was read and nothing is queued, close_now closes in one step: connectionLost (clean) before it returns, and the peer reads the last bytes then EOF, not a reset."""
    server, client, transport = tcp.server, tcp.client, tcp.server.transport
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await bounded(server.eof, reactor)
    transport.write(b"last words")  # type: ignore[union-attr]
    await wait_for(reactor, lambda: not transport.dataBuffer and not transport._tempDataLen)  # type: ignore[union-attr]
    assert close_now(transport)
    assert server.lost.called and not transport.connected  # type: ignore[union-attr]
    await bounded(client.eof, reactor)
    assert bytes(client.received) == b"last words"


class _ShutdownSpy:
    """Wraps a socket, counting ``shutdown`` calls."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        self._sock.shutdown(how)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest_twisted.ensureDeferred
async def test_close_finished_closes_without_a_shutdown(reactor: Any, tcp: _Pair) -> None:
    """Both directions over (our FIN sent, the peer's EOF read): close_finished closes at once with close() alone, and the peer sees a clean end."""
    server, client, transport = tcp.server, tcp.client, tcp.server.transport
    spy = _ShutdownSpy(transport.socket)  # type: ignore[union-attr]
    transport.socket = spy  # type: ignore[union-attr]
    lose_write_now(transport)
    await bounded(client.eof, reactor)
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await bounded(server.eof, reactor)
    close_finished(transport)
    assert server.lost.called
    assert spy.shutdowns == [socket.SHUT_WR]  # the FIN; none at the close


@pytest_twisted.ensureDeferred
async def test_close_now_refuses_while_data_is_queued(reactor: Any, tcp: _Pair) -> None:
    transport = tcp.server.transport
    transport.write(bytes(10_000_000))  # type: ignore[union-attr]  # more than the socket takes
    assert not close_now(transport)
    assert transport.connected  # type: ignore[union-attr]
    assert not close_now(StringTransport())


class _EagerFactory(Factory):
    """Records build_eager calls; refuses (or raises) when told to."""

    def __init__(self, refuse: bool = False, fail: int = 0) -> None:
        self.refuse = refuse
        self.fail = fail
        self.calls: list[tuple[Any, bytes]] = []
        self.protocols: list[_HalfClose] = []

    def build_eager(self, addr: Any, first: bytes) -> Optional[_HalfClose]:
        self.calls.append((addr, first))
        if self.fail:
            self.fail -= 1
            raise RuntimeError("a bug in the factory")
        protocol = None if self.refuse else _HalfClose()
        if protocol is not None:
            self.protocols.append(protocol)
        return protocol

    async def served(self, reactor: Any) -> _HalfClose:
        """The first protocol built, once its connection is made."""
        await wait_for(reactor, lambda: self.protocols, what="the accept")
        await bounded(self.protocols[0].made, reactor)
        return self.protocols[0]


async def _abort(reactor: Any, protocol: _HalfClose) -> None:
    """Abort a served connection and wait until it has ended."""
    protocol.transport.abortConnection()  # type: ignore[union-attr]
    await bounded(protocol.lost, reactor)


def _recv_until_closed(sock: socket.socket) -> bytes:
    try:
        return sock.recv(16)
    except BlockingIOError:
        return b"open"
    except ConnectionResetError:
        return b""


@pytest_twisted.ensureDeferred
async def test_eager_port_hands_early_bytes_to_the_factory_before_the_transport(
    reactor: Any,
) -> None:
    """What a client sent before it was accepted reaches build_eager; the transport (TCP_NODELAY inherited from the listener, no setsockopt of its own) reads the rest as usual."""
    factory = _EagerFactory()
    port = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    client = socket.socket()
    try:
        assert isinstance(port, EagerPort)
        # connect and write before the reactor gets a turn to accept
        client.settimeout(5)
        client.connect(("127.0.0.1", port.getHost().port))
        client.sendall(b"spoke first")
        server = await factory.served(reactor)
        [(addr, first)] = factory.calls
        assert first == b"spoke first"
        assert (addr.host, addr.port) == client.getsockname()
        transport = server.transport
        assert type(transport) is NoDelayServer
        assert transport.getTcpNoDelay()
        transport.setTcpNoDelay(False)  # the override keeps track both ways
        assert not transport.getTcpNoDelay()
        transport.setTcpNoDelay(True)
        assert transport.getTcpNoDelay()
        assert server.received == b""  # only what came later goes to dataReceived
        client.sendall(b" and then more")
        await wait_for(reactor, lambda: server.received == b" and then more", what="the read")
        transport.write(b"reply")  # type: ignore[union-attr]
        client.setblocking(False)
        await wait_for(reactor, lambda: _recv_until_closed(client) == b"reply", what="the reply")
        client.close()
        await bounded(server.eof, reactor)
        transport.loseConnection()  # type: ignore[union-attr]
        await bounded(server.lost, reactor)
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_eager_port_closes_a_refused_client(reactor: Any) -> None:
    factory = _EagerFactory(refuse=True)
    port = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        await wait_for(reactor, lambda: factory.calls, what="the accept")
        [(_, first)] = factory.calls
        assert first == b""  # it had sent nothing
        await wait_for(reactor, lambda: _recv_until_closed(client) == b"", what="the close")
    finally:
        client.close()
        await port.stopListening()


def test_listen_eager_falls_back_to_listen_tcp_on_other_reactors() -> None:
    reactor = MemoryReactor()
    factory = _EagerFactory()
    listen_eager(reactor, 1234, factory, 7, "127.0.0.1")
    [(port, built_by, backlog, interface)] = reactor.tcpServers
    assert (port, built_by, backlog, interface) == (1234, factory, 7, "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_eager_port_survives_a_failing_factory(reactor: Any) -> None:
    """A factory that raises: that client is closed (no descriptor leaks), the error is logged, the next client is served."""
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    factory = _EagerFactory(fail=1)
    port = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    first, second = socket.socket(), socket.socket()
    try:
        first.connect(("127.0.0.1", port.getHost().port))
        first.setblocking(False)
        await wait_for(reactor, lambda: _recv_until_closed(first) == b"", what="the close")
        assert any(e.get("log_failure") is not None or e.get("failure") is not None for e in logged)
        second.connect(("127.0.0.1", port.getHost().port))
        await _abort(reactor, await factory.served(reactor))
    finally:
        globalLogPublisher.removeObserver(logged.append)
        first.close()
        second.close()
        await port.stopListening()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_eager_port_on_ipv6_gives_ipv6_addresses(reactor: Any) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    factory = _EagerFactory()
    port = listen_eager(reactor, 0, factory, 50, "::1")
    client = socket.socket(socket.AF_INET6)
    try:
        client.connect(("::1", port.getHost().port))
        client.sendall(b"v6")
        served = await factory.served(reactor)
        [(addr, first)] = factory.calls
        assert first == b"v6"
        assert isinstance(addr, IPv6Address) and addr.host == "::1"
        assert addr.port == client.getsockname()[1]
        await _abort(reactor, served)
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_eager_port_drops_a_client_reset_before_it_was_served(reactor: Any) -> None:
    """A client that connected and reset before the accept: no protocol is built for it (the next client is)."""
    factory = _EagerFactory()
    port = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    reset, second = socket.socket(), socket.socket()
    try:
        reset.connect(("127.0.0.1", port.getHost().port))
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # RST, before the reactor gets a turn to accept
        second.connect(("127.0.0.1", port.getHost().port))
        second.sendall(b"second")
        served = await factory.served(reactor)
        assert [first for _, first in factory.calls] == [b"second"]
        await _abort(reactor, served)
    finally:
        second.close()
        await port.stopListening()


class _FailsToStart(_HalfClose):
    def __init__(self) -> None:
        super().__init__()
        self.reasons: list[Failure] = []

    def connectionMade(self) -> None:
        raise RuntimeError("a bug in connectionMade")

    def connectionLost(self, reason: Failure) -> None:
        self.reasons.append(reason)
        super().connectionLost(reason)


@pytest_twisted.ensureDeferred
async def test_eager_port_ends_a_connection_whose_set_up_failed(reactor: Any) -> None:
    """A protocol whose connectionMade raises hears connectionLost (so it can end what it started), the client is closed, the port keeps serving."""

    class Factory_(_EagerFactory):
        def build_eager(self, addr: Any, first: bytes) -> Any:
            self.calls.append((addr, first))
            protocol = _FailsToStart()
            self.protocols.append(protocol)
            return protocol

    factory = Factory_()
    port = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    client = socket.socket()
    try:
        client.connect(("127.0.0.1", port.getHost().port))
        client.setblocking(False)
        await wait_for(reactor, lambda: factory.protocols, what="the accept")
        protocol = factory.protocols[0]
        await bounded(protocol.lost, reactor)
        assert len(protocol.reasons) == 1
        await wait_for(reactor, lambda: _recv_until_closed(client) == b"", what="the close")
    finally:
        client.close()
        await port.stopListening()


class _Recorder(ClientFactory):
    """A client factory recording how its one connection attempt went."""

    def __init__(self) -> None:
        self.protocol_: _HalfClose = _HalfClose()
        self.failed: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None

    def buildProtocol(self, addr: Any) -> _HalfClose:
        return self.protocol_

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.reason = reason
        self.failed.callback(None)


class _Served:
    """A loopback listener serving one ``_HalfClose`` (``server``) on ``number``."""

    def __init__(self, reactor: Any, interface: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.server = _HalfClose()
        self.port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: self.server), interface=interface
        )
        self.number: int = self.port.getHost().port

    async def cut(self, client: _HalfClose) -> None:
        """Abort the served connection; wait until ``client`` has lost it."""
        await bounded(self.server.made, self.reactor)
        self.server.transport.abortConnection()  # type: ignore[union-attr]
        await bounded(client.lost, self.reactor)

    async def close(self) -> None:
        transport = self.server.transport
        if transport is not None and transport.connected:  # type: ignore[attr-defined]
            transport.abortConnection()  # type: ignore[attr-defined]
        await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def served(reactor: Any):  # type: ignore[no-untyped-def]
    """A loopback ``_Served``, closed after the test."""
    listener = _Served(reactor)
    try:
        yield listener
    finally:
        await listener.close()


@pytest_twisted.ensureDeferred
async def test_connect_eager_is_connected_on_return_over_loopback(
    reactor: Any, served: _Served
) -> None:
    """To a loopback listener the protocol is connected before connect_eager returns: no reactor pass, no connect timeout left pending; bytes flow both ways."""
    server = served.server
    factory = _Recorder()
    connector = connect_eager(reactor, "127.0.0.1", served.number, factory)
    client = factory.protocol_
    assert client.made.called
    assert isinstance(client.transport, EagerClient) and client.transport.connected
    assert connector.state == "connected"
    assert getattr(connector, "timeoutID", None) is None
    client.transport.write(b"ping")
    await wait_for(reactor, lambda: bytes(server.received) == b"ping", what="the bytes")
    server.transport.write(b"pong")  # type: ignore[union-attr]
    await wait_for(reactor, lambda: bytes(client.received) == b"pong", what="the reply")
    client.transport.loseConnection()
    await bounded(server.eof, reactor)
    server.transport.loseConnection()  # type: ignore[union-attr]
    await bounded(server.lost, reactor)
    await bounded(client.lost, reactor)


@pytest_twisted.ensureDeferred
async def test_connect_eager_reports_refusal_on_a_later_pass(reactor: Any) -> None:
    """A refused connection fails like Twisted's: clientConnectionFailed, after connect_eager has returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    factory = _Recorder()
    connect_eager(reactor, "127.0.0.1", closed_port, factory)
    assert not factory.failed.called
    await bounded(factory.failed, reactor)
    assert factory.reason is not None and factory.reason.check(ConnectionRefusedError)
    assert not factory.protocol_.made.called


@pytest_twisted.ensureDeferred
async def test_connect_eager_waits_for_a_handshake_still_under_way(reactor: Any) -> None:
    """A listener whose accept queue is full drops the SYN: the connect stays under way, is watched for writability like Twisted's, and ends with the connector's timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.socket()
    filler.connect(listener.getsockname())  # fills the queue
    factory = _Recorder()
    try:
        connector = connect_eager(reactor, "127.0.0.1", listener.getsockname()[1], factory, timeout=0.3)
        transport = connector.transport
        assert isinstance(transport, EagerClient) and not transport.connected
        assert transport.doWrite == transport.doConnect
        await bounded(factory.failed, reactor)
        assert factory.reason is not None and factory.reason.check(TimeoutError)
    finally:
        filler.close()
        listener.close()


@pytest_twisted.ensureDeferred
async def test_connect_eager_resolves_names_twisteds_way(reactor: Any, served: _Served) -> None:
    """A host name goes through Twisted's own resolution and connect."""
    factory = _Recorder()
    connect_eager(reactor, "localhost", served.number, factory)
    assert not factory.protocol_.made.called
    await bounded(factory.protocol_.made, reactor)
    await served.cut(factory.protocol_)


@pytest_twisted.ensureDeferred
async def test_connect_eager_ends_a_connection_whose_set_up_failed(
    reactor: Any, served: _Served
) -> None:
    """A protocol whose connectionMade raises during the at-once connect: logged, its socket closed (the server sees the end), connectionLost delivered, as the reactor does for Twisted's own connect."""
    from twisted.logger import globalLogPublisher

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    factory = _Recorder()
    factory.protocol_ = _FailsToStart()
    try:
        connect_eager(reactor, "127.0.0.1", served.number, factory)
        assert len(factory.protocol_.reasons) == 1
        assert any(e.get("log_failure") is not None or e.get("failure") is not None for e in logged)
        await bounded(served.server.eof, reactor)
    finally:
        globalLogPublisher.removeObserver(logged.append)


@pytest_twisted.ensureDeferred
async def test_connect_eager_over_ipv6(reactor: Any) -> None:
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    served = _Served(reactor, "::1")
    factory = _Recorder()
    try:
        connector = connect_eager(reactor, "::1", served.number, factory)
        assert factory.protocol_.made.called
        peer = connector.transport.getPeer()
        assert isinstance(peer, IPv6Address) and peer.host == "::1"
        await served.cut(factory.protocol_)
    finally:
        await served.close()


def test_connect_eager_falls_back_to_connect_tcp_on_other_reactors() -> None:
    memory = MemoryReactor()
    factory = ClientFactory()
    connect_eager(memory, "127.0.0.1", 1234, factory, timeout=5)
    assert memory.tcpClients == [("127.0.0.1", 1234, factory, 5, None)]


@pytest_twisted.ensureDeferred
async def test_connect_eager_reports_an_unusable_address_on_a_later_pass(reactor: Any) -> None:
    """An address connect() itself rejects (a port out of range) fails like a refusal: clientConnectionFailed on a later pass, nothing raised to the caller."""
    factory = _Recorder()
    connect_eager(reactor, "127.0.0.1", 70000, factory)
    await bounded(factory.failed, reactor)
    assert factory.reason is not None and factory.reason.check(ConnectError)


@pytest_twisted.ensureDeferred
async def test_connect_eager_sets_no_timeout_for_a_connection_made_at_once(
    reactor: Any, served: _Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connect timeout is scheduled only for a connection still under way (no DelayedCall created and cancelled per local connection)."""
    factory = _Recorder()
    delays: list[float] = []
    real_call_later = reactor.callLater

    def call_later(delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        delays.append(delay)
        return real_call_later(delay, f, *args, **kwargs)

    monkeypatch.setattr(reactor, "callLater", call_later)
    connect_eager(reactor, "127.0.0.1", served.number, factory, timeout=30)
    monkeypatch.undo()
    assert factory.protocol_.made.called
    assert 30 not in delays
    await served.cut(factory.protocol_)


def test_connect_eager_copes_with_a_factory_that_stops_it_at_once() -> None:
    """A factory whose startedConnecting stops the attempt: no error, the connection is not completed."""
    from twisted.internet import reactor as global_reactor

    class Stopper(_Recorder):
        def startedConnecting(self, connector: Any) -> None:
            connector.stopConnecting()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        factory = Stopper()
        connector = connect_eager(global_reactor, "127.0.0.1", listener.getsockname()[1], factory)
        assert connector.state == "disconnected"
        assert not factory.protocol_.made.called
        assert factory.reason is not None


def test_a_finished_splice_is_freed_without_the_cyclic_collector(no_cyclic_gc: None) -> None:
    """Once both ends are gone the splice, its sides and their transports hold no reference cycle: reference counting frees them at once (left to the cyclic collector, thousands of them made for a full collection that stopped the reactor ~100 ms)."""
    import weakref

    splice = Splice()
    ta, tb = StringTransport(), StringTransport()
    splice.visitor.makeConnection(ta)
    splice.service.makeConnection(tb)
    splice.visitor.dataReceived(b"to b")
    splice.service.dataReceived(b"to a")
    refs = [weakref.ref(o) for o in (splice, splice.visitor, splice.service)]
    splice.visitor.connectionLost(Failure(ConnectionDone()))
    splice.service.connectionLost(Failure(ConnectionDone()))
    assert tb.value() == b"to b" and ta.value() == b"to a"
    del splice
    assert [r() for r in refs] == [None, None, None]


def test_eager_connector_forgets_its_finished_transport() -> None:
    """After the connection is lost (and not reconnected) the connector drops its transport, as Twisted's does after a failed attempt: no connector <-> transport cycle per finished connection."""
    from twisted.internet import reactor as global_reactor

    class Done(ClientFactory):
        def buildProtocol(self, addr: Any) -> Protocol:
            return Protocol()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        connector = connect_eager(global_reactor, "127.0.0.1", listener.getsockname()[1], Done())
        transport = connector.transport
        assert transport is not None and transport.connected
        transport.connectionLost(Failure(ConnectionDone()))
        assert connector.state == "disconnected"
        assert connector.transport is None


@pytest_twisted.ensureDeferred
async def test_eager_port_accepts_a_bounded_batch_per_pass(reactor: Any) -> None:
    """However full its backlog, an EagerPort accepts at most ACCEPT_BATCH connections per reactor pass (Twisted's own batch grows without bound)."""
    from tcprelay._fastio import ACCEPT_BATCH

    factory = _EagerFactory(refuse=True)
    port = listen_eager(reactor, 0, factory, 200, "127.0.0.1")
    clients = [socket.socket() for _ in range(3 * ACCEPT_BATCH + 5)]
    try:
        reactor.removeReader(port)  # this test runs the passes itself
        for client in clients:
            client.connect(("127.0.0.1", port.getHost().port))  # queued in the backlog
        counts = []
        for _ in range(4):
            before = len(factory.calls)
            port.numberAccepts = 10_000  # what Twisted's scaling would reach
            port.doRead()
            counts.append(len(factory.calls) - before)
        assert counts == [ACCEPT_BATCH, ACCEPT_BATCH, ACCEPT_BATCH, 5]
    finally:
        for client in clients:
            client.close()
        await port.stopListening()


def test_splice_done_hooks_run_once_in_order_and_the_deferred_fires() -> None:
    """when_done hooks run in order once both sides closed (a failing one does not stop the rest); done fires; late hooks run at once."""
    from twisted.internet.testing import StringTransport

    from tcprelay.forward import Splice

    splice = Splice()
    calls: list[object] = []
    splice.when_done(lambda _, tag: calls.append(tag), "first")
    splice.when_done(lambda _: 1 / 0)
    splice.when_done(lambda _, tag: calls.append(tag), "second")
    done = splice.done
    for side in (splice.visitor, splice.service):
        side.makeConnection(StringTransport())
    splice.visitor.connectionLost(Failure(ConnectionDone()))
    assert calls == [] and not done.called and not splice.finished
    splice.service.connectionLost(Failure(ConnectionDone()))
    assert calls == ["first", "second"] and done.called and splice.finished
    splice.when_done(lambda _, tag: calls.append(tag), "late")
    assert calls[-1] == "late"
    assert splice.done.called
