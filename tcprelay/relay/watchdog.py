"""
The visitors' watchdog: streams a service leaves waiting are ended.

Two limits, both checked by one timer for the whole relay that runs only
while visitors are connected (a visitor costs nothing for it on its way
in or out):

- ``open_timeout``: a visitor has sent bytes and the service has sent
  nothing at all on the visitor's stream (no byte, no window update, no
  FIN): a service that never answers the relay's SYNs.
- ``half_close_timeout``: the visitor has closed its sending side and the
  service has sent it nothing since, for this long: a visitor that left,
  kept by a silent service (each such stream holds a descriptor).

The stream is then reset (CANCEL) and the visitor's connection closed.  A
limit is checked every quarter of it, so it is met within 1.25 times its
value.  The checks themselves are the tunnels' (:meth:`expire_streams`),
which know their protocol; tunnels without the method are left alone.

A check looks at every visitor, so it is cut into slices of at most
:data:`BATCH` visitors, one slice per reactor pass: in one pass, the
100,000 idle visitors a relay can hold took some 190 ms of CPU (measured:
36 ms for 19,000 on a 2-CPU VM, the pass 63 ms long), during which no
other visitor was accepted or served.  Sliced, the other connections wait
for one slice at most (about 0.5 ms), whatever the number of visitors; a
new visitor's connect and first echo take several passes, each of which
may come after a slice (with slices of 1,000, about 2 ms each, its p99
while 19,500 visitors were held was 1.4x the Go relay's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IDelayedCall

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["BATCH", "Watchdog", "WatchState"]

BATCH = 250
"""Most visitors one reactor pass of a check looks at (see above)."""


class WatchState:
    """What a tunnel remembers of one visitor between two checks."""

    __slots__ = ("unanswered_since", "silent_since", "mark")

    def __init__(self) -> None:
        self.unanswered_since: Optional[float] = None
        self.silent_since: Optional[float] = None
        self.mark = -1


class Watchdog:
    """Runs the tunnels' stream checks while any visitor is connected."""

    batch = BATCH
    """Visitors per reactor pass (:data:`BATCH`; tests lower it)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        config = relay.config
        limits = [t for t in (config.open_timeout, config.half_close_timeout) if t]
        self.interval: Optional[float] = min(limits) / 4 if limits else None
        self._timer: Optional[IDelayedCall] = None
        self._work: list[tuple[Any, list[Any]]] = []
        """The check under way: (tunnel, its visitors not looked at yet)."""

    def wake(self) -> None:
        """A visitor arrived: make sure the checks run."""
        if self._timer is None and self.interval is not None and self.relay.running:
            self._timer = self.relay.reactor.callLater(self.interval, self._check)

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        self._work = []
        if timer is not None and timer.active():
            timer.cancel()

    def _check(self) -> None:
        """Start a check: note every tunnel's visitors, look at a first slice."""
        self._timer = None
        work = []
        # the sessions' tunnels: one going away still has visitors to finish
        for session in list(self.relay.sessions):
            tunnel: Any = getattr(session, "tunnel", None)
            if getattr(tunnel, "expire_streams", None) is not None and tunnel.visitors:
                work.append((tunnel, list(tunnel.visitors)))
        self._work = work
        self._slice()

    def _slice(self) -> None:
        """Look at up to :attr:`batch` visitors; the rest in the next pass."""
        self._timer = None
        relay = self.relay
        config = relay.config
        now = relay.reactor.seconds()
        work = self._work
        budget = self.batch
        while work and budget > 0:
            tunnel, splices = work[-1]
            if len(splices) <= budget:
                part = splices
                work.pop()
            else:
                part = splices[-budget:]
                del splices[-budget:]
            budget -= len(part)
            tunnel.expire_streams(now, config.open_timeout, config.half_close_timeout, part)
        if work:
            self._timer = relay.reactor.callLater(0, self._slice)
            return
        busy = False
        for session in list(relay.sessions):
            tunnel: Any = getattr(session, "tunnel", None)
            if getattr(tunnel, "expire_streams", None) is not None and tunnel.visitors:
                busy = True
                break
        if busy:
            self.wake()
