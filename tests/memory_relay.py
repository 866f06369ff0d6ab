"""
The relay on a clock: :class:`tcprelay.testing.RelayFixture` built on a
``MemoryReactorClock``, so that time passes only when a test advances it.

Nothing listens and nothing connects: the control factory and the public
ports' factories are taken from the memory reactor, services are
:class:`~tests.muxpeer.ScriptedPeer`\\ s on StringTransports and visitors
are :class:`MemoryVisitor`\\ s.  A StringTransport only records that it was
closed, so :meth:`MemoryRelay.settle` delivers ``connectionLost`` to every
protocol whose transport the relay closed, as a real reactor would.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tcprelay.testing import RelayFixture
from tests.muxpeer import MemoryWire, ScriptedPeer

HOST = "127.0.0.1"


class HalfCloseTransport(StringTransport):
    """A visitor's StringTransport that, as TCP does, can be half-closed:
    ``loseWriteConnection`` records it in ``write_closed``."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class MemoryVisitor:
    """A visitor of a public port: the relay's protocol on a StringTransport."""

    def __init__(self, protocol: Protocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.received = bytearray()
        self.lost = False

    def send(self, data: bytes) -> None:
        """Bytes from the visitor to the relay."""
        self.protocol.dataReceived(data)

    def read(self) -> bytes:
        """Take what the relay wrote to the visitor."""
        data = self.transport.value()
        self.transport.clear()
        self.received += data
        return data

    @property
    def closed_by_relay(self) -> bool:
        return bool(self.transport.disconnecting)

    def leave(self, clean: bool = True) -> None:
        """The visitor closes its connection (clean) or it is reset."""
        if not self.lost:
            self.lost = True
            reason = ConnectionDone() if clean else ConnectionLost()
            self.protocol.connectionLost(Failure(reason))


class MemoryRelay:
    """A relay (``twistd tcprelay`` options ``args``) on a memory reactor and clock."""

    def __init__(self, *args: str, ports: int = 2, **kw: Any) -> None:
        self.clock = MemoryReactorClock()
        started = RelayFixture.start(self.clock, *args, ports=ports, **kw)
        assert started.called, "the fixture did not start on the memory reactor"
        self.fixture: RelayFixture = started.result
        self.relay = self.fixture.relay
        self.peers: list[ScriptedPeer] = []
        self.visitors: list[MemoryVisitor] = []
        self.unscripted: list[Protocol] = []
        """Control connections made by :meth:`control_refused`."""
        self._next_port = 40000

    def _address(self, host: str = HOST) -> Any:
        self._next_port += 1
        if ":" in host:
            return IPv6Address("TCP", host, self._next_port)
        return IPv4Address("TCP", host, self._next_port)

    def _factory(self, port: int) -> Any:
        for listened, factory, _backlog, _interface in reversed(self.clock.tcpServers):
            if listened == port:
                return factory
        raise KeyError(f"nothing listened on {port}")

    def service(self, host: str = HOST, **kw: Any) -> ScriptedPeer:
        """A scripted service connected to the control port from ``host`` (no handshake yet)."""
        address = self._address(host)
        protocol = self._factory(0).buildProtocol(address)
        assert protocol is not None, "the relay refused the control connection"
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        peer = ScriptedPeer.facing(protocol, transport, now=self.clock.seconds(), **kw)
        self.peers.append(peer)
        return peer

    def registered(self, **kw: Any) -> tuple[ScriptedPeer, int]:
        """A service that did the legacy handshake, and its public port."""
        peer = self.service(**kw)
        kind, address = peer.legacy_handshake()
        assert kind == "address", address
        return peer, int(address.rpartition(":")[2])

    def control_refused(self, host: str = HOST) -> bool:
        """Whether the control factory refuses a connection from ``host`` (else it is connected, unscripted)."""
        address = self._address(host)
        protocol = self._factory(0).buildProtocol(address)
        if protocol is None:
            return True
        protocol.makeConnection(StringTransport(peerAddress=address))
        self.unscripted.append(protocol)
        return False

    def visitor(self, port: int, host: str = HOST, first: bytes = b"") -> Optional[MemoryVisitor]:
        """A visitor from ``host`` accepted at public ``port`` (None when the relay refused it)."""
        address = self._address(host)
        protocol = self._factory(port).build_eager(address, first)
        if protocol is None:
            return None
        transport = HalfCloseTransport(
            peerAddress=address, hostAddress=IPv4Address("TCP", HOST, port)
        )
        protocol.makeConnection(transport)
        visitor = MemoryVisitor(protocol, transport)
        self.visitors.append(visitor)
        return visitor

    def settle(self, rounds: int = 50) -> None:
        """
        Exchange what every peer and visitor has pending, and lose the
        connections the relay closed, until nothing changes (no time passes).
        """
        for _ in range(rounds):
            changed = False
            for peer in self.peers:
                before = (len(peer.events), peer.eof)
                wire = peer.wire
                assert isinstance(wire, MemoryWire)
                if not peer.eof:
                    peer.exchange()
                elif wire.tr.disconnecting and not wire.lost:
                    wire.lose(ConnectionDone())  # a deaf peer's socket closes too
                    changed = True
                changed |= (len(peer.events), peer.eof) != before
            for visitor in self.visitors:
                if visitor.read():
                    changed = True
                if visitor.closed_by_relay and not visitor.lost:
                    visitor.leave()
                    changed = True
            if not changed:
                return
        raise AssertionError("the relay never settled")

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """
        Let ``seconds`` pass on the relay's clock, ``step`` at a time (a
        timer that re-arms itself runs once per step, as it would in real
        time), settling after each step.
        """
        end = self.clock.seconds() + seconds
        while self.clock.seconds() + step < end:
            self.clock.advance(step)
            self.settle()
        self.clock.advance(max(0.0, end - self.clock.seconds()))
        self.settle()

    def listening(self, port: int) -> bool:
        """Whether public ``port`` has its listener."""
        tunnel = self.relay.tunnel_at(port)
        return tunnel is not None and self.relay.ports.listening(tunnel.route)
