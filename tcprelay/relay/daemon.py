"""
The relay daemon: ``twistd tcprelay`` (and ``twist tcprelay``) own their
process, and only they tune it.

The twistd plugin (``twisted/plugins/tcprelay_plugin.py``) names this
module: its :data:`Options` are the tap's, and its :func:`makeService`
builds a :class:`RelayDaemon`, the :class:`~tcprelay.relay.service.RelayService`
plus the process: the open-files limit, the reactor's poll step and
allocator (:func:`tcprelay.process.own_process`), SIGHUP reloading the
secrets and the ``--config`` file's limits, calm repeated SIGTERM/SIGINT, a plain one-line error when a port
cannot be bound, and exit status 0 after a completed drain.  A program
composing the relay itself calls :func:`tcprelay.tap.makeService` and gets
none of that.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.internet.defer import Deferred

from tcprelay import tap
from tcprelay._signals import calm_repeated_signals
from tcprelay.process import own_process, raise_open_files_limit
from tcprelay.relay.service import RelayService

__all__ = ["Options", "RelayDaemon", "makeService"]

Options = tap.Options


class RelayDaemon(RelayService):
    """A :class:`RelayService` that owns its process (see the module docstring)."""

    _previous_sighup: Any = None

    def privilegedStartService(self) -> None:
        """Listen (control, metrics): a failure is one line on stderr and exit 1."""
        raise_open_files_limit(self.log)
        try:
            super().privilegedStartService()
        except Exception as e:  # noqa: BLE001 - any listen failure, reported plainly
            what = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
            sys.stderr.write(f"tcprelay: cannot listen ({what})\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    def startService(self) -> None:
        reactor = self.relay.reactor
        # first, so that the heap is frozen before the relay's own start-up
        own_process(reactor, self.busy_poll, self.log)
        super().startService()
        if hasattr(signal, "SIGHUP"):

            def on_hup(signum: int, frame: object) -> None:
                reactor.callFromThread(self.relay.reload_config)

            self._previous_sighup = signal.signal(signal.SIGHUP, on_hup)
        reactor.callWhenRunning(
            calm_repeated_signals, reactor, lambda: self.relay.draining
        )

    def stopService(self) -> Deferred[None]:
        """
        Stop every child (control first, then the drain).  A completed drain
        is a clean shutdown: forget the SIGTERM/SIGINT that twistd and twist
        would otherwise re-raise on exit, so the daemon exits 0.
        """
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        d: Deferred[None] = super().stopService()
        d.addCallback(self._clean_exit)
        return d

    def _clean_exit(self, _: object) -> None:
        reactor = self.relay.reactor
        if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            reactor._exitSignal = None


def makeService(options: tap.Options) -> RelayDaemon:
    """The daemon twistd runs, on the global reactor."""
    from twisted.internet import reactor

    return tap.makeService(options, reactor, service_class=RelayDaemon)  # type: ignore[return-value]
