"""
Splicing a TCP connection and a mux stream together, both ways, with
backpressure and half-close.

Used by the relay (a visitor's connection <-> a stream to the service) and
by the agent (a stream from the relay <-> a connection to the local
service).  Each side's protocol holds the other's transport:

- bytes read on one side are written to the other;
- the writing side's transport pauses the reading side when it cannot take
  more (a full socket buffer, or an exhausted stream window);
- a FIN on one side becomes a FIN on the other (``loseWriteConnection``);
  the connection is done when both directions are;
- an abnormal end of one side aborts the other (RST for a stream,
  ``abortConnection`` for a socket);
- a TCP socket side gets ``TCP_NODELAY`` (as Go sets on every TCP
  connection): each read is forwarded as one write already, and Nagle's
  algorithm would only hold back the tail of a reply until the peer's
  (possibly delayed) ACK;
- a TCP socket side reads :data:`FEED_READ_SIZE` bytes at a time: whole
  muxado frames.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay._fastio import (
    close_finished,
    close_now,
    lose_write_now,
    nodelay,
    read_size,
    write_now,
)
from tcprelay.mux.frames import MAX_PAYLOAD

log = Logger()

__all__ = ["FEED_READ_SIZE", "Splice"]

FEED_READ_SIZE = 4 * MAX_PAYLOAD
"""
Bytes a socket feeding a stream reads at a time: four whole muxado v1
frames (65532).  Twisted's 65536 would make four frames and a 4-byte one,
and with a Go peer every such tiny frame costs the peer a read, a wake-up,
a WNDINC and a tiny echoed frame of its own (about 7% of throughput with 8
connections; benchmarks/results/experiments.json).
"""


@implementer(interfaces.IPushProducer)
class _PauseOnly:
    """
    Registered as producer on a transport, pauses/resumes another one.

    ``stopProducing`` does nothing: how the other side ends is decided by
    :class:`Splice` from the reason the connection was lost (a TCP
    transport calls ``stopProducing`` before its protocol's
    ``connectionLost``).
    """

    def __init__(self, target: Any) -> None:
        self.target = target

    def pauseProducing(self) -> None:
        self.target.pauseProducing()

    def resumeProducing(self) -> None:
        self.target.resumeProducing()

    def stopProducing(self) -> None:
        pass


def _producer_done(transport: Any) -> None:
    """
    The side feeding ``transport`` has ended: unregister it as producer
    before ``loseWriteConnection``/``loseConnection``.  A Twisted socket
    transport whose streaming producer is paused, when its buffer drains,
    resumes the producer instead of sending the FIN or closing, so a FIN
    arriving while the writer is paused would otherwise never go out.
    """
    try:
        transport.unregisterProducer()
    except Exception:  # noqa: BLE001 - nothing registered
        pass


class Splice:
    """
    One spliced pair of protocols, each running on its own transport:
    :attr:`visitor` carries the visitor's bytes (a visitor's socket on the
    relay, the stream from the relay on the agent), :attr:`service` the
    service's (the stream to the service on the relay, the local service's
    socket on the agent).  Counts and names are by direction:
    :attr:`bytes_to_service` were read on the visitor side,
    :attr:`bytes_to_visitor` on the service side.

    When both sides have closed, the hooks given to :meth:`when_done` run
    (in order, each called with None and its own arguments) and :attr:`done`
    fires with None; the splice is unlinked right after.  :meth:`when_done`
    is the cheap way (a relay holding 10,000 idle visitors keeps one small
    tuple per hook instead of a Deferred and its callback chain each);
    :attr:`done`, a Deferred made on first use, suits everything else.
    """

    def __init__(self) -> None:
        self.visitor = _Side(self, to_service=True)
        self.service = _Side(self, to_service=False)
        self.visitor.peer = self.service
        self.service.peer = self.visitor
        self.greeting = b""
        """Bytes written to the service side before anything from the
        visitor side (set before it connects; e.g. the agent's PROXY header
        for a local service)."""
        self.on_linked: Optional[Callable[[Splice], None]] = None
        """Called once both sides are connected, before either reads."""
        self.finished = False
        """Both sides have closed (the hooks have run)."""
        self._hooks: Optional[list[tuple[Callable[..., object], tuple[Any, ...]]]] = None
        self._done: Optional[Deferred[None]] = None
        self.bytes_to_service = 0
        """Bytes read on the visitor side (written to the service side)."""
        self.bytes_to_visitor = 0
        """Bytes read on the service side (written to the visitor side)."""

    def _linked(self) -> None:
        on_linked, self.on_linked = self.on_linked, None
        if on_linked is not None:
            on_linked(self)

    def when_done(self, hook: Callable[..., object], *args: Any) -> None:
        """Call ``hook(None, *args)`` once both sides have closed (at once if they have)."""
        if self.finished:
            hook(None, *args)
        elif self._hooks is None:
            self._hooks = [(hook, args)]
        else:
            self._hooks.append((hook, args))

    @property
    def done(self) -> Deferred[None]:
        """Fires (with None) once both sides have closed."""
        if self._done is None:
            self._done = Deferred()
            if self.finished:
                self._done.callback(None)
        return self._done

    def _side_done(self) -> None:
        if self.visitor.lost and self.service.lost and not self.finished:
            self.finished = True
            try:
                hooks, self._hooks = self._hooks, None
                for hook, args in hooks or ():
                    try:
                        hook(None, *args)
                    except Exception:  # noqa: BLE001 - one hook's bug must not skip the rest
                        log.failure("a splice's done hook failed")
                if self._done is not None and not self._done.called:
                    self._done.callback(None)
            finally:
                self._unlink()

    def _unlink(self) -> None:
        """
        Both ends are gone: break the reference cycles between the two
        sides, this splice and their transports, so that reference counting
        frees a finished connection at once instead of the cyclic garbage
        collector, whose full passes stop the reactor.
        """
        for side in (self.visitor, self.service):
            side.peer = None  # type: ignore[assignment]
            side.transport = None
            side.splice = None  # type: ignore[assignment]
            side.factory = None  # (a factory building it may hold the splice)
        self.on_linked = None


@implementer(interfaces.IHalfCloseableProtocol)
class _Side(Protocol):
    """One end of a :class:`Splice`."""

    peer: _Side
    transport: Any

    def __init__(self, splice: Splice, to_service: bool) -> None:
        self.splice = splice
        self.to_service = to_service
        """What this side reads goes to the service (the visitor side)."""
        self.lost = False
        self.read_done = False
        self.write_done = False
        self._pending: list[bytes] = []
        self._pending_eof = False

    def connectionMade(self) -> None:
        peer = self.peer
        nodelay(self.transport)
        read_size(self.transport, FEED_READ_SIZE)
        if peer.transport is not None and not peer.lost:
            self._link()
            peer._link()
            self.splice._linked()
        elif peer.lost:
            self.transport.loseConnection()

    def _link(self) -> None:
        """Both transports exist: wire producers and flush early bytes."""
        transport = self.transport
        peer = self.peer
        splice = self.splice
        transport.registerProducer(_PauseOnly(peer.transport), True)
        if not self.to_service and splice.greeting:
            greeting, splice.greeting = splice.greeting, b""
            transport.write(greeting)
        if self._pending:
            pending, self._pending = self._pending, []
            transport.writeSequence(pending)
        if self._pending_eof:
            _producer_done(transport)
            transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        peer = self.peer
        if self.to_service:
            self.splice.bytes_to_service += len(data)
        else:
            self.splice.bytes_to_visitor += len(data)
        if peer.transport is None:
            peer._pending.append(data)
        elif not peer.lost:
            write_now(peer.transport, data)

    def readConnectionLost(self) -> None:
        self.read_done = True
        peer = self.peer
        if peer.transport is None:
            peer._pending_eof = True
        elif not peer.lost:
            _producer_done(peer.transport)
            # Both directions over (the peer's end-of-file was read first):
            # close at once; otherwise half-close and keep reading the peer.
            if not (peer.read_done and close_now(peer.transport)):
                lose_write_now(peer.transport)
        # (not when that already ended this side too, through the peer)
        if self.write_done and not self.lost:
            close_finished(self.transport)

    def writeConnectionLost(self) -> None:
        self.write_done = True
        if self.read_done and not self.lost:
            close_finished(self.transport)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.lost = True
        splice = self.splice  # ending the peer below may unlink the splice
        transport = self.transport
        if transport is not None:
            try:
                transport.unregisterProducer()
            except Exception:  # noqa: BLE001 - nothing registered yet
                pass
        peer = self.peer
        if peer.transport is not None and not peer.lost:
            if reason.check(error.ConnectionDone):
                # Clean end: let the peer finish sending what it has.
                _producer_done(peer.transport)
                close_finished(peer.transport)
            else:
                peer.transport.abortConnection()
        splice._side_done()

