"""
Write-through for idle plain TCP transports (the relay's hottest path).

Twisted's ``write`` always buffers, asks epoll for writability and sends on
the next reactor pass: three ``epoll_ctl``/``epoll_wait`` round trips per
send on a relay that forwards every chunk at once.  When a plain TCP
transport has nothing queued, :func:`write_now` hands the bytes to the
socket straight away and only queues what the kernel did not take, through
the ordinary ``write`` (so producers, half-close and error handling stay
Twisted's).  Anything else (TLS, a mux stream, a transport with data
pending, a closing one) simply gets ``transport.write``.

:func:`nodelay` turns Nagle's algorithm off on the TCP sockets the relay and
the agent forward on; :func:`read_size` sets how much one read of a plain
TCP transport may take; :func:`lose_write_now` and :func:`close_now`
half-close and close without waiting for a reactor pass, and
:func:`close_finished` closes a socket whose both directions are over with
``close()`` alone.

:class:`EagerPort` (through :func:`listen_eager`) accepts connections and
hands what the client already sent to the factory before Twisted builds the
transport, so a relay can forward it first.  :func:`connect_eager` is the
client side's counterpart: ``connectTCP`` whose ``connect()`` call is made
at once, and whose protocol is connected before it returns when the kernel
has already completed the connection (loopback).

Each of these relies on Twisted internals listed in :mod:`tcprelay._twisted`;
where the installed Twisted lacks one, the function it serves takes Twisted's
public API instead (``transport.write``, ``loseWriteConnection``,
``loseConnection``, ``listenTCP``, ``connectTCP``; ``close_now`` then returns
False).  The choice is made once, at import, into the module's ``_FAST_*``
booleans, which tests may patch to exercise the fallbacks.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any, Optional

from twisted.internet import tcp
from twisted.internet.error import ConnectError, ConnectionLost, TimeoutError, getConnectError
from twisted.internet.posixbase import PosixReactorBase
from twisted.python import log
from twisted.python.failure import Failure

from tcprelay import _twisted

__all__ = [
    "EagerClient",
    "EagerConnector",
    "EagerPort",
    "close_finished",
    "close_now",
    "connect_eager",
    "NoDelayServer",
    "listen_eager",
    "lose_write_now",
    "nodelay",
    "queued",
    "read_size",
    "write_now",
]


_FAST_WRITE = _twisted.WRITE_NOW
"""Twisted has what :func:`_idle_plain_tcp` reads (see :mod:`tcprelay._twisted`)."""
_FAST_FIN = _twisted.LOSE_WRITE_NOW
"""... and what :func:`lose_write_now` needs to send the FIN itself."""
_FAST_CLOSE = _twisted.CLOSE_FINISHED
"""... and the ``_shouldShutdown`` flag :func:`close_finished` clears."""
_FAST_READ_SIZE = _twisted.READ_SIZE
"""Twisted's transports read ``bufferSize`` bytes at a time."""
_FAST_ACCEPT = _twisted.LISTEN_EAGER
"""Twisted has what :class:`EagerPort` relies on."""
_FAST_CONNECT = _twisted.CONNECT_EAGER
"""Twisted has what :class:`EagerClient` and :class:`EagerConnector` rely on."""


class NoDelayServer(tcp.Server):
    """A connection accepted by an :class:`EagerPort`: its socket inherited
    ``TCP_NODELAY`` from the listener, so turning it on again costs no
    ``setsockopt``."""

    _nodelay = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        if bool(enabled) is self._nodelay:
            return
        self._nodelay = bool(enabled)
        super().setTcpNoDelay(enabled)


def _idle_plain_tcp(transport: Any) -> bool:
    """A plain TCP transport, open for writing, with nothing queued (never,
    when the installed Twisted lacks what this reads)."""
    return (
        _FAST_WRITE
        and type(transport) in _PLAIN_TCP
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
    )


def write_now(transport: Any, data: bytes) -> bool:
    """
    ``transport.write(data)``, sending at once when that is safe; whether
    it all went out at once (False: some of it may be queued).
    """
    if _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error the regular path will report.
            sent = 0
        if sent == len(data):
            return True
        if sent:
            data = data[sent:]
    transport.write(data)
    return False


def queued(transport: Any) -> Optional[int]:
    """
    Bytes a TCP transport (or TLS over one: its encrypted bytes) holds
    unsent, waiting for its socket; None when that cannot be known (another
    transport, or an installed Twisted without what this reads).
    """
    if not _FAST_WRITE:
        return None
    if type(transport) not in _PLAIN_TCP:
        transport = getattr(transport, "transport", None)  # TLSMemoryBIOProtocol's
        if type(transport) not in _PLAIN_TCP:
            return None
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen  # type: ignore[no-any-return]


def nodelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on a TCP transport (``TCP_NODELAY``); other
    transports are left alone.  A socket already reset by its peer is left
    for the reactor to report.
    """
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass


def read_size(transport: Any, size: int) -> None:
    """How many bytes each read of a plain TCP transport asks for (Twisted's
    ``bufferSize``, 64 KiB by default); other transports are left alone."""
    if _FAST_READ_SIZE and type(transport) in _PLAIN_TCP and transport.bufferSize != size:
        transport.bufferSize = size


def lose_write_now(transport: Any) -> None:
    """
    ``transport.loseWriteConnection()``, sending the FIN at once when a plain
    TCP transport has nothing queued.  Twisted always waits for the socket
    to be writable first (an ``epoll_ctl`` pair, a reactor pass and an empty
    ``send``), even when there is nothing left to write; here the FIN leaves
    now and the protocol hears ``writeConnectionLost`` as Twisted would tell
    it, so a ``loseConnection`` after that closes at once too.
    """
    if _FAST_FIN and _idle_plain_tcp(transport) and transport.producer is None:
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    transport.loseWriteConnection()


class EagerPort(tcp.Port):
    """
    A TCP listening port that forwards what a client has already sent
    before Twisted builds the connection's transport.

    For each accepted socket it reads, without waiting, whatever the client
    wrote right after connecting (most clients speak first) and calls the
    factory's ``build_eager(address, first_bytes)``, which may forward those
    bytes at once (the relay sends the stream's SYN and them in one write),
    and returns the protocol (or None to refuse).  The transport
    (:class:`NoDelayServer`) is created afterwards, so its set-up, epoll
    registration included, is off the client's critical path.  The listening
    socket has ``TCP_NODELAY``, which Linux copies to every accepted socket.

    Anything but a plain successful ``accept`` or ``EAGAIN`` (``EMFILE``,
    ``EPERM``...) is left to Twisted's own ``Port.doRead``, which knows how
    to recover from those.
    """

    transport = NoDelayServer

    def startListening(self) -> None:
        super().startListening()
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - TCP sockets always take it
            self.transport = tcp.Server

    def doRead(self) -> None:
        listener = self.socket
        factory = self.factory
        accepted = 0
        batch = min(self.numberAccepts, ACCEPT_BATCH)
        try:
            for _ in range(batch):
                try:
                    skt, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError:
                    tcp.Port.doRead(self)  # Twisted's recovery (EMFILE, EPERM, ...)
                    return
                accepted += 1
                if len(addr) == 4:
                    # IPv6: keep the scope id, as Twisted does
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0],) + tuple(addr[1:])
                try:
                    first = skt.recv(READ_FIRST, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    first = b""  # nothing sent yet
                except OSError:
                    skt.close()  # reset (or failed) before it was even served
                    continue
                try:
                    protocol = factory.build_eager(self._buildAddr(addr), first)
                except Exception:  # noqa: BLE001 - a bug: refuse this client, keep accepting
                    log.err(None, f"{factory!r} failed to build a protocol")
                    protocol = None
                if protocol is None:
                    skt.close()
                    continue
                session = self.sessionno
                self.sessionno = session + 1
                transport = None
                try:
                    transport = self.transport(skt, protocol, addr, self, session, self.reactor)
                    protocol.makeConnection(transport)
                except Exception:  # noqa: BLE001 - e.g. epoll_ctl failing (ENOMEM)
                    # The protocol may already have forwarded bytes: tell it
                    # the connection failed, so that it ends what it started.
                    log.err(None, "cannot set up an accepted connection")
                    failed = Failure(ConnectionLost("connection set-up failed"))
                    try:
                        if transport is not None:
                            transport.connectionLost(failed)  # closes, tells the protocol
                        else:
                            skt.close()
                            protocol.connectionLost(failed)
                    except Exception:  # noqa: BLE001
                        log.err(None, "ending a connection whose set-up failed")
            # Twisted's scaling of the accept loop, within ACCEPT_BATCH
            if accepted == batch:
                self.numberAccepts = min(batch + 20, ACCEPT_BATCH)
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.deferr()


ACCEPT_BATCH = 16
"""Most connections an :class:`EagerPort` accepts per reactor pass.  Twisted
grows its batch by 20 for as long as the backlog keeps it full, so that a
port flooded with connections came to accept hundreds between two polls
and starved every other connection of the relay (one service's visitor
churn raising another's echo p99 from under a millisecond to 100-220 ms).
With a bounded batch every ready port and connection is served once per
pass: the flooded port waits in its backlog, not the others."""

READ_FIRST = 65536
"""How much of what a client sent before it was accepted is read at once."""


def listen_eager(
    reactor: Any, port: int, factory: Any, backlog: int, interface: str
) -> Any:
    """
    Listen with an :class:`EagerPort` on a real POSIX reactor; elsewhere
    (memory reactors in tests), or when the installed Twisted lacks what
    :class:`EagerPort` relies on, fall back to ``listenTCP``, whose
    connections reach the factory through its ``buildProtocol``.
    """
    if not _FAST_ACCEPT or not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = EagerPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def close_finished(transport: Any) -> None:
    """
    ``transport.loseConnection()``; a plain TCP socket done with writing (its
    FIN sent, or left to ``close()``) is then closed without Twisted's
    ``shutdown(SHUT_RDWR)`` first, which has nothing left to do.
    """
    if (
        _FAST_CLOSE
        and type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport._writeDisconnected
    ):
        transport._shouldShutdown = False
    transport.loseConnection()


def close_now(transport: Any) -> bool:
    """
    Close a plain TCP transport at once when both directions are finished
    with: its peer's end-of-file has been read and nothing is queued.  One
    ``close()`` then sends the FIN, where ``lose_write_now`` followed by
    ``loseConnection`` costs ``shutdown(SHUT_WR)``, ``shutdown(SHUT_RDWR)``
    and ``close()``.  The protocol hears ``connectionLost`` (clean) as it
    would from Twisted.  Returns False, doing nothing, for anything else
    (and always, when the installed Twisted lacks what this relies on).
    """
    if not _FAST_CLOSE or not _idle_plain_tcp(transport) or transport.producer is not None:
        return False
    transport._writeDisconnected = True  # nothing more will be written: close() sends the FIN
    close_finished(transport)  # with _writeDisconnected: connectionLost now
    return True


_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class EagerClient(tcp.Client):
    """
    A TCP client transport that calls ``connect()`` at once instead of on
    the next reactor pass, and that finishes the connection at once when
    the kernel has already completed it (a loopback connection is
    established by the time ``connect()`` returns): no reactor pass, no
    ``epoll`` round trip for writability.  Anything else (a name to
    resolve, a handshake still under way, an error) goes Twisted's way.
    Made by :class:`EagerConnector`, which completes the connection once it
    is set up itself.
    """

    _connected_early = False

    def createInternetSocket(self) -> socket.socket:
        # Connection.__init__ (in _finishInit) makes it non-blocking anyway.
        return socket.socket(self.addressFamily, self.socketType)

    def _finishInit(self, whenDone: Any, skt: Any, error: Any, reactor: Any) -> None:
        if whenDone is None or self._requiresResolution:
            super()._finishInit(whenDone, skt, error, reactor)
            return
        # No protocol yet, as in Twisted's own _finishInit.
        self._commonConnection.__init__(self, skt, None, reactor)  # type: ignore[arg-type]
        address = self.addr
        if len(address) == 4:  # IPv6 with a scope id, as _setRealAddress does
            host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
            address = (host,) + tuple(address[1:])
        self.realAddress = address
        try:
            result = skt.connect_ex(address)
            if result in _CONNECTING:
                result = skt.connect_ex(address)  # done already? (EISCONN)
        except (OSError, OverflowError) as e:  # an unusable address
            reactor.callLater(0, self.failIfNotConnected, ConnectError(string=str(e)))
            return
        if result in (0, errno.EISCONN):
            self._connected_early = True
        elif result in _CONNECTING:
            # Under way: wait for writability like Client.doConnect.
            self.doRead = self.doWrite = self.doConnect  # type: ignore[method-assign]
            self.startReading()
            self.startWriting()
        else:
            # Reported on the next pass, as Twisted reports its own.
            reactor.callLater(
                0, self.failIfNotConnected, getConnectError((result, os.strerror(result)))
            )


_PLAIN_TCP = (tcp.Server, tcp.Client, NoDelayServer, EagerClient)
"""The transport types :func:`write_now` and friends may work on directly
(the types themselves, not subclasses such as TLS ones)."""


class EagerConnector(tcp.Connector):
    """``reactor.connectTCP``'s connector, with an :class:`EagerClient`."""

    def _makeTransport(self) -> EagerClient:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)

    def connect(self) -> None:
        # The connect timeout is only set up for a connection not made at
        # once (no DelayedCall to create and cancel per local connection).
        timeout, self.timeout = self.timeout, None  # type: ignore[assignment]
        try:
            super().connect()
        finally:
            self.timeout = timeout
        transport = getattr(self, "transport", None)  # gone if startedConnecting stopped it
        if self.state != "connecting" or not isinstance(transport, EagerClient):
            return
        if not transport._connected_early:
            if timeout is not None:
                self.timeoutID = self.reactor.callLater(
                    timeout, transport.failIfNotConnected, TimeoutError()
                )
            return
        transport._connected_early = False
        try:
            transport._connectDone()  # builds the protocol
        except Exception:  # noqa: BLE001 - e.g. a protocol whose connectionMade raised
            # As the reactor does when doConnect raises: log it, then close
            # the connection with that error as the reason.
            failure = Failure()
            log.err(failure, "cannot set up a connection made at once")
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(failure)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        if self.state == "disconnected":
            # As after a failed attempt: no connector <-> transport cycle
            # left behind by every finished connection.
            self.transport = None


def connect_eager(
    reactor: Any, host: str, port: int, factory: Any, timeout: float = 30
) -> Any:
    """
    ``reactor.connectTCP(host, port, factory, timeout)`` with an
    :class:`EagerConnector` on a real POSIX reactor: on loopback the
    protocol is connected before this returns.  Elsewhere (memory reactors
    in tests), or when the installed Twisted lacks what
    :class:`EagerConnector` relies on, plain ``connectTCP``.
    """
    if not _FAST_CONNECT or not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = EagerConnector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector
