"""
The ports entrance: one public listener per port route.

A route claimed by a door (:meth:`tcprelay.relay.core.Relay.claim_port`)
gets its listener here; every visitor accepted on it is spliced to a new
stream of the route's tunnel.  Listeners are eager
(:func:`tcprelay._fastio.listen_eager`): what a visitor sent before it was
accepted leaves with the stream's SYN, before Twisted builds the visitor's
transport.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol

from tcprelay._fastio import listen_eager
from tcprelay.relay.routes import PortRoute

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["PUBLIC_BACKLOG", "PortEntrance", "PortVisitorFactory"]

PUBLIC_BACKLOG = 4096
"""listen() backlog of public ports (the kernel caps it at somaxconn)."""


class PortVisitorFactory(Factory):
    """Accepts visitors on one public port and splices each to its route's tunnel."""

    noisy = False

    def __init__(self, relay: Relay, route: PortRoute, mirror: bool = False) -> None:
        self.relay = relay
        self.route = route
        self.closed = False
        self.mirror = mirror
        """The port is another cluster node's: visitors are forwarded there."""

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        return self.build_eager(addr, b"")

    def build_eager(self, addr: interfaces.IAddress, first: bytes) -> Optional[Protocol]:
        """A visitor accepted by the EagerPort, with what it already sent."""
        relay = self.relay
        tunnel = None if self.closed else relay.registry.lookup(self.route)
        if tunnel is None:
            cluster = relay.cluster
            if cluster is None or self.closed or not cluster.forwards_port(self.route.port):
                relay.stats.visitors_refused += 1
                return None
            # None when the owner was announced before this node heard of it:
            # the forward asks Redis where it is
            owner = cluster.port_owner(self.route.port)
            dialled = IPv4Address("TCP", relay.config.public_interface or "0.0.0.0", self.route.port)
            splice = cluster.forward("port", self.route.name, owner, addr, dialled, first)
            return splice.visitor  # type: ignore[no-any-return]
        guard = relay.guard
        route = self.route
        if not guard.admit_visitor(route, tunnel, addr):
            return None  # counted and logged; no stream was opened
        protocol = relay.splice_visitor(tunnel, addr, first)
        if protocol is None:
            guard.not_spliced(route, addr)
            return None
        guard.spliced(route, addr, protocol.splice)
        return protocol  # type: ignore[no-any-return]


class PortEntrance:
    """The listeners of every port route (no registry of its own)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._listening: dict[PortRoute, tuple[Any, PortVisitorFactory]] = {}

    def listen(self, route: PortRoute) -> None:
        """Start ``route``'s public listener (or adopt the port's mirror
        listener); raises CannotListenError."""
        relay = self.relay
        entry = self._listening.get(route)
        if entry is not None and entry[1].mirror:
            entry[1].mirror = False
            return
        factory = PortVisitorFactory(relay, route)
        listener = listen_eager(
            relay.reactor, route.port, factory, PUBLIC_BACKLOG, relay.config.public_interface
        )
        self._listening[route] = (listener, factory)

    def close(self, route: PortRoute) -> Optional[Deferred[None]]:
        """
        Stop ``route``'s listener: fires once it has stopped; None when it
        was not listening (closed already).
        """
        entry = self._listening.pop(route, None)
        if entry is None:
            return None
        listener, factory = entry
        factory.closed = True
        return maybeDeferred(listener.stopListening)

    def mirror(self, port: int) -> bool:
        """
        Listen on ``port``, claimed by another node of the cluster, to
        forward its visitors there; False when it cannot be bound (another
        process, or another node on the same address, has it).
        """
        route = PortRoute(port, self.relay.config.public_host)
        if route in self._listening:
            return True
        factory = PortVisitorFactory(self.relay, route, mirror=True)
        try:
            listener = listen_eager(
                self.relay.reactor, port, factory, PUBLIC_BACKLOG, self.relay.config.public_interface
            )
        except CannotListenError:
            return False
        self._listening[route] = (listener, factory)
        return True

    def unmirror(self, port: int) -> Optional[Deferred[None]]:
        """Stop forwarding ``port`` (no longer claimed elsewhere); None when it had no mirror."""
        entry = self._listening.get(PortRoute(port))
        if entry is None or not entry[1].mirror:
            return None
        return self.close(PortRoute(port))

    def listening(self, route: PortRoute) -> bool:
        """Whether ``route`` has its listener."""
        return route in self._listening

    def __len__(self) -> int:
        return len(self._listening)
