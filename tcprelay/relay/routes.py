"""
Routes: how visitors find a tunnel (:class:`~tcprelay.relay.interfaces.IRoute`).

A route is a value, compared and hashed by what it names, so that the
registry, leases and status can key by it; the listener that serves a port
route belongs to the ports entrance (:mod:`tcprelay.relay.entrances.ports`).
"""

from __future__ import annotations

import attrs
from zope.interface import implementer

from tcprelay.relay.interfaces import IRoute

__all__ = ["PortRoute"]


@implementer(IRoute)
@attrs.frozen(cache_hash=True)
class PortRoute:
    """A dedicated public port: every visitor connection to it is the route's."""

    port: int
    host: str = attrs.field(default="localhost", eq=False)
    """The public host name written into the address (not part of the key)."""

    kind = "port"

    @property
    def name(self) -> str:
        """The port number, as text."""
        return str(self.port)

    @property
    def address(self) -> str:
        """``HOST:PORT``, as given to the agent."""
        return f"{self.host}:{self.port}"
