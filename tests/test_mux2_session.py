"""
The muxado v2 session (tcprelay.mux2.session), sans-IO: typed streams, the
heartbeat echo, 256 KiB windows both ways, half-close, RST and GOAWAY,
silence, and the violations that end a session; checked against golden
bytes and against a client-role session of the same class.
"""

from __future__ import annotations

from tcprelay.mux import events as ev
from tcprelay.mux.session import Role, SessionConfig, StreamState
from tcprelay.mux2 import frames as f
from tcprelay.mux2.frames import Data, ErrorCode, FrameDecoder, GoAway, Rst, WndInc
from tcprelay.mux2.session import WINDOW, Session


def frames_of(data: bytes) -> list[f.Frame]:
    return FrameDecoder().feed(data)


def open_typed(server: Session, sid: int, stream_type: int, data: bytes = b"") -> list[ev.Event]:
    """The client's SYN: the stream type as the first 4 bytes (then ``data``)."""
    return server.receive_data(f.encode(Data(sid, stream_type.to_bytes(4, "big") + data, syn=True)))


def test_open_stream_sends_syn_with_the_type() -> None:
    """A stream the relay opens starts with one DATA frame flagged SYN holding its type; ids are even."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    assert sid == 2
    assert server.data_to_send() == bytes.fromhex("00000412 00000002 00000003")
    assert server.open_stream(3) == 4
    assert server.send_window(2) == WINDOW - 4


def test_peer_stream_is_reported_once_its_type_arrived() -> None:
    """A client stream is opened for the application once its 4 type bytes are in, split or not."""
    server = Session(Role.SERVER)
    assert server.receive_data(f.encode(Data(3, b"\0\0", syn=True))) == []
    events = server.receive_data(f.encode(Data(3, b"\0\1{}")))
    assert events == [ev.StreamOpened(3, 1, 0), ev.DataReceived(3, b"{}")]
    assert server.stream_count == 1 and server.stream_type(3) == 1


def test_heartbeat_is_echoed() -> None:
    """The client's heartbeat stream (type 0xFFFFFFFF): each 4-byte id comes back on it; no event."""
    server = Session(Role.SERVER)
    assert open_typed(server, 3, 0xFFFFFFFF) == []
    assert server.receive_data(f.encode(Data(3, b"\x12\x34\x56\x78"))) == []
    assert server.data_to_send() == bytes.fromhex("00000410 00000003 12345678")
    assert server.stream_count == 0 and server.heartbeats == 1


def test_client_and_server_talk() -> None:
    """Two sessions of the class, client and server: a typed request, a reply, FIN both ways."""
    client, server = Session(Role.CLIENT), Session(Role.SERVER)
    sid = client.open_stream(1)
    client.send_data(sid, b'{"Id":""}')
    client.events()
    events = server.receive_data(client.data_to_send())
    assert events == [ev.StreamOpened(3, 1, 0), ev.DataReceived(3, b'{"Id":""}')]
    server.accept_stream(3)
    server.send_data(3, b"{}", fin=True)
    events = client.receive_data(server.data_to_send())
    assert events[:2] == [ev.DataReceived(3, b"{}"), ev.StreamEnded(3)]
    client.end_stream(3)
    assert server.receive_data(client.data_to_send())[-1] == ev.StreamClosed(3, None, False, "")
    assert server.state(3) is StreamState.CLOSED


def test_receive_window_is_256k_and_enforced() -> None:
    """Unacknowledged, the peer may send 256 KiB (its type included); one byte more ends the session."""
    server = Session(Role.SERVER)
    open_typed(server, 3, 3, b"x" * 1000)
    server.accept_stream(3)
    server.data_to_send()
    rest = WINDOW - 4 - 1000
    server.receive_data(f.encode(Data(3, b"y" * rest)))
    assert server.recv_window(3) == 0
    assert server.data_to_send() == b""  # nothing consumed: no window given back
    events = server.receive_data(f.encode(Data(3, b"z")))
    assert isinstance(events[-1], ev.SessionEnded) and events[-1].error_code == ErrorCode.FLOW_CONTROL
    goaway = frames_of(server.data_to_send())[-1]
    assert isinstance(goaway, GoAway) and goaway.error_code == ErrorCode.FLOW_CONTROL


def test_window_given_back_per_half_window() -> None:
    """Consumed bytes are given back with one WNDINC once half a window (128 KiB) has been consumed."""
    server = Session(Role.SERVER)
    open_typed(server, 3, 3)
    server.accept_stream(3)
    server.data_to_send()
    server.receive_data(f.encode(Data(3, b"a" * 0x20000)))
    server.acknowledge(3, 0x1FFF0)
    assert server.data_to_send() == b""
    server.acknowledge(3, 0x10)
    # the 4 type bytes were credited by the session itself
    assert frames_of(server.data_to_send()) == [WndInc(3, 0x20004)]


def test_send_waits_for_the_peers_window() -> None:
    """More than the window waits in the stream's queue until WNDINC; frames carry 64 KiB at most."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    server.data_to_send()
    server.send_data(sid, b"d" * 300_000)
    sent = frames_of(server.data_to_send())
    assert sum(len(x.data) for x in sent if isinstance(x, Data)) == WINDOW - 4
    assert max(len(x.data) for x in sent if isinstance(x, Data)) <= 0x10000
    assert server.pending(sid) == 300_000 - (WINDOW - 4)
    events = server.receive_data(f.encode(WndInc(sid, 100_000)))
    assert ev.SendWindowOpened(sid) in events
    assert server.pending(sid) == 0


def test_fin_waits_behind_queued_data() -> None:
    """A FIN asked for while data waits for window goes out after that data."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    server.send_data(sid, b"d" * WINDOW, fin=True)
    sent = frames_of(server.data_to_send())
    assert not any(isinstance(x, Data) and x.fin for x in sent)
    server.receive_data(f.encode(WndInc(sid, 4)))
    assert frames_of(server.data_to_send()) == [Data(sid, b"dddd", fin=True)]


def test_half_close_from_the_peer() -> None:
    """The peer's FIN ends its direction only: the relay still sends, then its FIN closes the stream."""
    server = Session(Role.SERVER)
    open_typed(server, 3, 3)
    server.accept_stream(3)
    assert server.receive_data(f.encode(Data(3, b"", fin=True))) == [ev.StreamEnded(3)]
    assert server.state(3) is StreamState.HALF_CLOSED_REMOTE
    server.data_to_send()
    server.send_data(3, b"late", fin=True)
    assert frames_of(server.data_to_send()) == [Data(3, b"late", fin=True)]
    assert server.events() == [ev.SendWindowOpened(3), ev.StreamClosed(3, None, False, "")]


def test_rst_from_the_peer() -> None:
    """An RST closes the stream with its code, remote."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    events = server.receive_data(f.encode(Rst(sid, ErrorCode.STREAM_RESET)))
    assert events == [ev.StreamClosed(sid, ErrorCode.STREAM_RESET, True, "reset by peer (STREAM_RESET)")]


def test_reset_stream_sends_rst() -> None:
    """The relay's reset is an RST frame with its code."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    server.data_to_send()
    server.reset_stream(sid, ErrorCode.STREAM_CANCELLED)
    assert frames_of(server.data_to_send()) == [Rst(sid, ErrorCode.STREAM_CANCELLED)]


def test_goaway_from_the_peer_ends_the_session() -> None:
    """The peer's GOAWAY ends the session at once, every stream closed."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    events = server.receive_data(f.encode(GoAway(0, ErrorCode.NONE)))
    assert isinstance(events[0], ev.GoAwayReceived)
    assert any(isinstance(e, ev.StreamClosed) and e.stream_id == sid for e in events)
    assert events[-1] == ev.SessionEnded(0, "peer sent GOAWAY (NONE)", True)


def test_close_sends_goaway() -> None:
    """Closing sends GOAWAY with the last peer stream id and the code."""
    server = Session(Role.SERVER)
    open_typed(server, 5, 1)
    server.data_to_send()
    server.close(ErrorCode.NONE, "bye")
    assert frames_of(server.data_to_send()) == [GoAway(5, ErrorCode.NONE)]
    assert server.ended and server.stream_count == 0


def test_silent_peer_ends_the_session() -> None:
    """A peer that sends nothing for idle_timeout seconds is declared dead; any frame resets the clock."""
    server = Session(Role.SERVER, SessionConfig(), now=0.0)
    server.idle_timeout = 20.0
    when = server.next_timer()
    assert when is not None and when <= 5.0
    server.receive_data(f.encode(Data(3, b"\xff\xff\xff\xff", syn=True)))
    server.on_timer(10.0)  # heard since the last tick
    server.on_timer(25.0)
    assert not server.ended
    server.on_timer(30.5)
    assert server.ended and server.heartbeat_timed_out
    assert server.events()[-1].reason.startswith("heartbeat timeout")  # type: ignore[union-attr]


def test_violations_end_the_session_with_protocol_error() -> None:
    """SYN of the wrong parity or not above the last, data for a never-opened stream: GOAWAY PROTOCOL."""
    for wire in (
        f.encode(Data(2, b"\0\0\0\1", syn=True)),  # a server id from the client
        f.encode(Data(7, b"x")),  # never opened
        f.encode(WndInc(9, 1)),
        f.encode(Rst(11, 0)),
    ):
        server = Session(Role.SERVER)
        events = server.receive_data(wire)
        assert events[-1].error_code == ErrorCode.PROTOCOL, wire  # type: ignore[union-attr]
    server = Session(Role.SERVER)
    open_typed(server, 5, 1)
    events = server.receive_data(f.encode(Data(3, b"\0\0\0\1", syn=True)))
    assert events[-1].error_code == ErrorCode.PROTOCOL  # type: ignore[union-attr]


def test_data_for_a_closed_stream_gets_rst() -> None:
    """Data for a stream that is gone is answered with RST STREAM_CLOSED; the session lives."""
    server = Session(Role.SERVER)
    open_typed(server, 3, 1)
    server.accept_stream(3)
    server.reset_stream(3)
    server.data_to_send()
    server.receive_data(f.encode(Data(3, b"more")))
    assert frames_of(server.data_to_send()) == [Rst(3, ErrorCode.STREAM_CLOSED)]
    assert not server.ended


def test_stream_limit_refuses_with_rst() -> None:
    """Past max_streams, a new stream is refused with RST STREAM_REFUSED."""
    server = Session(Role.SERVER, SessionConfig(max_streams=1))
    open_typed(server, 3, 1)
    server.data_to_send()
    open_typed(server, 5, 1)
    assert frames_of(server.data_to_send()) == [Rst(5, ErrorCode.STREAM_REFUSED)]


def test_second_heartbeat_stream_is_reset() -> None:
    """Only one heartbeat stream per session; the application never hears of the second."""
    server = Session(Role.SERVER)
    assert open_typed(server, 3, 0xFFFFFFFF) == []
    assert open_typed(server, 5, 0xFFFFFFFF) == []
    assert frames_of(server.data_to_send()) == [Rst(5, ErrorCode.PROTOCOL)]
    assert server.stream_count == 0


def test_congested_holds_data_until_released() -> None:
    """While the adapter says the socket is full, stream data waits; release_held frames it."""
    server = Session(Role.SERVER)
    sid = server.open_stream(3)
    server.data_to_send()
    server.congested = True
    server.send_data(sid, b"held")
    assert server.data_to_send() == b"" and server.has_held
    server.congested = False
    server.release_held()
    assert frames_of(server.data_to_send()) == [Data(sid, b"held")]


def test_idle_timer_moves_on_without_frames() -> None:
    """Each check moves the next one a quarter of the limit on, frames or not (no timer storm)."""
    server = Session(Role.SERVER, now=0.0)
    server.idle_timeout = 40.0
    server.on_timer(12.0)
    assert server.next_timer() == 22.0
    server.on_timer(22.0)
    assert server.next_timer() == 32.0
