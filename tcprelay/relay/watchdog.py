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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.interfaces import IDelayedCall

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["Watchdog", "WatchState"]


class WatchState:
    """What a tunnel remembers of one visitor between two checks."""

    __slots__ = ("unanswered_since", "silent_since", "mark")

    def __init__(self) -> None:
        self.unanswered_since: Optional[float] = None
        self.silent_since: Optional[float] = None
        self.mark = -1


class Watchdog:
    """Runs the tunnels' stream checks while any visitor is connected."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        config = relay.config
        limits = [t for t in (config.open_timeout, config.half_close_timeout) if t]
        self.interval: Optional[float] = min(limits) / 4 if limits else None
        self._timer: Optional[IDelayedCall] = None

    def wake(self) -> None:
        """A visitor arrived: make sure the checks run."""
        if self._timer is None and self.interval is not None and self.relay.running:
            self._timer = self.relay.reactor.callLater(self.interval, self._check)

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _check(self) -> None:
        self._timer = None
        relay = self.relay
        config = relay.config
        now = relay.reactor.seconds()
        busy = False
        # the sessions' tunnels: one going away still has visitors to finish
        for session in list(relay.sessions):
            tunnel: Any = getattr(session, "tunnel", None)
            expire: Any = getattr(tunnel, "expire_streams", None)
            if expire is not None and tunnel.visitors:
                expire(now, config.open_timeout, config.half_close_timeout)
                busy = busy or bool(tunnel.visitors)
        if busy:
            self.wake()
