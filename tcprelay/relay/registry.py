"""
The in-memory registry of routes, tunnels and leases
(:class:`~tcprelay.relay.interfaces.IRegistry`).

No sockets or listeners here: the entrances listen, the doors accept
agents, and both find each other through this table.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from tcprelay.relay.interfaces import IRegistry, IRoute, ITunnel

__all__ = ["Lease", "MemoryRegistry"]


class Lease:
    """A route kept for a reconnecting agent: its token, route, credential and timer."""

    __slots__ = ("token", "route", "credential", "timer")

    def __init__(
        self, token: str, route: IRoute, credential: Optional[str], timer: IDelayedCall
    ) -> None:
        self.token = token
        self.route = route
        self.credential = credential
        self.timer = timer


@implementer(IRegistry)
class MemoryRegistry:
    """
    Routes, their tunnels and the leases of one relay process.

    ``on_lease_expired`` is called with the route of each lease that ran out
    (the relay gives a port back to the pool); leases given up by
    :meth:`release_leases` or taken up by :meth:`resume_lease` are not
    reported there.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        on_lease_expired: Callable[[IRoute], None] = lambda route: None,
    ) -> None:
        self.clock = clock
        self.on_lease_expired = on_lease_expired
        self._tunnels: dict[IRoute, ITunnel] = {}
        self._leases: dict[str, Lease] = {}
        self._held: dict[IRoute, str] = {}
        """Token of the lease holding each held route."""

    # -- routes ----------------------------------------------------------

    def add(self, route: IRoute, tunnel: ITunnel) -> None:
        """``tunnel`` serves ``route``; ValueError if another tunnel does."""
        current = self._tunnels.get(route)
        if current is not None and current is not tunnel:
            raise ValueError(f"route {route.kind} {route.name} is taken")
        self._tunnels[route] = tunnel

    def remove(self, route: IRoute, tunnel: ITunnel) -> None:
        """``tunnel`` no longer serves ``route``."""
        if self._tunnels.get(route) is tunnel:
            del self._tunnels[route]

    def lookup(self, route: IRoute) -> Optional[ITunnel]:
        """The tunnel serving ``route``, or None."""
        return self._tunnels.get(route)

    def routes(self) -> Iterator[tuple[IRoute, ITunnel]]:
        """Every (route, tunnel) pair served now."""
        return iter(list(self._tunnels.items()))

    def __len__(self) -> int:
        return len(self._tunnels)

    # -- leases ----------------------------------------------------------

    def hold_lease(
        self, token: str, route: IRoute, credential: Optional[str], seconds: float
    ) -> None:
        """Keep ``route`` for ``token`` (presented with ``credential``) for ``seconds``."""
        timer = self.clock.callLater(seconds, self._expired, token)
        self._leases[token] = Lease(token, route, credential, timer)
        self._held[route] = token
        self.log.info(
            "{kind} {name} held for its lease for {seconds}s",
            kind=route.kind,
            name=route.name,
            seconds=seconds,
            service_port=getattr(route, "port", None),
        )

    def lease_of(self, route: IRoute) -> Optional[Lease]:
        """The lease holding ``route``, if any."""
        token = self._held.get(route)
        return None if token is None else self._leases.get(token)

    def resume_lease(self, token: str, credential: Optional[str]) -> Optional[IRoute]:
        """The route held for ``token`` when ``credential`` created it; None otherwise."""
        lease = self._leases.get(token)
        if lease is None or lease.credential != credential:
            return None
        del self._leases[token]
        self._held.pop(lease.route, None)
        if lease.timer.active():
            lease.timer.cancel()
        return lease.route

    def _expired(self, token: str) -> None:
        lease = self._leases.pop(token, None)
        if lease is not None:
            self._held.pop(lease.route, None)
            self.on_lease_expired(lease.route)

    def release_leases(self) -> list[IRoute]:
        """End every lease now; the routes they held."""
        leases, self._leases = self._leases, {}
        self._held = {}
        for lease in leases.values():
            if lease.timer.active():
                lease.timer.cancel()
        return [lease.route for lease in leases.values()]

    def leases(self) -> list[Lease]:
        """Every lease held now (the cluster layer re-asserts them in Redis)."""
        return list(self._leases.values())

    def lease_count(self) -> int:
        """Leases held now."""
        return len(self._leases)
