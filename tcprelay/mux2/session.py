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

from typing import ClassVar, Final, Optional

from tcprelay.mux.common import (
    HALF_CLOSED_LOCAL,
    OPEN,
    SENDING,
    TRANSITIONS,
    Buffer,
    Codec,
    ErrorCodes,
    Heartbeat,
    Role,
    SessionClosedError,
    StreamInput,
    StreamRecord,
    StreamState,
)
from tcprelay.mux.events import DataReceived, GoAwayReceived, SendWindowOpened, StreamOpened
from tcprelay.mux.session import SessionConfig
from tcprelay.mux.sessionbase import SessionBase
from tcprelay.mux2 import frames as f
from tcprelay.mux2.frames import ErrorCode

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


class Session(SessionBase):
    """
    One muxado v2 session: every stream's state, type and windows.

    Created by the adapter when the connection is made, with the current
    time; the adapter then feeds it bytes and drains its output and events
    after each call.  ``config`` is the v1 session's: its stream limits,
    flood limits and ``heartbeat_tolerance`` apply (the window does not: v2
    has its own).
    """

    _codec: ClassVar[Codec] = f
    _codes: ClassVar[ErrorCodes] = ErrorCodes(
        protocol=ErrorCode.PROTOCOL,
        flow_control=ErrorCode.FLOW_CONTROL,
        stream_closed=ErrorCode.STREAM_CLOSED,
        refused=ErrorCode.STREAM_REFUSED,
        cancel=ErrorCode.STREAM_CANCELLED,
        flood=ErrorCode.ENHANCE_YOUR_CALM,
        session_ended=ErrorCode.SESSION_CLOSED,
    )

    def __init__(self, role: Role, config: SessionConfig = SessionConfig(), now: float = 0.0) -> None:
        # a v2 client may open stream 1
        super().__init__(role, config, now, f.FrameDecoder(max_data=WINDOW), remote_start=-1)
        self.out_limit = OUT_LIMIT
        self._wndinc_threshold = WINDOW // 2
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
    # What the adapter calls for v1's sake

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
        st = StreamRecord(sid, True, WINDOW - 4, WINDOW, stream_type)
        self._streams[sid] = st
        self._out.append(f.encode_data_header(sid, 4, False, True))
        self._out.append(stream_type.to_bytes(4, "big"))
        return sid

    def _write(self, st: StreamRecord, data: Buffer) -> None:
        """Queue ``data`` behind what waits, and frame what the window allows."""
        if data:
            st.pending.append(data)
            st.pending_len += len(data)
        self._flush(st)

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
        self._count_replies(now)
        if self.ended:
            return
        self._last_check = now
        if self.frames_received != self._heard_mark:
            self._heard_mark = self.frames_received
            self._last_heard = now
            return
        idle = self.idle_timeout
        if idle is not None and now - self._last_heard >= idle:
            self._die(
                ErrorCode.NONE,
                f"heartbeat timeout: nothing heard for {now - self._last_heard:.1f}s",
                remote=False,
                heartbeat_timeout=True,
            )

    # ------------------------------------------------------------------
    # Frame handlers

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
            st = StreamRecord(sid, False, WINDOW, WINDOW, accepted=False)
            self._streams[sid] = st
            self._remote_open += 1
            self._unaccepted += 1
        elif st is None:
            if self._check_known("DATA", sid) and frame.data:
                self._reply_rst(sid, ErrorCode.STREAM_CLOSED)
            return
        st.heard = True
        data = frame.data
        n = len(data)
        if st.state is not OPEN and st.state is not HALF_CLOSED_LOCAL:
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
            rest = self._read_type(st, data, frame.fin)
            if rest is None:
                return
            data = rest
        if st.heartbeat is not Heartbeat.NONE:
            self._on_heartbeat(st, data, frame.fin)
            return
        if data:
            self._events.append(DataReceived(sid, data))
        if frame.fin:
            self._recv_fin(st)

    def _read_type(self, st: StreamRecord, data: bytes, fin: bool) -> Optional[bytes]:
        """
        Take a peer stream's type (its first 4 bytes) from ``data``: the
        bytes after it, or None when the type is still incomplete or the
        stream is gone.  A complete type opens the stream (or makes it the
        heartbeat stream).
        """
        need = 4 - len(st.type_bytes)
        st.type_bytes += data[:need]
        self._credit(st, min(len(data), need))
        if len(st.type_bytes) < 4:
            if fin:
                self._reply_rst(st.id, ErrorCode.PROTOCOL)
                self._remove(st, ErrorCode.PROTOCOL, True, "FIN before the stream type")
            return None
        stream_type = int.from_bytes(st.type_bytes, "big")
        if stream_type == f.HEARTBEAT_STREAM_TYPE and any(
            s.heartbeat is not Heartbeat.NONE for s in self._streams.values()
        ):
            # never reported as opened (no type yet): no StreamClosed either
            self._reply_rst(st.id, ErrorCode.PROTOCOL)
            self._remove(st, ErrorCode.PROTOCOL, True, "second heartbeat stream")
            return None
        st.stream_type = stream_type
        if stream_type != f.HEARTBEAT_STREAM_TYPE:
            self._events.append(StreamOpened(st.id, stream_type, 0))
        else:
            st.heartbeat = Heartbeat.THEIRS
            st.accepted = True
            self._unaccepted -= 1
            self._remote_open -= 1
        return data[need:]

    def _on_heartbeat(self, st: StreamRecord, data: bytes, fin: bool) -> None:
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

    def _credit(self, st: StreamRecord, n: int) -> None:
        """Bytes the session consumed itself (a stream's type, heartbeats)."""
        st.recv_credit += n
        if st.recv_credit >= 4096 or (st.heartbeat is not Heartbeat.NONE and st.recv_window < WINDOW // 2):
            self._grant(st)

    def _on_heartbeat_rst(self, st: StreamRecord, error_code: int) -> None:
        self._die(ErrorCode.PROTOCOL, "peer reset its heartbeat stream", remote=False)

    def _on_goaway(self, frame: f.GoAway) -> None:
        self.remote_going_away = True
        self._events.append(GoAwayReceived(frame.last_stream_id, frame.error_code, frame.message))
        self._finish(frame.error_code, f"peer sent GOAWAY ({f.error_name(frame.error_code)})", remote=True)

    # ------------------------------------------------------------------
    # Internals

    def _grant(self, st: StreamRecord) -> None:
        credit = st.recv_credit
        if not credit:
            return
        st.recv_credit = 0
        st.recv_window += credit
        self._out.append(f.encode_wndinc(st.id, credit))

    def _flush(self, st: StreamRecord) -> None:
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
            out.append(header(sid, take, fin))
            out.append(piece)
            if fin:
                self._data_out += sent
                self._fin_sent(st)
                return
            if self._data_out + sent >= self.out_limit and pending:
                self._held[sid] = st
                break
        self._data_out += sent
        if not pending and st.fin_queued and st.state in SENDING:
            out.append(header(sid, 0, True))
            self._fin_sent(st)
            return
        if sent and not pending and st.heartbeat is Heartbeat.NONE:
            self._events.append(SendWindowOpened(sid))

    def _fin_sent(self, st: StreamRecord) -> None:
        self._events.append(SendWindowOpened(st.id))
        st.state = TRANSITIONS[(st.state, StreamInput.SEND_FIN)]
        if st.state is StreamState.CLOSED or st.forget_on_fin:
            self._remove(st, None, False, "")


Session._HANDLERS = {
    f.Data: Session._on_data,
    f.WndInc: Session._on_wndinc,
    f.Rst: Session._on_rst,
    f.GoAway: Session._on_goaway,
}
