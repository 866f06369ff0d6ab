"""
What every door shares: the bookkeeping of a tunnel, the admission of an
agent's connection, the handshake deadline, and how a door gives routes up.

- :class:`DoorTunnel`: the :class:`~tcprelay.relay.interfaces.ITunnel`
  state the relay keeps on every tunnel (visitors, byte counters, the
  ``ended`` Deferred, credential and lease token).
- :func:`admit`: a door's ``buildProtocol``: the drain and the guard's
  edge limits decide, the guard counts the session it builds
  (:class:`DoorFactory`: a factory of one session class that does so).
- :class:`Deadline`: a session's handshake (or login) deadline;
  :class:`MuxDoorSession`: an agent's muxado connection (v1 or v2) with
  the pre-handshake limits and that deadline.
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
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay.forward import Splice
from tcprelay.mux.session import Role
from tcprelay.protocol import MuxProtocol, MuxStream
from tcprelay.relay.config import PRE_HANDSHAKE_BUFFER, PRE_HANDSHAKE_READ
from tcprelay.relay.core import RouteRefused
from tcprelay.relay.pool import PoolTimeout

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = [
    "Deadline",
    "DoorFactory",
    "DoorTunnel",
    "MuxDoorSession",
    "admit",
    "claim_refusal",
    "end_tunnel",
    "when_quiet",
]

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


class DoorFactory(Factory):
    """Builds a :attr:`session` (called with the relay) per agent
    connection, through :func:`admit`."""

    noisy = False
    session: Callable[[Relay], Any]

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def buildProtocol(self, addr: interfaces.IAddress) -> Optional[Any]:  # type: ignore[override]
        return admit(self.relay, addr, lambda: self.session(self.relay))


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


class MuxDoorSession(MuxProtocol):
    """
    An agent's muxado connection (server role) on a door: one of the
    relay's :attr:`~tcprelay.relay.core.Relay.sessions` from its start to
    its loss, held to the pre-handshake buffer and read sizes until
    :meth:`registered_limits`, and closed by :meth:`handshake_expired` when
    :attr:`deadline` (the handshake timeout) passes first.  Subclasses
    accept the agent's streams (``_accept_stream``).
    """

    def __init__(self, relay: Relay) -> None:
        super().__init__(Role.SERVER, relay.reactor, relay.config.session, self._accept_stream)
        self.relay = relay
        self.max_buffered = PRE_HANDSHAKE_BUFFER
        self.max_read_size = PRE_HANDSHAKE_READ
        self.frame_timeout = relay.config.frame_timeout
        self.deadline = Deadline()

    def _accept_stream(self, stream: MuxStream) -> Optional[Any]:
        raise NotImplementedError

    def registered_limits(self) -> None:
        """The agent has authenticated: the session's own buffer, reads of any size."""
        self.max_buffered = self.relay.config.session_buffer
        self.max_read_size = None

    def session_started(self) -> None:
        self.relay.sessions.add(self)
        self.deadline.start(self.clock, self.relay.config.handshake_timeout, self.handshake_expired)

    def handshake_expired(self) -> None:
        """:attr:`deadline` has passed."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        super().connectionLost(reason)
        self.relay.session_gone(self)


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
