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

    def __init__(self, relay: Relay, route: PortRoute) -> None:
        self.relay = relay
        self.route = route
        self.closed = False

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Protocol]:  # type: ignore[override]
        return self.build_eager(addr, b"")

    def build_eager(self, addr: interfaces.IAddress, first: bytes) -> Optional[Protocol]:
        """A visitor accepted by the EagerPort, with what it already sent."""
        relay = self.relay
        tunnel = None if self.closed else relay.registry.lookup(self.route)
        if tunnel is None:
            relay.stats.visitors_refused += 1
            return None
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
        """Start ``route``'s public listener; raises CannotListenError."""
        relay = self.relay
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

    def listening(self, route: PortRoute) -> bool:
        """Whether ``route`` has its listener."""
        return route in self._listening

    def __len__(self) -> int:
        return len(self._listening)
