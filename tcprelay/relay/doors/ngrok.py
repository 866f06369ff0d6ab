"""
The ngrok door: ngrok's official agent SDKs (Python ``ngrok``, JavaScript
``@ngrok/ngrok``, Rust, Go) as agents, through ``--ngrok ENDPOINT``.

An SDK given ``server_addr`` (and the relay's CA) dials the door over TLS
and speaks muxado v2 (:mod:`tcprelay.mux2`) with typed streams:

- **Auth** (stream type 0): its ``Extra.AuthToken`` (``Authtoken`` in Go)
  must be one of the relay's secrets (``--secret``, ``--secrets-file``):
  that secret is the session's credential, with its rules.  A relay without
  secrets is open, as for the other doors.  A wrong token gets
  ``{"Error": ...}``, which the SDK raises from ``connect()``.
- **Bind** (1): ``Proto`` ``tcp`` claims a public port of the relay's range
  (``Opts.Addr`` may ask for one); ``http``/``https`` and ``tls`` claim a
  name on the shared HTTP or TLS entrance (``Opts.Hostname``, ``Domain``
  or ``Subdomain``; a name of its own otherwise).  The reply's ``Id`` is
  the route's lease token: an SDK reconnecting within ``--lease`` seconds
  binds again with that ``Id`` and gets the same port or name back; a TCP
  bind's ``Id`` also names its port, so that after a relay restart (no
  lease survives) the SDK gets its port back when it is still free.
- **Unbind** (2) gives a bind's route up.  The requests tcprelay does not
  implement (StartTunnelWithLabel, and the server-to-agent ones when an SDK
  sends them) get an ``Error`` reply naming them.
- Each visitor becomes a **Proxy** stream (3) the relay opens: the proxy
  header (:func:`tcprelay.mux2.rpc.encode_proxy_header`, with the visitor's
  address in ``ClientAddr``), then, when the bind asked for it
  (``Opts.ProxyProto`` 1 or 2), a PROXY protocol v1 or v2 header, then the
  visitor's bytes.  The v2 windows (256 KiB) give backpressure both ways
  and FIN the half-close.
- The SDK's heartbeat stream is echoed by the session; a session silent for
  longer than its heartbeat interval plus tolerance (from Auth, at least
  ``--heartbeat-tolerance``) is closed.

Why one module of this size: the door is one protocol's server side (the
session, its requests and the tunnels of its binds) whose parts share the
session's state (its binds and the claims under way); the framing is
:mod:`tcprelay.mux2`, the messages :mod:`tcprelay.mux2.rpc`, and what the
doors share :mod:`.base`.
"""

from __future__ import annotations

import hmac
import re
import time
from secrets import token_hex
from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import __version__
from tcprelay import handshake as hs
from tcprelay.mux import events as ev
from tcprelay.mux.session import Role, SessionClosedError, SessionConfig
from tcprelay.mux2 import rpc
from tcprelay.mux2.frames import ErrorCode
from tcprelay.mux2.session import Session as V2Session
from tcprelay.protocol import MuxStream
from tcprelay.relay.doors.base import (
    DoorFactory,
    DoorTunnel,
    MuxDoorSession,
    claim_refusal,
    end_tunnel,
    when_quiet,
)
from tcprelay.relay.interfaces import IAgentSession, ITunnel, IVisitor, TunnelUnavailable
from tcprelay.relay.routes import NameRoute, PortRoute
from tcprelay.secrets import credential_id

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["NgrokDoor", "NgrokFactory", "NgrokSession", "NgrokTunnel", "RpcStream"]

log = Logger(namespace="tcprelay.relay.doors.ngrok")

FIN_HOLD = 0.0002
"""Seconds a visitor's FIN may wait for other frames (as on the muxado door)."""

CLOSE_GRACE = 0.1
"""Seconds an ended session's connection has to flush its last frames
before it is closed for good.  An SDK does not close the connection after
a GOAWAY (it reconnects beside it), and a TLS close waits for the peer's
close_notify: without this, a relay shutting down would wait for its
CLOSE_TIMEOUT, and SDKs retry a lost relay only about 0, 0.05 and 2.5 s
after the loss, then only after about two minutes."""

AUTH_REFUSED_GRACE = 5.0
"""Seconds a session whose Auth was refused stays open for the SDK to read
the error (it closes the connection itself); then the relay closes it."""

_ID_PORT = re.compile(r"^tcp-(\d{1,5})-[0-9a-f]+$")

_STATS_CODES: dict[int, int] = {
    ErrorCode.PROTOCOL: 1,
    ErrorCode.INTERNAL: 2,
    ErrorCode.FLOW_CONTROL: 3,
    ErrorCode.STREAM_CLOSED: 4,
    ErrorCode.FRAME_SIZE: 5,
    ErrorCode.STREAM_REFUSED: 6,
    ErrorCode.STREAM_CANCELLED: 7,
}
"""v2 error codes counted under the v1 names of the relay's metrics."""

Reply = Union[bytes, "Deferred[bytes]"]


def _port_of(text: str) -> Optional[int]:
    """The port of ``host:port``, ``:port`` or ``port``; None when there is none."""
    tail = text.rsplit(":", 1)[-1].strip()
    if tail.isdigit() and 0 < int(tail) < 65536:
        return int(tail)
    return None


def _proxy_proto(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int) and value in (1, 2):
        return value
    if isinstance(value, str) and value in ("1", "2"):
        return int(value)
    return 0


# -- RPC streams ------------------------------------------------------------------


@implementer(interfaces.IHalfCloseableProtocol)
class RpcStream(Protocol):
    """
    One request of the SDK on a typed stream: the JSON object is read as
    it arrives (the SDK does not half-close before it reads the reply), the
    session answers it, and the reply goes out followed by FIN.
    """

    def __init__(self, session: NgrokSession, kind: int) -> None:
        self.session = session
        self.kind = kind
        self.reader = rpc.JsonReader()
        self.answered = False
        self._pending: Optional[Deferred[bytes]] = None

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        try:
            request = self.reader.feed(data)
        except rpc.RequestError as e:
            self._answer(rpc.error_reply(f"{rpc.REQUEST_NAMES.get(self.kind, 'request')}: {e}"))
            return
        if request is None:
            return
        self.answered = True
        d = maybeDeferred(self.session.handle, self.kind, request)
        self._pending = d
        d.addErrback(self._failed)
        d.addCallback(self._answer)

    def _failed(self, failure: Failure) -> bytes:
        if not failure.check(CancelledError):
            log.failure("ngrok agent {peer}: request", failure, peer=self.session.label)
        return rpc.error_reply("internal error of the relay")

    def _answer(self, reply: bytes) -> None:
        self.answered = True
        self._pending = None
        transport = self.transport
        if transport is None or getattr(transport, "disconnected", False):
            return
        transport.write(reply)
        transport.loseConnection()

    def readConnectionLost(self) -> None:
        if not self.answered:
            self._answer(rpc.error_reply("the request ended before its JSON object did"))

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()


# -- tunnels: one per bind --------------------------------------------------------


@implementer(ITunnel)
class NgrokTunnel(DoorTunnel):
    """One bind of an SDK session: the relay's tunnel to one of its endpoints."""

    dialect = "ngrok"
    lease_token: str

    def __init__(
        self,
        session: NgrokSession,
        route: Union[PortRoute, NameRoute],
        bind_id: str,
        proto: str,
        proxy_proto: int,
    ) -> None:
        super().__init__(session.credential, bind_id)
        self.session = session
        self.route = route
        self.bind_id = bind_id
        self.proto = proto
        self.proxy_proto = proxy_proto
        """PROXY protocol version written before the visitor's bytes (0: none)."""

    @property
    def control(self) -> NgrokSession:
        """The agent session (what the guard counts)."""
        return self.session

    @property
    def label(self) -> str:
        return self.session.label

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        transport = self.session.transport
        return transport.getPeer() if transport is not None else None

    def stream_count(self) -> int:
        """Visitors' streams open on this bind."""
        return len(self.visitors)

    def open_stream(self, visitor: IVisitor) -> MuxStream:
        """A Proxy stream for ``visitor``: the proxy header, any PROXY header, its bytes."""
        session = self.session
        if self.ended.called or session.session.ended:
            raise TunnelUnavailable("the ngrok session is gone")
        try:
            stream = session.open_stream(None, rpc.PROXY, flush=False)
        except SessionClosedError:
            raise TunnelUnavailable("the ngrok session is closing") from None
        stream.fin_hold = FIN_HOLD
        peer = visitor.peer
        host = str(getattr(peer, "host", ""))
        port = int(getattr(peer, "port", 0))
        stream.write(rpc.encode_proxy_header(self.bind_id, rpc.host_port(host, port), self.proto))
        first = visitor.first
        if self.proxy_proto:
            version = self.proxy_proto

            def connected(transport: Any) -> None:
                local = transport.getHost()
                header = hs.ProxyHeader(host, port, local.host, local.port)
                stream.write(hs.encode_proxy_v2(header) if version == 2 else hs.encode_proxy_v1(header))
                if first:
                    stream.write(first)

            visitor.when_connected(connected)
        elif first:
            stream.write(first)
        if stream.disconnected:
            raise TunnelUnavailable("stream reset at once")
        return stream

    def close(self, reason: str) -> None:
        """Give the route up and reset every visitor's stream."""
        self.session.end_tunnel(self, None, reason)
        for splice in list(self.visitors):
            transport = splice.service.transport
            if transport is not None:
                transport.abortConnection()


# -- the session: one SDK connection ----------------------------------------------


@implementer(IAgentSession)
class NgrokSession(MuxDoorSession):
    """One SDK's connection (muxado v2, server role), authenticated or not yet."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay)
        self.authenticated = False
        self.refused = False
        self.credential: Optional[str] = None
        self.client_id = ""
        self.tunnels: dict[str, NgrokTunnel] = {}
        """Published binds by Id."""
        self.claims: dict[str, Deferred[Any]] = {}
        """Binds still waiting for their route, by Id (or a placeholder)."""
        self._closer: Optional[IDelayedCall] = None
        self._opened = time.monotonic()

    def make_session(self, role: Role, config: SessionConfig, now: float) -> Any:
        """muxado v2 (the SDKs' framing)."""
        return V2Session(role, config, now)

    # -- lifecycle ---------------------------------------------------------

    def handshake_expired(self) -> None:
        if self.session.ended:
            return
        if self.refused:
            self.close(ErrorCode.NONE, "authentication failed")
            return
        log.info(
            "ngrok agent {peer} did not authenticate within {seconds:g}s; closing it",
            peer=self.label,
            seconds=self.relay.config.handshake_timeout,
        )
        self.close(ErrorCode.PROTOCOL, "no Auth in time")

    def session_ended(self, event: ev.SessionEnded) -> None:
        self.deadline.cancel()
        if self._connected:
            self._closer = self.clock.callLater(CLOSE_GRACE, self._close_now)
        stats = self.relay.stats
        code = event.error_code
        if code not in (None, ErrorCode.NONE) and not event.remote:
            stats.protocol_error(_STATS_CODES.get(code, -1))
        if self.session.heartbeat_timed_out:
            stats.heartbeat_timeouts += 1
        for d in list(self.claims.values()):
            d.cancel()
        for tunnel in list(self.tunnels.values()):
            self.end_tunnel(tunnel, (tunnel.lease_token, tunnel.credential), f"session ended: {event.reason}")
        if self.authenticated:
            log.info("ngrok agent {peer} left: {why}", peer=self.label, why=event.reason)

    def _close_now(self) -> None:
        self._closer = None
        transport = self.transport
        if self._connected and transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        closer, self._closer = self._closer, None
        if closer is not None and closer.active():
            closer.cancel()
        super().connectionLost(reason)

    # -- IAgentSession -----------------------------------------------------

    def drain(self, reason: str) -> None:
        """Give every route up; close once the visitors are done (a GOAWAY ends an SDK's session)."""
        for d in list(self.claims.values()):
            d.cancel()
        tunnels = list(self.tunnels.values())
        for tunnel in tunnels:
            self.end_tunnel(tunnel, None, reason)

        def quiet() -> None:
            if not self.session.ended:
                self.end(reason)

        when_quiet(tunnels, quiet)

    def end(self, reason: str) -> None:
        """End the session now (GOAWAY)."""
        self.close(ErrorCode.NONE, reason)

    def stream_count(self) -> int:
        """Streams open on the session."""
        return int(self.session.stream_count)

    # -- streams the SDK opens ------------------------------------------------

    def _accept_stream(self, stream: MuxStream) -> Optional[Protocol]:
        kind = stream.stream_type
        if kind == rpc.PROXY or kind not in rpc.REQUEST_NAMES:
            return None
        return RpcStream(self, kind)

    def handle(self, kind: int, request: dict[str, Any]) -> Reply:
        """The reply to one request (or a Deferred of it)."""
        name = rpc.REQUEST_NAMES.get(kind, str(kind))
        if self.refused:
            return rpc.error_reply("authentication failed")
        if kind == rpc.AUTH:
            return self.auth(request)
        if not self.authenticated:
            return rpc.error_reply(f"{name} before Auth")
        if kind == rpc.BIND:
            return self.bind(request)
        if kind == rpc.UNBIND:
            return self.unbind(request)
        if kind == rpc.BIND_LABELED:
            return rpc.error_reply(
                "tcprelay does not implement StartTunnelWithLabel (labeled tunnels, edges): "
                "use an endpoint (tcp, http or tls) instead"
            )
        return rpc.error_reply(f"tcprelay does not implement the {name} request")

    # -- Auth ------------------------------------------------------------------

    def auth(self, request: dict[str, Any]) -> bytes:
        """Check the authtoken; reply with the protocol version and a client id."""
        relay = self.relay
        if self.authenticated:
            return rpc.error_reply("this session has already authenticated")
        extra = rpc.field(request, "Extra", {})
        token = rpc.text_field(extra, "AuthToken")
        secrets = relay.secrets
        if secrets:
            given = token.encode("utf-8")
            found: Optional[bytes] = None
            for secret in secrets:  # every one compared, in constant time
                if hmac.compare_digest(secret, given):
                    found = secret
            if found is None:
                relay.stats.auth_failures += 1
                self.refused = True
                log.info(
                    "ngrok agent {peer}: authtoken refused ({why})",
                    peer=self.label,
                    why="none given" if not token else "not one of the relay's secrets",
                )
                self.deadline.start(self.clock, AUTH_REFUSED_GRACE, self.handshake_expired)
                return rpc.error_reply(
                    "authentication failed: the authtoken is not one of this relay's secrets",
                    "ERR_NGROK_105",
                )
            self.credential = credential_id(found)
        self.authenticated = True
        self.deadline.cancel()
        self.registered_limits()
        relay.stats.record_handshake(time.monotonic() - self._opened)
        interval = rpc.field(extra, "HeartbeatInterval")
        tolerance = rpc.field(extra, "HeartbeatTolerance")
        if isinstance(interval, int) and isinstance(tolerance, int) and interval > 0 and tolerance > 0:
            # nanoseconds: the SDK's own deadline, and one interval more
            silence = (2 * interval + tolerance) / 1e9
            self.session.idle_timeout = max(silence, relay.config.session.heartbeat_tolerance)
        client_id = rpc.text_field(request, "ClientId")
        self.client_id = client_id or token_hex(16)
        versions = rpc.field(request, "Version", [])
        if not isinstance(versions, list):
            versions = []
        version = "3" if "3" in versions else next((v for v in versions if isinstance(v, str)), "3")
        log.info(
            "ngrok agent {peer} authenticated{who} ({client})",
            peer=self.label,
            who=f" as {self.credential}" if self.credential else "",
            client=rpc.text_field(extra, "ClientType") or rpc.text_field(extra, "UserAgent") or "SDK",
        )
        return rpc.encode_reply(
            {
                "Version": version,
                "ClientId": self.client_id,
                "Extra": {
                    "Version": f"tcprelay {__version__}",
                    "Region": "",
                    "Cookie": "",
                    "AccountName": "",
                    "SessionDuration": 0,
                    "PlanName": "",
                    "Banner": "",
                },
            }
        )

    # -- Bind / Unbind ----------------------------------------------------------

    def _refuse(self, what: str, why: str, retry: bool = False) -> bytes:
        self.relay.stats.services_refused += 1
        log.info("ngrok agent {peer}: bind {what} refused: {why}", peer=self.label, what=what, why=why)
        return rpc.error_reply(f"bind {what} refused: {why}")

    def _claim_failed(self, what: str, failure: Failure) -> bytes:
        why = claim_refusal(failure)
        if why is None:
            return failure  # type: ignore[return-value]
        if not why:
            return rpc.error_reply("cancelled: the session is ending")
        return self._refuse(what, why)

    def bind(self, request: dict[str, Any]) -> Reply:
        """A Bind: claim the route its ``Proto`` and ``Opts`` ask for, publish its tunnel."""
        relay = self.relay
        proto = rpc.text_field(request, "Proto").lower()
        opts = rpc.field(request, "Opts", {})
        if not isinstance(opts, dict):
            opts = {}
        bind_id = rpc.text_field(request, "Id")
        what = proto or "(no Proto)"
        if relay.draining or self.session.ended:
            return self._refuse(what, "the relay is shutting down")
        if bind_id and (bind_id in self.tunnels or bind_id in self.claims):
            return self._refuse(what, f"Id {bind_id} is already bound on this session")
        if proto not in ("tcp", "http", "https", "tls"):
            return self._refuse(what, "tcprelay binds tcp, http, https and tls endpoints")
        stale = [
            tunnel
            for _, tunnel in relay.registry.routes()
            if isinstance(tunnel, NgrokTunnel)
            and bind_id
            and tunnel.bind_id == bind_id
            and tunnel.session is not self
            and tunnel.credential == self.credential
        ]
        if stale:
            # The SDK reconnected before the relay noticed its old session
            # was dead: the old bind goes to its lease, taken up at once.
            old = stale[0]
            released = old.session.end_tunnel(
                old, (old.lease_token, old.credential), "replaced by a reconnected session"
            )
            return released.addCallback(lambda _: self.bind(request))
        proxy_proto = _proxy_proto(rpc.field(opts, "ProxyProto"))
        if proto == "tcp":
            return self._bind_port(bind_id, opts, proxy_proto)
        return self._bind_name("tls" if proto == "tls" else "http", proto, bind_id, opts, proxy_proto)

    def _bind_port(self, bind_id: str, opts: dict[str, Any], proxy_proto: int) -> Reply:
        relay = self.relay
        config = relay.config
        asked = _port_of(rpc.text_field(opts, "Addr"))
        if asked is not None and asked not in config.ports:
            return self._refuse(
                "tcp",
                f"port {asked} is outside the relay's range {config.ports[0]}-{config.ports[-1]}",
            )
        wanted = asked
        if wanted is None and bind_id:
            match = _ID_PORT.match(bind_id)
            if match is not None and int(match.group(1)) in config.ports:
                wanted = int(match.group(1))  # its port before a relay restart
        credential = self.credential
        key = bind_id or f"pending-{token_hex(4)}"
        d: Deferred[Any] = maybeDeferred(
            relay.claim_port, wanted, bind_id or None, credential, lambda position: None
        )
        self.claims[key] = d

        def claimed(route: PortRoute) -> bytes:
            self.claims.pop(key, None)
            tid = bind_id or f"tcp-{route.port}-{token_hex(8)}"
            if self.session.ended:
                relay.release_route(route, (tid, credential))
                return rpc.error_reply("the session has ended")
            if asked is not None and route.port != asked:
                relay.release_route(route)
                return self._refuse("tcp", f"port {asked} is taken")
            tunnel = self._publish(route, tid, "tcp", proxy_proto)
            reply_opts = dict(opts)
            reply_opts["Addr"] = route.address
            reply_opts["ProxyProto"] = proxy_proto
            return rpc.encode_reply(
                {
                    "Id": tunnel.bind_id,
                    "URL": f"tcp://{route.address}",
                    "Proto": "tcp",
                    "Opts": reply_opts,
                    "Extra": {"Token": ""},
                }
            )

        def failed(failure: Failure) -> bytes:
            self.claims.pop(key, None)
            return self._claim_failed("tcp", failure)

        return d.addCallbacks(claimed, failed)

    def _bind_name(
        self, kind: str, proto: str, bind_id: str, opts: dict[str, Any], proxy_proto: int
    ) -> Reply:
        relay = self.relay
        tid = bind_id or f"{kind}-{token_hex(8)}"
        requested = (
            rpc.text_field(opts, "Hostname")
            or rpc.text_field(opts, "Domain")
            or rpc.text_field(opts, "Subdomain")
            or "n" + tid.rsplit("-", 1)[-1][:8].lower()
        )
        credential = self.credential
        d: Deferred[Any] = maybeDeferred(relay.claim_name, kind, requested, tid, credential)
        self.claims[tid] = d

        def claimed(route: NameRoute) -> bytes:
            self.claims.pop(tid, None)
            if self.session.ended:
                relay.release_route(route, (tid, credential))  # type: ignore[arg-type]
                return rpc.error_reply("the session has ended")
            if relay.registry.lookup(route) is not None:
                return self._refuse(proto, f"{kind} name {route.name} is taken")
            tunnel = self._publish(route, tid, proto, proxy_proto)
            reply_opts = dict(opts)
            reply_opts["Hostname"] = route.name
            reply_opts["ProxyProto"] = proxy_proto
            return rpc.encode_reply(
                {
                    "Id": tunnel.bind_id,
                    "URL": route.address.rstrip("/"),
                    "Proto": proto,
                    "Opts": reply_opts,
                    "Extra": {"Token": ""},
                }
            )

        def failed(failure: Failure) -> bytes:
            self.claims.pop(tid, None)
            return self._claim_failed(proto, failure)

        return d.addCallbacks(claimed, failed)

    def _publish(
        self, route: Union[PortRoute, NameRoute], bind_id: str, proto: str, proxy_proto: int
    ) -> NgrokTunnel:
        tunnel = NgrokTunnel(self, route, bind_id, proto, proxy_proto)
        self.tunnels[bind_id] = tunnel
        self.relay.publish(route, tunnel)  # type: ignore[arg-type]
        log.info(
            "ngrok agent {peer} serves {address} ({proto} bind {id})",
            peer=self.label,
            address=route.address,
            proto=proto,
            id=bind_id,
        )
        return tunnel

    def unbind(self, request: dict[str, Any]) -> Reply:
        """An Unbind: the bind's route is given up (no lease)."""
        bind_id = rpc.text_field(request, "Id")
        tunnel = self.tunnels.get(bind_id)
        if tunnel is None:
            claim = self.claims.get(bind_id)
            if claim is None:
                return rpc.error_reply(f"no bind with Id {bind_id!r} on this session")
            claim.cancel()
            return rpc.encode_reply({})
        return self.end_tunnel(tunnel, None, "unbound by the agent").addCallback(
            lambda _: rpc.encode_reply({})
        )

    def end_tunnel(
        self, tunnel: NgrokTunnel, lease: Optional[tuple[str, Optional[str]]], why: str
    ) -> Deferred[None]:
        """``tunnel``'s route is given up (held for ``lease`` when given); fires once it is."""
        if self.tunnels.get(tunnel.bind_id) is tunnel:
            del self.tunnels[tunnel.bind_id]
        return end_tunnel(self.relay, tunnel, lease, why, f"ngrok agent {self.label}", log)


# -- the factory and the door service ------------------------------------------------


class NgrokFactory(DoorFactory):
    """Builds an :class:`NgrokSession` for each SDK connection."""

    session = NgrokSession


class NgrokDoor(StreamServerEndpointService):
    """The ngrok door as a service: listens on ``endpoint`` (a TLS endpoint: the SDKs speak TLS)."""

    def __init__(self, relay: Relay, endpoint: Any) -> None:
        super().__init__(endpoint, NgrokFactory(relay))
        self.relay = relay
        self._raiseSynchronously = True
        self.setName("ngrok")

