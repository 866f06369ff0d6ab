"""
The seams of the relay: one core, many doors.

The relay is a table of *routes* (how visitors find a service) pointing at
*tunnels* (a registered service, whatever protocol its agent speaks)::

    agents (doors)                                   visitors (entrances)
    muxado v1 legacy / extended --.            .-- dedicated port  (route: port)
    (later: ssh -R, ngrok SDKs) ---+-- tunnel --+-- shared HTTP / TLS ports (by Host, SNI)
                                   |
                      registry of routes, tunnels, leases

- A *door* (:mod:`tcprelay.relay.doors`) accepts agents and turns each
  registered one into an :class:`ITunnel`.
- An *entrance* (:mod:`tcprelay.relay.entrances`) accepts visitors, finds
  the tunnel of their route in the registry and splices them to a stream of
  it (:class:`tcprelay.forward.Splice`).
- The *registry* (:class:`IRegistry`) is the table between them, with no
  sockets or listeners in it, so that a shared one (Redis) can replace the
  in-memory one for a cluster of relays.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "IAgentSession",
    "IRegistry",
    "IRoute",
    "ITunnel",
    "IVisitor",
    "IVisitorStream",
    "TunnelUnavailable",
]


class TunnelUnavailable(Exception):
    """The tunnel cannot take a visitor now (ended, going away, or full)."""


class IVisitorStream(Interface):
    """
    A transport (``ITransport``, ``IConsumer``, ``IPushProducer``, with
    half-close) that a tunnel opened for one visitor, towards its service:
    the entrance attaches the protocol that runs on it (a splice's service
    side).  Bytes written before :meth:`attach` are not lost.
    """

    def attach(protocol: object) -> None:
        """Run ``protocol`` on this stream (``makeConnection``)."""


class IVisitor(Interface):
    """What a tunnel learns of a visitor it opens a stream for."""

    peer = Attribute("The visitor's ``IAddress``.")
    first = Attribute("The bytes the entrance has already read from the visitor.")

    def when_connected(callback: object) -> None:
        """
        Call ``callback`` with the visitor's transport once it is connected
        to the stream (its ``getHost()`` is the address the visitor
        dialled): a dialect whose stream starts with the visitor's
        addresses writes them then.
        """


class IAgentSession(Interface):
    """
    One agent's connection to a door, registered or not yet: what the relay
    needs to shut it down.  A registered one has a :class:`ITunnel`.
    """

    label = Attribute("Short text naming the session in log lines.")

    def drain(reason: str) -> None:
        """Take no new streams; end once the open ones are done."""

    def end(reason: str) -> None:
        """End now, with every stream."""


class ITunnel(Interface):
    """
    What the relay needs from a registered service, whatever protocol its
    agent speaks: who it is, a stream for each visitor, and its end.  A
    muxado v1 session (:class:`tcprelay.relay.doors.muxado.MuxTunnel`) is
    the first implementation.
    """

    label = Attribute("Short text naming the tunnel in log lines (the agent's address).")
    credential = Attribute(
        "The id of the credential the agent proved (:func:`tcprelay.secrets.credential_id`), "
        "or None when the relay has no authentication."
    )
    peer = Attribute("The ``IAddress`` of the agent's connection.")
    dialect = Attribute("What the agent speaks, for logs and status: 'legacy', 'extended'...")
    connected_since = Attribute("When (UNIX time) the agent connected.")
    route = Attribute("The :class:`IRoute` it serves.")
    visitors = Attribute("The set of open :class:`~tcprelay.forward.Splice` of its visitors.")
    bytes_to_service = Attribute("Bytes of its visitors' ended connections, to the service.")
    bytes_to_visitor = Attribute("Bytes of its visitors' ended connections, to visitors.")
    ended = Attribute(
        "A Deferred that fires (with None) once the tunnel is gone for good: "
        "no stream can be opened on it any more."
    )

    def open_stream(visitor: IVisitor) -> IVisitorStream:
        """
        Open a stream to the service for a new ``visitor``: what it has
        already sent (``visitor.first``) goes first, after any header the
        tunnel's dialect puts before it.  Raises :class:`TunnelUnavailable`
        when the tunnel cannot take a visitor.
        """

    def close(reason: str) -> None:
        """End the tunnel (its agent is told when the dialect allows), with every stream."""

    def stream_count() -> int:
        """Streams open on the tunnel, visitors' and the agent's own."""


class IRoute(Interface):
    """
    How visitors find a tunnel.  A route is a value (hashable, compared by
    what it names), not a listener: :class:`tcprelay.relay.routes.PortRoute`
    (a dedicated public port) is the first kind; a host name on a shared
    HTTP port or an SNI name on a shared TLS port come next.
    """

    kind = Attribute("The kind of route: 'port', 'http' or 'tls'.")
    name = Attribute("What it names within its kind, as text: '8081', 'app.example.com'.")
    address = Attribute("The public address given to the agent ('relay.example.com:8081').")


class IRegistry(Interface):
    """
    The table of routes, the tunnels that serve them, and the leases that
    keep a route for a reconnecting credential.  It holds no sockets or
    listeners (the entrances do), so an implementation may live in memory
    (:class:`tcprelay.relay.registry.MemoryRegistry`) or in a store shared
    by several relays.
    """

    def add(route: IRoute, tunnel: ITunnel) -> None:
        """``tunnel`` serves ``route`` from now on; ValueError if another tunnel does."""

    def remove(route: IRoute, tunnel: ITunnel) -> None:
        """``tunnel`` no longer serves ``route`` (nothing if it did not)."""

    def lookup(route: IRoute) -> object:
        """The tunnel a new visitor of ``route`` goes to, or None."""

    def routes() -> object:
        """Every (route, tunnel) pair served now, in no particular order."""

    def hold_lease(token: str, route: IRoute, credential: object, seconds: float) -> None:
        """
        Keep ``route`` for whoever presents ``token`` with ``credential``
        within ``seconds``; after that the registry's ``on_lease_expired``
        callback is told that the route is free.
        """

    def lease_of(route: IRoute) -> object:
        """The lease holding ``route`` (with its ``token`` and ``credential``), or None."""

    def resume_lease(token: str, credential: object) -> object:
        """
        The route held for ``token``, taken off hold, when ``credential`` is
        the one that created the lease; None otherwise (the lease stays).
        """

    def release_leases() -> object:
        """End every lease at once; returns the routes they held."""

    def leases() -> object:
        """Every lease held now (each with its ``token``, ``route`` and ``credential``)."""

    def lease_count() -> int:
        """Leases held now."""
