"""
A muxado v2 session with typed streams, sans-IO: what ngrok's agent SDKs speak.

:class:`Session` has the interface of the v1 session
(:class:`tcprelay.mux.session.Session`), so that the same Twisted adapter
(:class:`tcprelay.protocol.MuxProtocol`) runs either, and it reports the
same events (:mod:`tcprelay.mux.events`).  What v2 changes:

- No SYN frame: a stream opens with its first DATA frame, flagged SYN.
- Typed streams: the first 4 bytes of every stream are its type
  (big-endian).  The session reads them itself: a peer's stream is reported
  (:class:`~tcprelay.mux.events.StreamOpened`, ``stream_type``) once its type
  has arrived, and :meth:`Session.open_stream` writes the type as the first
  bytes, with the SYN.
- Heartbeat: the client opens a stream of type ``0xFFFFFFFF`` and writes a
  4-byte id every interval; the session echoes each one.  The server sends
  no heartbeat of its own (an SDK would reject an unknown stream type);
  instead a peer silent for :attr:`Session.idle_timeout` seconds (no frame
  at all) is declared dead.
- Windows of 256 KiB per stream and direction, without negotiation; window
  is given back (WNDINC) once half of it has been consumed.
- GOAWAY ends the session at once (ngrok-rust stops reading after one).

Time: the adapter calls :meth:`Session.on_timer` at (or after)
:meth:`Session.next_timer`.  Nothing here raises because of what the peer
sent: a violation ends the session with GOAWAY and a
:class:`~tcprelay.mux.events.SessionEnded` event.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Final, Optional, Union

import attrs

from tcprelay.mux.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    SendWindowOpened,
    SessionEnded,
    StreamClosed,
    StreamEnded,
    StreamOpened,
)
from tcprelay.mux.session import (
    Role,
    SessionClosedError,
    SessionConfig,
    StreamClosedError,
    StreamState,
)
from tcprelay.mux2 import frames as f
from tcprelay.mux2.frames import ErrorCode, FrameError

__all__ = ["WINDOW", "MAX_FRAME", "Session"]

WINDOW: Final = 0x40000
"""Every stream's window in each direction (256 KiB, ngrok-rust's default)."""
MAX_FRAME: Final = 0x10000
"""Largest DATA payload the session sends in one frame (64 KiB)."""
OUT_LIMIT: Final = 0x100000
"""Stream data framed into one :meth:`Session.data_to_send` at most (about 1 MiB)."""
IDLE_TIMEOUT: Final = 30.0
"""Seconds a peer may stay silent before the session is declared dead
(the SDKs' heartbeat: every 10 s, 15 s of tolerance)."""
MAX_STREAM_ID: Final = 0x7FFFFFFF

Buffer = Union[bytes, bytearray, memoryview]


class _Input(enum.Enum):
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"


_TRANSITIONS: Final[dict[tuple[StreamState, _Input], StreamState]] = {
    (StreamState.OPEN, _Input.SEND_FIN): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, _Input.RECV_FIN): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, _Input.RECV_FIN): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, _Input.SEND_FIN): StreamState.CLOSED,
}
"""Clean transitions (the v1 table).  RST, or the session ending, closes from any state."""

_RECEIVING: Final = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_SENDING: Final = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)


@attrs.define(eq=False)
class _Stream:
    """Book-keeping for one stream (internal)."""

    id: int
    local: bool
    stream_type: Optional[int] = None
    """None until a peer stream's first 4 bytes have arrived."""
    type_bytes: bytes = b""
    heartbeat: bool = False
    state: StreamState = StreamState.OPEN
    send_window: int = WINDOW
    recv_window: int = WINDOW
    recv_credit: int = 0
    pending: deque[Buffer] = attrs.Factory(deque)
    pending_len: int = 0
    fin_queued: bool = False
    forget_on_fin: bool = False
    accepted: bool = True
    heard: bool = False
    needs_syn: bool = False


class Session:
    """
    One muxado v2 session: every stream's state, type and windows.

    Created by the adapter when the connection is made, with the current
    time; the adapter then feeds it bytes and drains its output and events
    after each call.  ``config`` is the v1 session's: its stream limits,
    flood limits and ``heartbeat_tolerance`` apply (the window does not: v2
    has its own).
    """

    def __init__(self, role: Role, config: SessionConfig = SessionConfig(), now: float = 0.0) -> None:
        self.role = role
        self.config = config
        self._streams: dict[int, _Stream] = {}
        self._decoder = f.FrameDecoder(max_data=WINDOW)
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self.congested = False
        """Set by the adapter while the connection cannot take more: stream
        data waits in its stream's queue meanwhile (see :meth:`release_held`)."""
        self.out_limit = OUT_LIMIT
        self._data_out = 0
        self._held: dict[int, _Stream] = {}
        self.frames_received = 0
        """Whole frames read so far."""
        if role is Role.CLIENT:
            self._local_last, self._remote_last = 1, 0
        else:
            self._local_last, self._remote_last = 0, -1
        self._remote_open = 0
        self._unaccepted = 0
        self._replies = 0
        self._replies_until = now + config.reset_flood_window
        self.ended = False
        self.going_away = False
        """We sent GOAWAY: new peer streams are refused."""
        self.remote_going_away = False
        self.end_reason: Optional[SessionEnded] = None
        self.heartbeat_timed_out = False
        """True when the session ended because the peer fell silent."""
        self.idle_timeout: Optional[float] = max(IDLE_TIMEOUT, config.heartbeat_tolerance)
        """Seconds without a frame from the peer before the session ends
        (None: never).  The door sets it from what the SDK says of its
        heartbeat."""
        self._last_heard = now
        self._last_check = now
        self._heard_mark = 0
        self.heartbeats = 0
        """Heartbeats the peer sent (and were echoed)."""

    # ------------------------------------------------------------------
    # Output for the adapter

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the connection."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self._data_out = 0
        return b"".join(out)

    def events(self) -> list[Event]:
        """Take the events that happened since the last call."""
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------
    # Introspection (what the adapter and the door read)

    @property
    def stream_count(self) -> int:
        """Application streams known (the heartbeat and untyped streams excluded)."""
        return sum(1 for s in self._streams.values() if s.stream_type is not None and not s.heartbeat)

    def stream_ids(self) -> list[int]:
        """Ids of the application streams known."""
        return [i for i, s in self._streams.items() if s.stream_type is not None and not s.heartbeat]

    def state(self, stream_id: int) -> StreamState:
        """A stream's state; CLOSED when it is gone."""
        st = self._streams.get(stream_id)
        return st.state if st is not None else StreamState.CLOSED

    def stream_type(self, stream_id: int) -> int:
        """A stream's type."""
        st = self._get(stream_id)
        assert st.stream_type is not None
        return st.stream_type

    @property
    def partial_frame(self) -> bool:
        """Whether the last read ended inside a frame."""
        return self._decoder.buffered > 0

    @property
    def last_remote_id(self) -> int:
        """Highest stream id the peer opened (what GOAWAY reports)."""
        return self._remote_last if self._remote_last > 0 else 0

    def heard_from(self, stream_id: int) -> bool:
        """Whether the peer has sent anything on a stream (data, FIN, window)."""
        st = self._streams.get(stream_id)
        return st is None or st.heard

    def pending(self, stream_id: int) -> int:
        """Bytes of a stream waiting for send window."""
        st = self._streams.get(stream_id)
        return st.pending_len if st is not None else 0

    def send_window(self, stream_id: int) -> int:
        """What the peer currently lets us send on a stream."""
        st = self._streams.get(stream_id)
        return st.send_window if st is not None else 0

    def recv_window(self, stream_id: int) -> int:
        """What the peer may still send on a stream before it needs more window."""
        st = self._streams.get(stream_id)
        return st.recv_window if st is not None else 0

    # v1's sub-frame holding and owed windows do not exist in v2: the
    # adapter's calls for them do nothing.
    holding_subframe: Final = False
    has_owed: Final = False

    def start_subframe_period(self) -> int:
        """Nothing to hold in v2 (see the v1 session)."""
        return 0

    def release_subframe(self, period: Optional[int] = None) -> None:
        """Nothing to hold in v2 (see the v1 session)."""

    def grant_owed(self) -> None:
        """No window is owed in v2 (see the v1 session)."""

    @property
    def has_held(self) -> bool:
        """Whether stream data waits for :meth:`release_held`."""
        return bool(self._held)

    def release_held(self) -> None:
        """Frame data held back by :attr:`congested` or :attr:`out_limit`, stream by stream."""
        held = self._held
        while held and not self.congested and self._data_out < self.out_limit:
            sid = next(iter(held))
            st = held.pop(sid)
            if self._streams.get(sid) is st and st.pending_len and st.send_window:
                self._flush(st)

    # ------------------------------------------------------------------
    # Application actions

    def open_stream(self, stream_type: int = 0, priority: int = 0) -> int:
        """
        Open a typed stream and return its id: its type goes out at once as
        its first 4 bytes, in the DATA frame that carries the SYN.
        ``priority`` does not exist in v2 and is ignored.
        """
        if self.ended:
            raise SessionClosedError("session has ended")
        if self.remote_going_away:
            raise SessionClosedError("peer sent GOAWAY; no new streams")
        if not 0 <= stream_type <= 0xFFFFFFFF:
            raise ValueError(f"stream type {stream_type:#x} does not fit in 32 bits")
        if self._local_last + 2 > MAX_STREAM_ID:
            raise SessionClosedError("stream ids exhausted")
        sid = self._local_last + 2
        self._local_last = sid
        st = _Stream(sid, True, stream_type, needs_syn=True)
        self._streams[sid] = st
        st.send_window -= 4
        self._out.append(f.encode_data_header(sid, 4, False, True))
        self._out.append(stream_type.to_bytes(4, "big"))
        st.needs_syn = False
        return sid

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
        for WNDINC.  ``data`` is not copied.
        """
        st = self._get(stream_id)
        if st.fin_queued or st.state not in _SENDING:
            raise StreamClosedError(f"stream {stream_id} is closed for sending")
        if fin:
            st.fin_queued = True
        if data:
            st.pending.append(data)
            st.pending_len += len(data)
        self._flush(st)

    def end_stream(self, stream_id: int) -> None:
        """Half-close: FIN after any queued data.  No-op if already sent."""
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat or st.fin_queued or st.state not in _SENDING:
            return
        self.send_data(stream_id, b"", fin=True)

    def close_stream(self, stream_id: int) -> None:
        """
        Close like a socket: FIN after queued data, then forget the stream
        (its later data is answered with RST STREAM_CLOSED).
        """
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat:
            return
        st.forget_on_fin = True
        if st.state not in _SENDING:
            self._remove(st, None, False, "closed")
        elif not st.fin_queued:
            self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCode.STREAM_CANCELLED) -> None:
        """Abort a stream with RST; queued data is dropped."""
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat:
            return
        self._out.append(f.encode_rst(stream_id, error_code))
        self._remove(st, error_code, False, "reset")

    def refuse_stream(self, stream_id: int) -> None:
        """The application refuses a peer stream: RST STREAM_REFUSED (counted as a flood)."""
        st = self._streams.get(stream_id)
        if st is None or st.local or st.heartbeat:
            return
        self._remove(st, ErrorCode.STREAM_REFUSED, False, "refused")
        self._reply_rst(stream_id, ErrorCode.STREAM_REFUSED)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """The application consumed ``size`` bytes of a stream: give the window back
        (one WNDINC per half window)."""
        st = self._streams.get(stream_id)
        if st is None or size <= 0 or st.state not in _RECEIVING:
            return
        st.recv_credit += size
        if st.recv_credit >= WINDOW // 2:
            self._grant(st)

    def go_away(self, error_code: int = ErrorCode.NONE) -> None:
        """
        Tell the peer not to open more streams (GOAWAY).  ngrok-rust treats
        any GOAWAY as the end of the session: use it when closing.
        """
        if self.ended or self.going_away:
            return
        self.going_away = True
        self._out.append(f.encode_goaway(self.last_remote_id, error_code))

    def close(self, error_code: int = ErrorCode.NONE, reason: str = "closed") -> None:
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
        flood = self._replies_until if self._replies else None
        idle = self.idle_timeout
        if idle is None:
            return flood
        # checked every quarter of the limit: the end comes at most that late
        when = self._last_check + idle / 4
        return when if flood is None else min(when, flood)

    def on_timer(self, now: float) -> None:
        """End the session when the peer has been silent too long; restart
        the flood-counting window once the last one is over."""
        if now >= self._replies_until:
            self._replies = 0
            self._replies_until = now + self.config.reset_flood_window
        if self.ended:
            return
        self._last_check = now
        if self.frames_received != self._heard_mark:
            self._heard_mark = self.frames_received
            self._last_heard = now
            return
        idle = self.idle_timeout
        if idle is not None and now - self._last_heard >= idle:
            self.heartbeat_timed_out = True
            self._die(
                ErrorCode.NONE,
                f"heartbeat timeout: nothing heard for {now - self._last_heard:.1f}s",
                remote=False,
            )

    # ------------------------------------------------------------------
    # Input

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the connection; returns :meth:`events`."""
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
            elif type(frame) is f.Rst:
                self._on_rst(frame)
            else:
                assert isinstance(frame, f.GoAway)
                self._on_goaway(frame)
        return self.events()

    # ------------------------------------------------------------------
    # Frame handlers

    def _theirs(self, stream_id: int) -> bool:
        return (stream_id & 1) == (0 if self.role is Role.CLIENT else 1)

    def _known(self, stream_id: int) -> bool:
        """Whether an id was ever opened (by either side)."""
        if self._theirs(stream_id):
            return stream_id <= self._remote_last
        return stream_id <= self._local_last

    def _on_data(self, frame: f.Data) -> None:
        sid = frame.stream_id
        st = self._streams.get(sid)
        if frame.syn:
            if st is not None or not self._theirs(sid) or sid <= self._remote_last:
                self._die(
                    ErrorCode.PROTOCOL,
                    f"SYN for stream {sid}: "
                    + ("wrong parity" if not self._theirs(sid) else f"not above {self._remote_last}"),
                    remote=False,
                )
                return
            self._remote_last = sid
            if self.going_away or self._remote_open >= self.config.max_streams or (
                self._unaccepted >= self.config.accept_backlog
            ):
                self._reply_rst(sid, ErrorCode.STREAM_REFUSED)
                return
            st = _Stream(sid, False, accepted=False)
            self._streams[sid] = st
            self._remote_open += 1
            self._unaccepted += 1
        elif st is None:
            if not self._known(sid):
                self._die(ErrorCode.PROTOCOL, f"DATA for stream {sid} that was never opened", remote=False)
            elif frame.data:
                self._reply_rst(sid, ErrorCode.STREAM_CLOSED)
            return
        st.heard = True
        data = frame.data
        n = len(data)
        if st.state not in _RECEIVING:
            if n:
                self._reply_rst(sid, ErrorCode.STREAM_CLOSED)
                self._remove(st, ErrorCode.STREAM_CLOSED, True, "data after FIN")
            return
        if n > st.recv_window:
            self._die(
                ErrorCode.FLOW_CONTROL,
                f"stream {sid}: {n} bytes sent into a window of {st.recv_window}",
                remote=False,
            )
            return
        st.recv_window -= n
        if st.stream_type is None:
            # a peer stream's type: its first 4 bytes
            need = 4 - len(st.type_bytes)
            st.type_bytes += data[:need]
            data = data[need:]
            self._credit(st, min(n, need))
            if len(st.type_bytes) < 4:
                if frame.fin:
                    self._reply_rst(sid, ErrorCode.PROTOCOL)
                    self._remove(st, ErrorCode.PROTOCOL, True, "FIN before the stream type")
                return
            st.stream_type = int.from_bytes(st.type_bytes, "big")
            if st.stream_type == f.HEARTBEAT_STREAM_TYPE:
                if any(s.heartbeat for s in self._streams.values()):
                    self._reply_rst(sid, ErrorCode.PROTOCOL)
                    self._remove(st, ErrorCode.PROTOCOL, True, "second heartbeat stream")
                    return
                st.heartbeat = True
                st.accepted = True
                self._unaccepted -= 1
                self._remote_open -= 1
            else:
                self._events.append(StreamOpened(sid, st.stream_type, 0))
        if st.heartbeat:
            self._on_heartbeat(st, data, frame.fin)
            return
        if data:
            self._events.append(DataReceived(sid, data))
        if frame.fin:
            self._recv_fin(st)

    def _on_heartbeat(self, st: _Stream, data: bytes, fin: bool) -> None:
        """Echo the peer's heartbeat ids (4 bytes each) on its stream."""
        if fin:
            self._die(ErrorCode.PROTOCOL, "peer closed its heartbeat stream", remote=False)
            return
        if not data:
            return
        self._credit(st, len(data))
        self.heartbeats += 1
        st.pending.append(data)
        st.pending_len += len(data)
        if st.pending_len > WINDOW:
            self._die(
                ErrorCode.ENHANCE_YOUR_CALM,
                "flood: peer sends heartbeats faster than it reads the echo",
                remote=False,
            )
            return
        self._flush(st)

    def _credit(self, st: _Stream, n: int) -> None:
        """Bytes the session consumed itself (a stream's type, heartbeats)."""
        st.recv_credit += n
        if st.recv_credit >= 4096 or (st.heartbeat and st.recv_window < WINDOW // 2):
            self._grant(st)

    def _recv_fin(self, st: _Stream) -> None:
        self._events.append(StreamEnded(st.id))
        st.state = _TRANSITIONS[(st.state, _Input.RECV_FIN)]
        if st.state is StreamState.CLOSED:
            self._remove(st, None, False, "")

    def _on_wndinc(self, frame: f.WndInc) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            if not self._known(frame.stream_id):
                self._die(
                    ErrorCode.PROTOCOL,
                    f"WNDINC for stream {frame.stream_id} that was never opened",
                    remote=False,
                )
            return
        st.heard = True
        window = st.send_window + frame.increment
        if window > 0x7FFFFFFF:
            self._die(ErrorCode.FLOW_CONTROL, f"stream {st.id}: window grown past 2**31-1", remote=False)
            return
        st.send_window = window
        if st.pending_len or st.fin_queued:
            self._flush(st)

    def _on_rst(self, frame: f.Rst) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            if not self._known(frame.stream_id):
                self._die(
                    ErrorCode.PROTOCOL,
                    f"RST for stream {frame.stream_id} that was never opened",
                    remote=False,
                )
            return
        if st.heartbeat:
            self._die(ErrorCode.PROTOCOL, "peer reset its heartbeat stream", remote=False)
            return
        self._remove(st, frame.error_code, True, f"reset by peer ({f.error_name(frame.error_code)})")

    def _on_goaway(self, frame: f.GoAway) -> None:
        self.remote_going_away = True
        self._events.append(GoAwayReceived(frame.last_stream_id, frame.error_code, frame.message))
        self._finish(frame.error_code, f"peer sent GOAWAY ({f.error_name(frame.error_code)})", remote=True)

    # ------------------------------------------------------------------
    # Internals

    def _get(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat or st.stream_type is None:
            if self.ended:
                raise SessionClosedError("session has ended")
            raise StreamClosedError(f"stream {stream_id} is closed")
        return st

    def _grant(self, st: _Stream) -> None:
        credit = st.recv_credit
        if not credit:
            return
        st.recv_credit = 0
        st.recv_window += credit
        self._out.append(f.encode_wndinc(st.id, credit))

    def _reply_rst(self, stream_id: int, error_code: int) -> None:
        """An RST the peer's own frames made necessary; too many is a flood."""
        self._out.append(f.encode_rst(stream_id, error_code))
        self._replies += 1
        if self._replies > self.config.reset_flood_limit:
            self._die(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"flood: more than {self.config.reset_flood_limit} refused or "
                f"dead-stream frames within {self.config.reset_flood_window:g}s",
                remote=False,
            )

    def _flush(self, st: _Stream) -> None:
        """Frame what the send window allows of the stream's queue, in order."""
        if st.pending_len and (self.congested or self._data_out >= self.out_limit):
            self._held[st.id] = st
            return
        pending = st.pending
        out = self._out
        sid = st.id
        header = f.encode_data_header
        sent = 0
        while pending and st.send_window:
            chunk = pending[0]
            n = len(chunk)
            take = min(n, st.send_window, MAX_FRAME)
            if take == n:
                pending.popleft()
                piece: Buffer = chunk
            else:
                view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                piece = view[:take]
                pending[0] = view[take:]
            st.pending_len -= take
            st.send_window -= take
            sent += take
            fin = st.fin_queued and not pending
            out.append(header(sid, take, fin, st.needs_syn))
            out.append(piece)
            st.needs_syn = False
            if fin:
                self._data_out += sent
                self._fin_sent(st)
                return
            if self._data_out + sent >= self.out_limit and pending:
                self._held[sid] = st
                break
        self._data_out += sent
        if not pending and st.fin_queued and st.state in _SENDING:
            out.append(header(sid, 0, True, st.needs_syn))
            st.needs_syn = False
            self._fin_sent(st)
            return
        if sent and not pending and not st.heartbeat:
            self._events.append(SendWindowOpened(sid))

    def _fin_sent(self, st: _Stream) -> None:
        self._events.append(SendWindowOpened(st.id))
        st.state = _TRANSITIONS[(st.state, _Input.SEND_FIN)]
        if st.state is StreamState.CLOSED or st.forget_on_fin:
            self._remove(st, None, False, "")

    def _remove(self, st: _Stream, error_code: Optional[int], remote: bool, reason: str) -> None:
        if self._streams.pop(st.id, None) is None:
            return
        self._held.pop(st.id, None)
        st.state = StreamState.CLOSED
        st.pending.clear()
        st.pending_len = 0
        if not st.local and not st.heartbeat:
            self._remote_open -= 1
            if not st.accepted:
                self._unaccepted -= 1
        if st.stream_type is not None and not st.heartbeat:
            self._events.append(StreamClosed(st.id, error_code, remote, reason))

    def _die(self, error_code: int, reason: str, remote: bool) -> None:
        """End the session from our side, telling the peer why."""
        if self.ended:
            return
        if not self.going_away or error_code:
            self.going_away = True
            message = reason.encode("utf-8", "replace") if error_code else b""
            self._out.append(f.encode_goaway(self.last_remote_id, error_code, message))
        self._finish(error_code, reason, remote)

    def _finish(self, error_code: Optional[int], reason: str, remote: bool) -> None:
        self.ended = True
        self.going_away = True
        code = error_code if error_code else ErrorCode.SESSION_CLOSED
        for st in list(self._streams.values()):
            self._remove(st, code, remote, f"session ended: {reason}")
        end = SessionEnded(error_code, reason, remote)
        self.end_reason = end
        self._events.append(end)
