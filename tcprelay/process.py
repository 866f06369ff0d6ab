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

from typing import Any

from twisted.logger import Logger

from tcprelay import _reactor

__all__ = ["own_process", "raise_open_files_limit"]


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
    (:func:`tcprelay._reactor.tune_reactor`), the allocator, and the
    start-up heap frozen once the reactor runs
    (:func:`tcprelay._reactor.own_process`).  Call it before registering
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
