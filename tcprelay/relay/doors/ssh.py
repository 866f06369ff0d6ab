"""
The SSH door: any machine with OpenSSH is an agent (``ssh -R``).

An agent runs ``ssh -N -R 0:localhost:3000 relay.example.com`` with a key
listed in the relay's ``authorized_keys`` file (``--ssh-authorized-keys``);
the relay is an SSH server (Twisted Conch) on ``--ssh`` with the host key
``--ssh-host-key``:

- authentication is by public key only (:mod:`.ssh_keys`): the key's
  SHA256 fingerprint is the agent's credential;
- each remote forward (RFC 4254 section 7, ``tcpip-forward``) becomes a
  tunnel (:class:`SshTunnel`): port 0 or a port of the relay's range gets a
  public port (the reply carries it: OpenSSH prints ``Allocated port N``),
  and with named routes (``--http``/``--tls`` and ``--domain``) a label
  bound on port 80 or 443 (``-R app:80:localhost:3000``) claims that HTTP
  or TLS name; ``cancel-tcpip-forward`` gives the route up;
- each visitor becomes a ``forwarded-tcpip`` channel
  (:class:`ForwardedChannel`, the visitor's stream): the connected address
  is the forward's bind address and port, the originator the visitor's
  address; the SSH windows give backpressure both ways and channel EOF the
  half-close;
- a lost connection's routes are held for the key's lease: the same key
  asking for the same forward within ``--lease`` seconds gets the same port
  or name back (one lease token per key and requested bind address);
- a session channel (``ssh relay`` without ``-N``, shell or command)
  prints the public addresses, one a line, and stays open; no command is
  ever run;
- ``keepalive@openssh.com`` requests are answered, and the relay sends its
  own every ``--heartbeat-interval`` seconds: a connection that answers
  none for ``--heartbeat-tolerance`` seconds is closed.

Why one module of this size: the SSH door is one protocol's server side
(connection, global requests, forwards, channels, session channel) whose
parts call each other's state; key handling is already apart in
:mod:`tcprelay.relay.doors.ssh_keys`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.application.internet import StreamServerEndpointService
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ConchError
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, connection, factory, forwarding, keys, transport, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import interfaces
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay.relay.doors.ssh_keys import (
    AuthorizedKey,
    AuthorizedKeys,
    AuthorizedKeysChecker,
    fingerprint,
    key_rules,
    load_host_key,
)
from tcprelay.relay.doors.base import (
    Deadline,
    DoorTunnel,
    admit,
    claim_refusal,
    end_tunnel,
    when_quiet,
)
from tcprelay.relay.interfaces import IAgentSession, ITunnel, IVisitor, TunnelUnavailable
from tcprelay.relay.routes import NameRoute, PortRoute

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = [
    "ForwardedChannel",
    "SessionChannel",
    "SshConnection",
    "SshDoor",
    "SshFactory",
    "SshServerTransport",
    "SshTunnel",
    "lease_token",
    "named_kind",
]

log = Logger(namespace="tcprelay.relay.doors.ssh")


def _quiet_logger() -> Logger:
    """A Logger for Conch's own classes that passes on only warnings and
    errors (Conch logs every channel's open and close at info level)."""
    predicate = LogLevelFilterPredicate(LogLevel.warn)
    return Logger(observer=FilteringLogObserver(globalLogPublisher, [predicate]))


_CONCH_LOG = _quiet_logger()

CHANNEL_PACKET = 32768
"""Largest data packet the relay accepts on a channel."""

MAX_SESSION_CHANNELS = 4
"""Session channels (``ssh`` without ``-N``) one connection may have open."""

NAMED_PORTS = {80: "http", 443: "tls"}
"""The bind ports that claim a name (``-R app:80:...``), and the kind of route."""

_LOCAL_BINDS = ("", "*", "localhost", "0.0.0.0", "::", "127.0.0.1", "::1")


def named_kind(host: str, port: int, http: bool, tls: bool) -> Optional[str]:
    """
    The kind of named route (``http``, ``tls``) the remote forward
    ``host:port`` claims, or None for a port route: a bind address that
    is a name (not empty, ``*``, ``localhost`` or an IP address) on port 80
    (when the relay has an HTTP entrance) or 443 (a TLS entrance).
    """
    kind = NAMED_PORTS.get(port)
    if kind is None or not (http if kind == "http" else tls):
        return None
    if host.lower() in _LOCAL_BINDS:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return kind
    return None


def lease_token(key_fingerprint: str, host: str, port: int, index: int = 0) -> str:
    """
    The lease token of a remote forward: one per key and requested bind
    address (the ``index``-th port-0 forward of the same bind address on
    one connection, for several ``-R 0:...``), so that the same ``ssh -R``
    gets its route back.  It is derived, not secret: a lease is only
    resumed by the credential that created it (the key, proved by its
    signature).
    """
    text = f"ssh\0{key_fingerprint}\0{host.lower()}\0{port}\0{index}"
    return "ssh-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _credential(entry: AuthorizedKey) -> str:
    return f"ssh:{entry.fingerprint}"


# -- visitors' channels -----------------------------------------------------------


@implementer(
    interfaces.ITransport,
    interfaces.IConsumer,
    interfaces.IPushProducer,
    interfaces.IHalfCloseableDescriptor,
)
class ForwardedChannel(SSHChannel):  # type: ignore[misc]
    """
    A ``forwarded-tcpip`` channel for one visitor: the visitor's stream to
    its service (:class:`~tcprelay.relay.interfaces.IVisitorStream`).

    - What is written before the agent confirms the channel is kept and
      sent then (the visitor's first bytes leave right after the open).
    - When the agent's window is used up, the producer (the visitor's
      socket) is paused until the agent opens it again.
    - While the protocol's own consumer is full (:meth:`pauseProducing`),
      the relay grants the agent no more window.
    - ``loseWriteConnection`` is channel EOF (once what is buffered is
      sent), the agent's EOF the protocol's ``readConnectionLost``, and the
      channel's close its ``connectionLost``.
    """

    name = b"forwarded-tcpip"
    _log = _CONCH_LOG

    def __init__(self, tunnel: SshTunnel, peer: Any, window: int) -> None:
        super().__init__(localWindow=window, localMaxPacket=CHANNEL_PACKET, conn=tunnel.conn)
        self.tunnel = tunnel
        self.peer = peer
        self.protocol: Any = None
        self.producer: Any = None
        self.opened = False
        self.lost = False
        self.paused = False
        """The protocol's consumer is full: no window is granted to the agent."""
        self._producer_paused = False
        self._pending: list[bytes] = []
        self._eof_pending = False
        self._eof_sent = False
        self._close_pending = False
        self._abort_pending = False

    # -- IVisitorStream ------------------------------------------------------

    def attach(self, protocol: Any) -> None:
        """Run ``protocol`` on the channel."""
        self.protocol = protocol
        protocol.makeConnection(self)

    # -- ITransport / IConsumer ----------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost or self.closing or self._eof_pending or self._eof_sent or not data:
            return
        if not self.opened:
            self._pending.append(data)
            return
        super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Channel EOF, once what is buffered has been sent."""
        if self.lost or self._eof_sent:
            return
        if not self.opened or self.buf:
            self._eof_pending = True
            return
        self._send_eof()

    def _send_eof(self) -> None:
        self._eof_pending = False
        self._eof_sent = True
        self.conn.sendEOF(self)
        protocol = self.protocol
        if protocol is not None and hasattr(protocol, "writeConnectionLost"):
            protocol.writeConnectionLost()

    def loseConnection(self) -> None:
        """Close the channel once what is buffered has been sent."""
        if self.lost:
            return
        if not self.opened:
            self._close_pending = True
            return
        super().loseConnection()

    def abortConnection(self) -> None:
        """Close the channel now, dropping what is buffered."""
        if self.lost:
            return
        if not self.opened:
            self._abort_pending = True
            return
        self.buf = b""
        self.closing = 1
        self.conn.sendClose(self)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self._producer_paused = False
        if not self.areWriting or not self.opened:
            self._pause_producer()

    def unregisterProducer(self) -> None:
        self.producer = None

    def getPeer(self) -> Any:
        """The visitor's address."""
        return self.peer

    def getHost(self) -> Any:
        """The relay's end of the agent's SSH connection."""
        return self.conn.transport.getHost()

    # -- IPushProducer: the protocol's consumer (the visitor) ---------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.opened and not self.lost and not self.localClosed:
            owed = self.localWindowSize - self.localWindowLeft
            if owed > 0:
                self.conn.adjustWindow(self, owed)

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- flow control: the agent's window ------------------------------------

    def _pause_producer(self) -> None:
        if self.producer is not None and not self._producer_paused:
            self._producer_paused = True
            self.producer.pauseProducing()

    def _resume_producer(self) -> None:
        if self.producer is not None and self._producer_paused:
            self._producer_paused = False
            self.producer.resumeProducing()

    def stopWriting(self) -> None:
        """The agent's window is used up: pause the visitor."""
        self._pause_producer()

    def startWriting(self) -> None:
        """The agent's window has room again: resume the visitor."""
        self._resume_producer()

    def addWindowBytes(self, data: int) -> None:
        self.remoteWindowLeft += data
        if self.buf:
            buffered, self.buf = self.buf, b""
            self.closing, closing = 0, self.closing
            SSHChannel.write(self, buffered)
            self.closing = closing
        if self.buf or self.lost:
            return
        if not self.areWriting:
            self.areWriting = True
            self.startWriting()
        if self._eof_pending:
            self._send_eof()
        if self.closing:
            SSHChannel.loseConnection(self)

    # -- channel events ------------------------------------------------------

    def channelOpen(self, specificData: bytes) -> None:
        self.opened = True
        self.tunnel.channels.add(self)
        if self._abort_pending:
            self._pending = []
            self.closing = 1
            self.conn.sendClose(self)
            return
        pending, self._pending = self._pending, []
        if pending:
            SSHChannel.write(self, b"".join(pending))
        if self.areWriting:
            self._resume_producer()
        if self._eof_pending and not self.buf:
            self._send_eof()
        if self._close_pending:
            SSHChannel.loseConnection(self)

    def openFailed(self, reason: Any) -> None:
        self.lost = True
        log.info(
            "SSH agent {peer} refused a visitor for {address}: {why}",
            peer=self.tunnel.label,
            address=self.tunnel.route.address,
            why=_reason_text(reason),
        )
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connectionLost(Failure(ConnectionLost("the agent refused the channel")))

    def dataReceived(self, data: bytes) -> None:
        if self.protocol is not None and not self.lost:
            self.protocol.dataReceived(data)

    def closeReceived(self) -> None:
        """The agent closed the channel: nothing buffered can reach it now."""
        self.buf = b""
        self._eof_pending = False
        self.closing = 1
        self.conn.sendClose(self)

    def eofReceived(self) -> None:
        protocol = self.protocol
        if protocol is not None and not self.lost and hasattr(protocol, "readConnectionLost"):
            protocol.readConnectionLost()

    def closed(self) -> None:
        self.lost = True
        self.tunnel.channels.discard(self)
        protocol, self.protocol = self.protocol, None
        self.producer = None
        if protocol is not None:
            if self.tunnel.conn.stopped:
                protocol.connectionLost(Failure(ConnectionLost("the agent's SSH connection closed")))
            else:
                protocol.connectionLost(Failure(ConnectionDone()))


def _reason_text(reason: Any) -> str:
    args = getattr(reason, "args", ())
    if args and isinstance(args[0], bytes):
        return args[0].decode("utf-8", "replace") or "no reason given"
    return str(reason)


# -- tunnels: one per remote forward ----------------------------------------------


@implementer(ITunnel)
class SshTunnel(DoorTunnel):
    """One remote forward of an SSH connection: the relay's tunnel to one service."""

    dialect = "ssh"
    lease_token: str

    def __init__(
        self,
        conn: SshConnection,
        route: Union[PortRoute, NameRoute],
        bind_host: str,
        bind_port: int,
        token: str,
    ) -> None:
        super().__init__(conn.credential, token)
        self.conn = conn
        self.route = route
        self.bind_host = bind_host
        """The bind address of the forward as the agent asked for it."""
        self.bind_port = bind_port
        """The port of the forward as the agent knows it (the allocated one for port 0)."""
        self.channels: set[ForwardedChannel] = set()

    @property
    def control(self) -> SshServerTransport:
        """The agent session (what the guard counts)."""
        return self.conn.transport  # type: ignore[no-any-return]

    @property
    def label(self) -> str:
        return self.conn.label

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        return self.conn.peer

    def stream_count(self) -> int:
        """Visitors' channels open on this forward."""
        return len(self.channels)

    def open_stream(self, visitor: IVisitor) -> ForwardedChannel:
        """A ``forwarded-tcpip`` channel for ``visitor``; its first bytes follow the open."""
        conn = self.conn
        if conn.stopped or self.ended.called:
            raise TunnelUnavailable("the SSH connection is gone")
        peer = visitor.peer
        channel = ForwardedChannel(self, peer, conn.window)
        origin = (str(getattr(peer, "host", "")), int(getattr(peer, "port", 0)))
        conn.openChannel(
            channel, forwarding.packOpen_forwarded_tcpip((self.bind_host, self.bind_port), origin)
        )
        if visitor.first:
            channel.write(visitor.first)
        return channel

    def close(self, reason: str) -> None:
        """Give the route up and close every visitor's channel."""
        self.conn.end_forward(self, None, reason)
        for channel in list(self.channels):
            channel.abortConnection()


# -- session channels: the addresses ------------------------------------------------


class SessionChannel(SSHChannel):  # type: ignore[misc]
    """
    ``ssh relay`` with a shell or a command: prints the public address of
    each forward of the connection, one a line (those still being claimed
    when they are), and stays open.  Nothing is ever run.  With a terminal,
    Ctrl-C or Ctrl-D closes it.
    """

    name = b"session"
    _log = _CONCH_LOG

    def __init__(self, conn: SshConnection, **kwargs: Any) -> None:
        super().__init__(conn=conn, **kwargs)
        self.pty = False
        self.started = False

    def request_pty_req(self, data: bytes) -> bool:
        self.pty = True
        return True

    def request_window_change(self, data: bytes) -> bool:
        return True

    def request_env(self, data: bytes) -> bool:
        return False

    def request_shell(self, data: bytes) -> bool:
        return self._start()

    def request_exec(self, data: bytes) -> bool:
        command = common.getNS(data)[0].decode("utf-8", "replace")
        if command.strip():
            self.writeExtended(
                connection.EXTENDED_DATA_STDERR,
                self._line(f"tcprelay: commands are not run (got {command!r})"),
            )
        return self._start()

    def _start(self) -> bool:
        if self.started:
            return False
        self.started = True
        conn: SshConnection = self.conn
        for tunnel in conn.forwards.values():
            self.announce(tunnel.route.address)
        if not conn.forwards and not conn.claims:
            self.writeExtended(
                connection.EXTENDED_DATA_STDERR,
                self._line("tcprelay: no remote forward yet (ssh -R 0:localhost:PORT ...)"),
            )
        return True

    def _line(self, text: str) -> bytes:
        return (text + ("\r\n" if self.pty else "\n")).encode("utf-8")

    def announce(self, address: str) -> None:
        """Print a public address (once the shell or command has started)."""
        if self.started and not self.closing:
            self.write(self._line(address))

    def dataReceived(self, data: bytes) -> None:
        if self.pty and (b"\x03" in data or b"\x04" in data):
            self.loseConnection()

    def eofReceived(self) -> None:
        """Stays open: ``ssh relay < /dev/null`` keeps its forwards."""

    def closed(self) -> None:
        self.conn.session_channels.discard(self)


# -- the connection service ------------------------------------------------------


class _Reply:
    __slots__ = ("want", "ready", "result")

    def __init__(self, want: bool) -> None:
        self.want = want
        self.ready = False
        self.result: Union[bool, bytes] = False


class SshConnection(connection.SSHConnection):  # type: ignore[misc]
    """
    The ``ssh-connection`` service of one authenticated agent: its remote
    forwards (:attr:`forwards`) and channels.  Global requests are answered
    in order even when one waits for a port from the pool.
    """

    _log = _CONCH_LOG

    def __init__(self) -> None:
        super().__init__()
        self.forwards: dict[tuple[str, int], SshTunnel] = {}
        """Published forwards by (bind host, port as the agent knows it)."""
        self.claims: dict[tuple[str, int, int], Deferred[Any]] = {}
        """Forwards still waiting for their port, by (bind host, port asked
        for, index among the port-0 forwards of that host)."""
        self._zero_forwards: dict[str, int] = {}
        self.session_channels: set[SessionChannel] = set()
        self.stopped = False
        self._replies: list[_Reply] = []
        self._keepalive: Optional[LoopingCall] = None
        self._heard = 0.0

    # -- who ---------------------------------------------------------------

    @property
    def relay(self) -> Relay:
        return self.transport.factory.relay  # type: ignore[no-any-return]

    @property
    def entry(self) -> AuthorizedKey:
        return self.transport.avatar.entry  # type: ignore[no-any-return]

    @property
    def credential(self) -> str:
        return _credential(self.entry)

    @property
    def label(self) -> str:
        return self.transport.label  # type: ignore[no-any-return]

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        return self.transport.peer  # type: ignore[no-any-return]

    @property
    def window(self) -> int:
        return self.relay.config.session.receive_window

    # -- lifecycle ---------------------------------------------------------

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.transport.authenticated()
        relay = self.relay
        log.info(
            "SSH agent {peer} logged in with key {fingerprint} {comment}",
            peer=self.label,
            fingerprint=self.entry.fingerprint,
            comment=self.entry.comment,
        )
        session = relay.config.session
        self._heard = relay.reactor.seconds()
        keepalive = LoopingCall(self._send_keepalive)
        keepalive.clock = relay.reactor
        keepalive.start(session.heartbeat_interval, now=False)
        self._keepalive = keepalive

    def serviceStopped(self) -> None:
        self.stopped = True
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        super().serviceStopped()
        for d in list(self.claims.values()):
            d.cancel()
        for tunnel in list(self.forwards.values()):
            self.end_forward(tunnel, (tunnel.lease_token, tunnel.credential), "connection closed")

    def _send_keepalive(self) -> None:
        relay = self.relay
        now = relay.reactor.seconds()
        tolerance = relay.config.session.heartbeat_tolerance
        if now - self._heard > tolerance:
            log.warn(
                "SSH agent {peer} answered no keepalive for {seconds:g}s; closing it",
                peer=self.label,
                seconds=tolerance,
            )
            relay.stats.heartbeat_timeouts += 1
            self.transport.end("keepalive timeout")
            return
        d = self.sendGlobalRequest(b"keepalive@openssh.com", b"", wantReply=1)
        d.addBoth(self._keepalive_answered)

    def _keepalive_answered(self, _: object) -> None:
        if not self.stopped:
            self._heard = self.relay.reactor.seconds()

    def drain(self, reason: str) -> None:
        """Give every route up; close the connection once its visitors are done."""
        for d in list(self.claims.values()):
            d.cancel()
        tunnels = list(self.forwards.values())
        for tunnel in tunnels:
            self.end_forward(tunnel, None, reason)

        def quiet() -> None:
            if not self.stopped:
                self.transport.end(reason)

        when_quiet(tunnels, quiet)

    def stream_count(self) -> int:
        """Channels open: visitors' and sessions."""
        return len(self.channelsToRemoteChannel)

    # -- channels the agent opens ------------------------------------------

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int, data: bytes) -> Any:
        if channelType != b"session":
            raise ConchError(
                "this relay takes remote forwards (ssh -R) and sessions only",
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
            )
        if len(self.session_channels) >= MAX_SESSION_CHANNELS:
            raise ConchError("too many sessions", connection.OPEN_RESOURCE_SHORTAGE)
        channel = SessionChannel(self, remoteWindow=windowSize, remoteMaxPacket=maxPacket)
        self.session_channels.add(channel)
        return channel

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        """No window for a visitor's channel while the visitor cannot take more."""
        if getattr(channel, "paused", False):
            return
        super().adjustWindow(channel, bytesToAdd)

    # -- global requests ---------------------------------------------------

    def ssh_GLOBAL_REQUEST(self, packet: bytes) -> None:
        kind, rest = common.getNS(packet)
        want = bool(rest[:1] and rest[0])
        reply = _Reply(want)
        self._replies.append(reply)
        try:
            result = self.global_request(kind, rest[1:])
        except Exception:  # noqa: BLE001 - a bad request is refused, the session lives
            log.failure("SSH agent {peer}: global request {kind!r}", peer=self.label, kind=kind)
            result = False
        d = result if isinstance(result, Deferred) else succeed(result)

        def failed(failure: Failure) -> bool:
            if not failure.check(CancelledError):
                log.failure("SSH agent {peer}: global request", failure, peer=self.label)
            return False

        def answered(value: Union[bool, bytes]) -> None:
            reply.ready = True
            reply.result = value
            self._send_replies()

        d.addErrback(failed).addCallback(answered)

    def _send_replies(self) -> None:
        replies = self._replies
        while replies and replies[0].ready:
            reply = replies.pop(0)
            if not reply.want or self.stopped:
                continue
            if reply.result is False:
                self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")
            else:
                data = reply.result if isinstance(reply.result, bytes) else b""
                self.transport.sendPacket(connection.MSG_REQUEST_SUCCESS, data)

    def global_request(self, kind: bytes, data: bytes) -> Union[bool, bytes, Deferred[Any]]:
        """
        The answer to a global request: False (failure), True or bytes
        (success, with those bytes), or a Deferred of one of them.
        """
        self._heard = self.relay.reactor.seconds()
        if kind == b"tcpip-forward":
            host, port = forwarding.unpackGlobal_tcpip_forward(data)
            return self.forward(host, port)
        if kind == b"cancel-tcpip-forward":
            host, port = forwarding.unpackGlobal_tcpip_forward(data)
            tunnel = self.forwards.get((host, port))
            if tunnel is None:
                claim = self.claims.get((host, port, 0)) if port else None
                if claim is None:
                    return False
                claim.cancel()
                return True
            self.end_forward(tunnel, None, "cancelled by the agent")
            return True
        if kind == b"keepalive@openssh.com":
            return True
        return False

    # -- remote forwards ---------------------------------------------------

    def _refuse(self, host: str, port: int, why: str) -> bool:
        self.relay.stats.services_refused += 1
        log.info(
            "SSH agent {peer}: remote forward {host}:{port} refused: {why}",
            peer=self.label,
            host=host,
            port=port,
            why=why,
        )
        return False

    def _claim_failed(self, host: str, port: int, failure: Failure) -> bool:
        why = claim_refusal(failure)
        if why is None:
            return failure  # type: ignore[return-value]
        return bool(why) and self._refuse(host, port, why)

    def forward(self, host: str, port: int) -> Union[bool, bytes, Deferred[Any]]:
        """A ``tcpip-forward`` request: claim its route, publish its tunnel."""
        relay = self.relay
        config = relay.config
        if relay.draining or self.stopped:
            return self._refuse(host, port, "the relay is shutting down")
        index = 0
        if port == 0:
            index = self._zero_forwards.get(host, 0)
            self._zero_forwards[host] = index + 1
        elif (host, port) in self.forwards or (host, port, 0) in self.claims:
            return self._refuse(host, port, "already forwarded on this connection")
        token = lease_token(self.entry.fingerprint, host, port, index)
        credential = self.credential
        try:
            relay.key_rules[credential] = key_rules(self.entry)
        except ValueError as e:
            return self._refuse(host, port, f"this key's options: {e}")
        stale = [
            tunnel
            for _, tunnel in relay.registry.routes()
            if isinstance(tunnel, SshTunnel) and tunnel.lease_token == token and tunnel.conn is not self
        ]
        if stale:
            # The same key asks again for the same forward from a new
            # connection: the old one is dead (or about to be). Its route
            # goes to its lease, which this claim takes up at once.
            old = stale[0]
            released = old.conn.end_forward(
                old, (old.lease_token, old.credential), "replaced by a new connection of its key"
            )
            return released.addCallback(lambda _: self.forward(host, port) if port else self._reforward(host))
        kind = named_kind(host, port, config.http_port is not None, config.tls_port is not None)
        if kind is not None:
            named = relay.claim_name(kind, host, token, credential)
            key_named = (host, port, 0)
            self.claims[key_named] = named

            def named_claimed(route: NameRoute) -> bool:
                self.claims.pop(key_named, None)
                if self.stopped:
                    relay.release_route(route, (token, credential))
                    return False
                self._publish(route, host, port, token, port)
                return True

            def named_failed(failure: Failure) -> bool:
                self.claims.pop(key_named, None)
                return self._claim_failed(host, port, failure)

            if named.called:  # decided here alone: answer at once, as before
                outcome: list[Any] = []
                named.addCallbacks(named_claimed, named_failed).addBoth(outcome.append)
                if outcome and not isinstance(outcome[0], Failure):
                    return outcome[0]  # type: ignore[no-any-return]
                if outcome:
                    outcome[0].raiseException()
            return named.addCallbacks(named_claimed, named_failed)
        if port and port not in config.ports:
            return self._refuse(
                host,
                port,
                f"port {port} is outside the relay's range "
                f"{config.ports[0]}-{config.ports[-1]} (ask for port 0)",
            )
        claim = relay.claim_port(port or None, token, credential, lambda position: None)
        key = (host, port, index)
        self.claims[key] = claim

        def claimed(route: PortRoute) -> Union[bool, bytes]:
            self.claims.pop(key, None)
            if self.stopped:
                relay.release_route(route, (token, credential))
                return False
            if port and route.port != port:
                relay.release_route(route)
                return self._refuse(host, port, f"port {port} is taken")
            self._publish(route, host, route.port, token, port)
            return struct.pack(">L", route.port) if port == 0 else True

        def failed(failure: Failure) -> bool:
            self.claims.pop(key, None)
            return self._claim_failed(host, port, failure)

        return claim.addCallbacks(claimed, failed)

    def _publish(
        self, route: Union[PortRoute, NameRoute], host: str, port: int, token: str, asked: int
    ) -> None:
        tunnel = SshTunnel(self, route, host, port, token)
        self.forwards[(host, port)] = tunnel
        self.relay.publish(route, tunnel)  # type: ignore[arg-type]
        log.info(
            "SSH agent {peer} ({fingerprint}) serves {address} (-R {host}:{port})",
            peer=self.label,
            fingerprint=self.entry.fingerprint,
            address=route.address,
            host=host,
            port=asked,
        )
        for channel in list(self.session_channels):
            channel.announce(route.address)

    def _reforward(self, host: str) -> Union[bool, bytes, Deferred[Any]]:
        """Claim a ``-R 0`` forward again with the same index (after a replacement)."""
        self._zero_forwards[host] = self._zero_forwards.get(host, 1) - 1
        return self.forward(host, 0)

    def end_forward(
        self, tunnel: SshTunnel, lease: Optional[tuple[str, Optional[str]]], why: str
    ) -> Deferred[None]:
        """``tunnel``'s route is given up (held for ``lease`` when given); fires once it is."""
        if self.forwards.get((tunnel.bind_host, tunnel.bind_port)) is tunnel:
            del self.forwards[(tunnel.bind_host, tunnel.bind_port)]
        return end_tunnel(self.relay, tunnel, lease, why, f"SSH agent {self.label}", log)


class SshUserAuth(userauth.SSHUserAuthServer):  # type: ignore[misc]
    """Public keys only (the portal has no other checker); the relay's clock
    and its handshake timeout."""

    _log = _CONCH_LOG

    def serviceStarted(self) -> None:
        relay = self.transport.factory.relay
        self.clock = relay.reactor
        self.loginTimeout = relay.config.handshake_timeout
        super().serviceStarted()

    def _ebBadAuth(self, reason: Failure) -> None:
        if self.method == b"publickey" and reason.check(UnauthorizedLogin):
            self.transport.factory.relay.stats.auth_failures += 1
            log.info(
                "SSH agent {peer}: public key refused ({why})",
                peer=self.transport.label,
                why=reason.getErrorMessage(),
            )
        super()._ebBadAuth(reason)


# -- the transport: one agent session -----------------------------------------------


@implementer(IAgentSession)
class SshServerTransport(transport.SSHServerTransport):  # type: ignore[misc]
    """One agent's SSH connection, authenticated or not yet: its session."""

    _log = _CONCH_LOG

    def __init__(self) -> None:
        super().__init__()
        self._deadline = Deadline()

    @property
    def label(self) -> str:
        peer = self.peer
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    @property
    def peer(self) -> Optional[interfaces.IAddress]:
        t = self.transport
        return t.getPeer() if t is not None else None

    def connectionMade(self) -> None:
        super().connectionMade()
        relay: Relay = self.factory.relay
        relay.sessions.add(self)
        self._deadline.start(relay.reactor, relay.config.handshake_timeout, self._too_slow)

    def authenticated(self) -> None:
        """Logged in: the handshake deadline is met."""
        self._deadline.cancel()

    def _too_slow(self) -> None:
        log.info(
            "SSH connection {peer} did not log in within {seconds:g}s; closing it",
            peer=self.label,
            seconds=self.factory.relay.config.handshake_timeout,
        )
        self.end("no login in time")

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        """The agent disconnected (``ssh`` exiting says "disconnected by user")."""
        log.info(
            "SSH agent {peer} disconnected: {why}",
            peer=self.label,
            why=description.decode("utf-8", "replace"),
            code=reasonCode,
        )

    def connectionLost(self, reason: Optional[Failure] = None) -> None:
        self.authenticated()
        super().connectionLost(reason)
        self.factory.relay.session_gone(self)

    # -- IAgentSession -----------------------------------------------------

    def drain(self, reason: str) -> None:
        service = self.service
        if isinstance(service, SshConnection):
            service.drain(reason)
        else:
            self.end(reason)

    def end(self, reason: str) -> None:
        if self.transport is not None and self.transport.connected:
            self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION, reason.encode("utf-8"))

    def stream_count(self) -> int:
        service = self.service
        return service.stream_count() if isinstance(service, SshConnection) else 0


# -- the factory and the door service ------------------------------------------------


class _Avatar(ConchUser):  # type: ignore[misc]
    def __init__(self, entry: AuthorizedKey) -> None:
        super().__init__()
        self.entry = entry


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces_: Any) -> Any:
        if IConchUser not in interfaces_:
            raise NotImplementedError("only IConchUser")
        return IConchUser, _Avatar(avatarId), lambda: None


class SshFactory(factory.SSHFactory):  # type: ignore[misc]
    """Builds an :class:`SshServerTransport` per agent connection."""

    protocol = SshServerTransport
    services = {b"ssh-userauth": SshUserAuth, b"ssh-connection": SshConnection}
    noisy = False
    _log = _CONCH_LOG

    def __init__(self, relay: Relay, host_key: keys.Key, authorized: AuthorizedKeys) -> None:
        self.relay = relay
        self.portal = Portal(_Realm(), [AuthorizedKeysChecker(authorized)])
        self.privateKeys = {host_key.sshType(): host_key}
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.primes = None  # fixed groups and elliptic curves only

    def buildProtocol(self, addr: interfaces.IAddress) -> Any:
        return admit(self.relay, addr, lambda: factory.SSHFactory.buildProtocol(self, addr))


class SshDoor(StreamServerEndpointService):
    """
    The SSH door as a service: on start it reads (or creates) the host key,
    logs its fingerprint, and listens on ``endpoint``.
    """

    def __init__(
        self, relay: Relay, endpoint: Any, host_key_path: str, authorized_keys_path: str
    ) -> None:
        super().__init__(endpoint, None)
        self.relay = relay
        self.host_key_path = host_key_path
        self.authorized = AuthorizedKeys(authorized_keys_path)
        self._raiseSynchronously = True
        self.setName("ssh")

    def privilegedStartService(self) -> None:
        if self.factory is None:
            key, created = load_host_key(self.host_key_path)
            log.info(
                "SSH host key {path}{created}: {type} {fingerprint}",
                path=self.host_key_path,
                created=" (created)" if created else "",
                type=key.type(),
                fingerprint=fingerprint(key),
            )
            log.info(
                "SSH: {count} authorized keys in {path}",
                count=len(self.authorized),
                path=self.authorized.path,
            )
            self.factory = SshFactory(self.relay, key, self.authorized)
        super().privilegedStartService()
