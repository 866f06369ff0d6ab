"""
A muxado v1 session, sans-IO.

:class:`Session` is fed the bytes read from the connection
(:meth:`Session.receive_data`) and told what the application wants
(:meth:`~Session.open_stream`, :meth:`~Session.send_data`, ...).  It keeps
every stream's state and windows, answers what the protocol requires on its
own (heartbeat echoes, RST for dead streams, GOAWAY on violations), and
leaves two things for its adapter to collect after every call: bytes to
write (:meth:`~Session.data_to_send`) and events (:meth:`~Session.events`).

Time only matters for heartbeats: the adapter calls :meth:`~Session.on_timer`
at (or after) the time :meth:`~Session.next_timer` names.

Nothing here raises because of what the peer sent: a violation ends the
session with GOAWAY carrying the matching error code and a
:class:`~tcprelay.mux.events.SessionEnded` event.  Methods called by the
application raise :class:`SessionClosedError` or :class:`StreamClosedError`
when asked for something the state does not allow.

Why one module of this size: the session is one state machine over every
stream's state, windows, heartbeats and flood counters; a split would
scatter the invariants that each frame handler keeps.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, Optional, Union

import attrs

from tcprelay.mux import frames as f
from tcprelay.mux.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HeartbeatAcknowledged,
    SendWindowOpened,
    SessionEnded,
    StreamClosed,
    StreamEnded,
    StreamOpened,
)
from tcprelay.mux.frames import ErrorCode, FrameError

__all__ = [
    "INITIAL_WINDOW",
    "Role",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "StreamClosedError",
    "StreamState",
]

INITIAL_WINDOW: Final = 0x10000
"""Every stream starts with this send window in each direction (64 KiB)."""
OUT_LIMIT: Final = 0x100000
"""Stream data framed into one :meth:`Session.data_to_send` at most (about
1 MiB): what a peer's window grants beyond it waits in the streams'
queues, so that the bytes queued for a connection stay bounded by what it
drains, however much window the peer grants at once."""
MAX_WINDOW: Final = 0x7FFFFFFF
MAX_STREAM_ID: Final = 0x7FFFFFFF

Buffer = Union[bytes, bytearray, memoryview]


class Role(enum.Enum):
    """Which end of the TCP connection we are: the dialler is the client."""

    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    """Lifecycle of one stream; see :data:`_TRANSITIONS`."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class _StreamInput(enum.Enum):
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"


_TRANSITIONS: Final[dict[tuple[StreamState, _StreamInput], StreamState]] = {
    (StreamState.OPEN, _StreamInput.SEND_FIN): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, _StreamInput.RECV_FIN): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, _StreamInput.RECV_FIN): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, _StreamInput.SEND_FIN): StreamState.CLOSED,
}
"""Clean transitions.  RST, or the session ending, closes from any state."""

_OPEN: Final = StreamState.OPEN
_HALF_CLOSED_LOCAL: Final = StreamState.HALF_CLOSED_LOCAL
# States in which the peer may still send (compared by identity: enum
# hashing costs a Python call per frame).


class SessionClosedError(Exception):
    """The session has ended, or the peer went away and no stream can open."""


class StreamClosedError(Exception):
    """The stream is gone, or its sending direction is already finished."""


@attrs.frozen
class SessionConfig:
    """
    Tunables of one session.

    receive_window:
        Bytes each stream may have in flight towards us.  64 KiB is what
        muxado starts with; more is granted with a WNDINC: with the SYN of a
        stream we open; on a stream the peer opens, with the next frames we
        send (usually the stream's first answer), or on its own once the
        peer has used half of its initial window.  Also the most a stream
        ever buffers for a paused reader.
    max_streams:
        Concurrent streams the peer may have open; more are refused with
        RST(REFUSED_STREAM).
    accept_backlog:
        Peer-opened streams not yet accepted by the application; more are
        refused with RST(REFUSED_STREAM).
    heartbeat:
        Run our own heartbeat stream (the peer's is always echoed).
    heartbeat_interval:
        Seconds between heartbeats.
    heartbeat_tolerance:
        Seconds an unanswered heartbeat may wait before the session is
        declared dead and closed.
    reset_flood_limit:
        RSTs the peer may provoke (streams refused by us or by the
        application, data for dead streams) within one
        ``reset_flood_window`` before the session is closed as a flood.
    reset_flood_window:
        Seconds over which ``reset_flood_limit`` counts, on the clock the
        adapter passes to :meth:`Session.on_timer` (heartbeats or not).
    """

    receive_window: int = INITIAL_WINDOW
    max_streams: int = 1024
    accept_backlog: int = 128
    heartbeat: bool = True
    heartbeat_interval: float = 3.0
    heartbeat_tolerance: float = 13.0
    reset_flood_limit: int = 10000
    reset_flood_window: float = 3.0

    def __attrs_post_init__(self) -> None:
        if not INITIAL_WINDOW <= self.receive_window <= MAX_WINDOW:
            raise ValueError(
                f"receive_window must be between {INITIAL_WINDOW} and {MAX_WINDOW}"
            )
        if self.max_streams < 1 or self.accept_backlog < 1:
            raise ValueError("max_streams and accept_backlog must be at least 1")
        if self.heartbeat_interval <= 0 or self.heartbeat_tolerance <= 0:
            raise ValueError("heartbeat interval and tolerance must be positive")
        if self.reset_flood_window <= 0 or self.reset_flood_limit < 1:
            raise ValueError("reset flood window and limit must be positive")


class _Heartbeat(enum.Enum):
    NONE = 0
    OURS = 1
    THEIRS = 2


@attrs.define(eq=False)
class _Stream:
    """Book-keeping for one stream (internal)."""

    id: int
    stream_type: int
    local: bool
    heartbeat: _Heartbeat = _Heartbeat.NONE
    state: StreamState = StreamState.OPEN
    send_window: int = INITIAL_WINDOW
    recv_window: int = INITIAL_WINDOW
    recv_credit: int = 0
    pending: deque[Buffer] = attrs.Factory(deque)
    pending_len: int = 0
    fin_queued: bool = False
    forget_on_fin: bool = False
    accepted: bool = True
    heard: bool = False
    """The peer has sent something on the stream (data, FIN or WNDINC)."""


class Session:
    """
    One muxado v1 session: every stream's state, windows and heartbeats.

    Created by the adapter when the connection is made, with the current
    time; the adapter then feeds it bytes and drains its output and events
    after each call.
    """

    def __init__(
        self,
        role: Role,
        config: SessionConfig = SessionConfig(),
        now: float = 0.0,
    ) -> None:
        self.role = role
        self.config = config
        self._streams: dict[int, _Stream] = {}
        self._decoder = f.FrameDecoder(merge_data=True)
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self._extra_window = config.receive_window - INITIAL_WINDOW
        """Granted on top of muxado's initial window as each stream opens."""
        self._window_owed: dict[int, _Stream] = {}
        """Peer-opened streams whose extra window is owed: its WNDINC is
        postponed until the next write, or until the peer has used half of
        its initial window (see :meth:`_add`)."""
        self._subframe_held: dict[int, int] = {}
        """Streams holding back a sub-frame remainder (queued data beyond a
        send window of less than a frame's worth), by id: the hold period
        they started in (see :meth:`release_subframe`)."""
        self._subframe_period = 0
        self.congested = False
        """Set by the adapter while the connection cannot take more (its
        write buffer is full): data is not framed meanwhile, it waits in its
        stream's queue (see :meth:`release_held`)."""
        self.out_limit = OUT_LIMIT
        """Data framed into one :meth:`data_to_send` at most (about): more
        waits for :meth:`release_held` after the adapter has written."""
        self._data_out = 0
        self.frames_received = 0
        """Whole frames read so far (the adapter's measure of progress)."""
        self._held: dict[int, _Stream] = {}
        """Streams with data held back by :attr:`congested` or
        :attr:`out_limit`, in the order they were held."""
        # Highest id used by us / seen from the peer.  Clients use odd ids
        # from 3 and servers even ids from 2, so a client SYN with id 1 is
        # already "not above the highest seen".
        if role is Role.CLIENT:
            self._local_last, self._remote_last = 1, 0
        else:
            self._local_last, self._remote_last = 0, 1
        self._remote_open = 0
        self._unaccepted = 0
        self._replies = 0
        self._replies_until = now + config.reset_flood_window
        """End of the window :attr:`_replies` counts in."""
        self._wndinc_threshold = config.receive_window // 2
        self.ended = False
        self.going_away = False
        """We sent GOAWAY: new peer streams are refused."""
        self.remote_going_away = False
        """The peer sent GOAWAY: we may not open streams."""
        self.end_reason: Optional[SessionEnded] = None
        self._hb_id: Optional[int] = None
        self._hb_counter = 0
        self._hb_sent_at: Optional[float] = None
        self._hb_next = now + config.heartbeat_interval
        self._hb_echo = bytearray()
        self._hb_expect = b""
        if config.heartbeat:
            self._hb_id = self._open(
                f.HEARTBEAT_STREAM_TYPE, f.HEARTBEAT_PRIORITY, _Heartbeat.OURS
            )

    # ------------------------------------------------------------------
    # Output for the adapter

    def data_to_send(self) -> bytes:
        """
        Take the bytes to write to the connection.  One join here is the only
        copy of outgoing payload (Twisted would join its buffer anyway).
        """
        out = self._out
        if not out:
            return b""
        if self._window_owed:
            # Something goes out anyway: the owed grants ride along.
            for st in list(self._window_owed.values()):
                self._grant(st)
        self._out = []
        self._data_out = 0
        return b"".join(out)

    def events(self) -> list[Event]:
        """Take the events that happened since the last call."""
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------
    # Introspection

    @property
    def stream_count(self) -> int:
        """Application streams currently known (extension streams excluded)."""
        return sum(1 for s in self._streams.values() if s.heartbeat is _Heartbeat.NONE)

    def stream_ids(self) -> list[int]:
        """Ids of the application streams currently known."""
        return [i for i, s in self._streams.items() if s.heartbeat is _Heartbeat.NONE]

    def state(self, stream_id: int) -> StreamState:
        """A stream's state; CLOSED when it is gone."""
        st = self._streams.get(stream_id)
        return st.state if st is not None else StreamState.CLOSED

    @property
    def holding_subframe(self) -> bool:
        """Whether a stream holds back a sub-frame remainder: queued data
        beyond a send window of less than a frame's worth (see
        :meth:`release_subframe`)."""
        return bool(self._subframe_held)

    def start_subframe_period(self) -> int:
        """
        Begin a new hold period and return the number of the one that ends:
        the adapter calls this when it starts its timer, and passes the
        number to :meth:`release_subframe` when the timer fires.
        """
        period = self._subframe_period
        self._subframe_period = period + 1
        return period

    def release_subframe(self, period: Optional[int] = None) -> None:
        """
        Send the sub-frame remainder (what the window allows, less than a
        frame's worth) of the streams that have held it back since hold
        period ``period`` or earlier (all of them without ``period``).

        A stream with more queued than its window sends whole frames only
        and waits for the peer's WNDINC rather than send the remainder: a
        muxado v1 frame carries at most 16383 bytes and a Go peer's window
        is 65536, so the remainder is often a few bytes, and each such frame
        costs the peer a read, a wake-up, a WNDINC and an echo frame of its
        own.  A stream starts holding anew whenever it sends.  A peer that
        grants window only once it has consumed nearly everything would wait
        for ever, hence this, called by the adapter once a hold has lasted
        ``tcprelay.protocol.SUBFRAME_HOLD``.
        """
        for sid, since in list(self._subframe_held.items()):
            if period is None or since <= period:
                del self._subframe_held[sid]
                st = self._streams.get(sid)
                if st is not None and st.pending_len and st.send_window:
                    self._flush(st, whole=False)

    @property
    def partial_frame(self) -> bool:
        """Whether the last read ended inside a frame (its rest has not come)."""
        return self._decoder.buffered > 0

    @property
    def has_owed(self) -> bool:
        """Whether window is owed to peer-opened streams (see :meth:`grant_owed`)."""
        return bool(self._window_owed)

    def grant_owed(self) -> None:
        """
        Send the window still owed to peer-opened streams now (it waits for
        the next frames we send otherwise).  The adapter calls this when
        nothing has gone out for a while, so that the peer hears from every
        stream it opened: an answer, even before the application has one.
        """
        for st in list(self._window_owed.values()):
            self._grant(st)

    def heard_from(self, stream_id: int) -> bool:
        """Whether the peer has sent anything on a stream (data, FIN, window)."""
        st = self._streams.get(stream_id)
        return st is None or st.heard

    @property
    def has_held(self) -> bool:
        """Whether stream data waits for :meth:`release_held`."""
        return bool(self._held)

    def release_held(self) -> None:
        """
        Frame data held back (see :attr:`congested`), stream by stream in
        the order they were held, until :attr:`out_limit` is reached again;
        the adapter calls this after writing, while the connection takes
        more.
        """
        held = self._held
        while held and not self.congested and self._data_out < self.out_limit:
            sid = next(iter(held))
            st = held.pop(sid)
            if self._streams.get(sid) is st and st.pending_len and st.send_window:
                self._flush(st)

    def pending(self, stream_id: int) -> int:
        """Bytes of a stream waiting for send window."""
        st = self._streams.get(stream_id)
        return st.pending_len if st is not None else 0

    def send_window(self, stream_id: int) -> int:
        """What the peer currently lets us send on a stream."""
        st = self._streams.get(stream_id)
        return st.send_window if st is not None else 0

    def stream_type(self, stream_id: int) -> int:
        """The stream type given in a stream's SYN."""
        return self._get(stream_id).stream_type

    @property
    def last_remote_id(self) -> int:
        """Highest stream id the peer opened (what GOAWAY reports)."""
        return self._remote_last if self._remote_last > 1 else 0

    # ------------------------------------------------------------------
    # Application actions

    def open_stream(self, stream_type: int = 0, priority: int = 0) -> int:
        """
        Open a stream and return its id.  The SYN goes out at once; data may
        follow immediately (muxado has no SYN-ACK).
        """
        if self.ended:
            raise SessionClosedError("session has ended")
        if self.remote_going_away:
            raise SessionClosedError("peer sent GOAWAY; no new streams")
        if not 0 <= stream_type < f.MIN_EXTENSION_TYPE:
            raise ValueError(f"stream type {stream_type:#x} is reserved")
        if not 0 <= priority <= 0x7FFFFFFF:
            raise ValueError("priority must fit in 31 bits")
        if self._local_last + 2 > MAX_STREAM_ID:
            raise SessionClosedError("stream ids exhausted")
        return self._open(stream_type, priority, _Heartbeat.NONE)

    def accept_stream(self, stream_id: int) -> None:
        """The application took a peer-opened stream off the backlog."""
        st = self._streams.get(stream_id)
        if st is not None and not st.accepted:
            st.accepted = True
            self._unaccepted -= 1

    def send_data(self, stream_id: int, data: Buffer, fin: bool = False) -> None:
        """
        Send ``data`` (any size) on a stream, and FIN after it when ``fin``.

        What the send window allows is framed now; the rest waits, in order,
        for WNDINC.  ``data`` is not copied: pass ``bytes`` (or a buffer you
        will not change).  :meth:`pending` tells how much waits, and
        :class:`~tcprelay.mux.events.SendWindowOpened` when it has all gone.
        """
        st = self._get(stream_id)
        if st.fin_queued or st.state in (
            StreamState.HALF_CLOSED_LOCAL,
            StreamState.CLOSED,
        ):
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        if fin:
            st.fin_queued = True
        self._write(st, data)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: FIN after any queued data.  No-op if already sent."""
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not _Heartbeat.NONE or st.fin_queued or st.state in (
            StreamState.HALF_CLOSED_LOCAL,
            StreamState.CLOSED,
        ):
            return
        self.send_data(stream_id, b"", fin=True)

    def close_stream(self, stream_id: int) -> None:
        """
        Close like Go's ``Stream.Close()``: FIN after queued data, then forget
        the stream (data still arriving for it is answered with RST(4)).
        ``StreamClosed`` follows once the FIN is out.
        """
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not _Heartbeat.NONE:
            return
        st.forget_on_fin = True
        if st.state in (StreamState.HALF_CLOSED_LOCAL, StreamState.CLOSED):
            self._remove(st, None, False, "closed")
        elif not st.fin_queued:
            self.send_data(stream_id, b"", fin=True)

    def reset_stream(
        self, stream_id: int, error_code: int = ErrorCode.CANCEL
    ) -> None:
        """Abort a stream with RST; queued data is dropped."""
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not _Heartbeat.NONE:
            return
        self._out.append(f.encode_rst(stream_id, error_code))
        self._remove(st, error_code, False, "reset")

    def refuse_stream(self, stream_id: int) -> None:
        """
        The application refuses a stream the peer opened: RST(REFUSED_STREAM),
        counted towards ``reset_flood_limit`` like the refusals the session
        makes itself.
        """
        st = self._streams.get(stream_id)
        if st is None or st.local or st.heartbeat is not _Heartbeat.NONE:
            return
        self._remove(st, ErrorCode.REFUSED_STREAM, False, "refused")
        self._reply_rst(stream_id, ErrorCode.REFUSED_STREAM)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """
        The application consumed ``size`` bytes of a stream: give the peer
        that much window back (coalesced into one WNDINC per half window).
        """
        st = self._streams.get(stream_id)
        if st is None or size <= 0 or (st.state is not _OPEN and st.state is not _HALF_CLOSED_LOCAL):
            return
        st.recv_credit += size
        if st.recv_credit >= self._wndinc_threshold:
            self._grant(st)

    def go_away(self, error_code: int = ErrorCode.NO_ERROR) -> None:
        """
        Tell the peer not to open more streams (GOAWAY); streams already open
        carry on.  Later SYNs are refused with RST(REFUSED_STREAM).
        """
        if self.ended or self.going_away:
            return
        self.going_away = True
        self._out.append(f.encode_goaway(self.last_remote_id, error_code))

    def close(
        self, error_code: int = ErrorCode.NO_ERROR, reason: str = "closed"
    ) -> None:
        """End the session now: GOAWAY (unless sent), every stream closed."""
        self._die(error_code, reason, remote=False)

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The transport is gone (the adapter calls this from connectionLost)."""
        if not self.ended:
            self._finish(None, reason, remote=True)

    # ------------------------------------------------------------------
    # Time

    def next_timer(self) -> Optional[float]:
        """When :meth:`on_timer` should next run, or None for never."""
        if self.ended:
            return None
        # The flood window only needs the clock while it counts something.
        flood = self._replies_until if self._replies else None
        if self._hb_id is None:
            return flood
        if self._hb_sent_at is not None:
            when = min(self._hb_next, self._hb_sent_at + self.config.heartbeat_tolerance)
        else:
            when = self._hb_next
        return when if flood is None else min(when, flood)

    def on_timer(self, now: float) -> None:
        """Send a due heartbeat; end the session if one went unanswered;
        start a new flood-counting window once the last one is over."""
        if now >= self._replies_until:
            self._replies = 0
            self._replies_until = now + self.config.reset_flood_window
        if self.ended or self._hb_id is None:
            return
        cfg = self.config
        if self._hb_sent_at is not None:
            if now - self._hb_sent_at >= cfg.heartbeat_tolerance:
                self._die(
                    ErrorCode.NO_ERROR,
                    f"heartbeat timeout: no echo for {now - self._hb_sent_at:.1f}s",
                    remote=False,
                    heartbeat_timeout=True,
                )
            elif now >= self._hb_next:
                self._hb_next = now + cfg.heartbeat_interval
            return
        if now >= self._hb_next:
            self._hb_counter = (self._hb_counter + 1) & 0xFFFFFFFF
            self._hb_expect = self._hb_counter.to_bytes(4, "big")
            self._hb_sent_at = now
            self._hb_next = now + cfg.heartbeat_interval
            self._write(self._streams[self._hb_id], self._hb_expect)

    heartbeat_timed_out = False
    """True when the session ended because our heartbeat went unanswered."""

    # ------------------------------------------------------------------
    # Input

    def receive_data(self, data: bytes) -> list[Event]:
        """
        Feed bytes read from the connection; returns :meth:`events`.
        After the session has ended, input is ignored.
        """
        if self.ended:
            return self.events()
        try:
            frames = self._decoder.feed(data)
        except FrameError as e:
            self._die(e.code, e.message, remote=False)
            return self.events()
        self.frames_received += len(frames)
        for frame in frames:
            if self.ended:
                break
            if type(frame) is f.Data:
                self._on_data(frame)
            elif type(frame) is f.WndInc:
                self._on_wndinc(frame)
            elif type(frame) is f.Syn:
                self._on_syn(frame)
            elif type(frame) is f.Rst:
                self._on_rst(frame)
            else:
                assert isinstance(frame, f.GoAway)
                self._on_goaway(frame)
        return self.events()

    # ------------------------------------------------------------------
    # Frame handlers

    def _known(self, stream_id: int) -> bool:
        """Whether an id was ever opened (by either side); else violation."""
        if stream_id == 0:
            return False
        ours = (stream_id & 1) == (1 if self.role is Role.CLIENT else 0)
        return stream_id <= (self._local_last if ours else self._remote_last)

    def _check_known(self, kind: str, stream_id: int) -> bool:
        """True if a frame's stream id was ever opened; else end the session."""
        if not self._known(stream_id):
            self._die(
                ErrorCode.PROTOCOL_ERROR,
                f"{kind} for stream {stream_id} that was never opened",
                remote=False,
            )
            return False
        return True

    def _on_data(self, frame: f.Data) -> None:
        st = self._streams.get(frame.stream_id)
        n = len(frame.data)
        if st is None:
            if self._check_known("DATA", frame.stream_id) and n:
                # A gone stream: tell the peer to stop (Go does the same).
                # A bare FIN for it is harmless noise.
                self._reply_rst(frame.stream_id, ErrorCode.STREAM_CLOSED)
            return
        st.heard = True
        if st.state is not _OPEN and st.state is not _HALF_CLOSED_LOCAL:
            if n:
                self._reply_rst(st.id, ErrorCode.STREAM_CLOSED)
                self._remove(st, ErrorCode.STREAM_CLOSED, True, "data after FIN")
            return
        if n > st.recv_window:
            self._die(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"stream {st.id}: {n} bytes sent into a window of {st.recv_window}",
                remote=False,
            )
            return
        st.recv_window -= n
        if (
            self._window_owed
            and st.recv_window < INITIAL_WINDOW // 2
            and not frame.fin
            and st.id in self._window_owed
        ):
            self._grant(st)
        if st.heartbeat is not _Heartbeat.NONE:
            self._on_heartbeat_data(st, frame)
            return
        if n:
            self._events.append(DataReceived(st.id, frame.data))
        if frame.fin:
            self._recv_fin(st)

    def _recv_fin(self, st: _Stream) -> None:
        self._window_owed.pop(st.id, None)  # the peer sends no more: no window for it
        self._events.append(StreamEnded(st.id))
        st.state = _TRANSITIONS[(st.state, _StreamInput.RECV_FIN)]
        if st.state is StreamState.CLOSED:
            self._remove(st, None, False, "")

    def _on_heartbeat_data(self, st: _Stream, frame: f.Data) -> None:
        if frame.fin:
            self._die(
                ErrorCode.PROTOCOL_ERROR, "peer closed a heartbeat stream", remote=False
            )
            return
        data = frame.data
        st.recv_credit += len(data)
        if st.recv_credit >= 4096:
            self._grant(st)
        if st.heartbeat is _Heartbeat.THEIRS:
            if data:
                self._write(st, data)
                if st.pending_len > INITIAL_WINDOW:
                    self._die(
                        ErrorCode.PROTOCOL_ERROR,
                        "flood: peer sends heartbeats faster than it reads the echo",
                        remote=False,
                    )
            return
        self._hb_echo += data
        while len(self._hb_echo) >= 4 and self._hb_sent_at is not None:
            echo = bytes(self._hb_echo[:4])
            del self._hb_echo[:4]
            if echo != self._hb_expect:
                self._die(
                    ErrorCode.PROTOCOL_ERROR,
                    f"heartbeat echo {echo.hex()} does not match {self._hb_expect.hex()}",
                    remote=False,
                )
                return
            self._events.append(HeartbeatAcknowledged(self._hb_sent_at))
            self._hb_sent_at = None
        if len(self._hb_echo) >= 4:
            self._die(ErrorCode.PROTOCOL_ERROR, "unsolicited heartbeat echo", remote=False)

    def _on_wndinc(self, frame: f.WndInc) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            self._check_known("WNDINC", frame.stream_id)
            return
        st.heard = True
        window = st.send_window + frame.increment
        if window > MAX_WINDOW:
            self._die(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"stream {st.id}: window grown past 2**31-1",
                remote=False,
            )
            return
        st.send_window = window
        if st.pending_len and window:
            self._flush(st)

    def _on_syn(self, frame: f.Syn) -> None:
        sid = frame.stream_id
        theirs = (sid & 1) == (0 if self.role is Role.CLIENT else 1)
        if not theirs or sid <= self._remote_last:
            self._die(
                ErrorCode.PROTOCOL_ERROR,
                f"SYN for stream {sid}: "
                + ("wrong parity" if not theirs else f"not above {self._remote_last}"),
                remote=False,
            )
            return
        self._remote_last = sid
        if self.going_away:
            self._reply_rst(sid, ErrorCode.REFUSED_STREAM)
            return
        if frame.stream_type >= f.MIN_EXTENSION_TYPE:
            if frame.stream_type == f.HEARTBEAT_STREAM_TYPE and not any(
                s.heartbeat is _Heartbeat.THEIRS for s in self._streams.values()
            ):
                self._add(sid, frame.stream_type, False, _Heartbeat.THEIRS)
            else:
                self._reply_rst(sid, ErrorCode.STREAM_CLOSED)
            return
        if (
            self._remote_open >= self.config.max_streams
            or self._unaccepted >= self.config.accept_backlog
        ):
            self._reply_rst(sid, ErrorCode.REFUSED_STREAM)
            return
        st = self._add(sid, frame.stream_type, False, _Heartbeat.NONE)
        st.accepted = False
        self._unaccepted += 1
        self._remote_open += 1
        self._events.append(StreamOpened(sid, frame.stream_type, frame.priority))
        if frame.fin:
            self._recv_fin(st)

    def _on_rst(self, frame: f.Rst) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            self._check_known("RST", frame.stream_id)
            return
        if st.heartbeat is _Heartbeat.OURS and frame.error_code == ErrorCode.STREAM_CLOSED:
            # The peer has no heartbeat extension: run without ours.
            del self._streams[st.id]
            self._hb_id = None
            return
        if st.heartbeat is not _Heartbeat.NONE:
            self._die(ErrorCode.PROTOCOL_ERROR, "peer reset a heartbeat stream", remote=False)
            return
        self._remove(
            st, frame.error_code, True, f"reset by peer ({f.error_name(frame.error_code)})"
        )

    def _on_goaway(self, frame: f.GoAway) -> None:
        self.remote_going_away = True
        self._events.append(
            GoAwayReceived(frame.last_stream_id, frame.error_code, frame.debug)
        )
        our_parity = 1 if self.role is Role.CLIENT else 0
        for st in list(self._streams.values()):
            if (
                st.local
                and (st.id & 1) == our_parity
                and st.id > frame.last_stream_id
                and st.heartbeat is _Heartbeat.NONE
            ):
                self._remove(
                    st, ErrorCode.REFUSED_STREAM, True, "peer went away before it"
                )
        if frame.final or frame.error_code != ErrorCode.NO_ERROR:
            self._finish(
                frame.error_code,
                f"peer sent GOAWAY ({f.error_name(frame.error_code)})",
                remote=True,
            )

    # ------------------------------------------------------------------
    # Internals

    def _get(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not _Heartbeat.NONE:
            if self.ended:
                raise SessionClosedError("session has ended")
            raise StreamClosedError(f"stream {stream_id} is closed")
        return st

    def _open(self, stream_type: int, priority: int, hb: _Heartbeat) -> int:
        sid = self._local_last + 2
        self._local_last = sid
        self._out.append(f.encode_syn(sid, priority, stream_type))
        self._add(sid, stream_type, True, hb)
        return sid

    def _add(self, sid: int, stream_type: int, local: bool, hb: _Heartbeat) -> _Stream:
        st = _Stream(sid, stream_type, local, hb)
        self._streams[sid] = st
        extra = self._extra_window
        if extra and hb is _Heartbeat.NONE:
            if local:
                # Leaves with the SYN.
                st.recv_window += extra
                self._out.append(f.encode_wndinc(sid, extra))
            else:
                # A WNDINC of its own would be a write (and a wake-up of the
                # peer) while the stream's first answer is being prepared:
                # it goes with the next frames we send, or alone once the
                # peer has used half of its initial window.
                self._window_owed[sid] = st
        return st

    def _grant(self, st: _Stream) -> None:
        """One WNDINC for the consumed credit and any extra window still owed."""
        credit = st.recv_credit
        if self._window_owed and self._window_owed.pop(st.id, None) is not None:
            credit += self._extra_window
        st.recv_credit = 0
        st.recv_window += credit
        self._out.append(f.encode_wndinc(st.id, credit))

    def _reply_rst(self, stream_id: int, error_code: int) -> None:
        """An RST the peer's own frames made necessary; too many is a flood."""
        self._out.append(f.encode_rst(stream_id, error_code))
        self._replies += 1
        if self._replies > self.config.reset_flood_limit:
            self._die(
                ErrorCode.PROTOCOL_ERROR,
                f"flood: more than {self.config.reset_flood_limit} refused or "
                f"dead-stream frames within {self.config.reset_flood_window:g}s",
                remote=False,
            )

    def _write(self, st: _Stream, data: Buffer) -> None:
        """Send or queue, keeping order behind anything already queued."""
        if st.pending_len:
            if data:
                st.pending.append(data)
                st.pending_len += len(data)
        else:
            self._send(st, data)

    def _send(self, st: _Stream, data: Buffer) -> None:
        """Frame what the window allows now and queue the rest (queue empty)."""
        n = len(data)
        window = st.send_window
        if n <= window and (not n or not self.congested and self._data_out < self.out_limit):
            st.send_window = window - n
            self._frame(st, data, st.fin_queued)
            return
        # more than the window allows: queued, and framed as a queue is
        st.pending.append(data)
        st.pending_len += n
        self._flush(st)

    def _frame(self, st: _Stream, data: Buffer, fin: bool) -> None:
        """Put DATA frames for ``data`` (window already counted) on the wire."""
        n = len(data)
        out = self._out
        self._data_out += n
        if n <= f.MAX_PAYLOAD:
            if n or fin:
                out.append(f.encode_data_header(st.id, n, fin))
                if n:
                    out.append(data)
        else:
            # _frame_pieces(st, [data], n, fin) in effect; this loop, for the
            # commonest case (one buffer), costs about 0.35 us less per 64 KiB
            view = memoryview(data)
            header = f.encode_data_header
            sid = st.id
            pos = 0
            while pos < n:
                end = pos + f.MAX_PAYLOAD
                if end >= n:
                    end = n
                    out.append(header(sid, end - pos, fin))
                else:
                    out.append(header(sid, f.MAX_PAYLOAD, False))
                out.append(view[pos:end])
                pos = end
        if fin:
            self._fin_sent(st)

    def _flush(self, st: _Stream, whole: bool = True) -> None:
        """
        The send window grew: frame queued data, in order.  With more queued
        than the window allows, only whole frames (unless not ``whole``);
        frames run across the queued writes' boundaries.
        """
        if self.congested or self._data_out >= self.out_limit:
            self._held[st.id] = st
            return
        pending = st.pending
        budget = st.send_window
        rest = budget % f.MAX_PAYLOAD if whole and st.pending_len > budget else 0
        if rest:
            # less than a frame's window left: it waits for the next WNDINC
            budget -= rest
            if budget:  # progress: a new hold starts
                self._subframe_held[st.id] = self._subframe_period
            else:
                self._subframe_held.setdefault(st.id, self._subframe_period)
        elif self._subframe_held:
            self._subframe_held.pop(st.id, None)
        if not budget or not pending:
            return
        pieces: list[Buffer] = []
        total = 0
        while pending and budget:
            chunk = pending[0]
            n = len(chunk)
            if n <= budget:
                pending.popleft()
                pieces.append(chunk)
            else:
                view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                pieces.append(view[:budget])
                pending[0] = view[budget:]
                n = budget
            budget -= n
            total += n
        st.pending_len -= total
        st.send_window -= total
        fin = not pending and st.fin_queued
        if not pending:
            self._events.append(SendWindowOpened(st.id))
        if len(pieces) == 1:
            self._frame(st, pieces[0], fin)
        else:
            self._frame_pieces(st, pieces, total, fin)

    def _frame_pieces(self, st: _Stream, pieces: list[Buffer], total: int, fin: bool) -> None:
        """DATA frames of up to MAX_PAYLOAD bytes over several buffers in
        order (a frame's payload may span two or more of them)."""
        out = self._out
        self._data_out += total
        header = f.encode_data_header
        sid = st.id
        room = 0  # payload bytes the current frame still takes
        for piece in pieces:
            n = len(piece)
            pos = 0
            view = None
            while pos < n:
                if not room:
                    room = f.MAX_PAYLOAD if total > f.MAX_PAYLOAD else total
                    total -= room
                    out.append(header(sid, room, fin and not total))
                take = n - pos if n - pos <= room else room
                if take == n:
                    out.append(piece)
                else:
                    if view is None:
                        view = piece if isinstance(piece, memoryview) else memoryview(piece)
                    out.append(view[pos : pos + take])
                pos += take
                room -= take
        if fin:
            self._fin_sent(st)

    def _fin_sent(self, st: _Stream) -> None:
        st.state = _TRANSITIONS[(st.state, _StreamInput.SEND_FIN)]
        if st.state is StreamState.CLOSED or st.forget_on_fin:
            self._remove(st, None, False, "")

    def _remove(
        self, st: _Stream, error_code: Optional[int], remote: bool, reason: str
    ) -> None:
        if self._streams.pop(st.id, None) is None:
            return
        self._window_owed.pop(st.id, None)
        self._subframe_held.pop(st.id, None)
        self._held.pop(st.id, None)
        st.state = StreamState.CLOSED
        st.pending.clear()
        st.pending_len = 0
        if not st.local and st.heartbeat is _Heartbeat.NONE:
            self._remote_open -= 1
            if not st.accepted:
                self._unaccepted -= 1
        if st.heartbeat is _Heartbeat.NONE:
            self._events.append(StreamClosed(st.id, error_code, remote, reason))

    def _die(
        self,
        error_code: int,
        reason: str,
        remote: bool,
        heartbeat_timeout: bool = False,
    ) -> None:
        """End the session from our side, telling the peer why."""
        if self.ended:
            return
        if not self.going_away or error_code:
            # A graceful GOAWAY may already be out; an error gets its own.
            self.going_away = True
            debug = reason.encode("utf-8", "replace") if error_code else b""
            self._out.append(f.encode_goaway(self.last_remote_id, error_code, debug))
        self.heartbeat_timed_out = heartbeat_timeout
        self._finish(error_code, reason, remote)

    def _finish(self, error_code: Optional[int], reason: str, remote: bool) -> None:
        self.ended = True
        self.going_away = True
        code = error_code if error_code else ErrorCode.CANCEL
        for st in list(self._streams.values()):
            self._remove(st, code, remote, f"session ended: {reason}")
        self._hb_id = None
        end = SessionEnded(error_code, reason, remote)
        self.end_reason = end
        self._events.append(end)
