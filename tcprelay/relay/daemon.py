"""
The relay daemon: ``twistd tcprelay`` (and ``twist tcprelay``) own their
process, and only they tune it.

The twistd plugin (``twisted/plugins/tcprelay_plugin.py``) names this
module: its :data:`Options` are the tap's, and its :func:`makeService`
builds a :class:`RelayDaemon`, the :class:`~tcprelay.relay.service.RelayService`
plus the process: the open-files limit, the reactor's poll step and
allocator (:func:`tcprelay.process.own_process`), SIGHUP reloading the
secrets and the ``--config`` file's limits, calm repeated SIGTERM/SIGINT, a plain one-line error when a port
cannot be bound (on standard error and in the log, and in daemon mode
reported to the waiting twistd parent, which exits 1), exit status 1 after
a bad option (:class:`Options`), and exit status 0 after a completed
drain.  A program
composing the relay itself calls :func:`tcprelay.tap.makeService` and gets
none of that.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, MutableMapping, Optional

from twisted.internet.defer import Deferred
from twisted.python import usage

from tcprelay import tap
from tcprelay._signals import calm_repeated_signals
from tcprelay.process import own_process, raise_open_files_limit
from tcprelay.relay.service import RelayService

__all__ = ["Options", "RelayDaemon", "makeService"]


class Options(tap.Options):
    """
    The tap's options; under twistd, a usage error ends the process with
    status 1.

    twistd prints a usage error of a plugin's options and exits, but only
    from 26.10.0 on with a non-zero status (``twisted.application.app.run``
    of earlier releases returns, so the process exits 0).  Under twistd
    these options therefore print what ``app.run`` prints (twistd's usage,
    which is :meth:`tcprelay.tap.Options.getUsage`'s one-line hint, then
    ``ARGV0 ARGV1: ERROR``) and exit 1 themselves, the same on every
    supported release.  Parsed by anything else (``twist``, which exits 64
    on a usage error, or a program or test), they raise
    :class:`~twisted.python.usage.UsageError` as the tap's do.
    """

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            parent = getattr(self, "parent", None)
            if parent is None or not self.twistd_options() or getattr(self, "reloading", False):
                raise  # (a reload on SIGHUP keeps the running relay)
            sys.stdout.write(f"{parent}\n{' '.join(sys.argv[0:2])}: {e}\n")
            sys.stdout.flush()
            raise SystemExit(1) from None


class RelayDaemon(RelayService):
    """A :class:`RelayService` that owns its process (see the module docstring)."""

    _previous_sighup: Any = None

    twistd_config: Optional[MutableMapping[str, Any]] = None
    """twistd's own options (the ``ServerOptions``) when twistd runs us:
    where its daemon mode keeps the status pipe and the pid file's name."""

    stderr_fd: Optional[int] = None
    """A copy of the standard error twistd was started with, taken before
    twistd daemonizes (which points fd 2 at /dev/null): where a start-up
    error is written.  Closed once the relay has started (or failed to)."""

    def privilegedStartService(self) -> None:
        """Listen (control, metrics): a failure is one plain line and exit 1."""
        raise_open_files_limit(self.log)
        try:
            super().privilegedStartService()
        except Exception as e:  # noqa: BLE001 - any listen failure, reported plainly
            what = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
            self._start_failed(f"tcprelay: cannot listen ({what})")
        self._close_stderr()

    def _start_failed(self, line: str) -> None:
        """
        End the start-up with ``line``: in the log (twistd sends
        ``sys.stderr`` there), on the original standard error, and in
        daemon mode down twistd's status pipe so the parent waiting in the
        terminal exits 1 instead of waiting forever (twistd only reports
        an ``Exception``, not a ``SystemExit``).  Then exit 1, without the
        pid file twistd wrote.

        twistd's config keys ``statusPipe`` (set by
        ``UnixApplicationRunner.setupEnvironment`` when it daemonizes) and
        ``pidfile`` are its own, not an API: without them this only logs
        and exits, as before (tests/e2e/test_relay_e2e.py checks them).
        """
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        fd = self.stderr_fd if self.stderr_fd is not None else 2
        if sys.stderr is not sys.__stderr__ or self.stderr_fd is not None:
            # sys.stderr is twistd's log: say it plainly on the real one too
            try:
                os.write(fd, (line + "\n").encode("utf-8", "backslashreplace"))
            except OSError:
                pass
        self._close_stderr()
        config = self.twistd_config
        if config is not None:
            status = config.get("statusPipe")
            if status is not None:
                config["statusPipe"] = None
                try:
                    os.write(status, b"1 the relay did not start")
                    os.close(status)
                except OSError:
                    pass
            pidfile = config.get("pidfile")
            if pidfile:
                try:
                    os.unlink(pidfile)
                except OSError:
                    pass
        raise SystemExit(1)

    def _close_stderr(self) -> None:
        if self.stderr_fd is not None:
            try:
                os.close(self.stderr_fd)
            except OSError:
                pass
            self.stderr_fd = None

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

    daemon: RelayDaemon = tap.makeService(options, reactor, service_class=RelayDaemon)  # type: ignore[assignment]
    config: Optional[MutableMapping[str, Any]] = getattr(options, "parent", None)
    if config is not None and options.twistd_options():
        daemon.twistd_config = config
        if not config.get("nodaemon"):
            # twistd daemonizes after this and before privilegedStartService
            try:
                daemon.stderr_fd = os.dup(2)
            except OSError:
                daemon.stderr_fd = None
    return daemon
