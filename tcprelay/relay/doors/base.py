"""
What every door shares: the bookkeeping of a tunnel, the admission of an
agent's connection, the handshake deadline, and how a door gives routes up.

- :class:`DoorTunnel`: the :class:`~tcprelay.relay.interfaces.ITunnel`
  state the relay keeps on every tunnel (visitors, byte counters, the
  ``ended`` Deferred, credential and lease token).
- :func:`admit`: a door's ``buildProtocol``: the drain and the guard's
  edge limits decide, the guard counts the session it builds.
- :class:`Deadline`: a session's handshake (or login) deadline.
- :func:`end_tunnel`: a tunnel's route is given up (or held for a lease),
  once; :func:`when_quiet`: once the tunnels' visitors are all done.
- :func:`claim_refusal`: why a failed route claim is refused (the text an
  agent is told), or None when the failure is not a refusal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay.forward import Splice
from tcprelay.relay.core import RouteRefused
from tcprelay.relay.pool import PoolTimeout

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["Deadline", "DoorTunnel", "admit", "claim_refusal", "end_tunnel", "when_quiet"]

Lease = Optional[tuple[str, Optional[str]]]
"""A lease to hold a route for: (token, credential), or None."""


class DoorTunnel:
    """
    The state the relay keeps on every door's tunnel: the visitors spliced
    to it (:meth:`~tcprelay.relay.core.Relay.splice_visitor` adds them, and
    adds their bytes to the counters when they are done), and ``ended``,
    which fires once the tunnel has left its route.
    """

    route: Any

    def __init__(self, credential: Optional[str], lease_token: Optional[str]) -> None:
        self.credential = credential
        self.lease_token = lease_token
        self.connected_since = time.time()
        self.visitors: set[Splice] = set()
        self.bytes_to_service = 0
        self.bytes_to_visitor = 0
        self.ended: Deferred[None] = Deferred()


def admit(relay: Relay, addr: interfaces.IAddress, build: Callable[[], Any]) -> Optional[Any]:
    """
    A door factory's ``buildProtocol``: None while the relay drains or when
    the guard refuses ``addr``, else the session ``build()`` makes, counted
    by the guard as pending until it registers.
    """
    if relay.draining or not relay.guard.admit_session(addr):
        return None
    session = build()
    relay.guard.session_opened(session, addr)
    return session


class Deadline:
    """One pending call on a clock, started again or cancelled at will."""

    __slots__ = ("_call",)

    def __init__(self) -> None:
        self._call: Optional[IDelayedCall] = None

    def start(self, clock: Any, seconds: float, expired: Callable[[], None]) -> None:
        """``expired()`` in ``seconds`` (any earlier deadline is cancelled)."""
        self.cancel()

        def fire() -> None:
            self._call = None
            expired()

        self._call = clock.callLater(seconds, fire)

    def cancel(self) -> None:
        """The deadline is met (nothing when none is pending)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


def end_tunnel(
    relay: Relay,
    tunnel: DoorTunnel,
    lease: Lease,
    why: Optional[str] = None,
    who: str = "",
    log: Optional[Logger] = None,
) -> Deferred[None]:
    """
    ``tunnel``'s route is given up, or held for ``lease``; ``ended`` fires.
    Once: a tunnel that has ended already gets nothing done.  With ``log``,
    one line says so (``who``: the agent, as the door names it).  Fires
    once the route is released.
    """
    if tunnel.ended.called:
        return succeed(None)
    if log is not None:
        log.info(
            "{who}: {address} closed ({why}){held}",
            who=who,
            address=tunnel.route.address,
            why=why,
            held="; held for its lease" if lease is not None and not relay.draining else "",
        )
    released = relay.unpublish(tunnel, lease)  # type: ignore[arg-type]
    tunnel.ended.callback(None)
    return released


def when_quiet(tunnels: Iterable[DoorTunnel], quiet: Callable[[], None]) -> None:
    """Call ``quiet()`` once every visitor of ``tunnels`` (as they are now) is done."""
    done = [splice.done for tunnel in tunnels for splice in tunnel.visitors]
    DeferredList(done).addCallback(lambda _: quiet())


def claim_refusal(failure: Failure) -> Optional[str]:
    """
    Why a route claim that failed with ``failure`` is refused: no free
    port, the :class:`RouteRefused` reason, or ``""`` for a claim cancelled
    as its session ends.  None for any other failure (a bug: it goes on).
    """
    if failure.check(PoolTimeout):
        return "no free public port"
    if failure.check(RouteRefused):
        return str(failure.value)
    if failure.check(CancelledError):
        return ""
    return None
