"""
The agent: holds one session to a relay, keeps it up, and serves the visitor
streams the relay opens.

:class:`Agent` is a Service used by ``tcprelay expose`` and by the
``tcprelay:`` endpoint.  It connects (client role), speaks the extended
handshake on a :data:`~tcprelay.handshake.CONTROL_STREAM_TYPE` stream, and
falls back to the legacy dialect when the relay answers with a bare
``HOST:PORT``.  After any loss it reconnects with exponential backoff and
jitter, asking for the same port and presenting its lease token.

Why one module of this size: the agent's handshake, session and reconnect
loop share one state machine (a registration and its lease), which reads
best in one place.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Callable, Optional, Protocol as TypingProtocol

import attrs
from twisted.application.service import Service
from twisted.internet import error, interfaces
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay._sniff import TLS_ALERT, TLS_HANDSHAKE, looks_like_tls, tls_error_means_not_tls
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role, SessionConfig
from tcprelay.protocol import MuxProtocol, MuxStream

__all__ = ["Agent", "AgentConfig", "AgentObserver", "AgentRefused", "VisitorHandler"]


class AgentRefused(Exception):
    """The relay refused the agent and retrying will not help (bad secret)."""


VisitorHandler = Callable[[MuxStream, Optional[hs.ProxyHeader]], Optional[interfaces.IProtocol]]
"""Given a visitor stream and its visitor address (if known), the protocol
to run on it (None resets the stream)."""


@attrs.frozen
class AgentConfig:
    """How the agent reaches and talks to the relay."""

    secret: Optional[bytes] = None
    port: Optional[int] = None
    """Public port to ask for (0/None: any)."""
    kind: str = "port"
    """What to ask for: ``port`` (a public port), or ``http`` / ``tls`` (a
    name on the relay's shared HTTP or TLS entrance: :attr:`name`)."""
    name: Optional[str] = None
    """The name to ask for with ``kind`` ``http`` or ``tls``: a label
    (``app``), a wildcard label (``*.app``) or a full name."""
    proxy: bool = True
    """Ask the relay for visitor addresses (PROXY v2 header per stream)."""
    pool: bool = False
    """Share the route (the :attr:`name`, or the :attr:`port`, which a
    joining agent must then give) with the other agents of the same
    credential that ask to pool: the relay spreads visitors over them."""
    lease_file: Optional[str] = None
    """Where the lease token and port are kept across agent restarts."""
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    handshake_timeout: float = 30.0
    session: SessionConfig = SessionConfig(
        receive_window=262144, max_streams=1 << 20, accept_backlog=1 << 20
    )
    """Visitor streams are opened by the relay, which enforces its own
    per-service limit (``--max-visitors``); the agent takes what it gets."""

    def __attrs_post_init__(self) -> None:
        for name in ("backoff_initial", "backoff_max", "handshake_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"AgentConfig.{name} must be a positive number of seconds, not {value!r}")
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"AgentConfig.port must be a port number, not {self.port!r}")


class AgentObserver(TypingProtocol):
    """What the agent reports (all optional to act upon)."""

    def ready(self, address: str, port: int, legacy: bool) -> None: ...

    def queued(self, position: int) -> None: ...

    def lost(self, reason: str, retry_in: Optional[float]) -> None: ...

    def refused(self, reason: str, fatal: bool) -> None: ...


class _NullObserver:
    def ready(self, address: str, port: int, legacy: bool) -> None:
        pass

    def queued(self, position: int) -> None:
        pass

    def lost(self, reason: str, retry_in: Optional[float]) -> None:
        pass

    def refused(self, reason: str, fatal: bool) -> None:
        pass


class _Control(Protocol):
    """The agent's side of the handshake, on its first stream."""

    log = Logger()

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        self.reader = hs.LegacyOrMessageReader()
        self.finished = False

    def dataReceived(self, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except hs.HandshakeError as e:
            self.session.fail(f"relay handshake: {e}", retry=True)
            return
        for message in messages:
            self._on_message(message)

    def _on_message(self, message: dict[str, Any]) -> None:
        agent = self.session.agent
        kind = message.get("type")
        if kind == "hello":
            nonce = message.get("nonce")
            if not isinstance(nonce, str) or len(nonce) > 256:
                self.session.fail("relay hello carries no valid nonce", retry=True)
                return
            config = agent.config
            fields: dict[str, Any] = {
                "port": (agent.wanted_port or 0) if config.kind == "port" else 0,
                "lease": agent.lease_token,
                "proxy": config.proxy,
            }
            if config.kind != "port":
                fields["route"] = config.kind
                fields["name"] = config.name
            if config.pool:
                fields["pool"] = True
            if message.get("auth"):
                if agent.config.secret is None:
                    self.session.fail("the relay requires a secret (--secret-file)", retry=False)
                    return
                fields["mac"] = hs.compute_mac(agent.config.secret, nonce)
            assert self.transport is not None
            self.transport.write(hs.encode_message("register", **fields))
        elif kind == "queued":
            position = message.get("position")
            if isinstance(position, int):
                # Queued is an answer: the relay's own wait timeout applies now.
                self.session.mark_ready(registered=False)
                agent.observer.queued(position)
        elif kind == "ready":
            port = message.get("port")
            address = message.get("address")
            if not isinstance(port, int) or not isinstance(address, str):
                self.session.fail("relay sent a malformed ready message", retry=True)
                return
            lease = message.get("lease")
            self.session.extended = True
            agent._ready(address, port, lease if isinstance(lease, str) else None, False)
        elif kind == "refused":
            reason = str(message.get("reason", "refused"))
            self.session.fail(f"relay refused: {reason}", retry=message.get("retry") is not False)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        if self.reader.legacy and not self.session.ready:
            try:
                address = self.reader.legacy_address()
            except hs.HandshakeError as e:
                self.session.fail(f"legacy relay: {e}", retry=True)
                return
            _, _, port = address.rpartition(":")
            self.session.agent._ready(address, int(port), None, True)


RELAY_SPEAKS_TLS = "the relay's control port speaks TLS: use --ca-file, or --relay tls:HOST:PORT"
RELAY_SPEAKS_NO_TLS = "the relay's control port does not speak TLS: use --relay HOST:PORT without --ca-file"
RELAY_SILENT = (
    "the relay closed the connection without a word (a TLS control port does "
    "that to a plain agent: use --ca-file, or --relay tls:HOST:PORT)"
)


class AgentSession(MuxProtocol):
    """The agent's session (client role)."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(Role.CLIENT, agent.reactor, agent.config.session, self._accept_stream)
        self.agent = agent
        self.extended = False
        self.ready = False
        self.failure: Optional[tuple[str, bool]] = None
        self.diagnosis: Optional[str] = None
        """What the connection's first bytes (or its TLS failure) say is wrong
        with the way the relay is reached: the reason given for the loss."""
        self._handshake_timer: Optional[interfaces.IDelayedCall] = None
        self._head: Optional[bytes] = b""
        """The relay's first bytes until they are known not to be TLS (then None)."""

    def dataReceived(self, data: bytes) -> None:
        """Check the relay's first bytes for TLS, then feed the session."""
        head = self._head
        if head is not None:
            head += data
            verdict = looks_like_tls(head, (TLS_HANDSHAKE, TLS_ALERT))
            if verdict is None:
                self._head = head
                return
            self._head = None
            if verdict:
                self.diagnosis = RELAY_SPEAKS_TLS
                self.close(ErrorCode.PROTOCOL_ERROR, RELAY_SPEAKS_TLS)
                return
            data = head
        super().dataReceived(data)

    def session_started(self) -> None:
        self.control: Optional[_Control] = _Control(self)
        self.open_stream(self.control, hs.CONTROL_STREAM_TYPE)
        self._handshake_timer = self.clock.callLater(
            self.agent.config.handshake_timeout,
            self.fail,
            "the relay did not answer the handshake",
            True,
        )

    def mark_ready(self, registered: bool = True) -> None:
        """The relay answered: stop the handshake timer (and accept visitors)."""
        if registered:
            self.ready = True
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()

    def leave(self) -> None:
        """Stop for good: tell an extended relay to free the port, then close."""
        control = getattr(self, "control", None)
        if self.extended and control is not None and control.transport is not None:
            control.transport.write(hs.encode_message("leave"))
        self.close(ErrorCode.NO_ERROR, "agent stopping")

    def fail(self, reason: str, retry: bool) -> None:
        """End the session because of the handshake; the agent decides what next."""
        if self.failure is None:
            self.failure = (reason, retry)
        self.close(ErrorCode.NO_ERROR if retry else ErrorCode.REFUSED_STREAM, reason)

    def session_ended(self, event: ev.SessionEnded) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()

    def _accept_stream(self, stream: MuxStream) -> Optional[interfaces.IProtocol]:
        if not self.ready:
            return None
        agent = self.agent
        if self.extended and stream.stream_type == hs.VISITOR_STREAM_TYPE and agent.config.proxy:
            return _HeaderReader(agent)
        return agent.visitor_handler(stream, None)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        if self.diagnosis is None and not self.ready and self.failure is None:
            if tls_error_means_not_tls(reason.getErrorMessage()):
                self.diagnosis = f"{RELAY_SPEAKS_NO_TLS} ({reason.getErrorMessage()})"
            elif self._head == b"" and reason.check(error.ConnectionDone) and self.end_event is None:
                self.diagnosis = RELAY_SILENT
        super().connectionLost(reason)
        # the control stream's protocol refers back to this session
        self.control = None
        self._handshake_timer = None
        self.agent._session_lost(self, reason)


class _HeaderReader(Protocol):
    """Reads the PROXY v2 header, then hands the stream to the real protocol."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.reader = hs.ProxyV2Reader()

    def dataReceived(self, data: bytes) -> None:
        stream = self.transport
        assert isinstance(stream, MuxStream)
        try:
            rest = self.reader.feed(data)
        except hs.HandshakeError as e:
            Agent.log.warn("visitor stream {id}: {error}", id=stream.stream_id, error=str(e))
            stream.abortConnection()
            return
        if rest is None:
            return
        header = self.reader.header
        if header is not None:
            cls = IPv6Address if header.ipv6 else IPv4Address
            stream.peer_address = cls("TCP", header.source_host, header.source_port)
            stream.host_address = cls("TCP", header.dest_host, header.dest_port)
        inner = self.agent.visitor_handler(stream, header)
        if inner is None:
            stream.abortConnection()
            return
        stream.attach(inner)
        if rest and not stream.disconnected:
            inner.dataReceived(rest)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        pass


class Agent(Service):
    """
    Keeps a registration at a relay alive.

    ``relay`` is the client endpoint of the relay's control port;
    ``visitor_handler`` decides what runs on each visitor stream.  The
    observer hears about addresses, queue positions, losses and refusals.
    ``rng`` draws the jitter of the reconnection delays (the :mod:`random`
    module's generator by default; tests pass a seeded one).
    ``when_ready()`` fires with the first public address; ``when_done()``
    fires once the agent has stopped (with an :class:`AgentRefused` failure
    if the relay refused it for good).
    """

    log = Logger()

    def __init__(
        self,
        relay: interfaces.IStreamClientEndpoint,
        config: AgentConfig,
        reactor: Any,
        visitor_handler: VisitorHandler,
        observer: Optional[AgentObserver] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.relay = relay
        self.config = config
        self.reactor = reactor
        self.visitor_handler = visitor_handler
        self.observer: AgentObserver = observer or _NullObserver()
        self._uniform = rng.uniform if rng is not None else random.uniform
        self.session: Optional[AgentSession] = None
        self.address: Optional[str] = None
        self.port: Optional[int] = None
        self.legacy = False
        self.lease_token: Optional[str] = None
        self.wanted_port: Optional[int] = config.port or None
        self._attempt = 0
        self._retry: Optional[interfaces.IDelayedCall] = None
        self._connecting: Optional[Deferred[Any]] = None
        self._ready_waiters: list[Deferred[str]] = []
        self._done_waiters: list[Deferred[None]] = []
        self._done: Optional[Failure] = None
        self._finished = False
        self._stopped = False
        self._load_lease()

    # -- lease file -----------------------------------------------------------

    def _load_lease(self) -> None:
        path = self.config.lease_file
        if not path:
            return
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            token, port = saved.get("lease"), saved.get("port")
            if isinstance(token, str):
                self.lease_token = token
            if isinstance(port, int) and not self.wanted_port:
                self.wanted_port = port

    def _save_lease(self) -> None:
        path = self.config.lease_file
        if not path:
            return
        try:
            # the token claims the port: private to its owner, from the first byte
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            tmp = f"{path}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                os.fchmod(fd, 0o600)  # a stale .tmp keeps its old mode otherwise
                json.dump({"lease": self.lease_token, "port": self.port}, f)
            os.replace(tmp, path)
        except OSError as e:
            self.log.warn("cannot save lease to {path}: {error}", path=path, error=str(e))

    # -- service ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopped = self._finished = False
        self._done = None
        self._connect()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        session = self.session
        if session is None or session.end_event is not None:
            self._finish(None)
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._done_waiters.append(d)
        session.leave()
        return d

    def when_ready(self) -> Deferred[str]:
        """Fires with the public address once registered."""
        if self.address is not None:
            return succeed(self.address)
        d: Deferred[str] = Deferred()
        self._ready_waiters.append(d)
        return d

    def when_done(self) -> Deferred[None]:
        """Fires when the agent stops for good (fails with AgentRefused)."""
        if self._finished:
            return fail(self._done) if self._done is not None else succeed(None)
        d: Deferred[None] = Deferred()
        self._done_waiters.append(d)
        return d

    # -- internals ----------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        factory = Factory.forProtocol(lambda: AgentSession(self))
        factory.noisy = False
        d = self.relay.connect(factory)
        self._connecting = d

        def connected(session: AgentSession) -> None:
            self._connecting = None
            self.session = session

        def failed(failure: Failure) -> None:
            self._connecting = None
            if self._stopped:
                return
            self._schedule_retry(f"cannot reach the relay: {failure.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def _ready(self, address: str, port: int, lease: Optional[str], legacy: bool) -> None:
        session = self.session
        if session is not None:
            session.mark_ready()
        self._attempt = 0
        self.address = address
        self.port = port
        self.legacy = legacy
        self.wanted_port = port
        if lease is not None:
            self.lease_token = lease
            self._save_lease()
        self.log.info(
            "registered at {address} ({dialect} relay)",
            address=address,
            dialect="legacy" if legacy else "tcprelay",
        )
        self.observer.ready(address, port, legacy)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(address)

    def _session_lost(self, session: AgentSession, reason: Failure) -> None:
        if session is self.session:
            self.session = None
        failure = session.failure
        if self._stopped:
            self._finish(None)
            return
        if failure is not None and not failure[1]:
            self.observer.refused(failure[0], True)
            self._finish(Failure(AgentRefused(failure[0])))
            return
        if failure is not None:
            self.observer.refused(failure[0], False)
            why = failure[0]
        elif session.diagnosis is not None:
            why = session.diagnosis
        else:
            end = session.end_event
            why = end.reason if end is not None else reason.getErrorMessage()
        self._schedule_retry(why)

    def _schedule_retry(self, why: str) -> None:
        delay = min(self.config.backoff_max, self.config.backoff_initial * 2**self._attempt)
        delay *= self._uniform(0.8, 1.2)
        self._attempt += 1
        self.log.info("relay connection lost ({why}); retrying in {delay:.1f}s", why=why, delay=delay)
        self.observer.lost(why, delay)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _finish(self, failure: Optional[Failure]) -> None:
        self._stopped = True
        self._finished = True
        self._done = failure
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiters, self._done_waiters = self._done_waiters, []
        ready, self._ready_waiters = self._ready_waiters, []
        for d in ready:
            d.errback(failure if failure is not None else Failure(error.ConnectionDone("agent stopped")))
        for d in waiters:
            if failure is not None:
                d.errback(failure)
            else:
                d.callback(None)
