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
scatter the invariants that each frame handler keeps.  What v2 runs the
same way (stream actions, WNDINC and RST handling, the session's end) is
in :class:`tcprelay.mux.common.SessionBase`; v1's tuned data path
(``_send``, ``_frame``, ``_flush``, ``_frame_pieces``) stays here.
"""

from __future__ import annotations

from typing import ClassVar, Final, Optional

import attrs

from tcprelay.mux import frames as f
from tcprelay.mux.common import (
    HALF_CLOSED_LOCAL,
    MAX_WINDOW,
    OPEN,
    TRANSITIONS,
    Buffer,
    Codec,
    ErrorCodes,
    Heartbeat,
    Role,
    SessionClosedError,
    StreamClosedError,
    StreamInput,
    StreamRecord,
    StreamState,
)
from tcprelay.mux.events import (
    DataReceived,
    GoAwayReceived,
    HeartbeatAcknowledged,
    SendWindowOpened,
    StreamOpened,
)
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.sessionbase import SessionBase


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
MAX_STREAM_ID: Final = 0x7FFFFFFF


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


class Session(SessionBase):
    """
    One muxado v1 session: every stream's state, windows and heartbeats.

    Created by the adapter when the connection is made, with the current
    time; the adapter then feeds it bytes and drains its output and events
    after each call.
    """

    _codec: ClassVar[Codec] = f
    _codes: ClassVar[ErrorCodes] = ErrorCodes(
        protocol=ErrorCode.PROTOCOL_ERROR,
        flow_control=ErrorCode.FLOW_CONTROL_ERROR,
        stream_closed=ErrorCode.STREAM_CLOSED,
        refused=ErrorCode.REFUSED_STREAM,
        cancel=ErrorCode.CANCEL,
        flood=ErrorCode.PROTOCOL_ERROR,
        session_ended=ErrorCode.CANCEL,
    )

    def __init__(
        self,
        role: Role,
        config: SessionConfig = SessionConfig(),
        now: float = 0.0,
    ) -> None:
        super().__init__(role, config, now, f.FrameDecoder(merge_data=True), remote_start=1)
        self._extra_window = config.receive_window - INITIAL_WINDOW
        """Granted on top of muxado's initial window as each stream opens."""
        self._window_owed: dict[int, StreamRecord] = {}
        """Peer-opened streams whose extra window is owed: its WNDINC is
        postponed until the next write, or until the peer has used half of
        its initial window (see :meth:`_add`)."""
        self._subframe_held: dict[int, int] = {}
        """Streams holding back a sub-frame remainder (queued data beyond a
        send window of less than a frame's worth), by id: the hold period
        they started in (see :meth:`release_subframe`)."""
        self._subframe_period = 0
        self.out_limit = OUT_LIMIT
        self._wndinc_threshold = config.receive_window // 2
        self._hb_id: Optional[int] = None
        self._hb_counter = 0
        self._hb_sent_at: Optional[float] = None
        self._hb_next = now + config.heartbeat_interval
        self._hb_echo = bytearray()
        self._hb_expect = b""
        if config.heartbeat:
            self._hb_id = self._open(
                f.HEARTBEAT_STREAM_TYPE, f.HEARTBEAT_PRIORITY, Heartbeat.OURS
            )

    # ------------------------------------------------------------------
    # Output for the adapter

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the connection (see the base class)."""
        if self._window_owed and self._out:
            # Something goes out anyway: the owed grants ride along.
            for st in list(self._window_owed.values()):
                self._grant(st)
        return super().data_to_send()

    # ------------------------------------------------------------------
    # Introspection

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
        return self._open(stream_type, priority, Heartbeat.NONE)

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
        self._count_replies(now)
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

    # ------------------------------------------------------------------
    # Frame handlers

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
        if st.state is not OPEN and st.state is not HALF_CLOSED_LOCAL:
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
        if st.heartbeat is not Heartbeat.NONE:
            self._on_heartbeat_data(st, frame)
            return
        if n:
            self._events.append(DataReceived(st.id, frame.data))
        if frame.fin:
            self._recv_fin(st)

    def _recv_fin(self, st: StreamRecord) -> None:
        self._window_owed.pop(st.id, None)  # the peer sends no more: no window for it
        super()._recv_fin(st)

    def _on_heartbeat_data(self, st: StreamRecord, frame: f.Data) -> None:
        if frame.fin:
            self._die(
                ErrorCode.PROTOCOL_ERROR, "peer closed a heartbeat stream", remote=False
            )
            return
        data = frame.data
        st.recv_credit += len(data)
        if st.recv_credit >= 4096:
            self._grant(st)
        if st.heartbeat is Heartbeat.THEIRS:
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

    def _on_syn(self, frame: f.Syn) -> None:
        sid = frame.stream_id
        theirs = self._theirs(sid)
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
                s.heartbeat is Heartbeat.THEIRS for s in self._streams.values()
            ):
                self._add(sid, frame.stream_type, False, Heartbeat.THEIRS)
            else:
                self._reply_rst(sid, ErrorCode.STREAM_CLOSED)
            return
        if (
            self._remote_open >= self.config.max_streams
            or self._unaccepted >= self.config.accept_backlog
        ):
            self._reply_rst(sid, ErrorCode.REFUSED_STREAM)
            return
        st = self._add(sid, frame.stream_type, False, Heartbeat.NONE)
        st.accepted = False
        self._unaccepted += 1
        self._remote_open += 1
        self._events.append(StreamOpened(sid, frame.stream_type, frame.priority))
        if frame.fin:
            self._recv_fin(st)

    def _on_heartbeat_rst(self, st: StreamRecord, error_code: int) -> None:
        if st.heartbeat is Heartbeat.OURS and error_code == ErrorCode.STREAM_CLOSED:
            # The peer has no heartbeat extension: run without ours.
            del self._streams[st.id]
            self._hb_id = None
            return
        self._die(ErrorCode.PROTOCOL_ERROR, "peer reset a heartbeat stream", remote=False)

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
                and st.heartbeat is Heartbeat.NONE
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

    def _open(self, stream_type: int, priority: int, hb: Heartbeat) -> int:
        sid = self._local_last + 2
        self._local_last = sid
        self._out.append(f.encode_syn(sid, priority, stream_type))
        self._add(sid, stream_type, True, hb)
        return sid

    def _add(self, sid: int, stream_type: int, local: bool, hb: Heartbeat) -> StreamRecord:
        st = StreamRecord(sid, local, INITIAL_WINDOW, INITIAL_WINDOW, stream_type, heartbeat=hb)
        self._streams[sid] = st
        extra = self._extra_window
        if extra and hb is Heartbeat.NONE:
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

    def _grant(self, st: StreamRecord) -> None:
        """One WNDINC for the consumed credit and any extra window still owed."""
        credit = st.recv_credit
        if self._window_owed and self._window_owed.pop(st.id, None) is not None:
            credit += self._extra_window
        st.recv_credit = 0
        st.recv_window += credit
        self._out.append(f.encode_wndinc(st.id, credit))

    def _write(self, st: StreamRecord, data: Buffer) -> None:
        """Send or queue, keeping order behind anything already queued."""
        if st.pending_len:
            if data:
                st.pending.append(data)
                st.pending_len += len(data)
        else:
            self._send(st, data)

    def _send(self, st: StreamRecord, data: Buffer) -> None:
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

    def _frame(self, st: StreamRecord, data: Buffer, fin: bool) -> None:
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

    def _flush(self, st: StreamRecord, whole: bool = True) -> None:
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

    def _frame_pieces(self, st: StreamRecord, pieces: list[Buffer], total: int, fin: bool) -> None:
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

    def _fin_sent(self, st: StreamRecord) -> None:
        st.state = TRANSITIONS[(st.state, StreamInput.SEND_FIN)]
        if st.state is StreamState.CLOSED or st.forget_on_fin:
            self._remove(st, None, False, "")

    def _remove(
        self, st: StreamRecord, error_code: Optional[int], remote: bool, reason: str
    ) -> None:
        self._window_owed.pop(st.id, None)
        self._subframe_held.pop(st.id, None)
        super()._remove(st, error_code, remote, reason)

    def _finish(self, error_code: Optional[int], reason: str, remote: bool) -> None:
        self._hb_id = None
        super()._finish(error_code, reason, remote)


Session._HANDLERS = {
    f.Data: Session._on_data,
    f.WndInc: Session._on_wndinc,
    f.Syn: Session._on_syn,
    f.Rst: Session._on_rst,
    f.GoAway: Session._on_goaway,
}
