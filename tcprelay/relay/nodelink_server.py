"""
The receiving end of the node links of a cluster: where a node listens
for the other nodes (:func:`node_listen_endpoint`, ``--node-address``),
and :class:`NodeLinkProtocol`, which checks a link's header
(:mod:`tcprelay.relay.nodelink`) and PROXY v2 header, then splices the
visitor it brings to the local tunnel of its route.  The sending end is
:meth:`tcprelay.relay.cluster.Cluster.forward`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import interfaces
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay.relay.nodelink import LinkError, LinkHeader, LinkHeaderReader
from tcprelay.relay.routes import PortRoute

if TYPE_CHECKING:
    from tcprelay.relay.cluster import Cluster

__all__ = ["NodeLinkFactory", "NodeLinkProtocol", "node_listen_endpoint"]


def _address(host: str, port: int) -> interfaces.IAddress:
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def node_listen_endpoint(reactor: Any, host: str, port: int) -> interfaces.IStreamServerEndpoint:
    """Where a node listens for other nodes: ``port`` on ``host`` when it is
    an IP address of this machine, else on every interface."""
    if isIPv6Address(host):
        return TCP6ServerEndpoint(reactor, port, interface=host)
    if isIPAddress(host):
        return TCP4ServerEndpoint(reactor, port, interface=host)
    return TCP4ServerEndpoint(reactor, port)


# -- the receiving end of a node link ------------------------------------------------


class NodeLinkProtocol(Protocol):
    """
    A connection from another node: a link header, a PROXY v2 header, then
    a visitor of a route this node must hold (else refused: no second hop).
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._reader: Optional[LinkHeaderReader] = None
        self._proxy: Optional[hs.ProxyV2Reader] = None
        self._header: Optional[LinkHeader] = None
        self._timer: Optional[interfaces.IDelayedCall] = None

    def connectionMade(self) -> None:
        cluster = self.cluster
        if cluster.secret is None:
            self._refuse("this node does not know the cluster secret yet")
            return
        self._reader = LinkHeaderReader(cluster.secret, time.time())
        self._timer = cluster.reactor.callLater(10, self._refuse, "no link header in time")

    def _refuse(self, why: str) -> None:
        self._timer = None
        cluster = self.cluster
        cluster.stats.links_refused += 1
        peer = self.transport.getPeer() if self.transport is not None else None
        cluster.log.info(
            "cluster: node link from {peer} refused: {why}",
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            why=why,
        )
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        try:
            if self._header is None:
                assert self._reader is not None
                got = self._reader.feed(data)
                if got is None:
                    return
                self._header, data = got
                self._proxy = hs.ProxyV2Reader()
            assert self._proxy is not None
            rest = self._proxy.feed(data)
        except (LinkError, hs.HandshakeError) as e:
            self._stop_timer()
            self._refuse(str(e))
            return
        if rest is None:
            return
        self._stop_timer()
        self._visitor(self._header, self._proxy.header, rest)

    def _visitor(self, header: LinkHeader, proxy: Optional[hs.ProxyHeader], first: bytes) -> None:
        cluster = self.cluster
        relay = cluster.relay
        if header.kind == "port":
            tunnel = relay.registry.lookup(PortRoute(int(header.name))) if header.name.isdigit() else None
        else:
            tunnel = relay.find_named(header.kind, header.name)
        if tunnel is None or relay.draining:
            self._refuse(f"{header.kind} {header.name} is not served by this node")
            return
        dialled: Optional[interfaces.IAddress] = None
        if proxy is not None:
            peer: interfaces.IAddress = _address(proxy.source_host, proxy.source_port)
            dialled = _address(proxy.dest_host, proxy.dest_port)
        else:
            peer = self.transport.getPeer()
        guard = relay.guard
        route = tunnel.route
        if not guard.admit_visitor(route, tunnel, peer):
            self.transport.abortConnection()
            return
        protocol = relay.splice_visitor(tunnel, peer, first, dialled)
        if protocol is None:
            guard.not_spliced(route, peer)
            self.transport.abortConnection()
            return
        guard.spliced(route, peer, protocol.splice)
        cluster.stats.forwarded_in += 1
        transport = self.transport
        transport.protocol = protocol
        protocol.makeConnection(transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timer()


class NodeLinkFactory(Factory):
    """Accepts other nodes' visitors on ``--node-address``."""

    noisy = False

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        if self.cluster.relay.draining:
            return None
        return NodeLinkProtocol(self.cluster)
