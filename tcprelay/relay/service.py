"""
:class:`RelayService`: the relay as a composable Twisted service.

A MultiService of named children: ``pool`` (the
:class:`~tcprelay.relay.pool.PortPool`), ``public`` (the
:class:`~tcprelay.relay.core.Relay`), ``control`` (the control endpoint's
service), and when configured ``metrics`` and ``systemd``.  Stopping it
stops accepting sessions (control first), then drains.  It changes nothing
process-wide: the daemon (:mod:`tcprelay.relay.daemon`) does that.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from tcprelay._reactor import DEFAULT_BUSY_POLL
from tcprelay.relay.core import Relay

__all__ = ["RelayService"]


class RelayService(MultiService):
    """The relay's services in start and stop order (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        relay: Relay,
        control: Service,
        metrics: Optional[Service] = None,
        notifier: Optional[Service] = None,
        log_observer: Optional[object] = None,
        busy_poll: float = DEFAULT_BUSY_POLL,
        entrances: Sequence[Service] = (),
    ) -> None:
        super().__init__()
        self.relay = relay
        self.control = control
        self.busy_poll = busy_poll
        """Seconds of busy polling a daemon running this relay asks for
        (see :mod:`tcprelay._reactor`); unused by the service itself."""
        self.log_observer = log_observer
        relay.pool.setServiceParent(self)
        relay.setServiceParent(self)
        for entrance in entrances:
            entrance.setServiceParent(self)
        if metrics is not None:
            metrics.setName("metrics")
            metrics.setServiceParent(self)
        control.setName("control")
        control.setServiceParent(self)
        if notifier is not None:
            notifier.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        """
        Attached to twistd's Application: hand it our log observer (twistd
        uses an ILogObserver component of the application when present).
        """
        super().setServiceParent(parent)
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)
