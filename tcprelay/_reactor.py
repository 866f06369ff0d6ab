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
  at most ``busy_poll`` per burst of activity and a quarter of one CPU over
  time, none while the relay is idle or the machine busy, and none with
  fewer than two usable CPUs; never longer than the next timed call allows
  (see :class:`IdleGauge`).
- **Dispatch.**  The stock step wraps every event in
  ``log.callWithLogger``: a ``logPrefix()`` call and a log context (several
  microseconds each time) that only name the selectable in legacy
  ``twisted.python.log`` messages (tcprelay logs through
  ``twisted.logger``, whose events carry their own namespace), and an
  exception handler.  Here events go to the reactor's own
  ``_doReadOrWrite`` (so disconnection and half-close handling stay
  Twisted's) inside a plain ``try``: an exception escaping it is logged
  with the selectable's prefix, as Twisted does, and the other events of
  the pass are still handled.

:func:`tune_reactor` installs this step on an ``EPollReactor`` (Linux's
default reactor) and leaves any other reactor untouched.  Two more tunings
are for the daemons only, which own their process: :func:`tune_malloc`
keeps glibc's allocator from giving the heap back to the kernel and faulting
it in again for every burst of large buffers, and :func:`freeze_heap` takes
a started daemon's start-up objects out of the cyclic garbage collector's
passes, which stop the reactor while they run.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

from twisted.python import log

from tcprelay import _twisted

__all__ = [
    "DEFAULT_BUSY_POLL",
    "MAX_BUSY_POLL",
    "IdleGauge",
    "freeze_heap",
    "is_glibc",
    "own_process",
    "tune_malloc",
    "tune_reactor",
    "usable_cpus",
]

DEFAULT_BUSY_POLL = 250e-6
"""
Seconds the relay keeps polling after activity before it sleeps: about one
peer's answer on a connection's critical path (a few hundred microseconds
on loopback), so the answer finds the relay awake, for little CPU (about
25 us more per connection; connect + echo p50 397 against 430 us without,
benchmarks/results/experiments.json).  A busy machine always has events waiting, so the
relay does not spin there.
"""
IDLE_SAMPLE_INTERVAL = 0.1
"""Seconds between two readings of the machine's idle CPU time."""
MIN_IDLE_SHARE = 0.2
"""Busy-poll only while at least this share of the machine's CPU time was
idle (or spent in our own busy polling) since the previous reading."""
MAX_POLL_SHARE = 0.25
"""Busy polling may take at most this share of one CPU over time: a relay
woken often by sparse events (heartbeats of many idle sessions) spins at
most this much, whatever the machine's load."""
MAX_BUSY_POLL = 0.01
"""The longest busy-poll time the options accept (seconds)."""


def usable_cpus(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> float:
    """CPUs this process may use: its affinity mask, lowered by a cgroup v2
    CPU quota (``cpu_max``) when there is one."""
    try:
        cpus = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = float(os.cpu_count() or 1)
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cpus


class IdleGauge:
    """
    How long the reactor may busy-poll now.

    Busy polling on a CPU nobody else wants costs only power; on a saturated
    machine (a relay moving bulk data next to its peers) it would take CPU
    from the very processes the relay is waiting for.  So it is allowed only
    while at least :data:`MIN_IDLE_SHARE` of the machine's CPU time was idle
    between two readings of ``/proc/stat`` (every
    :data:`IDLE_SAMPLE_INTERVAL` seconds; the CPU time of our own polling
    counts as idle, or polling would switch itself off), and only within a
    budget of :data:`MAX_POLL_SHARE` of one CPU: a token bucket that fills at
    that rate, holds at most one busy-poll period, and is drained by the CPU
    time the polling actually took.  Without a readable ``/proc/stat`` the
    machine counts as having spare CPU (the budget still holds).
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
        """CPU seconds spent busy polling since the last reading."""
        self.tokens: Optional[float] = None
        """Seconds of busy polling the budget holds (None: not started)."""
        self._refilled = 0.0
        self._next = 0.0
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

    def _sample(self, now: float) -> None:
        self._next = now + self.interval
        polled, self.polled = self.polled, 0.0
        sample = self._read()
        if sample is None:
            self.spare = True
            return
        last, self._last = self._last, sample
        if last is not None and sample[0] > last[0]:
            total = sample[0] - last[0]
            idle = sample[1] - last[1] + polled * self.ticks_per_second
            self.spare = idle >= self.min_share * total

    def allowance(self, now: float, most: float) -> float:
        """Seconds the reactor may busy-poll from ``now`` (0: not now), at
        most ``most`` (also the bucket's size)."""
        if now >= self._next:
            self._sample(now)
        if self.tokens is None:
            self.tokens = most
        else:
            self.tokens = min(most, self.tokens + (now - self._refilled) * self.max_poll_share)
        self._refilled = now
        return self.tokens if self.spare else 0.0

    def spent(self, cpu_seconds: float) -> None:
        """Busy polling took ``cpu_seconds`` of CPU time."""
        self.polled += cpu_seconds
        if self.tokens is not None:
            self.tokens = max(0.0, self.tokens - cpu_seconds)


_FAST_POLL = _twisted.TUNE_REACTOR
"""The installed Twisted has the epoll reactor internals the lean poll step
uses (see :mod:`tcprelay._twisted`); tests may patch it."""

MIN_SPIN = 5e-6
"""A busy poll shorter than this is not worth starting."""


def tune_reactor(
    reactor: Any,
    busy_poll: float = DEFAULT_BUSY_POLL,
    clock: Callable[[], float] = time.perf_counter,
    pause: Optional[Callable[[], None]] = getattr(os, "sched_yield", None),
    gauge: Optional[IdleGauge] = None,
    cpu_clock: Callable[[], float] = time.thread_time,
    cpus: Optional[float] = None,
) -> bool:
    """
    Install the lean poll step on ``reactor`` if it is Twisted's
    ``EPollReactor`` and the installed Twisted has the internals the step
    uses; return whether it was installed (when not, the reactor keeps
    Twisted's own poll step).  ``busy_poll`` is in
    seconds (0: never busy-poll); busy polling stays off with fewer than two
    usable CPUs (``cpus``, default :func:`usable_cpus`), where the relay's
    spinning could only delay the peers it waits for.  ``clock``, ``pause``,
    ``gauge`` and ``cpu_clock`` are for tests.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - not on Linux
        return False
    if not _FAST_POLL or type(reactor) is not EPollReactor:
        return False
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if poller is None or not isinstance(selectables, dict) or dispatch is None:
        return False  # pragma: no cover - a Twisted whose internals moved
    busy_poll = min(max(0.0, float(busy_poll)), MAX_BUSY_POLL)
    if busy_poll and (usable_cpus() if cpus is None else cpus) < 2:
        busy_poll = 0.0
    if gauge is None:
        gauge = IdleGauge()
    active = False

    def do_poll(timeout: Optional[float]) -> None:
        nonlocal active
        limit = len(selectables) or 1
        blocking = timeout is None or timeout > 0
        events = None
        if active and busy_poll and blocking:
            # Recently busy: poll without blocking for a while first.
            start = clock()
            allowed = gauge.allowance(start, busy_poll)
            if timeout is not None and timeout < allowed:
                allowed = timeout
            if allowed >= MIN_SPIN:
                deadline = start + allowed
                cpu_start = cpu_clock()
                events = poller.poll(0, limit)
                now = start
                while not events and now < deadline:
                    if pause is not None:
                        pause()
                    events = poller.poll(0, limit)
                    now = clock()
                gauge.spent(cpu_clock() - cpu_start)
                if not events and timeout is not None:
                    timeout = max(0.0, timeout - (now - start))
        if not events:
            events = poller.poll(-1 if timeout is None else timeout, limit)
        # a pass that only ran due timed calls says nothing about activity
        active = bool(events) or (active and not blocking)
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:
                    # as Twisted's own step: log it, carry on with the others
                    log.err(system=_log_prefix(selectable))

    reactor.doIteration = do_poll  # type: ignore[method-assign]
    reactor.doPoll = do_poll  # type: ignore[method-assign]
    return True


def _log_prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:  # noqa: BLE001 - a broken logPrefix must not hide the error
        return "(buggy logPrefix method)"


def freeze_heap() -> None:
    """
    Collect the garbage of start-up, then move every object alive (the
    modules, classes and functions a started daemon holds for good) out of
    the cyclic garbage collector's reach (``gc.freeze``).  A full
    collection walks every object it tracks and the reactor waits meanwhile:
    the 55,000 objects of a started relay took 35-40 ms per pass on a 2-CPU
    VM, for nothing.  Afterwards a pass walks only what was created since.
    For the daemons (``twistd tcprelay``, ``tcprelay expose``) once they
    have started; not for a process that embeds the relay.
    """
    gc.collect()
    gc.freeze()


MALLOC_TOP_PAD = 8 << 20
"""Bytes glibc adds to every growth of the heap (``M_TOP_PAD``)."""
MALLOC_TRIM_THRESHOLD = 32 << 20
"""Free bytes at the top of the heap before glibc gives them back to the
kernel (``M_TRIM_THRESHOLD``)."""
MALLOC_MMAP_THRESHOLD = 4 << 20
"""Allocations from this size up get their own ``mmap`` (``M_MMAP_THRESHOLD``;
setting the trim threshold turns off glibc's own adjustment of this one)."""
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MALLOC_ENVIRONMENT = ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def is_glibc() -> bool:
    """Whether this process's C library is glibc."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return False


def own_process(reactor: Any) -> None:
    """
    The tunings for a daemon that owns its process (``twistd tcprelay``,
    ``tcprelay expose``), not for one that embeds the relay: the allocator
    now (:func:`tune_malloc`), the start-up heap frozen once the reactor
    runs (:func:`freeze_heap`; call this before registering anything else
    to run then, so that what that creates is not frozen).
    """
    tune_malloc()
    reactor.callWhenRunning(freeze_heap)


def tune_malloc(libc: Any = None, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Keep glibc's heap from shrinking and growing with every burst of large
    buffers; return whether the settings were made.

    A relay moving bulk data allocates and frees buffers of 64-256 KiB many
    times a second (socket reads, joined frames).  With glibc's defaults the
    heap's free top is given back to the kernel whenever it passes a few
    hundred KiB (``brk``) and faulted in again, page by page, by the next
    allocations: some 4,600 page faults a second in a relay echoing
    330 MB/s over 8 connections, none with these settings; its CPU per GB
    relayed fell by a tenth (benchmarks/results/experiments.json).  The cost is up to
    :data:`MALLOC_TRIM_THRESHOLD` of freed memory kept by the process.

    Does nothing where the C library is not glibc, or where the operator
    has chosen malloc settings (``MALLOC_TOP_PAD_``,
    ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or
    ``glibc.malloc`` tunables in ``GLIBC_TUNABLES``).  ``libc`` is for tests.
    """
    if any(name in environ for name in _MALLOC_ENVIRONMENT):
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    if libc is None:
        if not is_glibc():  # pragma: no cover - musl and others
            return False
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt  # noqa: B018 - present?
        except (OSError, AttributeError):  # pragma: no cover
            return False
    ok = True
    for param, value in (
        (_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD),
        (_M_TOP_PAD, MALLOC_TOP_PAD),
    ):
        ok = libc.mallopt(param, value) == 1 and ok
    return ok
