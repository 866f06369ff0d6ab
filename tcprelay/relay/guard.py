"""
The Twisted side of the edge limits (:mod:`tcprelay.relay.limits`): the
relay's :class:`Guard` is asked by the ports entrance before a visitor gets
a stream and by the control door before a session is built; it counts the
refusals in the relay's stats, logs them (rate-limited, one line per source
per interval), and runs the idle timeout of visitor connections on the
relay's clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable, Optional

from twisted.internet import interfaces
from twisted.logger import Logger

from tcprelay.forward import Splice
from tcprelay.relay.limits import (
    IdleWatch,
    LimitsConfig,
    RefusalLog,
    SessionLimits,
    VisitorLimits,
    ip_key,
)

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["REFUSAL_LOG_INTERVAL", "Guard"]

REFUSAL_LOG_INTERVAL = 60.0
"""Seconds between two log lines about refusals of one source."""

_VISITOR_WHY = {
    "denied": "address not allowed",
    "credential_denied": "address not allowed for this service's credential",
    "ip_limit": "too many connections from its address",
    "service_limit": "too many connections to the service",
    "relay_limit": "too many connections to the relay",
    "rate_limit": "too many new connections to the service",
}

_SESSION_WHY = {
    "ip_limit": "too many control connections from its address",
    "pending_limit": "too many control connections waiting to register",
}


def _host(addr: Any) -> str:
    host = getattr(addr, "host", None)
    return host if isinstance(host, str) else ""


class Guard:
    """The limits of one relay (reconfigured with :meth:`configure` on reload)."""

    log = Logger()

    def __init__(self, relay: Relay, config: LimitsConfig) -> None:
        self.relay = relay
        self.config = config
        self.visitors = VisitorLimits(config)
        self.sessions = SessionLimits(config)
        self.refusals = RefusalLog(REFUSAL_LOG_INTERVAL)

    def configure(self, config: LimitsConfig) -> None:
        """New limits; what is open stays open."""
        self.config = config
        self.visitors.configure(config)
        self.sessions.configure(config)

    def _now(self) -> float:
        return float(self.relay.reactor.seconds())

    def _log_refusal(self, kind: str, host: str, message: str, **fields: Any) -> None:
        key = ip_key(host) or host
        skipped = self.refusals.should_log(f"{kind} {key}", self._now())
        if skipped is None:
            return
        more = f" ({skipped} more since the last line)" if skipped else ""
        self.log.warn(message + "{more}", source=key, more=more, **fields)

    # -- visitors (the ports entrance) -------------------------------------

    def admit_visitor(self, service: Hashable, tunnel: Any, addr: interfaces.IAddress) -> bool:
        """
        Whether a visitor from ``addr`` may be spliced to ``tunnel`` (serving
        ``service``, its route); a refusal is counted and logged.  An
        admitted visitor is counted until :meth:`spliced`'s splice ends (or
        :meth:`not_spliced`).
        """
        host = _host(addr)
        reason = self.visitors.admit(
            host, service, getattr(tunnel, "credential", None), self._now()
        )
        if reason is None:
            return True
        stats = self.relay.stats
        stats.visitors_refused += 1
        stats.visitors_limited[reason] += 1
        self._log_refusal(
            "visitor",
            host,
            "visitor {source} refused at {address}: {why}",
            address=getattr(service, "address", service),
            why=_VISITOR_WHY[reason],
            reason=reason,
        )
        return False

    def not_spliced(self, service: Hashable, addr: interfaces.IAddress) -> None:
        """An admitted visitor got no stream after all."""
        self.visitors.release(_host(addr), service)

    def spliced(self, service: Hashable, addr: interfaces.IAddress, splice: Splice) -> None:
        """An admitted visitor is spliced: release it when done, watch it for idleness."""
        host = _host(addr)
        timeout = self.config.idle_timeout
        timer: Optional[list[Any]] = None
        if timeout > 0:
            timer = [None]
            watch = IdleWatch(timeout, splice.bytes_to_service + splice.bytes_to_visitor, self._now())
            timer[0] = self.relay.reactor.callLater(watch.step, self._idle_check, splice, watch, timer)
        # a bound method and its arguments: no closure, no Deferred per visitor
        splice.when_done(self._released, host, service, timer)

    def _released(self, _: object, host: str, service: Hashable, timer: Optional[list[Any]]) -> None:
        self.visitors.release(host, service)
        if timer is not None:
            call, timer[0] = timer[0], None
            if call is not None and call.active():
                call.cancel()

    def _idle_check(self, splice: Splice, watch: IdleWatch, timer: list[Any]) -> None:
        timer[0] = None
        if splice.finished:
            return
        clock = self.relay.reactor
        if watch.idle(splice.bytes_to_service + splice.bytes_to_visitor, self._now()):
            if splice.visitor.transport is not None:
                self.relay.stats.visitors_idle_closed += 1
                # both ways at once: the visitor's socket and its stream
                for side in (splice.visitor, splice.service):
                    if side.transport is not None and not side.lost:
                        side.transport.loseConnection()
                # a peer that does not read (or never closes its side) would
                # keep that waiting: reset what is not gone one step later
                timer[0] = clock.callLater(watch.step, self._idle_abort, splice)
                return
        timer[0] = clock.callLater(watch.step, self._idle_check, splice, watch, timer)

    def _idle_abort(self, splice: Splice) -> None:
        if splice.finished:
            return
        for side in (splice.visitor, splice.service):
            if side.transport is not None and not side.lost:
                side.transport.abortConnection()

    def service_gone(self, service: Hashable) -> None:
        """``service`` left: forget its rate bucket."""
        self.visitors.forget_service(service)

    # -- control sessions (the door) ---------------------------------------

    def admit_session(self, addr: interfaces.IAddress) -> bool:
        """Whether a control connection from ``addr`` may get a session (refusals counted, logged)."""
        host = _host(addr)
        reason = self.sessions.admit(host)
        if reason is None:
            return True
        self.relay.stats.sessions_limited[reason] += 1
        self._log_refusal(
            "session",
            host,
            "control connection from {source} refused: {why}",
            why=_SESSION_WHY[reason],
            reason=reason,
        )
        return False

    def session_opened(self, session: Hashable, addr: interfaces.IAddress) -> None:
        """An admitted connection's session exists (pending until it registers)."""
        self.sessions.opened(session, _host(addr))

    def session_registered(self, session: Hashable) -> None:
        self.sessions.registered(session)

    def session_gone(self, session: Hashable) -> None:
        self.sessions.release(session)
