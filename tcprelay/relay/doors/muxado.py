"""
The muxado v1 door: services and agents that dial the control port.

- :class:`ControlFactory` builds a :class:`ControlSession` (a server-role
  :class:`~tcprelay.protocol.MuxProtocol`) per connection.  The first
  stream the agent opens is its handshake, in the dialect its stream type
  says (:mod:`.muxado_handshake`): legacy (the original relay's) or
  extended (tcprelay's own).
- Once registered, the session's :class:`MuxTunnel` is the relay's
  :class:`~tcprelay.relay.interfaces.ITunnel`: each visitor becomes a new
  stream of the session (typed, with a PROXY v2 header when the extended
  agent asked for one; plain and raw for legacy services).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import interfaces
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import handshake as hs
from tcprelay._sniff import looks_like_tls, tls_error_means_not_tls
from tcprelay.forward import Splice
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import SessionClosedError
from tcprelay.protocol import MuxStream
from tcprelay.relay.doors.base import (
    DoorFactory,
    DoorTunnel,
    MuxDoorSession,
    end_tunnel,
    when_quiet,
)
from tcprelay.relay.doors.muxado_handshake import (
    ExtendedHandshake,
    Handshake,
    LegacyHandshake,
)
from tcprelay.relay.interfaces import (
    IAgentSession,
    ITunnel,
    IVisitor,
    TunnelUnavailable,
)
from tcprelay.relay.routes import PortRoute
from tcprelay.relay.watchdog import WatchState

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["FIN_HOLD", "SYN_HOLD", "TLS_ON_PLAIN_PORT", "ControlFactory", "ControlSession", "MuxTunnel"]

TLS_ON_PLAIN_PORT = "this looks like a TLS ClientHello; the control port expects muxado (plain TCP)"
"""Why a control connection that starts with a TLS ClientHello is closed."""

SYN_HOLD = 0.001
"""Seconds a visitor's SYN may wait for the visitor's first bytes when it
had sent none by the time it was accepted: most clients speak first, and
their bytes then leave in the same write as the SYN."""

FIN_HOLD = 0.0002
"""
Seconds a visitor's FIN (its half-close or close) may wait on the
service's session for other frames to leave with it.  A client that closes
one connection and opens the next (sequential requests, health checks)
otherwise has the FIN wake the service on its own just as the next SYN
follows it (sequential connect + 1-byte echo: p50 about 15% lower, and less
relay CPU).  A service that waits for a visitor's end-of-file before
answering answers at most this much later.
"""


@implementer(ITunnel)
class MuxTunnel(DoorTunnel):
    """A registered muxado v1 session: the relay's tunnel to one service."""

    def __init__(
        self,
        control: ControlSession,
        route: PortRoute,
        extended: bool,
        proxy: bool,
        credential: Optional[str],
    ) -> None:
        super().__init__(credential, None)
        self.control = control
        self.route = route
        self.extended = extended
        """Visitor streams are typed (:data:`~tcprelay.handshake.VISITOR_STREAM_TYPE`)."""
        self.proxy = proxy
        """Visitor streams start with a PROXY v2 header."""
        self._stream_type = hs.VISITOR_STREAM_TYPE if extended else 0
        self._watch: dict[Splice, WatchState] = {}

    def expire_streams(
        self,
        now: float,
        open_timeout: Optional[float],
        half_close_timeout: Optional[float],
        splices: Optional[Iterable[Splice]] = None,
    ) -> None:
        """
        End the visitors' streams the service has left waiting (see
        :mod:`tcprelay.relay.watchdog`): unanswered ``open_timeout`` after
        the visitor's first bytes, or silent ``half_close_timeout`` after
        the visitor's end-of-file.  ``splices``: the visitors to look at
        (default: all; the watchdog passes one slice at a time).  Only a
        visitor in one of those two states has a :class:`WatchState`, so
        that idle visitors cost a check no allocation.
        """
        session = self.control.session
        stats = self.control.relay.stats
        watch = self._watch
        visitors = self.visitors
        if splices is None:
            splices = list(visitors)
        for gone in [s for s in watch if s not in visitors]:
            del watch[gone]
        for splice in splices:
            stream = splice.service.transport
            if not isinstance(stream, MuxStream) or stream.disconnected:
                watch.pop(splice, None)
                continue
            unanswered = bool(
                open_timeout and splice.bytes_to_service and not session.heard_from(stream.stream_id)
            )
            half_closed = bool(half_close_timeout and splice.visitor.read_done)
            if not unanswered and not half_closed:
                watch.pop(splice, None)
                continue
            state = watch.get(splice)
            if state is None:
                state = watch[splice] = WatchState()
            expired = None
            if unanswered:
                if state.unanswered_since is None:
                    state.unanswered_since = now
                elif now - state.unanswered_since >= open_timeout:  # type: ignore[operator]
                    expired = ("unanswered", f"the service did not answer within {open_timeout:g}s")
            if expired is None and half_closed:
                if state.mark != splice.bytes_to_visitor:
                    state.mark = splice.bytes_to_visitor
                    state.silent_since = now
                elif state.silent_since is not None and now - state.silent_since >= half_close_timeout:  # type: ignore[operator]
                    expired = (
                        "half_closed",
                        f"the visitor left and the service sent nothing for {half_close_timeout:g}s",
                    )
            if expired is None:
                continue
            del watch[splice]
            reason, text = expired
            stats.visitor_timed_out(reason)
            self.control.log.debug(
                "service {peer}: stream {stream} reset: {why}",
                peer=self.control.label,
                stream=stream.stream_id,
                why=text,
            )
            stream.abortConnection()

    @property
    def label(self) -> str:
        return self.control.label

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        transport = self.control.transport
        return transport.getPeer() if transport is not None else None

    @property
    def dialect(self) -> str:
        return "extended" if self.extended else "legacy"

    def stream_count(self) -> int:
        """Streams open on the session."""
        return self.control.session.stream_count

    def open_stream(self, visitor: IVisitor) -> MuxStream:
        """
        A new stream for ``visitor``.  Without a PROXY header to put first,
        the SYN and the visitor's first bytes leave in one write before
        anything else is set up (a silent visitor's SYN waits up to
        :data:`SYN_HOLD` for its bytes).  With one, the header needs the
        address the visitor dialled: SYN and header leave together once the
        visitor's transport exists, its first bytes right after them.
        """
        control = self.control
        try:
            stream = control.open_stream(None, self._stream_type, flush=False)
        except SessionClosedError:
            raise TunnelUnavailable("session closed") from None
        stream.fin_hold = FIN_HOLD
        first = visitor.first
        if self.proxy:
            peer = visitor.peer

            def connected(transport: Any) -> None:
                host = getattr(visitor, "dialled", None) or transport.getHost()
                stream.write(
                    hs.encode_proxy_v2(
                        hs.ProxyHeader(peer.host, peer.port, host.host, host.port)  # type: ignore[attr-defined]
                    )
                )
                if first:
                    stream.write(first)
                control.flush()

            visitor.when_connected(connected)
        elif first:
            stream.write(first)  # SYN, window and bytes: one write
            if stream.disconnected:
                raise TunnelUnavailable("stream reset at once")
        else:
            # The SYN leaves with the visitor's bytes (any flush of the
            # session sends it), or at most SYN_HOLD later.
            control.flush_within(SYN_HOLD)
        return stream

    def close(self, reason: str) -> None:
        """End the session (GOAWAY NO_ERROR)."""
        self.control.end(reason)


@implementer(IAgentSession)
class ControlSession(MuxDoorSession):
    """One agent's control connection (server role), registered or not."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.tunnel: Optional[MuxTunnel] = None
        self.handshake: Optional[Handshake] = None
        self._head: Optional[bytes] = b""
        """The connection's first bytes until they are known not to be a
        TLS ClientHello (then None)."""

    def dataReceived(self, data: bytes) -> None:
        """Check the connection's first bytes for a TLS ClientHello, then feed the session."""
        head = self._head
        if head is not None:
            head += data
            verdict = looks_like_tls(head)
            if verdict is None:
                self._head = head
                return
            self._head = None
            if verdict:
                # one line (session PEER ended: ...), a GOAWAY the TLS client
                # will call "not TLS", and the connection closed
                self.close(ErrorCode.PROTOCOL_ERROR, TLS_ON_PLAIN_PORT)
                return
            data = head
        super().dataReceived(data)

    def _accept_stream(self, stream: MuxStream) -> Optional[Protocol]:
        if self.handshake is not None or self.relay.draining:
            return None
        if stream.stream_type == hs.CONTROL_STREAM_TYPE:
            self.handshake = ExtendedHandshake(self)
        else:
            self.handshake = LegacyHandshake(self)
        return self.handshake

    def registered(self, route: PortRoute, handshake: Handshake) -> MuxTunnel:
        """The handshake claimed ``route``: the session's tunnel serves it from now on."""
        tunnel = MuxTunnel(self, route, handshake.extended, handshake.proxy, handshake.credential)
        self.tunnel = tunnel
        self.registered_limits()
        self.relay.publish(route, tunnel, pool=handshake.pool)
        return tunnel

    # -- lifecycle ---------------------------------------------------------

    def handshake_started(self) -> None:
        """The service asked for a port: the handshake deadline is met."""
        self.deadline.cancel()

    def handshake_expired(self) -> None:
        if self.session.ended:
            return
        self.log.warn(
            "session {session} sent no handshake within {seconds:g}s; closing it",
            session=self.label,
            seconds=self.relay.config.handshake_timeout,
        )
        self.close(ErrorCode.PROTOCOL_ERROR, "no handshake in time")

    def session_ended(self, event: ev.SessionEnded) -> None:
        stats = self.relay.stats
        self.handshake_started()
        refused_by_us = not event.remote and event.error_code == ErrorCode.REFUSED_STREAM
        if event.error_code not in (None, ErrorCode.NO_ERROR) and not refused_by_us:
            stats.protocol_error(event.error_code)
        if self.session.heartbeat_timed_out:
            stats.heartbeat_timeouts += 1
        self._unregister(f"left: {event.reason}", reason=event.reason)

    def goaway_received(self, event: ev.GoAwayReceived) -> None:
        """
        The service is going away: no new visitor can get a stream, so its
        public port closes now, and the session closes once its visitors are
        done.  The port is held for an extended agent's lease unless the
        agent said it is leaving for good (a GOAWAY alone may be an agent
        whose heartbeat timed out and that will be back).
        """
        self._unregister("is going away; public port closed")
        self._close_when_quiet("service went away")

    def _unregister(self, what: str, **fields: object) -> None:
        """
        Log ``what`` happened to the service and take its tunnel off its
        route (once): the port is freed, or held for an extended agent's
        lease unless the agent said it is leaving.
        """
        tunnel = self.tunnel
        if tunnel is None:
            return
        route = tunnel.route
        self.log.info(
            "service {peer} at {address} {what}",
            peer=self.label,
            address=route.address,
            what=what,
            service_port=route.port,
            session=self.label,
            **fields,
        )
        leaving = self.handshake is not None and self.handshake.leaving
        lease = None
        if tunnel.extended and not leaving and tunnel.lease_token:
            lease = (tunnel.lease_token, tunnel.credential)
        end_tunnel(self.relay, tunnel, lease)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        """The socket is closed: only now is the session gone for good."""
        if self._head == b"" and tls_error_means_not_tls(reason.getErrorMessage()):
            # a TLS control port, and the first bytes were not TLS
            self.log.info(
                "session {session} ended: the TLS handshake failed ({error}); "
                "the control port speaks TLS and the agent does not",
                session=self.label,
                error=reason.getErrorMessage(),
            )
        super().connectionLost(reason)
        # each refers back to this session: let reference counting free all three
        self.handshake = None
        self.tunnel = None

    # -- IAgentSession -----------------------------------------------------

    def drain(self, reason: str) -> None:
        """GOAWAY now; close once the visitors are done."""
        self.go_away()
        self._close_when_quiet(reason)

    def end(self, reason: str) -> None:
        """End the session now (GOAWAY NO_ERROR)."""
        self.close(ErrorCode.NO_ERROR, reason)

    def stream_count(self) -> int:
        """Streams open on the session."""
        return self.session.stream_count

    def _close_when_quiet(self, reason: str) -> None:
        """Close the session as soon as it has no visitors left."""
        if self.session.ended:
            return
        tunnel = self.tunnel
        if tunnel is None or not tunnel.visitors:
            self.end(reason)
            return

        def quiet() -> None:
            if not self.session.ended:
                self.end(reason)

        when_quiet([tunnel], quiet)


class ControlFactory(DoorFactory):
    """Builds a :class:`ControlSession` for each agent connection."""

    session = ControlSession
