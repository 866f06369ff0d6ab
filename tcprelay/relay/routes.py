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

__all__ = ["NAME_KINDS", "NameRoute", "PortRoute", "wildcards"]

NAME_KINDS = ("http", "tls")
"""The kinds of named routes: by HTTP ``Host``, by TLS SNI."""


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


@implementer(IRoute)
@attrs.frozen(cache_hash=True)
class NameRoute:
    """
    A host name on a shared entrance: visitors of the ``http`` entrance
    whose ``Host`` is ``name``, or of the ``tls`` entrance whose SNI is.
    ``name`` is normalised (:func:`tcprelay.relay.sniff.normalise_name`)
    and may be a wildcard (``*.app.example.com``).
    """

    kind: str
    name: str
    url: str = attrs.field(default="", eq=False)
    """The public URL given to the agent (not part of the key)."""
    port: int = attrs.field(default=0, eq=False)
    """The entrance's public port (for the agent's address; not part of the key)."""

    @property
    def address(self) -> str:
        """The public URL."""
        return self.url

    @property
    def host(self) -> str:
        return self.name


def wildcards(name: str) -> list[str]:
    """
    The wildcard names that cover ``name``, most specific first:
    ``a.b.example.com`` -> ``*.b.example.com``, ``*.example.com``, ``*.com``.
    """
    labels = name.split(".")
    return ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]
