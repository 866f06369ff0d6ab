"""
The little of systemd's notify protocol the relay needs: ``READY=1`` once
listening, ``STOPPING=1`` on shutdown, ``WATCHDOG=1`` while alive when the
unit sets ``WatchdogSec=``.  Datagrams to ``$NOTIFY_SOCKET``; a no-op when
it is not set.  (Socket activation itself is Twisted's ``systemd:``
endpoint.)
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["notify", "watchdog_interval", "SystemdNotifier"]


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send one state message; False when there is no notify socket."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode("utf-8"))
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000


class SystemdNotifier(Service):
    """
    Tells systemd how the relay is doing.  Started after the control
    service (so READY=1 goes out once it listens), stopped first (so
    STOPPING=1 goes out as the drain begins).
    """

    log = Logger()
    name = "systemd"

    def __init__(
        self, clock: Any, listening: Optional[Any] = None, environ: Mapping[str, str] = os.environ
    ) -> None:
        self.clock = clock
        self.listening = listening
        """The control service, whose port must be up before READY=1."""
        self.environ = environ
        self._watchdog: Optional[LoopingCall] = None

    def _send(self, message: str) -> None:
        try:
            notify(message, self.environ)
        except OSError as e:
            self.log.warn("cannot notify systemd ({message}): {error}", message=message, error=str(e))

    def startService(self) -> None:
        super().startService()
        waiting: Optional[Deferred[Any]] = getattr(self.listening, "_waitingForPort", None)
        d = maybeDeferred(lambda: None) if waiting is None else waiting
        # _waitingForPort fires with the port; do not consume its result.
        ready: Deferred[Any] = Deferred()
        d.addBoth(lambda result: (ready.callback(None), result)[1])
        ready.addCallback(lambda _: self._when_running(self._ready))

    def _when_running(self, f: Any) -> None:
        """
        Call ``f`` once the reactor runs.  twistd starts services (and the
        control port listens) before ``reactor.run()`` installs the signal
        handlers: a READY=1 sent then could be followed by a SIGTERM that
        kills the relay outright instead of draining it.
        """
        call_when_running = getattr(self.clock, "callWhenRunning", None)
        if call_when_running is None:
            f()
        else:
            call_when_running(f)

    def _ready(self) -> None:
        if not self.running:
            return
        self._send("READY=1")
        interval = watchdog_interval(self.environ)
        if interval is not None:
            self._watchdog = LoopingCall(self._send, "WATCHDOG=1")
            self._watchdog.clock = self.clock
            self._watchdog.start(interval, now=True)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        self._send("STOPPING=1")
