"""
Unit tests for the sans-IO muxado v1 session (tcprelay.mux.session): stream
ids, stream states, flow control, GOAWAY, heartbeats, limits, and property
tests with two sessions wired back to back.
"""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import cycle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
from tcprelay.mux.frames import Data, ErrorCode, GoAway, Rst, Syn, WndInc
from tcprelay.mux.session import (
    INITIAL_WINDOW,
    Role,
    Session,
    SessionClosedError,
    SessionConfig,
    StreamClosedError,
    StreamState,
)
from tests.mux_helpers import (
    NO_HEARTBEAT,
    data_payload,
    decode_all,
    feed,
    new_session,
    of_type,
    pump,
    sent_frames,
)

HB_TYPE = 0xFFFFFEFF
WHOLE = INITIAL_WINDOW - INITIAL_WINDOW % f.MAX_PAYLOAD
"""Whole frames within a fresh window: 4 frames of 16383 bytes, 4 bytes short."""
HB_PRIORITY = 0x7FFFFFFF
HEARTBEAT_SYN_3 = bytes.fromhex("0008 0601 00000003 7fffffff fffffeff")
HEARTBEAT_SYN_2 = bytes.fromhex("0008 0601 00000002 7fffffff fffffeff")


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` reproducible pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def server_with_stream(
    config: SessionConfig = NO_HEARTBEAT, sid: int = 3
) -> Session:
    """A server session (no heartbeat) on which the client has opened ``sid``."""
    server = new_session(Role.SERVER, config)
    assert feed(server, Syn(sid)) == [StreamOpened(sid, 0, 0)]
    assert server.data_to_send() == b""
    return server


def client_with_stream(config: SessionConfig = NO_HEARTBEAT) -> tuple[Session, int]:
    """A client session (no heartbeat) that has opened one stream, output drained."""
    client = new_session(Role.CLIENT, config)
    sid = client.open_stream()
    client.data_to_send()
    return client, sid


def assert_died(session: Session, code: int) -> None:
    """The session ended by itself, having queued GOAWAY(code)."""
    frames = sent_frames(session)
    goaways = of_type(frames, GoAway)
    assert len(goaways) == 1 and goaways[0].error_code == code, frames
    assert frames[-1] == goaways[0]
    assert session.ended
    assert session.end_reason is not None
    assert session.end_reason.error_code == code
    assert session.end_reason.remote is False


# ----------------------------------------------------------------------
# Stream ids


def test_client_heartbeat_syn_takes_id_3_first() -> None:
    """A new client session sends exactly its heartbeat SYN on stream 3."""
    client = Session(Role.CLIENT)
    assert client.data_to_send() == HEARTBEAT_SYN_3
    assert client.events() == []


def test_client_app_streams_are_odd_from_5() -> None:
    """With the heartbeat on stream 3, the client's application streams are 5, 7, ..."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    assert [client.open_stream() for _ in range(3)] == [5, 7, 9]
    assert client.data_to_send() == b"".join(f.encode(Syn(i)) for i in (5, 7, 9))
    assert client.data_to_send() == b""


def test_first_client_syn_exact_bytes() -> None:
    """The first application SYN of a client is `00 00 00 01 00 00 00 05`."""
    client = new_session(Role.CLIENT, SessionConfig())
    assert client.open_stream() == 5
    assert client.data_to_send() == bytes.fromhex("0000 0001 00000005")


def test_server_ids_are_even_from_2() -> None:
    """A server's heartbeat takes stream 2 and its application streams are 4, 6, ..."""
    server = Session(Role.SERVER)
    assert server.data_to_send() == HEARTBEAT_SYN_2
    assert [server.open_stream(), server.open_stream()] == [4, 6]


def test_ids_without_heartbeat() -> None:
    """Without our heartbeat the first ids are 3 (client) and 2 (server)."""
    assert Session(Role.CLIENT, NO_HEARTBEAT).open_stream() == 3
    assert Session(Role.SERVER, NO_HEARTBEAT).open_stream() == 2


def test_open_stream_with_type_and_priority() -> None:
    """open_stream puts the stream type and priority in the SYN."""
    client = new_session(Role.CLIENT)
    sid = client.open_stream(stream_type=7, priority=2)
    assert sent_frames(client) == [Syn(sid, 2, 7)]
    assert client.stream_type(sid) == 7


def test_open_stream_refuses_extension_types() -> None:
    """The application may not open a stream in the extension type range."""
    client = new_session(Role.CLIENT)
    with pytest.raises(ValueError):
        client.open_stream(stream_type=HB_TYPE)
    assert client.data_to_send() == b""


@pytest.mark.parametrize(
    "role,ids,last",
    [
        pytest.param(Role.SERVER, [1], 0, id="server-id-1"),
        pytest.param(Role.SERVER, [2], 0, id="server-wrong-parity"),
        pytest.param(Role.SERVER, [0], 0, id="server-id-0"),
        pytest.param(Role.SERVER, [5, 3], 5, id="server-decreasing"),
        pytest.param(Role.SERVER, [5, 5], 5, id="server-repeated"),
        pytest.param(Role.CLIENT, [3], 0, id="client-wrong-parity"),
        pytest.param(Role.CLIENT, [0], 0, id="client-id-0"),
        pytest.param(Role.CLIENT, [4, 2], 4, id="client-decreasing"),
        pytest.param(Role.CLIENT, [4, 4], 4, id="client-repeated"),
    ],
)
def test_bad_syn_id_is_protocol_error(role: Role, ids: list[int], last: int) -> None:
    """A SYN with id 1, the wrong parity or a non-increasing id ends the session with GOAWAY(PROTOCOL_ERROR)."""
    session = new_session(role)
    events = feed(session, *(Syn(i) for i in ids))
    assert isinstance(events[-1], SessionEnded)
    assert events[-1].error_code == ErrorCode.PROTOCOL_ERROR
    frames = sent_frames(session)
    assert [type(x) for x in frames] == [GoAway]
    assert frames[0].last_stream_id == last  # type: ignore[union-attr]
    assert frames[0].error_code == ErrorCode.PROTOCOL_ERROR  # type: ignore[union-attr]
    assert session.ended


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(Data(5, b"x"), id="data-above-remote"),
        pytest.param(Data(5, b"", fin=True), id="fin-above-remote"),
        pytest.param(Rst(5, 7), id="rst-above-remote"),
        pytest.param(WndInc(5, 10), id="wndinc-above-remote"),
        pytest.param(Data(2, b"x"), id="data-our-parity-never-opened"),
        pytest.param(WndInc(2, 10), id="wndinc-our-parity-never-opened"),
        pytest.param(Rst(4, 1), id="rst-our-parity-never-opened"),
        pytest.param(Data(0, b"x"), id="data-stream-0"),
    ],
)
def test_frames_for_never_opened_ids_are_protocol_error(frame: f.Frame) -> None:
    """DATA/RST/WNDINC for an id above the highest opened ends the session with PROTOCOL_ERROR."""
    server = server_with_stream()
    events = feed(server, frame)
    assert events[-1] == SessionEnded(
        ErrorCode.PROTOCOL_ERROR, events[-1].reason, False  # type: ignore[union-attr]
    )
    assert_died(server, ErrorCode.PROTOCOL_ERROR)


# ----------------------------------------------------------------------
# Gone streams


def gone_stream_server() -> Session:
    """A server whose client stream 3 has finished both ways and is forgotten."""
    server = server_with_stream()
    feed(server, Data(3, b"", fin=True))
    server.end_stream(3)
    server.data_to_send()
    assert server.events() == [StreamClosed(3, None, False, "")]
    assert server.state(3) is StreamState.CLOSED
    return server


def test_data_for_gone_stream_is_answered_with_rst_4() -> None:
    """DATA for a stream that existed but is gone is answered with RST(STREAM_CLOSED)."""
    server = gone_stream_server()
    assert feed(server, Data(3, b"late")) == []
    assert sent_frames(server) == [Rst(3, ErrorCode.STREAM_CLOSED)]
    assert not server.ended


def test_fin_only_for_gone_stream_is_ignored() -> None:
    """A payload-free FIN for a gone stream is ignored: no reply, no event."""
    server = gone_stream_server()
    assert feed(server, Data(3, b"", fin=True)) == []
    assert server.data_to_send() == b""
    assert not server.ended


@pytest.mark.parametrize("frame", [Rst(3, 4), Rst(3, 0), WndInc(3, 1000)])
def test_rst_and_wndinc_for_gone_stream_are_ignored(frame: f.Frame) -> None:
    """RST and WNDINC for a gone stream produce no reply and no event."""
    server = gone_stream_server()
    assert feed(server, frame) == []
    assert server.data_to_send() == b""
    assert not server.ended


def test_duplicate_fin_is_tolerated() -> None:
    """A second FIN on a half-closed stream is ignored (no reply, one StreamEnded)."""
    server = server_with_stream()
    assert feed(server, Data(3, b"", fin=True)) == [StreamEnded(3)]
    assert feed(server, Data(3, b"", fin=True)) == []
    assert server.data_to_send() == b""
    assert server.state(3) is StreamState.HALF_CLOSED_REMOTE


def test_data_after_fin_resets_stream() -> None:
    """Payload after the peer's FIN is answered with RST(4) and closes the stream."""
    server = server_with_stream()
    feed(server, Data(3, b"", fin=True))
    server.events()
    events = feed(server, Data(3, b"oops"))
    assert of_type(events, DataReceived) == []
    assert events == [StreamClosed(3, ErrorCode.STREAM_CLOSED, True, events[0].reason)]  # type: ignore[union-attr]
    assert sent_frames(server) == [Rst(3, ErrorCode.STREAM_CLOSED)]


# ----------------------------------------------------------------------
# Flow control


def test_sender_never_exceeds_window() -> None:
    """Of 200 KB sent on a fresh stream, whole frames up to the 65536-byte window go out until a WNDINC arrives; the last 4 bytes of window (less than a frame) wait, unless released."""
    client, sid = client_with_stream()
    body = payload(200_000)
    client.send_data(sid, body)
    frames = sent_frames(client)
    assert all(isinstance(x, Data) for x in frames)
    assert [len(x.data) for x in frames] == [f.MAX_PAYLOAD] * 4  # type: ignore[union-attr]
    assert data_payload(frames) == body[:WHOLE]
    assert client.pending(sid) == 200_000 - WHOLE
    assert client.send_window(sid) == INITIAL_WINDOW - WHOLE
    assert client.holding_subframe
    # More writes only queue.
    client.send_data(sid, b"tail")
    assert client.data_to_send() == b""
    assert client.events() == []
    # Released (the adapter does so after SUBFRAME_HOLD): the window's rest goes.
    client.release_subframe()
    assert sent_frames(client) == [Data(sid, body[WHOLE:INITIAL_WINDOW])]
    assert client.send_window(sid) == 0
    assert not client.holding_subframe


def test_queued_data_flushed_in_order_after_wndinc() -> None:
    """Queued data goes out in order, no more than each WNDINC grants, then SendWindowOpened."""
    client, sid = client_with_stream()
    first, second, third = payload(70_000, 1), payload(10, 2), payload(50_000, 3)
    for chunk in (first, second, third):
        client.send_data(sid, chunk)
    out = data_payload(sent_frames(client))
    assert len(out) == WHOLE
    # less than a frame of window with more queued: it waits...
    assert feed(client, WndInc(sid, 1000)) == []
    assert client.data_to_send() == b""
    assert client.holding_subframe
    # ... until released
    client.release_subframe()
    step = data_payload(sent_frames(client))
    assert len(step) == INITIAL_WINDOW - WHOLE + 1000
    out += step
    events = feed(client, WndInc(sid, 1_000_000))
    assert events == [SendWindowOpened(sid)]
    frames = sent_frames(client)
    assert all(len(x.data) <= f.MAX_PAYLOAD for x in frames)  # type: ignore[union-attr]
    out += data_payload(frames)
    assert out == first + second + third
    assert client.pending(sid) == 0
    assert client.send_window(sid) == INITIAL_WINDOW + 1_001_000 - len(out)


def test_send_window_opened_only_when_queue_empties() -> None:
    """SendWindowOpened is reported once, when the whole queue has been framed."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW + 3000))
    client.data_to_send()
    assert feed(client, WndInc(sid, 1000)) == []
    assert feed(client, WndInc(sid, 1000)) == []
    assert feed(client, WndInc(sid, 1000)) == [SendWindowOpened(sid)]
    assert feed(client, WndInc(sid, 1000)) == []
    assert client.pending(sid) == 0


def test_fin_waits_behind_queued_data() -> None:
    """send_data(..., fin=True) puts FIN on the last DATA frame, after the window opens."""
    client, sid = client_with_stream()
    body = payload(INITIAL_WINDOW + 10)
    client.send_data(sid, body, fin=True)
    frames = sent_frames(client)
    assert not any(x.fin for x in frames)  # type: ignore[union-attr]
    assert client.state(sid) is StreamState.OPEN
    feed(client, WndInc(sid, 10))
    frames = sent_frames(client)
    # the window now covers everything queued: the sub-frame tail goes with FIN
    assert frames == [Data(sid, body[WHOLE:], fin=True)]
    assert client.state(sid) is StreamState.HALF_CLOSED_LOCAL


def test_bare_fin_needs_no_window() -> None:
    """With the send window used up, a payload-free FIN still goes out at once."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW))
    client.data_to_send()
    assert client.send_window(sid) == 0
    client.end_stream(sid)
    assert sent_frames(client) == [Data(sid, b"", fin=True)]


def test_exactly_the_window_is_accepted() -> None:
    """A peer may fill the 65536-byte window exactly without error."""
    server = server_with_stream()
    body = payload(INITIAL_WINDOW)
    frames = [Data(3, body[i : i + 16383]) for i in range(0, len(body), 16383)]
    events = feed(server, *frames)
    assert b"".join(e.data for e in events) == body  # type: ignore[union-attr]
    assert server.data_to_send() == b""
    assert not server.ended


def test_receiver_exceeding_window_is_flow_control_error() -> None:
    """One byte beyond the granted window ends the session with GOAWAY(FLOW_CONTROL_ERROR)."""
    server = server_with_stream()
    body = payload(INITIAL_WINDOW)
    feed(server, *[Data(3, body[i : i + 16383]) for i in range(0, len(body), 16383)])
    server.events()
    events = feed(server, Data(3, b"!"))
    assert of_type(events, DataReceived) == []
    assert isinstance(events[-1], SessionEnded)
    assert_died(server, ErrorCode.FLOW_CONTROL_ERROR)


def test_acknowledged_bytes_reopen_receive_window() -> None:
    """After acknowledging what it read, the receiver accepts that much more."""
    server = server_with_stream()
    body = payload(INITIAL_WINDOW)
    chunks = [Data(3, body[i : i + 16383]) for i in range(0, len(body), 16383)]
    feed(server, *chunks)
    server.acknowledge(3, INITIAL_WINDOW)
    assert sent_frames(server) == [WndInc(3, INITIAL_WINDOW)]
    feed(server, *chunks)
    assert not server.ended
    assert server.data_to_send() == b""


def test_wndinc_coalescing() -> None:
    """Acknowledging one byte at a time emits one WNDINC per half window, not one per byte."""
    server = server_with_stream()
    body = payload(INITIAL_WINDOW)
    feed(server, *[Data(3, body[i : i + 16383]) for i in range(0, len(body), 16383)])
    for _ in range(INITIAL_WINDOW - 1):
        server.acknowledge(3, 1)
    half = INITIAL_WINDOW // 2
    assert sent_frames(server) == [WndInc(3, half)]
    server.acknowledge(3, 1)
    assert sent_frames(server) == [WndInc(3, half)]


def test_large_receive_window_grants_extra_with_our_syn() -> None:
    """receive_window above 64 KiB sends WNDINC(extra) with the SYN of each stream we open."""
    cfg = SessionConfig(receive_window=256 * 1024)
    extra = 256 * 1024 - INITIAL_WINDOW
    client = Session(Role.CLIENT, cfg)
    assert client.data_to_send() == HEARTBEAT_SYN_3  # not for the heartbeat stream
    sid = client.open_stream()
    assert sent_frames(client) == [Syn(sid), WndInc(sid, extra)]


def _big_window_server() -> Session:
    server = new_session(Role.SERVER, SessionConfig(receive_window=256 * 1024, heartbeat=False))
    feed(server, Syn(3))
    return server


EXTRA = 256 * 1024 - INITIAL_WINDOW


def _frames(sid: int, body: bytes) -> list[Data]:
    return [Data(sid, body[i : i + f.MAX_PAYLOAD]) for i in range(0, len(body), f.MAX_PAYLOAD)]


def test_peer_stream_extra_window_rides_with_first_answer() -> None:
    """
    On a peer-opened stream the extra window is not a write of its own:
    nothing goes out at the SYN, and the WNDINC leaves in the same write as
    the stream's first answer.
    """
    server = _big_window_server()
    assert server.data_to_send() == b""
    feed(server, Data(3, b"x"))
    assert server.data_to_send() == b""
    server.acknowledge(3, 1)  # far below the coalescing threshold
    assert server.data_to_send() == b""
    server.send_data(3, b"x")
    assert sent_frames(server) == [Data(3, b"x"), WndInc(3, EXTRA + 1)]
    # granted once: later output carries no second one
    server.send_data(3, b"y")
    assert sent_frames(server) == [Data(3, b"y")]


def test_peer_stream_extra_window_rides_with_any_output() -> None:
    """Any frame the session sends (another stream's, a heartbeat) carries the grant."""
    server = _big_window_server()
    feed(server, Syn(5))
    server.reset_stream(5)
    assert sent_frames(server) == [Rst(5, ErrorCode.CANCEL), WndInc(3, EXTRA)]


def test_peer_stream_extra_window_goes_alone_at_half_initial_window() -> None:
    """
    A stream that only receives (an upload, the session otherwise quiet)
    gets its extra window once the peer has used half of the initial 64 KiB,
    so the peer never stalls; then it may fill the whole 256 KiB, and not a
    byte more.
    """
    server = _big_window_server()
    half = INITIAL_WINDOW // 2
    feed(server, *_frames(3, payload(half)))
    assert server.data_to_send() == b""
    feed(server, Data(3, b"!"))
    assert sent_frames(server) == [WndInc(3, EXTRA)]
    feed(server, *_frames(3, payload(256 * 1024 - half - 1)))
    assert not server.ended
    feed(server, Data(3, b"!"))
    assert_died(server, ErrorCode.FLOW_CONTROL_ERROR)


def test_peer_stream_extra_window_combines_with_credit() -> None:
    """Consumed credit due for a WNDINC and the owed extra window leave as one frame."""
    server = _big_window_server()
    threshold = 256 * 1024 // 2
    # the peer has used less than half its initial window: nothing sent yet
    feed(server, *_frames(3, payload(INITIAL_WINDOW // 2 - 1)))
    server.acknowledge(3, INITIAL_WINDOW // 2 - 1)
    assert server.data_to_send() == b""
    # a reader that consumed enough for a WNDINC: one frame with both
    big = _big_window_server()
    big.acknowledge(3, threshold)  # (credit taken as consumed, for the test)
    assert sent_frames(big) == [WndInc(3, EXTRA + threshold)]


@pytest.mark.parametrize("end", ["fin", "rst", "local-rst"])
def test_peer_stream_extra_window_dropped_when_peer_stops_sending(end: str) -> None:
    """No WNDINC for a stream whose peer has finished sending or that is gone."""
    server = _big_window_server()
    if end == "fin":
        feed(server, Data(3, b"", fin=True))
    elif end == "rst":
        feed(server, Rst(3, ErrorCode.CANCEL))
    else:
        server.reset_stream(3)
        assert sent_frames(server) == [Rst(3, ErrorCode.CANCEL)]
    feed(server, Syn(5))
    server.send_data(5, b"x")
    assert sent_frames(server) == [Data(5, b"x"), WndInc(5, EXTRA)]  # none for 3


def test_config_rejects_window_below_initial() -> None:
    """A receive_window below muxado's 64 KiB start is refused."""
    with pytest.raises(ValueError):
        SessionConfig(receive_window=INITIAL_WINDOW - 1)


def test_wndinc_overflowing_31_bits_is_flow_control_error() -> None:
    """A WNDINC that would grow the send window past 2**31-1 ends the session."""
    client, sid = client_with_stream()
    feed(client, WndInc(sid, 0x7FFFFFFF))
    assert_died(client, ErrorCode.FLOW_CONTROL_ERROR)


# ----------------------------------------------------------------------
# Half-close and close


def test_local_fin_then_remote_fin() -> None:
    """end_stream half-closes our side; the peer's FIN then closes the stream cleanly."""
    client, sid = client_with_stream()
    client.end_stream(sid)
    assert client.data_to_send() == f.encode_data_header(sid, 0, fin=True)
    assert client.state(sid) is StreamState.HALF_CLOSED_LOCAL
    with pytest.raises(StreamClosedError):
        client.send_data(sid, b"more")
    client.end_stream(sid)  # a no-op once FIN is out
    assert client.data_to_send() == b""
    assert feed(client, Data(sid, b"reply")) == [DataReceived(sid, b"reply")]
    assert feed(client, Data(sid, b"", fin=True)) == [
        StreamEnded(sid),
        StreamClosed(sid, None, False, ""),
    ]
    assert client.state(sid) is StreamState.CLOSED
    assert client.stream_ids() == []


def test_remote_fin_then_local_fin() -> None:
    """After the peer's FIN we may still send; our FIN then closes the stream cleanly."""
    server = server_with_stream()
    assert feed(server, Data(3, b"q", fin=True)) == [
        DataReceived(3, b"q"),
        StreamEnded(3),
    ]
    assert server.state(3) is StreamState.HALF_CLOSED_REMOTE
    server.send_data(3, b"answer")
    assert sent_frames(server) == [Data(3, b"answer")]
    server.end_stream(3)
    assert sent_frames(server) == [Data(3, b"", fin=True)]
    assert server.events() == [StreamClosed(3, None, False, "")]
    assert server.state(3) is StreamState.CLOSED


def test_send_data_with_fin_sets_flag_on_frame() -> None:
    """send_data(fin=True) carries the FIN on the data frame itself."""
    client, sid = client_with_stream()
    client.send_data(sid, b"last", fin=True)
    assert sent_frames(client) == [Data(sid, b"last", fin=True)]
    with pytest.raises(StreamClosedError):
        client.send_data(sid, b"x")


def test_syn_with_fin_opens_half_closed() -> None:
    """A SYN carrying FIN opens a stream whose remote side is already finished."""
    server = new_session(Role.SERVER)
    assert feed(server, Syn(3, fin=True)) == [StreamOpened(3, 0, 0), StreamEnded(3)]
    assert server.state(3) is StreamState.HALF_CLOSED_REMOTE


def test_close_stream_sends_fin_and_forgets() -> None:
    """close_stream sends FIN, forgets the stream, and later DATA is answered with RST(4)."""
    server = server_with_stream()
    server.close_stream(3)
    assert sent_frames(server) == [Data(3, b"", fin=True)]
    assert server.events() == [StreamClosed(3, None, False, "")]
    assert server.state(3) is StreamState.CLOSED
    assert feed(server, Data(3, b"late")) == []
    assert sent_frames(server) == [Rst(3, ErrorCode.STREAM_CLOSED)]
    assert feed(server, Data(3, b"", fin=True)) == []
    assert server.data_to_send() == b""


def test_close_stream_after_fin_forgets_at_once() -> None:
    """close_stream on a stream whose FIN is already out forgets it without a second FIN."""
    client, sid = client_with_stream()
    client.end_stream(sid)
    client.data_to_send()
    client.close_stream(sid)
    assert client.data_to_send() == b""
    assert client.events() == [StreamClosed(sid, None, False, "closed")]
    assert feed(client, Data(sid, b"x")) == []
    assert sent_frames(client) == [Rst(sid, ErrorCode.STREAM_CLOSED)]


def test_close_stream_with_queued_data_fins_after_it() -> None:
    """close_stream behind a shut window sends the queued data first, then FIN, then StreamClosed."""
    client, sid = client_with_stream()
    body = payload(INITIAL_WINDOW + 100)
    client.send_data(sid, body)
    client.data_to_send()
    client.close_stream(sid)
    assert client.data_to_send() == b""
    assert client.events() == []
    events = feed(client, WndInc(sid, 100))
    assert sent_frames(client) == [Data(sid, body[WHOLE:], fin=True)]
    assert events == [SendWindowOpened(sid), StreamClosed(sid, None, False, "")]


def test_reset_stream_sends_rst_and_drops_queue() -> None:
    """reset_stream sends RST(CANCEL) and queued data is never sent."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW + 5000))
    client.data_to_send()
    client.reset_stream(sid)
    assert client.data_to_send() == f.encode_rst(sid, ErrorCode.CANCEL)
    assert client.events() == [StreamClosed(sid, ErrorCode.CANCEL, False, "reset")]
    assert client.pending(sid) == 0
    assert feed(client, WndInc(sid, 100_000)) == []
    assert client.data_to_send() == b""
    with pytest.raises(StreamClosedError):
        client.send_data(sid, b"x")


def test_reset_stream_with_code() -> None:
    """reset_stream puts the given error code in the RST."""
    server = server_with_stream()
    server.reset_stream(3, ErrorCode.INTERNAL_ERROR)
    assert sent_frames(server) == [Rst(3, ErrorCode.INTERNAL_ERROR)]


def test_peer_rst_closes_stream() -> None:
    """An RST from the peer closes the stream at once with the peer's code."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW + 1))
    client.data_to_send()
    events = feed(client, Rst(sid, ErrorCode.REFUSED_STREAM))
    assert len(events) == 1 and isinstance(events[0], StreamClosed)
    assert events[0].error_code == ErrorCode.REFUSED_STREAM and events[0].remote
    assert client.pending(sid) == 0
    with pytest.raises(StreamClosedError):
        client.send_data(sid, b"x")
    assert client.data_to_send() == b""


# ----------------------------------------------------------------------
# GOAWAY


def test_honest_goaway_keeps_session_running() -> None:
    """A NO_ERROR GOAWAY of length 8 forbids new streams, closes ours above its id, and keeps the rest."""
    client = new_session(Role.CLIENT)
    ids = [client.open_stream() for _ in range(3)]
    assert ids == [3, 5, 7]
    client.data_to_send()
    events = feed(client, GoAway(5, ErrorCode.NO_ERROR))
    assert events[0] == GoAwayReceived(5, ErrorCode.NO_ERROR, b"")
    assert events[1:] == [
        StreamClosed(7, ErrorCode.REFUSED_STREAM, True, events[1].reason)  # type: ignore[union-attr]
    ]
    assert not client.ended and client.remote_going_away
    with pytest.raises(SessionClosedError):
        client.open_stream()
    client.send_data(5, b"still")
    assert sent_frames(client) == [Data(5, b"still")]
    assert feed(client, Data(3, b"ok")) == [DataReceived(3, b"ok")]


def test_goaway_keeps_our_heartbeat() -> None:
    """A NO_ERROR GOAWAY does not close our heartbeat stream: pings go on."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    feed(client, GoAway(0, ErrorCode.NO_ERROR))
    client.on_timer(3.0)
    frames = sent_frames(client)
    assert len(frames) == 1 and isinstance(frames[0], Data)
    assert frames[0].stream_id == 3 and len(frames[0].data) == 4


@pytest.mark.parametrize("code", [ErrorCode.PROTOCOL_ERROR, ErrorCode.INTERNAL_ERROR, 99])
def test_errored_goaway_ends_session(code: int) -> None:
    """A GOAWAY with an error code ends the session, closing every stream."""
    client, sid = client_with_stream()
    events = feed(client, GoAway(sid, code))
    assert events[0] == GoAwayReceived(sid, code, b"")
    closed = of_type(events, StreamClosed)
    assert [c.stream_id for c in closed] == [sid]
    assert events[-1] == SessionEnded(code, events[-1].reason, True)  # type: ignore[union-attr]
    assert client.ended
    with pytest.raises(SessionClosedError):
        client.open_stream()


def test_go_bug_goaway_ends_session() -> None:
    """The Go v1 GOAWAY (length 16, 8 body bytes) ends the session even with NO_ERROR."""
    client, sid = client_with_stream()
    wire = bytes.fromhex("0010 0006 00000000 00000000 00000000")
    events = client.receive_data(wire)
    assert events[0] == GoAwayReceived(0, 0, b"")
    assert isinstance(events[-1], SessionEnded) and events[-1].remote
    assert client.ended


def test_go_away_refuses_later_syns() -> None:
    """After go_away() a new SYN is refused with RST(6) while open streams carry on."""
    server = server_with_stream()
    server.go_away()
    assert server.data_to_send() == f.encode_goaway(3, ErrorCode.NO_ERROR)
    assert server.going_away and not server.ended
    assert feed(server, Syn(5)) == []
    assert sent_frames(server) == [Rst(5, ErrorCode.REFUSED_STREAM)]
    assert feed(server, Data(3, b"more")) == [DataReceived(3, b"more")]
    server.send_data(3, b"reply")
    assert sent_frames(server) == [Data(3, b"reply")]
    server.go_away()
    assert server.data_to_send() == b""


# ----------------------------------------------------------------------
# Heartbeat


def test_heartbeat_ping_and_echo() -> None:
    """Every interval a 4-byte ping goes out on our heartbeat stream; its echo is acknowledged."""
    client = Session(Role.CLIENT, now=100.0)
    client.data_to_send()
    acks = []
    for n in range(1, 6):
        due = client.next_timer()
        assert due == 100.0 + 3.0 * n
        client.on_timer(due - 0.01)
        assert client.data_to_send() == b""
        client.on_timer(due)
        frames = sent_frames(client)
        assert len(frames) == 1 and isinstance(frames[0], Data)
        assert frames[0].stream_id == 3 and len(frames[0].data) == 4
        acks += feed(client, Data(3, frames[0].data))
    assert acks == [HeartbeatAcknowledged(100.0 + 3.0 * n) for n in range(1, 6)]
    assert not client.ended


def test_heartbeat_echo_in_pieces() -> None:
    """A heartbeat echo split over several frames is acknowledged once complete."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    client.on_timer(3.0)
    ping = data_payload(sent_frames(client))
    assert feed(client, Data(3, ping[:1])) == []
    assert feed(client, Data(3, ping[1:3])) == []
    assert feed(client, Data(3, ping[3:])) == [HeartbeatAcknowledged(3.0)]


def test_heartbeat_timeout_ends_session() -> None:
    """No echo within the tolerance ends the session (heartbeat_timed_out) with GOAWAY."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    sid = client.open_stream()
    client.data_to_send()
    now = 0.0
    for _ in range(20):  # 3 s heartbeats: ended by 16 s, well within 20 timers
        if client.ended:
            break
        due = client.next_timer()
        assert due is not None and due > now
        now = due
        client.on_timer(now)
        if now < 16.0:
            assert not client.ended
    assert now == pytest.approx(3.0 + 13.0)
    assert client.heartbeat_timed_out
    frames = sent_frames(client)
    assert isinstance(frames[-1], GoAway)
    events = client.events()
    assert StreamClosed(sid, ErrorCode.CANCEL, False, events[0].reason) in events  # type: ignore[union-attr]
    assert isinstance(events[-1], SessionEnded)
    assert client.next_timer() is None


def test_no_heartbeat_no_timer() -> None:
    """With heartbeat off there is no timer and nothing is ever pinged."""
    client = Session(Role.CLIENT, NO_HEARTBEAT)
    assert client.data_to_send() == b""
    assert client.next_timer() is None
    client.on_timer(1000.0)
    assert client.data_to_send() == b""


def test_wrong_heartbeat_echo_is_protocol_error() -> None:
    """An echo that does not match the ping ends the session with PROTOCOL_ERROR."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    client.on_timer(3.0)
    ping = data_payload(sent_frames(client))
    feed(client, Data(3, bytes(b ^ 0xFF for b in ping)))
    assert_died(client, ErrorCode.PROTOCOL_ERROR)


def test_peer_without_heartbeat_extension() -> None:
    """RST(4) on our heartbeat stream (peer lacks the extension) just stops our heartbeat."""
    client = Session(Role.CLIENT)
    client.data_to_send()
    assert feed(client, Rst(3, ErrorCode.STREAM_CLOSED)) == []
    assert not client.ended
    assert client.next_timer() is None
    assert client.data_to_send() == b""


def peer_heartbeat_client() -> Session:
    """A client (own heartbeat off) whose peer has opened its heartbeat stream 2."""
    client = new_session(Role.CLIENT)
    assert feed(client, Syn(2, HB_PRIORITY, HB_TYPE)) == []
    assert client.data_to_send() == b""
    return client


def test_peer_heartbeat_is_echoed_byte_for_byte() -> None:
    """Every chunk on the peer's heartbeat stream is echoed back unchanged."""
    client = peer_heartbeat_client()
    for chunk in (b"\0\0\0\0", b"\0\0\0\1", b"\x12", b"\x34\x56\x78", b"abcdefgh"):
        assert feed(client, Data(2, chunk)) == []
        assert sent_frames(client) == [Data(2, chunk)]
    assert client.stream_ids() == []
    assert client.stream_count == 0


def test_peer_heartbeat_gets_window_back_and_is_never_closed() -> None:
    """Long heartbeat traffic is echoed in full with WNDINCs, and never FINed or RSTed."""
    client = peer_heartbeat_client()
    sent = payload(100_000, 7)
    echoed = bytearray()
    granted = 0
    for i in range(0, len(sent), 1000):
        feed(client, Data(2, sent[i : i + 1000]), WndInc(2, 1000))
        for fr in sent_frames(client):
            assert not isinstance(fr, (Rst, GoAway, Syn))
            if isinstance(fr, Data):
                assert fr.stream_id == 2 and not fr.fin
                echoed += fr.data
            else:
                assert isinstance(fr, WndInc) and fr.stream_id == 2
                granted += fr.increment
    assert bytes(echoed) == sent
    assert granted >= len(sent) - INITIAL_WINDOW
    for call in (client.end_stream, client.close_stream, client.reset_stream):
        try:
            call(2)
        except StreamClosedError:
            pass
    assert client.data_to_send() == b""
    assert not client.ended


@pytest.mark.parametrize("stream_type", [0xFFFFFF00, 0xFFFFFFFF])
def test_unknown_extension_type_is_rst_4(stream_type: int) -> None:
    """A SYN with an unregistered extension stream type is answered with RST(4)."""
    server = new_session(Role.SERVER)
    assert feed(server, Syn(3, 0, stream_type)) == []
    assert sent_frames(server) == [Rst(3, ErrorCode.STREAM_CLOSED)]
    assert not server.ended
    assert feed(server, Syn(5)) == [StreamOpened(5, 0, 0)]


def test_stream_type_below_extension_range_is_application_stream() -> None:
    """A stream type below 0xFFFFFEFF is delivered as an ordinary stream."""
    server = new_session(Role.SERVER)
    assert feed(server, Syn(3, 5, 0xFFFFFEFE)) == [StreamOpened(3, 0xFFFFFEFE, 5)]
    assert server.stream_type(3) == 0xFFFFFEFE


# ----------------------------------------------------------------------
# Limits


def test_max_streams_refuses_extra_streams() -> None:
    """Beyond max_streams a SYN gets RST(REFUSED_STREAM); the open streams carry on."""
    server = new_session(
        Role.SERVER, SessionConfig(max_streams=2, heartbeat=False)
    )
    assert feed(server, Syn(3), Syn(5)) == [StreamOpened(3, 0, 0), StreamOpened(5, 0, 0)]
    server.accept_stream(3)
    server.accept_stream(5)
    assert feed(server, Syn(7)) == []
    assert sent_frames(server) == [Rst(7, ErrorCode.REFUSED_STREAM)]
    assert feed(server, Data(3, b"a"), Data(5, b"b")) == [
        DataReceived(3, b"a"),
        DataReceived(5, b"b"),
    ]
    feed(server, Data(3, b"", fin=True))
    server.end_stream(3)
    server.data_to_send()
    server.events()
    assert feed(server, Syn(9)) == [StreamOpened(9, 0, 0)]
    assert not server.ended


def test_accept_backlog_refuses_extra_streams() -> None:
    """Beyond accept_backlog unaccepted streams a SYN gets RST(REFUSED_STREAM) until one is accepted."""
    server = new_session(
        Role.SERVER, SessionConfig(accept_backlog=2, heartbeat=False)
    )
    feed(server, Syn(3), Syn(5))
    assert feed(server, Syn(7)) == []
    assert sent_frames(server) == [Rst(7, ErrorCode.REFUSED_STREAM)]
    assert feed(server, Data(5, b"x")) == [DataReceived(5, b"x")]
    server.accept_stream(3)
    server.accept_stream(3)  # accepting twice frees only one slot
    assert feed(server, Syn(9)) == [StreamOpened(9, 0, 0)]
    assert feed(server, Syn(11)) == []
    assert sent_frames(server) == [Rst(11, ErrorCode.REFUSED_STREAM)]


def test_closed_unaccepted_stream_frees_backlog_slot() -> None:
    """A backlog stream reset by the peer before acceptance frees its slot."""
    server = new_session(Role.SERVER, SessionConfig(accept_backlog=1, heartbeat=False))
    feed(server, Syn(3))
    feed(server, Rst(3, ErrorCode.CANCEL))
    assert feed(server, Syn(5)) == [StreamOpened(5, 0, 0)]


# ----------------------------------------------------------------------
# Session end


def test_close_sends_goaway_and_closes_streams() -> None:
    """close() sends GOAWAY(NO_ERROR), closes every stream and reports SessionEnded last."""
    server = server_with_stream()
    server.close()
    assert server.data_to_send() == f.encode_goaway(3, ErrorCode.NO_ERROR)
    events = server.events()
    assert [type(e) for e in events] == [StreamClosed, SessionEnded]
    assert events[0].stream_id == 3 and events[0].error_code == ErrorCode.CANCEL  # type: ignore[union-attr]
    assert events[1] == SessionEnded(ErrorCode.NO_ERROR, "closed", False)


def test_application_calls_after_end_raise() -> None:
    """After SessionEnded, open_stream and send_data raise SessionClosedError."""
    client, sid = client_with_stream()
    client.close()
    client.data_to_send()
    client.events()
    with pytest.raises(SessionClosedError):
        client.open_stream()
    with pytest.raises(SessionClosedError):
        client.send_data(sid, b"x")
    # Tear-down calls stay harmless and silent.
    client.end_stream(sid)
    client.close_stream(sid)
    client.reset_stream(sid)
    client.acknowledge(sid, 10)
    client.go_away()
    client.close()
    client.connection_lost()
    assert client.data_to_send() == b""
    assert client.events() == []


def test_input_after_end_is_ignored() -> None:
    """After the session ends, received bytes produce no events and no output."""
    server = server_with_stream()
    feed(server, Syn(1))
    server.data_to_send()
    server.events()
    assert feed(server, Syn(5), Data(3, b"x"), Data(99, b"y")) == []
    assert server.receive_data(b"\xff" * 50) == []
    assert server.data_to_send() == b""


def test_connection_lost_ends_session_without_goaway() -> None:
    """connection_lost ends the session with error_code None and writes nothing."""
    server = server_with_stream()
    server.connection_lost()
    assert server.data_to_send() == b""
    events = server.events()
    assert isinstance(events[-1], SessionEnded)
    assert events[-1].error_code is None and events[-1].remote
    assert of_type(events, StreamClosed)[0].stream_id == 3


def test_framing_error_ends_session_with_its_code() -> None:
    """A framing violation ends the session with GOAWAY carrying the codec's error code."""
    server = server_with_stream()
    server.receive_data(bytes.fromhex("0003 0002 00000003 000000"))
    assert_died(server, ErrorCode.FRAME_SIZE_ERROR)


# ----------------------------------------------------------------------
# Back to back


def test_pair_handshake_and_echo() -> None:
    """Two sessions wired together open a stream, exchange data and close it cleanly."""
    client, server = Session(Role.CLIENT), Session(Role.SERVER)
    ev_c, ev_s = pump(client, server)
    assert ev_c == [] and ev_s == []
    sid = client.open_stream()
    client.send_data(sid, b"ping", fin=True)
    _, ev_s = pump(client, server)
    assert ev_s == [StreamOpened(sid, 0, 0), DataReceived(sid, b"ping"), StreamEnded(sid)]
    server.accept_stream(sid)
    server.send_data(sid, b"pong", fin=True)
    ev_c, ev_s = pump(client, server)
    assert ev_c == [DataReceived(sid, b"pong"), StreamEnded(sid), StreamClosed(sid, None, False, "")]
    assert ev_s == [StreamClosed(sid, None, False, "")]


def test_pair_heartbeats_are_answered() -> None:
    """Two sessions keep each other's heartbeats answered over a long time."""
    client, server = Session(Role.CLIENT), Session(Role.SERVER)
    pump(client, server)
    acks_c = acks_s = 0
    for t in range(1, 200):
        client.on_timer(float(t))
        server.on_timer(float(t))
        ev_c, ev_s = pump(client, server)
        acks_c += len(of_type(ev_c, HeartbeatAcknowledged))
        acks_s += len(of_type(ev_s, HeartbeatAcknowledged))
    assert acks_c == acks_s == 66
    assert not client.ended and not server.ended


class Wire:
    """Two sessions joined by byte pipes that deliver in chunks of varying size."""

    def __init__(self, client: Session, server: Session, sizes: list[int]) -> None:
        self.client, self.server = client, server
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.sizes = cycle(sizes)
        self.received: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
        self.events: dict[str, list[Event]] = {"client": [], "server": []}
        self.now = 0.0

    def handle(self, side: str, session: Session, events: list[Event]) -> None:
        """Record a side's events; accept streams and consume data at once."""
        while events:
            self.events[side] += events
            for ev in events:
                if isinstance(ev, StreamOpened):
                    session.accept_stream(ev.stream_id)
                elif isinstance(ev, DataReceived):
                    self.received[(side, ev.stream_id)] += ev.data
                    session.acknowledge(ev.stream_id, len(ev.data))
            events = session.events()

    def step(self) -> bool:
        """Deliver one piece each way; return False when nothing is left to move."""
        self.now += 0.01
        for session in (self.client, self.server):
            due = session.next_timer()
            if due is not None and due <= self.now:
                session.on_timer(self.now)
        self.handle("client", self.client, self.client.events())
        self.handle("server", self.server, self.server.events())
        self.c2s += self.client.data_to_send()
        self.s2c += self.server.data_to_send()
        if not self.c2s and not self.s2c:
            return False
        for buf, side, session in (
            (self.c2s, "server", self.server),
            (self.s2c, "client", self.client),
        ):
            if buf:
                n = max(next(self.sizes), len(buf) // 64)
                piece = bytes(buf[:n])
                del buf[:n]
                self.handle(side, session, session.receive_data(piece))
        return True

    def run(self, limit: int = 50_000) -> None:
        """Step until quiet."""
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("wire never went quiet")


write_strategy = st.tuples(
    st.integers(0, 2),
    st.booleans(),
    st.one_of(st.integers(0, 3000), st.integers(60_000, 100_000)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_streams=st.integers(1, 3),
    writes=st.lists(write_strategy, max_size=6),
    sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=10),
    heartbeat=st.booleans(),
    window=st.sampled_from([INITIAL_WINDOW, 200_000]),
    seed=st.integers(0, 2**32 - 1),
)
def test_back_to_back_delivers_every_byte_in_order(
    n_streams: int,
    writes: list[tuple[int, bool, int]],
    sizes: list[int],
    heartbeat: bool,
    window: int,
    seed: int,
) -> None:
    """Random writes both ways over a randomly split byte stream arrive complete and in order."""
    cfg = SessionConfig(
        receive_window=window,
        heartbeat=heartbeat,
        heartbeat_interval=0.05,
        heartbeat_tolerance=1e6,
    )
    client, server = Session(Role.CLIENT, cfg), Session(Role.SERVER, cfg)
    wire = Wire(client, server, sizes)
    ids = [client.open_stream() for _ in range(n_streams)]
    wire.run()
    rng = random.Random(seed)
    sent: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
    for index, from_client, size in writes:
        sid = ids[index % n_streams]
        chunk = rng.randbytes(size)
        sender = client if from_client else server
        sender.send_data(sid, chunk)
        # Keyed by the receiving side.
        sent[("server" if from_client else "client", sid)] += chunk
        for _ in range(rng.randint(0, 3)):
            wire.step()
    for sid in ids:
        client.end_stream(sid)
        server.end_stream(sid)
    wire.run()
    assert not client.ended and not server.ended
    for key in set(sent) | set(wire.received):
        assert bytes(wire.received[key]) == bytes(sent[key]), key
    for side, session in (("client", client), ("server", server)):
        evs = wire.events[side]
        assert sorted(e.stream_id for e in of_type(evs, StreamEnded)) == ids
        assert sorted(
            e.stream_id for e in of_type(evs, StreamClosed) if e.error_code is None
        ) == ids
        assert session.stream_ids() == []


# ----------------------------------------------------------------------
# Robustness against arbitrary input


def check_event_order(events: list[Event]) -> None:
    """Per stream: Opened first, Data before Ended, nothing after Closed; SessionEnded last."""
    seen: dict[int, list[str]] = defaultdict(list)
    for i, ev in enumerate(events):
        if isinstance(ev, SessionEnded):
            assert i == len(events) - 1
            continue
        sid = getattr(ev, "stream_id", None)
        if sid is None:
            continue
        history = seen[sid]
        assert "closed" not in history, (sid, ev)
        name = type(ev).__name__
        if isinstance(ev, StreamOpened):
            assert history == []
            history.append("opened")
        elif isinstance(ev, DataReceived):
            assert "ended" not in history
            history.append("data")
        elif isinstance(ev, StreamEnded):
            assert "ended" not in history
            history.append("ended")
        elif isinstance(ev, StreamClosed):
            history.append("closed")
        else:
            history.append(name)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (modulo its length)."""
    if not data:
        return [data]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


small_id = st.integers(0, 12)
u32 = st.integers(0, 0xFFFFFFFF)
peer_frame = st.one_of(
    st.builds(Syn, small_id, st.sampled_from([0, 1, 0x7FFFFFFF]), st.sampled_from([0, 5, HB_TYPE, 0xFFFFFFF0]), st.booleans()),
    st.builds(Rst, small_id, st.integers(0, 9)),
    st.builds(Data, small_id, st.binary(max_size=40), st.booleans()),
    st.builds(Data, small_id, st.binary(min_size=16000, max_size=16383), st.just(False)),
    st.builds(WndInc, small_id, st.one_of(st.integers(0, 70_000), st.just(0x7FFFFFFF))),
    st.builds(GoAway, small_id, st.integers(0, 3)),
)


def run_garbage(session: Session, pieces: list[bytes], now_steps: list[float]) -> list[Event]:
    """Feed pieces (with timer ticks between), checking the session's invariants."""
    events: list[Event] = session.events()
    out = bytearray(session.data_to_send())
    times = cycle(now_steps or [0.0])
    now = 0.0
    for piece in pieces:
        events += session.receive_data(piece)
        now += next(times)
        session.on_timer(now)
        events += session.events()
        out += session.data_to_send()
    check_event_order(events)
    frames = decode_all(bytes(out))  # what we wrote is always well-formed
    if session.ended:
        assert isinstance(events[-1], SessionEnded)
        assert len(of_type(events, SessionEnded)) == 1
        if session.end_reason is not None and session.end_reason.remote:
            assert of_type(events, GoAwayReceived)
        else:
            assert isinstance(frames[-1], GoAway)
        # Every application stream that opened was closed.
        opened = {e.stream_id for e in events if isinstance(e, StreamOpened)}
        closed = {e.stream_id for e in of_type(events, StreamClosed)}
        assert opened <= closed
    else:
        assert not of_type(events, SessionEnded)
    return events


def fresh_target(role: Role) -> Session:
    """A session with some state to damage: heartbeat on, two streams of ours."""
    session = Session(role, SessionConfig(heartbeat_interval=1.0, heartbeat_tolerance=5.0))
    session.open_stream()
    session.open_stream()
    return session


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from(Role),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
    ticks=st.lists(st.floats(0, 4), max_size=4),
)
def test_random_bytes_never_raise(
    role: Role, data: bytes, cuts: list[int], ticks: list[float]
) -> None:
    """Arbitrary bytes fed to a session never raise: it stays up or ends with a GOAWAY."""
    run_garbage(fresh_target(role), split(data, cuts), ticks)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from(Role),
    frames=st.lists(peer_frame, max_size=25),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
    ticks=st.lists(st.floats(0, 4), max_size=4),
)
def test_random_frames_never_raise(
    role: Role, frames: list[f.Frame], cuts: list[int], ticks: list[float]
) -> None:
    """Random well-formed frames on small ids never raise and keep the event order rules."""
    wire = b"".join(f.encode(fr) for fr in frames)
    run_garbage(fresh_target(role), split(wire, cuts), ticks)


# ----------------------------------------------------------------------
# Flood defences


def test_refused_stream_flood_ends_the_session() -> None:
    """Provoking more RSTs than reset_flood_limit within one heartbeat interval is a flood: GOAWAY(PROTOCOL_ERROR)."""
    server = new_session(Role.SERVER, SessionConfig(heartbeat=False, reset_flood_limit=10))
    server.go_away()
    server.data_to_send()
    for i in range(10):
        feed(server, Syn(3 + 2 * i))
    assert not server.ended
    assert len(of_type(sent_frames(server), Rst)) == 10
    feed(server, Syn(23))
    assert_died(server, ErrorCode.PROTOCOL_ERROR)


def test_flood_budget_renews_every_interval() -> None:
    """The RST budget is per heartbeat interval: the same rate spread over ticks is fine."""
    server = new_session(Role.SERVER, SessionConfig(reset_flood_limit=10), now=0.0)
    server.go_away()
    sid = 3
    for tick in range(1, 4):
        for _ in range(10):
            feed(server, Syn(sid))
            sid += 2
        server.on_timer(3.0 * tick)
        assert not server.ended


def test_peer_heartbeat_flood_ends_the_session() -> None:
    """A peer that sends heartbeat bytes faster than it reads our echo cannot make us queue more than a window."""
    client = new_session(Role.CLIENT, NO_HEARTBEAT)
    feed(client, Syn(2, HB_PRIORITY, HB_TYPE))
    chunk = b"\0" * 16000
    for _ in range(4):
        feed(client, Data(2, chunk))  # echoed: exhausts the 64 KiB send window
        client.data_to_send()
    assert not client.ended
    for _ in range(5):
        feed(client, Data(2, chunk))
        if client.ended:
            break
    assert_died(client, ErrorCode.PROTOCOL_ERROR)


def test_data_before_a_new_stream_is_delivered_before_it() -> None:
    """Within one read, data on one stream stays ahead of a SYN that followed it (the agent's 'ready' before its first visitor)."""
    client = new_session(Role.CLIENT, NO_HEARTBEAT)
    sid = client.open_stream()
    client.data_to_send()
    wire = f.encode(Data(sid, b"ready")) + f.encode(Data(sid, b"!")) + f.encode(Syn(2))
    events = client.receive_data(wire)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["DataReceived", "StreamOpened"], events
    assert events[0] == DataReceived(sid, b"ready!")


def test_peer_stream_extra_window_not_sent_with_the_peers_last_data() -> None:
    """DATA with FIN that uses more than half the initial window: the peer sends nothing more, so no owed grant goes out for it."""
    server = _big_window_server()
    frames = _frames(3, payload(INITIAL_WINDOW // 2 + 1))
    frames[-1] = Data(3, frames[-1].data, fin=True)
    feed(server, *frames)
    assert server.data_to_send() == b""


def test_a_window_below_one_frame_waits_only_while_more_is_queued_than_it_allows() -> None:
    """Data that fits the window goes at once, sub-frame tail included; only more than the window holds back the sub-frame rest."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(100))
    assert data_payload(sent_frames(client)) == payload(100)
    assert not client.holding_subframe
    client.send_data(sid, payload(INITIAL_WINDOW - 100, 2))  # exactly the window
    assert len(data_payload(sent_frames(client))) == INITIAL_WINDOW - 100
    assert client.send_window(sid) == 0 and not client.holding_subframe


def test_held_back_streams_are_forgotten_when_they_end() -> None:
    """A reset stream holds nothing back, and releasing then sends nothing."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(100_000))
    sent_frames(client)
    assert client.holding_subframe
    client.reset_stream(sid, ErrorCode.CANCEL)
    assert not client.holding_subframe
    client.data_to_send()
    client.release_subframe()
    assert client.data_to_send() == b""


def test_frames_span_the_boundaries_of_queued_writes() -> None:
    """Writes of uneven sizes queued behind a shut window go out as whole 16383-byte frames whose payloads run across the writes."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW))  # the window, exactly
    sent_frames(client)
    chunks = [payload(n, k) for k, n in enumerate((100, 30_000, 40_000))]
    for chunk in chunks:
        client.send_data(sid, chunk)
    feed(client, WndInc(sid, INITIAL_WINDOW))
    frames = sent_frames(client)
    assert [len(x.data) for x in frames] == [f.MAX_PAYLOAD] * 4  # type: ignore[union-attr]
    assert client.send_window(sid) == INITIAL_WINDOW - 4 * f.MAX_PAYLOAD
    feed(client, WndInc(sid, 100_000))
    rest = sent_frames(client)
    assert [len(x.data) for x in rest] == [70_100 - 4 * f.MAX_PAYLOAD]  # type: ignore[union-attr]
    assert data_payload(frames + rest) == b"".join(chunks)


def test_whole_frames_go_across_queued_chunks() -> None:
    """Chunks queued behind the window go out in whole frames when window opens, the rest waiting for the next grant."""
    client, sid = client_with_stream()
    chunks = [payload(4 * f.MAX_PAYLOAD, n) for n in range(3)]
    for chunk in chunks:
        client.send_data(sid, chunk)
    first = data_payload(sent_frames(client))
    assert first == chunks[0]
    feed(client, WndInc(sid, 3 * f.MAX_PAYLOAD - 4 + 50))  # window: 3 frames + 50
    frames = sent_frames(client)
    assert [len(x.data) for x in frames] == [f.MAX_PAYLOAD] * 3  # type: ignore[union-attr]
    assert client.send_window(sid) == 50 and client.holding_subframe
    feed(client, WndInc(sid, 10 * f.MAX_PAYLOAD))
    rest = data_payload(sent_frames(client))
    assert first + data_payload(frames) + rest == b"".join(chunks)
    assert not client.holding_subframe


def test_fin_rides_on_the_last_frame_spanning_queued_writes() -> None:
    """A FIN queued behind several writes goes on the last frame of all, exactly once."""
    client, sid = client_with_stream()
    client.send_data(sid, payload(INITIAL_WINDOW))
    sent_frames(client)
    client.send_data(sid, payload(100, 1))
    client.send_data(sid, payload(30_000, 2), fin=True)
    feed(client, WndInc(sid, 1_000_000))
    frames = sent_frames(client)
    assert [(len(x.data), x.fin) for x in frames] == [  # type: ignore[union-attr]
        (f.MAX_PAYLOAD, False), (30_100 - f.MAX_PAYLOAD, True)
    ]
    assert data_payload(frames) == payload(100, 1) + payload(30_000, 2)
    assert client.state(sid) is StreamState.HALF_CLOSED_LOCAL
