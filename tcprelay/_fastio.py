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
TCP transport may take.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

__all__ = [
    "HeldServer",
    "lose_write_now",
    "nodelay",
    "read_size",
    "write_now",
    "read_now",
    "prepare_listener",
]


class HeldServer(tcp.Server):
    """
    A connection accepted by a listener set up with
    :func:`prepare_listener`: its socket inherited ``TCP_NODELAY`` from the
    listener, and it is not registered for reading until :meth:`release` is
    called, so the ``epoll_ctl`` that registers it comes after whatever the
    protocol sends first (the relay: the SYN and the visitor's first bytes)
    instead of before.  Pausing and stopping while held are remembered.
    """

    _held = True
    _want_reading = False

    def startReading(self) -> None:
        if self._held:
            self._want_reading = True
            return
        super().startReading()

    def stopReading(self) -> None:
        self._want_reading = False
        super().stopReading()

    def release(self) -> None:
        """Start reading now, unless the protocol paused or closed meanwhile."""
        if self._held:
            self._held = False
            if self._want_reading and self.connected:
                super().startReading()


_PLAIN_TCP = (tcp.Server, tcp.Client, HeldServer)


def _idle_plain_tcp(transport: Any) -> bool:
    """A plain TCP transport, open for writing, with nothing queued."""
    return (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._writeDisconnected
    )


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending at once when that is safe."""
    if _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error the regular path will report.
            sent = 0
        if sent == len(data):
            return
        if sent:
            data = data[sent:]
    transport.write(data)


def read_now(transport: Any, protocol: Any) -> None:
    """
    Hand ``protocol`` whatever a just-accepted plain TCP socket already holds
    (a visitor that writes at once), without waiting for the next reactor
    pass.  End-of-file and errors are left for the reactor, which sees them
    again on its own read.
    """
    if type(transport) not in _PLAIN_TCP or transport.TLS or not transport.connected:
        return
    try:
        data = transport.socket.recv(transport.bufferSize)
    except OSError:
        return
    if data:
        protocol.dataReceived(data)


def nodelay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on a TCP transport (``TCP_NODELAY``); other
    transports are left alone.  A socket already reset by its peer is left
    for the reactor to report.
    """
    if type(transport) is HeldServer:
        return  # accepted from a listener with TCP_NODELAY: inherited
    set_nodelay = getattr(transport, "setTcpNoDelay", None)
    if set_nodelay is not None:
        try:
            set_nodelay(True)
        except OSError:
            pass


def read_size(transport: Any, size: int) -> None:
    """How many bytes each read of a plain TCP transport asks for (Twisted's
    ``bufferSize``, 64 KiB by default); other transports are left alone."""
    if type(transport) in _PLAIN_TCP and transport.bufferSize != size:
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
    if _idle_plain_tcp(transport) and transport.producer is None:
        transport._writeDisconnecting = True
        transport._writeDisconnected = True
        transport._closeWriteConnection()
        return
    transport.loseWriteConnection()


def prepare_listener(port: Any) -> bool:
    """
    Set ``TCP_NODELAY`` on a listening Twisted TCP port (Linux copies it to
    every accepted socket, saving a ``setsockopt`` per connection) and make
    it create :class:`HeldServer` transports.  Returns False, changing
    nothing, for anything but a plain ``tcp.Port``.
    """
    if type(port) is not tcp.Port:
        return False
    try:
        port.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        return False
    port.transport = HeldServer
    return True
