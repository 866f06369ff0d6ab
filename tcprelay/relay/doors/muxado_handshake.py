"""
The two dialects an agent speaks on the first stream of its muxado v1
session: the original relay's (:class:`LegacyHandshake`) and tcprelay's
own (:class:`ExtendedHandshake`, see :mod:`tcprelay.handshake`).

Both ask the relay for a public port (:meth:`Relay.claim_port`), then
register the session's tunnel on it; they differ in what they can say.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay.mux.frames import ErrorCode
from tcprelay.relay.pool import PoolTimeout
from tcprelay.relay.core import RouteRefused
from tcprelay.relay.pooled import PooledTunnel
from tcprelay.relay.routes import PortRoute

if TYPE_CHECKING:
    from tcprelay.relay.doors.muxado import ControlSession, MuxTunnel

__all__ = ["ExtendedHandshake", "Handshake", "LegacyHandshake"]


class Handshake(Protocol):
    """
    What both dialects share on the service's first stream: claim a port
    (a resumed lease, a requested free port, or the pool's queue), register
    the tunnel on it and report the address.  Subclasses speak the dialect.
    """

    log = Logger()
    extended = False
    leaving = False
    """The agent said it is leaving for good (its port is not held)."""

    def __init__(self, control: ControlSession) -> None:
        self.control = control
        self._claim: Optional[Deferred[PortRoute]] = None
        self.done = False
        self.proxy = False
        self.pool = False
        """The agent asked to share its route with agents of its credential."""
        self.credential: Optional[str] = None
        self.queue_position = 0

    def register(self, wanted: Optional[int] = None, lease: Optional[str] = None) -> None:
        """Find a port for the service and report it (or queue, or refuse)."""
        control = self.control
        relay = control.relay
        control.handshake_started()
        self._started = relay.reactor.seconds()
        claim = relay.claim_port(wanted, lease, self.credential, self._queued, pool=self.pool)
        self._claim = claim
        claim.addCallbacks(self._got_route, self._no_port)

    def register_name(self, kind: str, name: str, lease: Optional[str]) -> None:
        """Claim the named route ``kind`` ``name`` for the service and report it (or refuse)."""
        control = self.control
        relay = control.relay
        control.handshake_started()
        self._started = relay.reactor.seconds()
        claim = relay.claim_name(kind, name, lease, self.credential, pool=self.pool)
        self._claim = claim  # type: ignore[assignment]
        claim.addCallbacks(self._got_route, self._no_port)  # type: ignore[arg-type]

    def _queued(self, position: int) -> None:
        first = self.queue_position == 0
        self.queue_position = position
        if first:
            self.log.info(
                "service {peer} queued for a public port at position {position}",
                peer=self.control.label,
                position=position,
                session=self.control.label,
            )
        self.report_position(position)

    def _got_route(self, route: PortRoute) -> None:
        self._claim = None
        control = self.control
        relay = control.relay
        if control.session.ended or self.transport is None or relay.draining:
            if relay.registry.lookup(route) is None:  # not a pool's that it joined
                relay.release_route(route)
            return
        tunnel = control.registered(route, self)
        relay.stats.record_handshake(relay.reactor.seconds() - self._started)
        self.done = True
        pooled = relay.registry.lookup(route)
        self.log.info(
            "service {peer} registered at {address}{pool}",
            peer=control.label,
            address=route.address,
            pool=f" (pooled, {len(pooled.members)} agents)" if isinstance(pooled, PooledTunnel) else "",
            service_port=route.port,
            session=control.label,
            dialect=tunnel.dialect,
        )
        self.report_address(tunnel)

    def _no_port(self, failure: Failure) -> None:
        self._claim = None
        if failure.check(CancelledError):
            return
        if failure.check(PoolTimeout):
            self.refuse(str(failure.value), ErrorCode.REFUSED_STREAM)
            return
        if failure.check(RouteRefused):
            refused: RouteRefused = failure.value
            self.refuse(str(refused), ErrorCode.REFUSED_STREAM, retry=refused.retry)
            return
        self.log.failure("acquiring a port", failure)

    def refuse(self, reason: str, code: int, retry: Optional[bool] = None) -> None:
        """Turn the service away: one log line, then GOAWAY.  ``retry``: whether
        the agent may try again (default: unless authentication failed)."""
        control = self.control
        self.log.warn(
            "service {peer} refused: {reason}",
            peer=control.label,
            reason=reason,
            session=control.label,
        )
        control.relay.stats.services_refused += 1
        if retry is None:
            retry = not reason.startswith("authentication")
        self.report_refusal(reason, code, retry)
        control.close(code, reason)

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:
        if self._claim is not None:
            claim, self._claim = self._claim, None
            claim.cancel()

    # -- dialect -----------------------------------------------------------

    def report_position(self, position: int) -> None:
        """Tell the service its place in the queue (if the dialect can)."""

    def report_address(self, tunnel: MuxTunnel) -> None:
        """Tell the service its public address."""
        raise NotImplementedError

    def report_refusal(self, reason: str, code: int, retry: bool) -> None:
        """Tell the service why it is refused (if the dialect can)."""


class LegacyHandshake(Handshake):
    """
    The original relay's handshake, on a plain first stream: write
    ``HOST:PORT`` in ASCII, then FIN.
    """

    def connectionMade(self) -> None:
        relay = self.control.relay
        if relay.secrets:
            relay.stats.auth_failures += 1
            self.refuse(
                "authentication required: untyped (legacy) handshake refused",
                ErrorCode.REFUSED_STREAM,
            )
            return
        self.register()

    def report_address(self, tunnel: MuxTunnel) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(tunnel.route.address.encode("ascii"))
        transport.loseWriteConnection()  # type: ignore[attr-defined]


class ExtendedHandshake(Handshake):
    """
    tcprelay's own handshake on a :data:`CONTROL_STREAM_TYPE` stream: hello
    (nonce, auth) -> register (mac, port, lease, proxy) -> queued* ->
    ready | refused.  See :mod:`tcprelay.handshake`.
    """

    extended = True

    def __init__(self, control: ControlSession) -> None:
        super().__init__(control)
        self._reader = hs.MessageReader()
        self._nonce = hs.make_nonce()
        self._registered = False

    def connectionMade(self) -> None:
        self._send("hello", nonce=self._nonce, auth=bool(self.control.relay.secrets))

    def _send(self, kind: str, **fields: object) -> None:
        transport = self.transport
        if transport is not None and not self.control.session.ended:
            transport.write(hs.encode_message(kind, **fields))

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except hs.HandshakeError as e:
            self.refuse(f"bad handshake: {e}", ErrorCode.PROTOCOL_ERROR)
            return
        for message in messages:
            kind = message.get("type")
            if kind == "register" and not self._registered:
                self._registered = True
                self._on_register(message)
                if self.control.session.ended:
                    return
            elif kind == "leave":
                # The agent is stopping on purpose: its lease ends with it.
                self.leaving = True

    def _on_register(self, message: dict[str, object]) -> None:
        relay = self.control.relay
        if relay.secrets:
            self.credential = relay.credential_for(self._nonce, message.get("mac"))
            if self.credential is None:
                relay.stats.auth_failures += 1
                self.refuse("authentication failed", ErrorCode.REFUSED_STREAM)
                return
        port = message.get("port")
        lease = message.get("lease")
        self.proxy = message.get("proxy") is True
        self.pool = message.get("pool") is True
        kind = message.get("route", "port")
        if kind != "port":
            name = message.get("name")
            if not isinstance(kind, str) or not isinstance(name, str) or not name:
                self.refuse("bad handshake: a named route needs a kind and a name", ErrorCode.PROTOCOL_ERROR, retry=False)
                return
            self.register_name(kind, name, lease if isinstance(lease, str) else None)
            return
        wanted = port if isinstance(port, int) and port in relay.pool.ports else None
        self.register(wanted, lease if isinstance(lease, str) else None)

    def report_position(self, position: int) -> None:
        self._send("queued", position=position)

    def report_address(self, tunnel: MuxTunnel) -> None:
        relay = self.control.relay
        route = tunnel.route
        tunnel.lease_token = relay.new_lease_token()
        self._send(
            "ready",
            address=route.address,
            host=route.host,
            port=route.port,
            route=route.kind,
            name=route.name,
            lease=tunnel.lease_token,
            lease_seconds=relay.config.lease,
        )

    def report_refusal(self, reason: str, code: int, retry: bool) -> None:
        self._send("refused", reason=reason, code=code, retry=retry)
