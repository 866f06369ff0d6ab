"""
Process-wide tunings, for daemons that own their process only
(``twistd tcprelay`` through :mod:`tcprelay.relay.daemon`, and
``tcprelay expose``): never for a relay or agent embedded in someone
else's process (the test kit, a user's ``makeService`` composition, the
``tcprelay:`` endpoint).

:func:`own_process` applies them all and logs one line for each that
cannot be applied.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tcprelay import _reactor

__all__ = ["FULL_SWEEP_EVERY", "OLD_GENERATION_INTERVAL", "collect_old_generation_on_a_clock",
           "own_process", "raise_open_files_limit"]

OLD_GENERATION_INTERVAL = 60.0
"""Seconds between two collections of the old generation in a daemon."""

FULL_SWEEP_EVERY = 10
"""Every this many collections on the clock, one also walks what earlier
ones froze (a full sweep: every object the process holds)."""

_NEVER = 1 << 30
"""A third ``gc`` threshold no count of young collections reaches."""


def collect_old_generation_on_a_clock(
    reactor: Any,
    interval: float = OLD_GENERATION_INTERVAL,
    sweep_every: int = FULL_SWEEP_EVERY,
    collector: Any = gc,
) -> LoopingCall:
    """
    Collect the cyclic garbage collector's old generation every ``interval``
    seconds instead of when CPython's counts say so, then freeze what
    survived (``gc.freeze``), so that the next collection walks only what
    was created since; every ``sweep_every`` collections, unfreeze first and
    walk everything (0: never).  The young generations stay as they are.
    ``collector`` is for tests.

    CPython runs a full collection whenever the objects promoted into the
    old generation since the last one reach a quarter of it.  A relay holding
    10,000 agent sessions promotes objects all the time (those that outlive
    two young collections, such as what lives a heartbeat interval), so it
    ran a full pass every 2-4 s: each walked every object the relay holds
    (250-360 ms of CPU on a 2-CPU VM), collected nothing, and held up every
    session meanwhile (benchmarks/results/capacity-sessions-*.json, the
    ``sessions`` test of ``python -m benchmarks.capacity``).  On a clock
    alone, every pass still walked every object held: 70 ms with 19,500
    idle visitors (430,000 objects), some 350 ms at 100,000, in which no
    visitor is served.  Long-lived objects (held connections, sessions) die
    by reference counting (the tests check that finished connections and
    sessions leave no cycles), so walking them again every minute finds
    nothing; frozen, they are walked once, by the first pass after they
    were made, and then only by the full sweeps, which bound how long a
    cycle among them could wait.  Cycles that die young are still collected
    by the young generations at once, and those that reached the old
    generation by the next pass.  For the daemons only.
    """
    young, middle, _old = collector.get_threshold()
    collector.set_threshold(young, middle, _NEVER)
    passes = 0

    def collect() -> None:
        nonlocal passes
        passes += 1
        if sweep_every and passes % sweep_every == 0:
            collector.unfreeze()
        collector.collect()
        collector.freeze()

    loop = LoopingCall(collect)
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop


def raise_open_files_limit(log: Logger) -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; say so if it stays low."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        log.info("open-files limit raised from {soft} to {limit}", soft=soft, limit=target)
    except (ValueError, OSError) as e:
        log.warn(
            "cannot raise the open-files limit above {soft} (hard {hard}): {error}",
            soft=soft,
            hard=hard,
            error=str(e),
        )


def own_process(reactor: Any, busy_poll: float, log: Logger) -> None:
    """
    Tune the process for a daemon that owns it: the open-files limit, the
    reactor's lean poll step with ``busy_poll`` seconds of busy polling
    (:func:`tcprelay._reactor.tune_reactor`), the allocator, the
    start-up heap frozen once the reactor runs
    (:func:`tcprelay._reactor.own_process`), then the garbage collector's
    old generation collected on a clock
    (:func:`collect_old_generation_on_a_clock`).  Call it before registering
    anything else to run at reactor start-up, so that what that creates is
    not frozen.  A tuning that cannot be applied is one log line.
    """
    raise_open_files_limit(log)
    if not _reactor.tune_reactor(reactor, busy_poll):
        log.info(
            "the lean poll step is not installed on {reactor} (it needs Twisted's "
            "epoll reactor with the internals listed in tcprelay._twisted); "
            "using the reactor's own, without busy polling",
            reactor=type(reactor).__name__,
        )
    _reactor.own_process(reactor)
    reactor.callWhenRunning(collect_old_generation_on_a_clock, reactor)
