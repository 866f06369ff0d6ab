"""
:class:`SessionBase`: the part of a muxado session that v1
(:class:`tcprelay.mux.session.Session`) and v2
(:class:`tcprelay.mux2.session.Session`) run the same way, sans-IO.

What differs between the versions stays in their modules: how a stream
opens (a SYN frame with a type; a typed stream whose first 4 bytes are the
type), heartbeats, GOAWAY's meaning, and each version's data path (v1's is
tuned for throughput and kept apart).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

from tcprelay.mux.common import (
    HALF_CLOSED_LOCAL,
    MAX_WINDOW,
    OPEN,
    SENDING,
    TRANSITIONS,
    Buffer,
    Codec,
    Decoder,
    ErrorCodes,
    FrameError,
    Heartbeat,
    Role,
    Rst,
    SessionClosedError,
    StreamClosedError,
    StreamInput,
    StreamRecord,
    StreamState,
    WndInc,
)
from tcprelay.mux.events import Event, SessionEnded, StreamClosed, StreamEnded

if TYPE_CHECKING:
    from tcprelay.mux.session import SessionConfig

__all__ = ["SessionBase"]


class SessionBase:
    """
    The part of a muxado session that v1 and v2 share: the stream table,
    the application's stream actions, the window accounting of WNDINC,
    RST handling, refusal floods and the session's end.

    A subclass sets :attr:`_codec`, :attr:`_codes` and :attr:`_HANDLERS`
    (frame class to handler, for :meth:`receive_data`) and provides
    ``_write`` (send or queue stream data), ``_flush`` (frame queued data
    the window allows), ``_grant`` (WNDINC for consumed credit) and
    ``_on_heartbeat_rst``.
    """

    _codec: ClassVar[Codec]
    _codes: ClassVar[ErrorCodes]
    _HANDLERS: ClassVar[Mapping[type[Any], Callable[[Any, Any], None]]]

    heartbeat_timed_out = False
    """True when the session ended because the peer fell silent (or did
    not answer our heartbeat)."""

    def __init__(self, role: Role, config: SessionConfig, now: float, decoder: Decoder, remote_start: int) -> None:
        self.role = role
        self.config = config
        self._streams: dict[int, StreamRecord] = {}
        self._decoder = decoder
        self._out: list[Buffer] = []
        self._events: list[Event] = []
        self.congested = False
        """Set by the adapter while the connection cannot take more (its
        write buffer is full): data is not framed meanwhile, it waits in its
        stream's queue (see :meth:`release_held`)."""
        self._data_out = 0
        self.frames_received = 0
        """Whole frames read so far (the adapter's measure of progress)."""
        self._held: dict[int, StreamRecord] = {}
        """Streams with data held back by :attr:`congested` or
        :attr:`out_limit`, in the order they were held."""
        # Highest id used by us / seen from the peer.  Clients use odd ids
        # from 3 and servers even ids from 2; ``remote_start`` is a
        # server's "highest seen" before any stream (v1: 1, so that a
        # client SYN with id 1 is already not above it; v2: -1, an SDK
        # may open stream 1).
        if role is Role.CLIENT:
            self._local_last, self._remote_last = 1, 0
        else:
            self._local_last, self._remote_last = 0, remote_start
        self._remote_start = self._remote_last
        self._remote_open = 0
        self._unaccepted = 0
        self._replies = 0
        self._replies_until = now + config.reset_flood_window
        """End of the window :attr:`_replies` counts in."""
        self.ended = False
        self.going_away = False
        """We sent GOAWAY: new peer streams are refused."""
        self.remote_going_away = False
        """The peer sent GOAWAY: we may not open streams."""
        self.end_reason: Optional[SessionEnded] = None

    # The subclass's part (see the class docstring).

    def _write(self, st: StreamRecord, data: Buffer) -> None:
        raise NotImplementedError

    def _flush(self, st: StreamRecord) -> None:
        raise NotImplementedError

    def _grant(self, st: StreamRecord) -> None:
        raise NotImplementedError

    def _on_heartbeat_rst(self, st: StreamRecord, error_code: int) -> None:
        raise NotImplementedError

    _wndinc_threshold: int
    """Consumed bytes of a stream that :meth:`acknowledge` gives back in one WNDINC."""

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
        """Application streams currently known (extension and untyped streams excluded)."""
        return sum(1 for s in self._streams.values() if s.heartbeat is Heartbeat.NONE and s.stream_type is not None)

    def stream_ids(self) -> list[int]:
        """Ids of the application streams currently known."""
        return [i for i, s in self._streams.items() if s.heartbeat is Heartbeat.NONE and s.stream_type is not None]

    def state(self, stream_id: int) -> StreamState:
        """A stream's state; CLOSED when it is gone."""
        st = self._streams.get(stream_id)
        return st.state if st is not None else StreamState.CLOSED

    def stream_type(self, stream_id: int) -> int:
        """A stream's type (v1: given in its SYN; v2: its first 4 bytes)."""
        st = self._get(stream_id)
        assert st.stream_type is not None
        return st.stream_type

    @property
    def partial_frame(self) -> bool:
        """Whether the last read ended inside a frame (its rest has not come)."""
        return self._decoder.buffered > 0

    @property
    def last_remote_id(self) -> int:
        """Highest stream id the peer opened (what GOAWAY reports)."""
        return self._remote_last if self._remote_last > self._remote_start else 0

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

    out_limit: int
    """Data framed into one ``data_to_send`` at most (about): more waits
    for :meth:`release_held` after the adapter has written."""

    # ------------------------------------------------------------------
    # Application actions

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
        if st is None or st.heartbeat is not Heartbeat.NONE or st.fin_queued or st.state not in SENDING:
            return
        self.send_data(stream_id, b"", fin=True)

    def close_stream(self, stream_id: int) -> None:
        """
        Close like Go's ``Stream.Close()``: FIN after queued data, then forget
        the stream (data still arriving for it is answered with RST
        STREAM_CLOSED).  ``StreamClosed`` follows once the FIN is out.
        """
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not Heartbeat.NONE:
            return
        st.forget_on_fin = True
        if st.state not in SENDING:
            self._remove(st, None, False, "closed")
        elif not st.fin_queued:
            self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, error_code: Optional[int] = None) -> None:
        """Abort a stream with RST (by default CANCEL); queued data is dropped."""
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not Heartbeat.NONE:
            return
        if error_code is None:
            error_code = self._codes.cancel
        self._out.append(self._codec.encode_rst(stream_id, error_code))
        self._remove(st, error_code, False, "reset")

    def refuse_stream(self, stream_id: int) -> None:
        """
        The application refuses a stream the peer opened: RST(REFUSED),
        counted towards ``reset_flood_limit`` like the refusals the session
        makes itself.
        """
        st = self._streams.get(stream_id)
        if st is None or st.local or st.heartbeat is not Heartbeat.NONE:
            return
        refused = self._codes.refused
        self._remove(st, refused, False, "refused")
        self._reply_rst(stream_id, refused)

    def acknowledge(self, stream_id: int, size: int) -> None:
        """
        The application consumed ``size`` bytes of a stream: give the peer
        that much window back (coalesced into one WNDINC per half window).
        """
        st = self._streams.get(stream_id)
        if st is None or size <= 0 or (st.state is not OPEN and st.state is not HALF_CLOSED_LOCAL):
            return
        st.recv_credit += size
        if st.recv_credit >= self._wndinc_threshold:
            self._grant(st)

    def go_away(self, error_code: int = 0) -> None:
        """
        Tell the peer not to open more streams (GOAWAY).  In v1 streams
        already open carry on and later SYNs are refused; ngrok-rust (v2)
        treats any GOAWAY as the end of the session: use it when closing.
        """
        if self.ended or self.going_away:
            return
        self.going_away = True
        self._out.append(self._codec.encode_goaway(self.last_remote_id, error_code))

    def close(self, error_code: int = 0, reason: str = "closed") -> None:
        """End the session now: GOAWAY (unless sent), every stream closed."""
        self._die(error_code, reason, remote=False)

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The transport is gone (the adapter calls this from connectionLost)."""
        if not self.ended:
            self._finish(None, reason, remote=True)

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
        handlers = self._HANDLERS
        for frame in frames:
            if self.ended:
                break
            handlers[type(frame)](self, frame)
        return self.events()

    def _theirs(self, stream_id: int) -> bool:
        """Whether an id is of the peer's parity (a server's are even)."""
        return (stream_id & 1) == (0 if self.role is Role.CLIENT else 1)

    def _known(self, stream_id: int) -> bool:
        """Whether an id was ever opened (by either side); else violation."""
        if stream_id == 0:
            return False
        return stream_id <= (self._remote_last if self._theirs(stream_id) else self._local_last)

    def _check_known(self, kind: str, stream_id: int) -> bool:
        """True if a frame's stream id was ever opened; else end the session."""
        if not self._known(stream_id):
            self._die(
                self._codes.protocol,
                f"{kind} for stream {stream_id} that was never opened",
                remote=False,
            )
            return False
        return True

    def _recv_fin(self, st: StreamRecord) -> None:
        self._events.append(StreamEnded(st.id))
        st.state = TRANSITIONS[(st.state, StreamInput.RECV_FIN)]
        if st.state is StreamState.CLOSED:
            self._remove(st, None, False, "")

    def _on_wndinc(self, frame: WndInc) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            self._check_known("WNDINC", frame.stream_id)
            return
        st.heard = True
        window = st.send_window + frame.increment
        if window > MAX_WINDOW:
            self._die(
                self._codes.flow_control,
                f"stream {st.id}: window grown past 2**31-1",
                remote=False,
            )
            return
        st.send_window = window
        if st.pending_len and window:
            self._flush(st)

    def _on_rst(self, frame: Rst) -> None:
        st = self._streams.get(frame.stream_id)
        if st is None:
            self._check_known("RST", frame.stream_id)
            return
        if st.heartbeat is not Heartbeat.NONE:
            self._on_heartbeat_rst(st, frame.error_code)
            return
        self._remove(st, frame.error_code, True, f"reset by peer ({self._codec.error_name(frame.error_code)})")

    # ------------------------------------------------------------------
    # Internals

    def _get(self, stream_id: int) -> StreamRecord:
        st = self._streams.get(stream_id)
        if st is None or st.heartbeat is not Heartbeat.NONE or st.stream_type is None:
            if self.ended:
                raise SessionClosedError("session has ended")
            raise StreamClosedError(f"stream {stream_id} is closed")
        return st

    def _reply_rst(self, stream_id: int, error_code: int) -> None:
        """An RST the peer's own frames made necessary; too many is a flood."""
        self._out.append(self._codec.encode_rst(stream_id, error_code))
        self._replies += 1
        if self._replies > self.config.reset_flood_limit:
            self._die(
                self._codes.flood,
                f"flood: more than {self.config.reset_flood_limit} refused or "
                f"dead-stream frames within {self.config.reset_flood_window:g}s",
                remote=False,
            )

    def _count_replies(self, now: float) -> None:
        """Start a new flood-counting window once the last one is over."""
        if now >= self._replies_until:
            self._replies = 0
            self._replies_until = now + self.config.reset_flood_window

    def _remove(self, st: StreamRecord, error_code: Optional[int], remote: bool, reason: str) -> None:
        if self._streams.pop(st.id, None) is None:
            return
        self._held.pop(st.id, None)
        st.state = StreamState.CLOSED
        st.pending.clear()
        st.pending_len = 0
        if st.heartbeat is Heartbeat.NONE:
            if not st.local:
                self._remote_open -= 1
                if not st.accepted:
                    self._unaccepted -= 1
            if st.stream_type is not None:
                self._events.append(StreamClosed(st.id, error_code, remote, reason))

    def _die(self, error_code: int, reason: str, remote: bool, heartbeat_timeout: bool = False) -> None:
        """End the session from our side, telling the peer why."""
        if self.ended:
            return
        if not self.going_away or error_code:
            # A graceful GOAWAY may already be out; an error gets its own.
            self.going_away = True
            debug = reason.encode("utf-8", "replace") if error_code else b""
            self._out.append(self._codec.encode_goaway(self.last_remote_id, error_code, debug))
        self.heartbeat_timed_out = heartbeat_timeout
        self._finish(error_code, reason, remote)

    def _finish(self, error_code: Optional[int], reason: str, remote: bool) -> None:
        self.ended = True
        self.going_away = True
        code = error_code if error_code else self._codes.session_ended
        for st in list(self._streams.values()):
            self._remove(st, code, remote, f"session ended: {reason}")
        end = SessionEnded(error_code, reason, remote)
        self.end_reason = end
        self._events.append(end)
