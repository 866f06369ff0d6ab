"""
Pooled routes: several agents of one credential serving one route.

Agents that present the same credential (the same secret, or none on a
relay without secrets), ask for the same route (a name, or a port number)
and ask to pool (``pool: true`` in their register message) share it: the
registry holds one :class:`PooledTunnel` for the route, whose members are
the agents' own tunnels.

- A new visitor goes to the member with the fewest open visitors; ties go
  round robin (:func:`choose`).  The relay asks the pool for that member
  (:meth:`PooledTunnel.pick`) and splices the visitor to *it*: the splice
  is in the member's ``visitors``, so a member that leaves drops (or
  drains) only its own visitors, and the watchdog checks them on its
  session.
- A member that leaves is taken out of the pool; the route stays up while
  one member is left.  The last one to leave ends the pool: the route is
  unpublished as a single tunnel's would be (its lease, if any, is held
  for that last member's token).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from zope.interface import implementer

from tcprelay.forward import Splice
from tcprelay.relay.interfaces import IRoute, ITunnel, IVisitor, IVisitorStream, TunnelUnavailable

__all__ = ["PooledTunnel", "choose"]


def choose(loads: Sequence[int], start: int) -> int:
    """
    The index of the member that takes the next visitor, given each
    member's open visitors (``loads``, at least one): the fewest, ties
    broken by round robin (the first at or after ``start``, wrapping).
    """
    if not loads:
        raise ValueError("no members to choose from")
    count = len(loads)
    best = start % count
    for step in range(1, count):
        index = (start + step) % count
        if loads[index] < loads[best]:
            best = index
    return best


@implementer(ITunnel)
class PooledTunnel:
    """
    The tunnel a pooled route is registered with: its members' tunnels
    behind one :class:`~tcprelay.relay.interfaces.ITunnel`.  Visitors are
    spread by :meth:`pick`; :attr:`visitors` and the byte counters add up
    the members'.
    """

    dialect = "pooled"

    def __init__(self, route: IRoute, credential: Optional[str]) -> None:
        self.route = route
        self.credential = credential
        self.members: list[ITunnel] = []
        """The live members, in the order they joined."""
        self.ended: Deferred[None] = Deferred()
        """Fires once the last member has left."""
        self.connected_since = time.time()
        self._next = 0
        self._gone_to_service = 0
        self._gone_to_visitor = 0

    # -- members -----------------------------------------------------------

    def admits(self, credential: Optional[str]) -> bool:
        """Whether an agent with ``credential`` may join (the pool's own credential)."""
        return credential == self.credential and not self.ended.called

    def add(self, member: ITunnel) -> None:
        """``member`` serves the route too from now on."""
        if not self.admits(member.credential):
            raise ValueError(f"{member.label} may not join the pool of {self.route.name}")
        if member not in self.members:
            self.members.append(member)

    def remove(self, member: ITunnel) -> bool:
        """
        Take ``member`` out (nothing if it is not in); True when it was
        the last one (the pool is then empty and ends with the route).
        """
        try:
            index = self.members.index(member)
        except ValueError:
            return not self.members
        del self.members[index]
        if index < self._next:
            self._next -= 1
        self._gone_to_service += member.bytes_to_service
        self._gone_to_visitor += member.bytes_to_visitor
        return not self.members

    def __contains__(self, member: object) -> bool:
        return member in self.members

    def pick(self) -> ITunnel:
        """The member that takes a new visitor (see :func:`choose`)."""
        members = self.members
        if not members:
            raise TunnelUnavailable("no agent left in the pool")
        index = choose([len(m.visitors) for m in members], self._next)
        self._next = (index + 1) % len(members)
        return members[index]

    # -- ITunnel -----------------------------------------------------------

    @property
    def label(self) -> str:
        labels = ", ".join(m.label for m in self.members)
        return f"pool of {len(self.members)} ({labels})"

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        """The first member's agent address (each member has its own)."""
        return self.members[0].peer if self.members else None

    @property
    def visitors(self) -> frozenset[Splice]:
        """Every member's open visitors (a snapshot: members keep their own)."""
        return frozenset(s for m in self.members for s in m.visitors)

    @property
    def bytes_to_service(self) -> int:
        return self._gone_to_service + sum(m.bytes_to_service for m in self.members)

    @bytes_to_service.setter
    def bytes_to_service(self, value: int) -> None:
        self._gone_to_service += value - self.bytes_to_service

    @property
    def bytes_to_visitor(self) -> int:
        return self._gone_to_visitor + sum(m.bytes_to_visitor for m in self.members)

    @bytes_to_visitor.setter
    def bytes_to_visitor(self, value: int) -> None:
        self._gone_to_visitor += value - self.bytes_to_visitor

    def open_stream(self, visitor: IVisitor) -> IVisitorStream:
        """
        A stream on the member :meth:`pick` chooses.  The relay calls
        :meth:`pick` itself so that the visitor's splice is the member's;
        this is for callers that only know :class:`ITunnel`.
        """
        return self.pick().open_stream(visitor)  # type: ignore[no-any-return]

    def close(self, reason: str) -> None:
        """End every member."""
        for member in list(self.members):
            member.close(reason)

    def stream_count(self) -> int:
        """Streams open across the members."""
        return sum(m.stream_count() for m in self.members)
