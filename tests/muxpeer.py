"""
The test suite's one scripted muxado v1 peer.

:class:`ScriptedPeer` is the sans-IO :class:`~tcprelay.mux.session.Session`
driven by hand: it sends exactly the frames a test asks for (so it can
break the rules on purpose), keeps every event it receives, and grants
window for what it reads unless told not to.  It talks over a *wire*:

- :class:`MemoryWire` faces a :class:`~tcprelay.protocol.MuxProtocol` (a
  relay's control session, a stream multiplexer under test) on a
  ``StringTransport``, for tests on a ``Clock`` with no sockets;
- :class:`SocketWire` is a blocking loopback socket, for tests against a
  relay process.

The legacy handshake of the original Go echo service (open the first plain
stream, read ``HOST:PORT`` to its FIN) is :meth:`ScriptedPeer.legacy_handshake`.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Optional, Protocol

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role, Session, SessionConfig
from tcprelay.protocol import MuxProtocol

NO_HEARTBEAT = SessionConfig(heartbeat=False)
HOST = "127.0.0.1"


class Wire(Protocol):
    """Bytes to and from the peer's counterpart."""

    def write(self, data: bytes) -> None:
        """Deliver ``data`` to the counterpart."""

    def read(self, deadline: float) -> Optional[bytes]:
        """
        What the counterpart wrote since the last read: ``b""`` when nothing
        came (at once for memory, by ``deadline`` for a socket), ``None``
        once the counterpart closed the connection.
        """

    def close(self) -> None:
        """Drop the connection."""


class MemoryWire:
    """Faces ``mux`` on its StringTransport ``tr``: no reactor, no sockets."""

    def __init__(self, mux: MuxProtocol, tr: StringTransport) -> None:
        self.mux = mux
        self.tr = tr
        self.lost = False

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.mux.dataReceived(data)

    def read(self, deadline: float) -> Optional[bytes]:
        data = self.tr.value()
        self.tr.clear()
        if not data and self.tr.disconnecting:
            # The mux closed its transport: a reactor would now report the
            # connection lost to it.
            self.lose(ConnectionDone())
            return None
        return data

    def close(self) -> None:
        """The peer drops the connection (a reset, as the mux sees it)."""
        self.lose(ConnectionLost())

    def lose(self, reason: Exception) -> None:
        if not self.lost:
            self.lost = True
            self.mux.connectionLost(Failure(reason))


class SocketWire:
    """A blocking TCP connection to ``HOST:port``."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = HOST) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, deadline: float) -> Optional[bytes]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b""
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return b""
        return chunk if chunk else None

    def close(self) -> None:
        self.sock.close()


class ScriptedPeer:
    """
    A muxado v1 peer scripted frame by frame (see the module docstring).
    Everything received is in :attr:`events`; stream data also in
    :attr:`received`.  With ``auto_ack`` the peer consumes (and so grants
    window for) every byte it receives.
    """

    def __init__(
        self,
        wire: Wire,
        role: Role = Role.CLIENT,
        config: SessionConfig = NO_HEARTBEAT,
        auto_ack: bool = True,
        now: Optional[float] = None,
    ) -> None:
        self.wire = wire
        self.session = Session(role, config, time.monotonic() if now is None else now)
        self.auto_ack = auto_ack
        self.events: list[ev.Event] = []
        self.received: dict[int, bytearray] = {}
        self.ended_streams: set[int] = set()
        self.closed_streams: dict[int, ev.StreamClosed] = {}
        self.goaway: Optional[ev.GoAwayReceived] = None
        self.ended: Optional[ev.SessionEnded] = None
        self.eof = False

    @classmethod
    def facing(
        cls, mux: MuxProtocol, tr: StringTransport, role: Role = Role.CLIENT, **kw: object
    ) -> ScriptedPeer:
        """A peer for ``mux`` on its StringTransport (clock time 0)."""
        kw.setdefault("now", 0.0)
        return cls(MemoryWire(mux, tr), role, **kw)  # type: ignore[arg-type]

    @classmethod
    def dial(cls, port: int, timeout: float = 10.0, **kw: object) -> ScriptedPeer:
        """A client peer on a new loopback connection to ``port``."""
        return cls(SocketWire(port, timeout), Role.CLIENT, **kw)  # type: ignore[arg-type]

    # -- what the peer sends ---------------------------------------------

    def open_stream(self, stream_type: int = 0) -> int:
        """Open a stream of ``stream_type`` (sent at once); its id."""
        sid = self.session.open_stream(stream_type)
        self.received.setdefault(sid, bytearray())
        self.flush()
        return sid

    def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        """Send ``data`` on stream ``sid`` (as far as its window allows)."""
        self.session.send_data(sid, data, fin=fin)
        self.flush()

    def reset(self, sid: int, code: int = ErrorCode.CANCEL) -> None:
        """Reset stream ``sid``."""
        self.session.reset_stream(sid, code)
        self.flush()

    def flush(self) -> None:
        """Write what the session has to say and take its own events."""
        self._write_pending()

    def _write_pending(self) -> bool:
        out = self.session.data_to_send()
        if out and not self.eof:
            try:
                self.wire.write(out)
            except OSError:
                self._lost("write failed")
        self._take(self.session.events())
        return bool(out)

    def close(self) -> None:
        """Drop the connection."""
        self.wire.close()

    # -- what the peer receives ------------------------------------------

    def _take(self, events: list[ev.Event]) -> None:
        for event in events:
            self.events.append(event)
            if isinstance(event, ev.DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.auto_ack:
                    self.session.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, ev.StreamEnded):
                self.ended_streams.add(event.stream_id)
            elif isinstance(event, ev.StreamClosed):
                self.closed_streams[event.stream_id] = event
            elif isinstance(event, ev.GoAwayReceived):
                self.goaway = event
            elif isinstance(event, ev.SessionEnded):
                self.ended = event

    def _lost(self, reason: str) -> None:
        self.eof = True
        self.session.connection_lost(reason)
        self._take(self.session.events())

    def _read_once(self, deadline: float) -> bool:
        """Read and process one chunk; whether anything happened."""
        try:
            chunk = self.wire.read(deadline)
        except OSError as e:
            self._lost(f"read failed: {e}")
            return True
        if chunk is None:
            self._lost("eof")
            return True
        if not chunk:
            return False
        self._take(self.session.receive_data(chunk))
        self.flush()
        return True

    def exchange(self, limit: int = 10000) -> None:
        """Move bytes both ways until neither side has anything to say (memory wires)."""
        for _ in range(limit):
            wrote = self._write_pending()
            if self.eof or not (self._read_once(0.0) or wrote):
                return
        raise AssertionError("exchange never went quiet")

    def pump_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """
        Process what arrives until ``done()`` holds or the connection ends;
        fail (AssertionError) when it has not by ``timeout`` seconds, or at
        once when a memory wire goes quiet first.
        """
        deadline = time.monotonic() + timeout
        self.flush()
        while not done():
            if self.eof:
                return
            if not self._read_once(deadline):
                if isinstance(self.wire, MemoryWire) or time.monotonic() >= deadline:
                    raise AssertionError(f"scripted peer: condition not met within {timeout}s")

    def data(self, sid: int) -> bytes:
        """The bytes received on stream ``sid`` so far."""
        return bytes(self.received.get(sid, b""))

    def messages(self, sid: int) -> list[dict[str, object]]:
        """The extended-handshake messages received on ``sid`` so far."""
        return hs.MessageReader().feed(self.data(sid))

    # -- the original Go echo service's handshake -------------------------

    def legacy_handshake(self, timeout: float = 10.0) -> tuple[str, str]:
        """
        Open the first plain stream and read it to its FIN.  Returns
        ``("address", "HOST:PORT")`` when the relay served the handshake, or
        ``("goaway", reason)`` when a draining relay sent GOAWAY(NO_ERROR)
        first.  Anything else (a reset, a timeout, a silent close, an error
        code) raises AssertionError saying what happened.
        """
        sid = self.open_stream(0)
        self.pump_until(lambda: sid in self.ended_streams or self.ended is not None, timeout)
        if sid in self.ended_streams:
            return ("address", self.data(sid).decode("ascii", "replace"))
        goaway = self.goaway
        if self.ended is not None and goaway is not None and goaway.error_code == ErrorCode.NO_ERROR:
            return ("goaway", self.ended.reason)
        raise AssertionError(
            f"session ended before the address ({self.ended and self.ended.reason}; "
            f"goaway: {goaway})"
        )


def legacy_handshake(port: int, timeout: float = 10.0) -> tuple[str, str]:
    """:meth:`ScriptedPeer.legacy_handshake` on a new connection to ``port`` (closed after)."""
    peer = ScriptedPeer.dial(port, timeout)
    try:
        return peer.legacy_handshake(timeout)
    finally:
        peer.close()
