"""
A leaner poll step for Twisted's epoll reactor, with optional busy polling.

A relay forwards: nearly every event it handles (a visitor connecting, a
reply from the service) makes it write to a peer and then wait for that
peer's answer, usually a few hundred microseconds later.  Two costs of the
stock poll step sit on that path:

- **Waking up.**  When the relay blocks in ``epoll_wait``, its CPU goes idle;
  the peer's answer then has to wake it again, which on a virtual machine
  (an idle virtual CPU is halted) costs tens of microseconds per hop.  Go's
  runtime avoids much of that by letting idle threads spin briefly before
  they sleep.  With ``busy_poll`` set, after a pass that handled events the
  reactor polls without blocking, yielding the CPU between polls
  (``sched_yield``, so any other runnable task on that CPU goes first), for
  up to ``busy_poll`` seconds, and only then blocks.  The CPU this costs is
  at most ``busy_poll`` per burst of activity, and none while the relay is
  idle or fully busy; never longer than the next timed call allows.
- **Dispatch.**  The stock step wraps every event in
  ``log.callWithLogger`` (two context managers and a ``logPrefix()`` call,
  several microseconds each time), which only names the selectable in
  legacy ``twisted.python.log`` messages; tcprelay logs through
  ``twisted.logger``, whose events carry their own namespace.  Events are
  handed to the reactor's own ``_doReadOrWrite``, so errors, disconnection
  and half-close handling stay Twisted's.

:func:`tune_reactor` installs this step on an ``EPollReactor`` (Linux's
default reactor) and leaves any other reactor untouched.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any, Callable, Optional

__all__ = ["DEFAULT_BUSY_POLL", "IdleGauge", "tune_reactor"]

DEFAULT_BUSY_POLL = 250e-6
"""
Seconds the relay keeps polling after activity before it sleeps.

Measured on a 2-CPU VM (docs/benchmarks.rst), sequential connect + 1-byte
echo through the relay and a Go echo service: p50 about 430 us without
busy polling, 370-385 us with 100 us, 360 us with 250 us (the Go relay
about 420 us in the same runs).  Throughput runs, where events are always
waiting, do not spin.
"""


IDLE_SAMPLE_INTERVAL = 0.05
"""Seconds between two readings of the machine's idle CPU time."""
MIN_IDLE_SHARE = 0.2
"""Busy-poll only while at least this share of the machine's CPU time was
idle (or spent in our own busy polling) since the previous reading."""
MAX_POLL_SHARE = 0.25
"""Busy polling may take at most this share of one CPU (counted over each
reading interval): a relay woken often by sparse events (heartbeats of
many idle sessions) spins at most this much, whatever the machine's load."""


class IdleGauge:
    """
    Whether the machine has CPU to spare, from ``/proc/stat`` read at most
    every :data:`IDLE_SAMPLE_INTERVAL` seconds, and whether busy polling is
    still within its budget (:data:`MAX_POLL_SHARE` of one CPU).  Busy
    polling on a CPU nobody else wants costs only power; on a saturated
    machine (a relay moving bulk data next to its peers) it would take CPU
    from the very processes the relay is waiting for, so it stops there.  The time spent
    busy polling counts as idle, or polling would switch itself off.
    Without a readable ``/proc/stat`` the machine counts as having spare CPU.
    """

    def __init__(
        self,
        path: str = "/proc/stat",
        interval: float = IDLE_SAMPLE_INTERVAL,
        min_share: float = MIN_IDLE_SHARE,
        ticks_per_second: Optional[float] = None,
        max_poll_share: float = MAX_POLL_SHARE,
    ) -> None:
        self.path = path
        self.interval = interval
        self.min_share = min_share
        self.max_poll_share = max_poll_share
        if ticks_per_second is None:
            try:
                ticks_per_second = float(os.sysconf("SC_CLK_TCK"))
            except (ValueError, OSError, AttributeError):  # pragma: no cover
                ticks_per_second = 100.0
        self.ticks_per_second = ticks_per_second
        self.spare = True
        self.polled = 0.0
        """Seconds spent busy polling since the last reading (added by the caller)."""
        self._next = 0.0
        self._since = 0.0
        self._last: Optional[tuple[int, int]] = None

    def _read(self) -> Optional[tuple[int, int]]:
        """(total, idle) ticks of the whole machine, or None."""
        try:
            with open(self.path, "rb") as f:
                line = f.readline()
            fields = [int(x) for x in line.split()[1:9]]
        except (OSError, ValueError):
            return None
        if len(fields) < 5:
            return None
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    def has_spare_cpu(self, now: float) -> bool:
        """Whether to busy-poll, re-reading the machine's figures when due."""
        if now < self._next:
            # within the interval: the machine's last figures, and our budget
            return self.spare and self.polled <= self.max_poll_share * (now - self._since)
        self._next = now + self.interval
        self._since = now
        polled, self.polled = self.polled, 0.0
        sample = self._read()
        if sample is None:
            self.spare = True
            return True
        last, self._last = self._last, sample
        if last is not None and sample[0] > last[0]:
            total = sample[0] - last[0]
            idle = sample[1] - last[1] + polled * self.ticks_per_second
            self.spare = idle >= self.min_share * total
        return self.spare


def tune_reactor(
    reactor: Any,
    busy_poll: float = DEFAULT_BUSY_POLL,
    clock: Callable[[], float] = time.perf_counter,
    pause: Optional[Callable[[], None]] = getattr(os, "sched_yield", None),
    gauge: Optional[IdleGauge] = None,
) -> bool:
    """
    Install the lean poll step on ``reactor`` if it is Twisted's
    ``EPollReactor``; return whether it was installed.  ``busy_poll`` is in
    seconds (0: never busy-poll).  ``clock``, ``pause`` and ``gauge`` are
    for tests.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not on Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if poller is None or not isinstance(selectables, dict) or dispatch is None:
        return False  # pragma: no cover - a Twisted whose internals moved
    busy_poll = max(0.0, float(busy_poll))
    if gauge is None:
        gauge = IdleGauge()
    spare = gauge.has_spare_cpu
    active = False

    def do_poll(timeout: Optional[float]) -> None:
        nonlocal active
        limit = len(selectables) or 1
        try:
            events = None
            if active and busy_poll and (timeout is None or timeout > 0):
                # Recently busy: poll without blocking for a while first.
                start = clock()
                if spare(start):
                    deadline = start + (busy_poll if timeout is None else min(busy_poll, timeout))
                    events = poller.poll(0, limit)
                    now = start
                    while not events and now < deadline:
                        if pause is not None:
                            pause()
                        events = poller.poll(0, limit)
                        now = clock()
                    gauge.polled += now - start
                    if not events and timeout is not None:
                        timeout = max(0.0, timeout - (now - start))
            if not events:
                events = poller.poll(-1 if timeout is None else timeout, limit)
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        active = bool(events)
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    reactor.doIteration = do_poll  # type: ignore[method-assign]
    reactor.doPoll = do_poll  # type: ignore[method-assign]
    return True
