"""
The public port pool: a first-in first-out free list over a port range, a
FIFO queue of services waiting for a port, and a quarantine for ports whose
bind failed.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Optional

import attrs

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tcprelay.options import parse_port_range

__all__ = ["PortPool", "PoolTimeout", "parse_port_range"]


class PoolTimeout(Exception):
    """No port became free within the wait timeout."""


PositionCallback = Callable[[int], None]


@attrs.define(eq=False)
class _Waiter:
    deferred: Deferred[int]
    on_position: Optional[PositionCallback]
    timer: Optional[IDelayedCall] = None


class PortPool(Service):
    """
    Hands out public ports first-in first-out.

    ``acquire`` fires with a port at once when one is free, otherwise queues
    the caller (FIFO) until a port is released or the timeout passes; the
    returned Deferred can be cancelled to leave the queue (a service that
    disconnects while waiting).  A port whose bind failed goes to
    ``quarantine`` and comes back after ``retry_delay`` seconds.
    """

    log = Logger()
    name = "pool"

    def __init__(
        self, ports: Iterable[int], clock: IReactorTime, retry_delay: float = 5.0
    ) -> None:
        self.ports = list(ports)
        self._free: deque[int] = deque(self.ports)
        self._waiters: deque[_Waiter] = deque()
        self._quarantined: dict[int, IDelayedCall] = {}
        self._clock = clock
        self.retry_delay = retry_delay

    @property
    def size(self) -> int:
        """Ports in the range."""
        return len(self.ports)

    @property
    def free(self) -> int:
        """Ports ready to hand out."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Ports handed out (quarantined ones excluded)."""
        return len(self.ports) - len(self._free) - len(self._quarantined)

    @property
    def quarantined(self) -> int:
        """Ports waiting to be retried after a failed bind."""
        return len(self._quarantined)

    @property
    def queued(self) -> int:
        """Callers waiting for a port."""
        return len(self._waiters)

    def acquire(
        self,
        timeout: Optional[float],
        on_position: Optional[PositionCallback] = None,
    ) -> Deferred[int]:
        """
        A Deferred firing with a port, or failing with :class:`PoolTimeout`.
        ``on_position`` is told the 1-based queue position whenever it
        changes.  :meth:`take` asks for one particular port.
        """
        if self._free and not self._waiters:
            return succeed(self._free.popleft())
        waiter = _Waiter(Deferred(lambda d: self._cancel(waiter)), on_position)
        if timeout is not None:
            waiter.timer = self._clock.callLater(timeout, self._expire, waiter, timeout)
        self._waiters.append(waiter)
        if on_position is not None:
            on_position(len(self._waiters))
        return waiter.deferred

    def take(self, port: int) -> bool:
        """Take a specific free port (a lease being resumed); False if busy."""
        if port in self._free:
            self._free.remove(port)
            return True
        return False

    def release(self, port: int) -> None:
        """A port is free again: give it to the first waiter, or queue it."""
        if port not in self.ports or port in self._free or port in self._quarantined:
            return
        self._free.append(port)
        self._serve()

    def quarantine(self, port: int) -> None:
        """Binding ``port`` failed: set it aside and retry it later."""
        if port in self._quarantined:
            return
        self.log.warn(
            "public port {port} could not be bound; retrying in {delay}s",
            port=port,
            delay=self.retry_delay,
        )
        self._quarantined[port] = self._clock.callLater(
            self.retry_delay, self._unquarantine, port
        )

    def stopService(self) -> None:  # type: ignore[override]
        """Cancel quarantine timers and fail the waiters."""
        super().stopService()
        for call in self._quarantined.values():
            if call.active():
                call.cancel()
        self._quarantined.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(CancelledError("relay stopping"))

    def _unquarantine(self, port: int) -> None:
        del self._quarantined[port]
        self._free.append(port)
        self._serve()

    def _serve(self) -> None:
        while self._free and self._waiters:
            waiter = self._waiters.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(self._free.popleft())
        self._tell_positions()

    def _tell_positions(self) -> None:
        for index, waiter in enumerate(self._waiters, 1):
            if waiter.on_position is not None:
                waiter.on_position(index)

    def _cancel(self, waiter: _Waiter) -> None:
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._tell_positions()

    def _expire(self, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        waiter.deferred.errback(PoolTimeout(f"no free port within {timeout:g}s"))
        self._tell_positions()
