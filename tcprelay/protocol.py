"""
The Twisted adapter for :mod:`tcprelay.mux`.

:class:`MuxProtocol` runs one muxado v1 session over one connection.  It is
the only producer registered on its socket.  Each stream is a
:class:`MuxStream`: a transport for an ordinary Twisted protocol, with
``write``/``writeSequence``, ``loseConnection`` (Go-style close),
``loseWriteConnection`` (half-close), ``abortConnection`` (RST), producers
and consumers both ways, and :class:`IHalfCloseableProtocol` delivery of the
peer's FIN.

Backpressure:

- A stream whose send window is exhausted pauses the producer registered on
  it (typically the visitor's socket), and resumes it when the peer grants
  window again.
- When the session socket's write buffer is full, Twisted pauses the
  MuxProtocol, which pauses every stream's producer until it drains.
- A stream whose protocol pauses it (``pauseProducing``) keeps what arrives
  and stops granting window, so only that stream's peer stops sending; the
  other streams go on.

Why one module of this size: MuxProtocol and MuxStream are the two halves of
one adapter (the stream's producer and consumer calls go through the
session's), and each needs the other's internals.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay._fastio import nodelay, queued, read_size, write_now
from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode, error_name
from tcprelay.mux.session import (
    Role,
    Session,
    SessionClosedError,
    SessionConfig,
    StreamClosedError,
)

__all__ = ["MuxProtocol", "MuxStream", "StreamResetError"]

CLOSE_TIMEOUT = 10.0
"""Seconds a closing session may take to flush before the socket is aborted."""

HOLD_AT = 1024 * 1024
"""Bytes a socket may hold unsent before its session stops framing stream
data (until the socket drains): enough that a socket that is merely full
for a moment keeps a write queued behind what it is sending, so that it
never runs dry; what a peer grants beyond it waits in the streams."""

OWED_GRANT_DELAY = 1.0
"""Seconds the extra window of a stream the peer opened may wait for our
next frames before it goes alone: the peer hears from every stream it
opened within a second, even while the application has nothing to say yet
(a relay resets the streams a service never answers)."""


class StreamResetError(error.ConnectionLost):
    """The stream ended abnormally (RST, or its session ended)."""

    def __init__(self, code: int, remote: bool, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.remote = remote
        self.reason = reason

    def __str__(self) -> str:
        side = "peer" if self.remote else "local"
        return f"stream reset ({side}, {error_name(self.code)}): {self.reason}"


PAUSE_PENDING = 65536
"""
A stream's streaming producer is paused once more than this many bytes
wait for send window, and resumed when none do.  Pausing as soon as one
byte waits would stop and restart reading the visitor (two ``epoll_ctl``
calls and Twisted's bookkeeping) for almost every read behind a peer that
grants 64 KiB windows; with this margin a stream holds at most one more
read (64 KiB) than it would otherwise.
"""

SUBFRAME_HOLD = 0.001
"""
Seconds after which a stream that holds back a sub-frame remainder (queued
data beyond a send window of less than a frame's worth), and has made no
progress since, sends it anyway (:meth:`tcprelay.mux.session.Session.release_subframe`).  One timer
serves the session, so a hold lasts between SUBFRAME_HOLD and twice that.  A
peer's WNDINC almost always comes sooner; this only bounds the wait on a
peer that grants window only once it has consumed nearly all of it.
"""

StreamAcceptor = Callable[["MuxStream"], Optional[interfaces.IProtocol]]
"""Given a peer-opened stream, return the protocol to run on it, or None."""


@implementer(
    interfaces.ITransport,
    interfaces.IConsumer,
    interfaces.IPushProducer,
)
class MuxStream:
    """
    One stream of a session, as a transport for a Twisted protocol.

    Created by :class:`MuxProtocol` (``open_stream`` or an accepted peer
    stream); the protocol is attached with :meth:`attach`.
    """

    disconnecting = False
    disconnected = False

    def __init__(self, mux: MuxProtocol, stream_id: int, stream_type: int) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.stream_type = stream_type
        self.protocol: Optional[interfaces.IProtocol] = None
        self.peer_address: Optional[IAddress] = None
        """Overrides :meth:`getPeer` (e.g. a visitor's address)."""
        self.host_address: Optional[IAddress] = None
        """Overrides :meth:`getHost` (e.g. a public listening address)."""
        self._paused = False
        self._inbox: list[bytes] = []
        self._eof_pending = False
        self._producer: Optional[interfaces.IProducer] = None
        self._streaming = True
        self._producer_paused = False
        self._pull_scheduled = False
        self.fin_hold = 0.0
        """Seconds this stream's FIN (``loseWriteConnection``,
        ``loseConnection``) may wait for other frames to leave with it on
        the session; 0 sends it at once (see :meth:`MuxProtocol.flush_within`).
        The relay sets it on visitor streams
        (:data:`tcprelay.relay.doors.muxado.FIN_HOLD`)."""

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} type={self.stream_type}>"

    def attach(self, protocol: interfaces.IProtocol) -> None:
        """Run ``protocol`` on this stream (calls its makeConnection)."""
        self.protocol = protocol
        protocol.makeConnection(self)

    # -- ITransport ------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes; ignored once the stream is closed for sending."""
        if self.disconnecting or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the session keeps what it queues: no aliasing
        mux = self.mux
        try:
            mux.session.send_data(self.stream_id, data)
        except (StreamClosedError, SessionClosedError):
            # The session has already closed this stream for sending (an RST
            # in the batch being dispatched), but its StreamClosed event,
            # which stops the producer, has not been dispatched yet.  Pause
            # the producer meanwhile, or one that writes until paused spins.
            producer = self._producer
            if producer is not None and self._streaming and not self._producer_paused:
                self._producer_paused = True
                producer.pauseProducing()  # type: ignore[attr-defined]
            return
        if self._producer is not None:
            self._update_producer()
        mux.flush()

    def writeSequence(self, data: list[bytes]) -> None:
        """Send several buffers."""
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close like a TCP socket: FIN after queued data, then forget."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self.mux.session.close_stream(self.stream_id)
        self.mux.flush_within(self.fin_hold)

    def loseWriteConnection(self) -> None:
        """Half-close: FIN after queued data; keep reading."""
        if self.disconnected:
            return
        self.mux.session.end_stream(self.stream_id)
        self.mux.flush_within(self.fin_hold)

    def abortConnection(self) -> None:
        """Reset the stream (RST CANCEL) at once."""
        if self.disconnected:
            return
        self.disconnecting = True
        self.mux.session.reset_stream(self.stream_id, ErrorCode.CANCEL)
        self.mux.flush()

    def getPeer(self) -> IAddress:
        """The peer's address: overridden per stream, else the session's."""
        if self.peer_address is not None:
            return self.peer_address
        return self.mux.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        """Our address: overridden per stream, else the session's."""
        if self.host_address is not None:
            return self.host_address
        return self.mux.transport.getHost()  # type: ignore[union-attr]

    # -- IConsumer: something that writes into this stream ---------------

    def registerProducer(self, producer: interfaces.IProducer, streaming: bool) -> None:
        """Pause ``producer`` whenever this stream cannot send."""
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if self.disconnected:
            producer.stopProducing()
            return
        self._update_producer()

    def unregisterProducer(self) -> None:
        """Forget the producer."""
        self._producer = None

    def _blocked(self) -> bool:
        return self.mux.paused or self.mux.session.pending(self.stream_id) > 0

    def _update_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        if not self._streaming:
            if not self._pull_scheduled and not self._blocked():
                self._pull_scheduled = True
                self.mux.clock.callLater(0, self._pull)
            return
        if self._producer_paused:
            if not self._blocked():
                self._producer_paused = False
                producer.resumeProducing()
        elif self.mux.paused or self.mux.session.pending(self.stream_id) > PAUSE_PENDING:
            self._producer_paused = True
            producer.pauseProducing()  # type: ignore[attr-defined]

    def _pull(self) -> None:
        self._pull_scheduled = False
        if self._producer is not None and not self.disconnected and not self._blocked():
            self._producer.resumeProducing()

    # -- IPushProducer: the protocol reading from this stream ------------

    def pauseProducing(self) -> None:
        """Stop delivering data; the peer's window stays shut meanwhile."""
        self._paused = True

    def resumeProducing(self) -> None:
        """Deliver what was held back, then grant the window again."""
        if not self._paused:
            return
        self._paused = False
        while self._inbox and not self._paused and not self.disconnected:
            data = self._inbox.pop(0)
            self._deliver(data)
        if not self._inbox and self._eof_pending and not self._paused:
            self._eof_pending = False
            self._read_ended()
        self.mux.flush()

    def stopProducing(self) -> None:
        """The consumer is gone: close the stream."""
        self.loseConnection()

    # -- called by MuxProtocol -------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._paused:
            self._inbox.append(data)
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol is not None:
            protocol.dataReceived(data)
        self.mux.session.acknowledge(self.stream_id, len(data))

    def _read_ended(self) -> None:
        if self._paused and self._inbox:
            self._eof_pending = True
            return
        protocol = self.protocol
        half = interfaces.IHalfCloseableProtocol(protocol, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.loseConnection()

    def _closed(self, event: ev.StreamClosed) -> None:
        self.disconnected = True
        self.disconnecting = True
        reason: Failure
        if event.error_code is None and (self._inbox or self._eof_pending):
            # Clean end while paused: hand over what arrived first, then EOF.
            for data in self._inbox:
                if self.protocol is not None:
                    self.protocol.dataReceived(data)
            half = interfaces.IHalfCloseableProtocol(self.protocol, None)
            if self._eof_pending and half is not None:
                half.readConnectionLost()
        self._inbox = []
        self._eof_pending = False
        if event.error_code is None:
            reason = Failure(error.ConnectionDone())
        else:
            reason = Failure(
                StreamResetError(event.error_code, event.remote, event.reason)
            )
        producer = self._producer
        self._producer = None
        if producer is not None:
            producer.stopProducing()
        protocol, self.protocol = self.protocol, None  # no stream <-> protocol cycle left
        if protocol is not None:
            protocol.connectionLost(reason)


READ_SIZE_PER_STREAM = 65536
MAX_READ_STREAMS = 16
"""
A session socket reads 64 KiB (Twisted's default) per open stream, up to
16 streams (1 MiB); a single stream keeps 64 KiB.  A peer interleaves its
streams' frames (16 KiB at most each), so one 64 KiB read holds a frame or
so per stream and every stream's chunk becomes its own small write; a read
that grows with the number of streams carries several frames of each,
which the decoder joins into one chunk per stream: fewer, larger writes to
visitors and fewer reads (about a third more throughput with 8 busy
streams).  The 1 MiB cap relies on the daemon's allocator tuning
(:func:`tcprelay._reactor.tune_malloc`); without it, glibc gives each
burst's memory back and faults it in again, and larger reads cost more.
"""


@implementer(interfaces.IPushProducer)
class MuxProtocol(Protocol):
    """
    One muxado v1 session over one connection, in either role.

    ``acceptor`` decides what runs on each stream the peer opens (None
    refuses it with RST(REFUSED_STREAM)).  ``ended`` fires with the
    :class:`~tcprelay.mux.events.SessionEnded` event once the connection is
    gone.  Subclasses may override the ``session_*`` hooks.
    """

    log = Logger()

    def __init__(
        self,
        role: Role,
        clock: IReactorTime,
        config: SessionConfig = SessionConfig(),
        acceptor: Optional[StreamAcceptor] = None,
    ) -> None:
        self.role = role
        self.clock = clock
        self.config = config
        self.acceptor = acceptor
        self.session = self.make_session(role, config, clock.seconds())
        self.streams: dict[int, MuxStream] = {}
        self.paused = False
        self.ended: Deferred[ev.SessionEnded] = Deferred()
        self.end_event: Optional[ev.SessionEnded] = None
        self.label = ""
        """Short text naming the session in log lines (the peer address)."""
        self._pumping = False
        self._backlog: list[ev.Event] = []
        self._timer: Optional[IDelayedCall] = None
        self._abort_timer: Optional[IDelayedCall] = None
        self._held_flush: Optional[IDelayedCall] = None
        self._subframe_release: Optional[IDelayedCall] = None
        self._connected = False
        self.max_buffered: Optional[int] = None
        """Most bytes the socket may hold unsent for this session (beyond
        what the kernel took); a session over it is cut at once.  None: no
        cap.  Stream data is framed only while the socket takes more (see
        :attr:`Session.congested`), so what piles up beyond a few hundred
        KiB is what the peer provokes without reading: echoes, RSTs,
        WNDINCs."""
        self._written_paused = 0
        """Bytes written while the socket was full (the cap's measure when
        the transport's own buffer cannot be read)."""
        self.overflowed = False
        """True once the session was cut for going over :attr:`max_buffered`."""
        self.frame_timeout: Optional[float] = None
        """Seconds the rest of a frame may take to arrive once its first
        bytes have (checked at each such interval: a frame still unfinished,
        with no frame completed since the last check, ends the session with
        PROTOCOL_ERROR).  None: no limit."""
        self.max_read_size: Optional[int] = None
        """Most bytes one read of the socket takes (None: as many as the
        streams need); a relay keeps unregistered sessions' reads small, so
        that what one read makes it decode stays small too."""
        self._frame_timer: Optional[IDelayedCall] = None
        self._frame_mark = 0
        self._owed_timer: Optional[IDelayedCall] = None

    def make_session(self, role: Role, config: SessionConfig, now: float) -> Session:
        """
        The sans-IO session this adapter runs: muxado v1.  A subclass may
        return another session with the same interface (the ngrok door's
        :class:`tcprelay.mux2.session.Session`, muxado v2).
        """
        return Session(role, config, now)

    # -- Protocol ----------------------------------------------------------

    def connectionMade(self) -> None:
        """Register as the socket's producer and start the session."""
        self._connected = True
        transport = self.transport
        assert transport is not None
        if not self.label:
            peer = transport.getPeer()
            self.label = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        nodelay(transport)
        transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.session_started()
        self.flush()
        self._schedule()

    def dataReceived(self, data: bytes) -> None:
        """Feed the session; dispatch what it reports."""
        session = self.session
        events = session.receive_data(data)
        self.flush(events)
        if self.frame_timeout is not None and self._frame_timer is None and session.partial_frame:
            self._frame_mark = session.frames_received
            self._frame_timer = self.clock.callLater(self.frame_timeout, self._frame_check)
        if self._connected:
            # What was read may need the clock sooner (a flood window).
            when = self.session.next_timer()
            timer = self._timer
            if when is not None and (timer is None or when < timer.getTime()):
                if timer is not None:
                    timer.cancel()
                self._schedule()
        streams = len(self.streams)
        # never 0: a read of 0 bytes would look like end-of-file
        size = READ_SIZE_PER_STREAM * (
            streams if 0 < streams < MAX_READ_STREAMS else MAX_READ_STREAMS if streams else 1
        )
        limit = self.max_read_size
        read_size(self.transport, size if limit is None or size < limit else limit)

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        """The socket is gone: every stream ends, then the session."""
        self._connected = False
        self.session.connection_lost(reason.getErrorMessage())
        self.flush()
        for call in (
            self._timer,
            self._abort_timer,
            self._held_flush,
            self._subframe_release,
            self._frame_timer,
            self._owed_timer,
        ):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._abort_timer = self._held_flush = self._subframe_release = None
        self._frame_timer = self._owed_timer = None
        if not self.ended.called:
            end = self.end_event or self.session.end_reason
            assert end is not None
            self.ended.callback(end)
        # The acceptor is often a method of this protocol: a cycle, which
        # reference counting alone would never free.
        self.acceptor = None

    # -- IPushProducer (for our socket) ------------------------------------

    def pauseProducing(self) -> None:
        """The socket's write buffer is full: pause every stream's producer."""
        if self.paused:
            return
        self.paused = True
        for stream in list(self.streams.values()):
            stream._update_producer()

    def resumeProducing(self) -> None:
        """The socket drained: send held data, let stream producers go again."""
        if not self.paused:
            return
        self.paused = False
        self._written_paused = 0
        self.session.congested = False
        if self.session.has_held:
            self.flush()
        if self.paused:
            return  # what was held filled the socket again
        for stream in list(self.streams.values()):
            stream._update_producer()

    def stopProducing(self) -> None:
        """The socket is closing; connectionLost does the work."""

    # -- API -----------------------------------------------------------------

    def open_stream(
        self,
        protocol: Optional[interfaces.IProtocol],
        stream_type: int = 0,
        flush: bool = True,
    ) -> MuxStream:
        """
        Open a stream to the peer and run ``protocol`` on it.
        Raises :class:`SessionClosedError` if the session cannot open one.
        With ``flush=False`` the SYN waits for the caller's next
        :meth:`flush` (so that it can leave with the stream's first bytes).
        With ``protocol=None`` the stream takes writes at once and its
        protocol is attached later (:meth:`MuxStream.attach`).
        """
        sid = self.session.open_stream(stream_type)
        stream = MuxStream(self, sid, stream_type)
        self.streams[sid] = stream
        if protocol is not None:
            stream.attach(protocol)
        if flush:
            self.flush()
        return stream

    def go_away(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """Refuse new peer streams from now on; open ones carry on."""
        self.session.go_away(error_code)
        self.flush()

    def close(self, error_code: int = ErrorCode.NO_ERROR, reason: str = "closed") -> None:
        """End the session: GOAWAY, every stream closed, socket closed."""
        self.session.close(error_code, reason)
        self.flush()

    # -- hooks for subclasses -------------------------------------------------

    def session_started(self) -> None:
        """Called once the connection is up, before anything is sent."""

    def session_ended(self, event: ev.SessionEnded) -> None:
        """Called when the session ends (before the socket has closed)."""

    def heartbeat_acknowledged(self, rtt: float) -> None:
        """Called with each heartbeat round-trip time."""

    def goaway_received(self, event: ev.GoAwayReceived) -> None:
        """Called when the peer sends GOAWAY."""

    # -- internals -------------------------------------------------------------

    def flush_within(self, delay: float) -> None:
        """
        Flush at most ``delay`` seconds from now (at once for 0): what is
        queued may wait for other frames to leave in the same write, and
        any flush before then sends it.  A silent visitor's SYN and a
        visitor's FIN wait this way on the relay.
        """
        if delay <= 0 or not self._connected:
            self.flush()
            return
        held = self._held_flush
        if held is None:
            self._held_flush = self.clock.callLater(delay, self._flush_held)
        elif held.getTime() > self.clock.seconds() + delay:
            held.reset(delay)

    def _flush_held(self) -> None:
        self._held_flush = None
        self.flush()

    def flush(self, events: Optional[list[ev.Event]] = None) -> None:
        """
        Write what the session has to send and dispatch its events (and
        ``events``, already taken from it), until both run dry.  Re-entrant
        calls (a protocol writing from a callback) return at once: the
        outer loop picks up what they caused.
        """
        if self._pumping:
            if events:
                self._backlog.extend(events)
            return
        self._pumping = True
        session = self.session
        transport = self.transport
        try:
            while True:
                out = session.data_to_send()
                if out and self._connected:
                    if not write_now(transport, out):
                        self._check_buffered(len(out))
                if events is None:
                    events = session.events()
                if self._backlog:
                    events = self._backlog + events
                    self._backlog = []
                if not events:
                    if session.has_held and not self.paused and self._connected:
                        session.release_held()
                        events = None
                        continue
                    break
                for event in events:
                    try:
                        self._dispatch(event)
                    except Exception:
                        # A bug in one stream's protocol: reset that stream,
                        # keep the session (and every other stream) going.
                        sid = getattr(event, "stream_id", None)
                        self.log.failure(
                            "stream protocol raised handling {event}", event=event
                        )
                        if sid is not None:
                            session.reset_stream(sid, ErrorCode.INTERNAL_ERROR)
                events = None
        finally:
            self._pumping = False
        held = self._held_flush
        if held is not None:
            # what it held has just left: no timer pass for nothing
            self._held_flush = None
            held.cancel()
        if session.holding_subframe and self._subframe_release is None and self._connected:
            self._subframe_release = self.clock.callLater(
                SUBFRAME_HOLD, self._release_subframe, session.start_subframe_period()
            )
        if self._owed_timer is None and session.has_owed and self._connected:
            self._owed_timer = self.clock.callLater(OWED_GRANT_DELAY, self._grant_owed)

    def _grant_owed(self) -> None:
        self._owed_timer = None
        self.session.grant_owed()
        self.flush()

    def _frame_check(self) -> None:
        """A frame was left unfinished :attr:`frame_timeout` ago: progress since, or the end."""
        self._frame_timer = None
        session = self.session
        if session.ended or not session.partial_frame or self.frame_timeout is None:
            return
        if session.frames_received != self._frame_mark:
            self._frame_mark = session.frames_received
            self._frame_timer = self.clock.callLater(self.frame_timeout, self._frame_check)
            return
        self.close(
            ErrorCode.PROTOCOL_ERROR,
            f"a frame left unfinished for {self.frame_timeout:g}s",
        )

    def _check_buffered(self, written: int) -> None:
        """
        After a write that did not all go out: hold stream data once the
        socket holds more than :data:`HOLD_AT` unsent (until it drains), and
        cut the session when it holds more than :attr:`max_buffered`.
        """
        held = queued(self.transport)
        if held is None:
            if self.paused:
                self._written_paused += written
            held = self._written_paused
        if held > HOLD_AT and self.paused:
            self.session.congested = True
        limit = self.max_buffered
        if limit is None or held <= limit or self.overflowed:
            return
        self.overflowed = True
        self.log.info(
            "session {session} cut: {queued} bytes wait for a peer that does not read "
            "(limit {limit})",
            session=self.label,
            queued=held,
            limit=limit,
        )
        # Nothing more will reach a peer that does not read: drop what is queued.
        self.transport.abortConnection()  # type: ignore[union-attr]
        self.session.close(ErrorCode.FLOW_CONTROL_ERROR, "peer does not read its socket")

    def _release_subframe(self, period: int) -> None:
        """The hold timer fired: streams that have held back a sub-frame
        remainder for SUBFRAME_HOLD or more send it (no WNDINC came)."""
        self._subframe_release = None
        self.session.release_subframe(period)
        self.flush()

    def _dispatch(self, event: ev.Event) -> None:
        kind = type(event)
        if kind is ev.DataReceived:
            stream = self.streams.get(event.stream_id)  # type: ignore[union-attr]
            if stream is not None:
                stream._data_received(event.data)  # type: ignore[union-attr]
            else:
                self.session.acknowledge(event.stream_id, len(event.data))  # type: ignore[union-attr]
        elif kind is ev.SendWindowOpened:
            stream = self.streams.get(event.stream_id)  # type: ignore[union-attr]
            if stream is not None:
                stream._update_producer()
        elif kind is ev.StreamEnded:
            stream = self.streams.get(event.stream_id)  # type: ignore[union-attr]
            if stream is not None:
                stream._read_ended()
        elif kind is ev.StreamClosed:
            assert isinstance(event, ev.StreamClosed)
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream._closed(event)
        elif kind is ev.StreamOpened:
            assert isinstance(event, ev.StreamOpened)
            self._on_stream_opened(event)
        elif kind is ev.HeartbeatAcknowledged:
            assert isinstance(event, ev.HeartbeatAcknowledged)
            self.heartbeat_acknowledged(self.clock.seconds() - event.sent_at)
        elif kind is ev.GoAwayReceived:
            assert isinstance(event, ev.GoAwayReceived)
            self.goaway_received(event)
        elif kind is ev.SessionEnded:
            assert isinstance(event, ev.SessionEnded)
            self._ended(event)

    def _on_stream_opened(self, event: ev.StreamOpened) -> None:
        stream = MuxStream(self, event.stream_id, event.stream_type)
        protocol = self.acceptor(stream) if self.acceptor is not None else None
        if protocol is None:
            self.session.refuse_stream(event.stream_id)
            return
        self.session.accept_stream(event.stream_id)
        self.streams[event.stream_id] = stream
        stream.attach(protocol)

    def _ended(self, event: ev.SessionEnded) -> None:
        self.end_event = event
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if event.error_code not in (None, ErrorCode.NO_ERROR) or self.session.heartbeat_timed_out:
            self.log.info(
                "session {session} ended: {reason}",
                session=self.label,
                reason=event.reason,
                error_code=event.error_code,
                remote=event.remote,
            )
        self.session_ended(event)
        if self._connected:
            transport = self.transport
            assert transport is not None
            # A TLS transport waits for its producer to go before it closes.
            transport.unregisterProducer()  # type: ignore[attr-defined]
            if self.paused and event.error_code not in (None, ErrorCode.NO_ERROR):
                # Ended on an error while the peer was not reading: what is
                # queued (our GOAWAY last) would wait CLOSE_TIMEOUT for it.
                transport.abortConnection()  # type: ignore[attr-defined]
                return
            transport.loseConnection()
            # Some transports call connectionLost from loseConnection itself;
            # then there is nothing left to abort (and no timer may linger).
            if self._connected:
                self._abort_timer = self.clock.callLater(
                    CLOSE_TIMEOUT, transport.abortConnection  # type: ignore[attr-defined]
                )

    def _schedule(self) -> None:
        when = self.session.next_timer()
        if when is None:
            self._timer = None
            return
        self._timer = self.clock.callLater(
            max(0.0, when - self.clock.seconds()), self._on_timer
        )

    def _on_timer(self) -> None:
        self._timer = None
        self.session.on_timer(self.clock.seconds())
        self.flush()
        if not self.session.ended and self._timer is None:
            self._schedule()
