"""
``ResolvedEndpoint`` (tcprelay expose's LOCAL resolved once): both ways of
connecting try the addresses in order, fall back on a connection error,
and put the address that worked first for the next visitor.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure

from tcprelay.agent.expose import ResolvedEndpoint

V6 = (socket.AF_INET6, "::1")
V4 = (socket.AF_INET, "127.0.0.1")


def _endpoint() -> tuple[MemoryReactor, ResolvedEndpoint]:
    reactor = MemoryReactor()
    endpoint = ResolvedEndpoint(reactor, "127.0.0.1", 7000)
    endpoint.addresses = [V6, V4]
    return reactor, endpoint


def test_connect_protocol_falls_back_and_prefers_what_worked() -> None:
    reactor, endpoint = _endpoint()
    protocol = Protocol()
    failures: list[Failure] = []
    endpoint.connect_protocol(protocol, failures.append)
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("::1", 7000)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    host, _, factory, _, _ = reactor.tcpClients[1]
    assert host == "127.0.0.1"
    assert factory.buildProtocol(None) is protocol
    assert endpoint.addresses == [V4, V6]
    assert failures == []


def test_connect_protocol_reports_when_no_address_works() -> None:
    reactor, endpoint = _endpoint()
    failures: list[Failure] = []
    endpoint.connect_protocol(Protocol(), failures.append)
    for index in range(2):
        factory = reactor.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert len(failures) == 1 and failures[0].check(ConnectionRefusedError)
    assert endpoint.addresses == [V6, V4]


def test_connect_falls_back_and_prefers_what_worked() -> None:
    reactor, endpoint = _endpoint()
    results: list[Any] = []
    endpoint.connect(Factory.forProtocol(Protocol)).addBoth(results.append)
    first = reactor.tcpClients[0][2]
    first.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    host, _, second, _, _ = reactor.tcpClients[1]
    assert host == "127.0.0.1"
    second.buildProtocol(None).makeConnection(StringTransport())
    assert results and isinstance(results[0], Protocol)
    assert endpoint.addresses == [V4, V6]


def test_a_link_local_address_keeps_its_scope(monkeypatch: Any) -> None:
    """getaddrinfo gives an IPv6 scope id apart from the address: it is kept (``fe80::1%2``), or a link-local LOCAL could not be connected."""
    infos = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", 7000, 0, 2)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 7000, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 7000)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: infos)
    endpoint = ResolvedEndpoint(MemoryReactor(), "somewhere", 7000)
    assert endpoint.addresses == [
        (socket.AF_INET6, "fe80::1%2"),
        (socket.AF_INET6, "::1"),
        (socket.AF_INET, "127.0.0.1"),
    ]


def test_connect_protocol_leaves_no_reference_cycle(no_cyclic_gc: None) -> None:
    """The per-visitor connect attempts form no reference cycle with the protocol: the factory hands the protocol over (keeping no reference, setting no ``factory`` on it) and reference counting frees it."""
    import weakref

    reactor, endpoint = _endpoint()
    protocol = Protocol()
    failures: list[Failure] = []
    endpoint.connect_protocol(protocol, failures.append)
    factory = reactor.tcpClients[0][2]
    assert factory.buildProtocol(None) is protocol
    assert factory.instance is None  # handed over, not kept
    assert protocol.factory is None  # not told its factory
    assert endpoint.addresses == [V6, V4]
    ref = weakref.ref(factory)
    # a real reactor forgets a finished connector; this one keeps a list
    reactor.tcpClients.clear()
    del factory
    assert ref() is None


def test_a_visitor_whose_local_connection_fails_is_reset_and_finished(no_cyclic_gc: None) -> None:
    """When no LOCAL address works: the visitor's stream is reset, and the splice finishes like any other (on_splice_done, nothing left active, its objects freed without the cyclic collector)."""
    import weakref

    from twisted.internet.task import Clock

    from tcprelay.agent.expose import LocalForwarder
    from tcprelay.mux import frames as f
    from tcprelay.mux.frames import ErrorCode, Rst
    from tcprelay.mux.session import Role, SessionConfig
    from tcprelay.protocol import MuxProtocol
    from tests.mux_helpers import decode_all

    reactor, endpoint = _endpoint()
    done: list[Any] = []
    forwarder = LocalForwarder(endpoint, on_splice_done=done.append)
    mux = MuxProtocol(
        Role.SERVER, Clock(), SessionConfig(heartbeat=False), acceptor=lambda s: forwarder(s, None)
    )
    wire = StringTransport()
    mux.makeConnection(wire)
    mux.dataReceived(f.encode_syn(3) + f.encode_data_header(3, 2, False) + b"hi")
    assert len(forwarder.active) == 1
    splice_ref = weakref.ref(next(iter(forwarder.active)))
    wire.clear()
    for index in range(2):  # both addresses refused
        reactor.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert Rst(3, ErrorCode.CANCEL) in decode_all(wire.value())
    assert forwarder.active == set()
    assert len(done) == 1 and done[0] is splice_ref()
    done.clear()
    reactor.tcpClients.clear()  # as a real reactor forgets finished connectors
    assert splice_ref() is None
