"""
Adapter tests for :mod:`tcprelay.protocol` (MuxProtocol / MuxStream).

Almost everything runs on StringTransport and Clock: a MuxProtocol is faced
either with another MuxProtocol (``Pair``, pumped by hand) or with a bare
sans-IO Session / hand-made frames, so every byte on the wire can be checked.
Two tests at the end use real loopback TCP for half-close end to end.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
import pytest_twisted
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure

from tcprelay.mux.events import SessionEnded
from tcprelay.mux.frames import (
    MAX_PAYLOAD,
    Data,
    ErrorCode,
    FrameDecoder,
    GoAway,
    Rst,
    Syn,
    WndInc,
    encode,
    encode_data_header,
    encode_goaway,
    encode_rst,
    encode_syn,
    encode_wndinc,
)
from tcprelay.mux.session import INITIAL_WINDOW, Role, SessionClosedError, SessionConfig
from tcprelay.protocol import (
    CLOSE_TIMEOUT,
    PAUSE_PENDING,
    SUBFRAME_HOLD,
    MuxProtocol,
    MuxStream,
    StreamResetError,
)
from tests.relay_helpers import wait_for

WHOLE_WINDOW = INITIAL_WINDOW - INITIAL_WINDOW % MAX_PAYLOAD
"""What a stream sends of a larger write into a fresh window: whole frames."""

from tests.muxpeer import ScriptedPeer
from tests.adapter_helpers import (
    Acceptor,
    FakePushProducer,
    HalfCloseRecorder,
    Pair,
    PausingRecorder,
    Recorder,
    ReplyOnFin,
    connect,
    data_on,
    take_frames,
)


def payload(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that are not all alike, so reordering would show."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251))
    return (block * (n // len(block) + 1))[:n]


def ended_results(mux: MuxProtocol) -> list[SessionEnded]:
    results: list[SessionEnded] = []
    mux.ended.addCallback(lambda e: results.append(e) or e)
    return results


# ---------------------------------------------------------------------------
# Accepting and opening streams


def test_peer_opened_stream_reaches_acceptor() -> None:
    """A stream the peer opens is handed to the acceptor and its protocol runs on it."""
    acceptor = Acceptor()
    pair = Pair(server_acceptor=acceptor)
    pair.client.open_stream(Recorder(), stream_type=5)
    pair.pump()

    assert len(acceptor.streams) == 1
    stream = acceptor.streams[0]
    assert isinstance(stream, MuxStream)
    assert stream.stream_id == 3
    assert stream.stream_type == 5
    proto = acceptor.protocols[0]
    assert proto.made == 1
    assert proto.transport is stream
    assert proto.log[0] == ("made", stream)
    assert pair.server.streams == {3: stream}


def test_acceptor_returning_none_refuses_with_rst_refused_stream() -> None:
    """An acceptor that returns None gets the stream refused with RST(REFUSED_STREAM)."""
    seen: list[MuxStream] = []
    mux, tr = connect(Role.SERVER, Clock(), acceptor=lambda s: seen.append(s))
    take_frames(tr)

    mux.dataReceived(encode_syn(3))

    assert len(seen) == 1
    assert take_frames(tr) == [Rst(3, ErrorCode.REFUSED_STREAM)]
    assert mux.streams == {}
    assert mux.session.stream_count == 0


def test_refused_stream_is_reset_for_the_opener() -> None:
    """The opener of a refused stream sees connectionLost with StreamResetError(REFUSED_STREAM)."""
    pair = Pair(server_acceptor=lambda s: None)
    proto = Recorder()
    pair.client.open_stream(proto)
    pair.pump()

    assert proto.lost == 1
    assert proto.lost_reason is not None
    exc = proto.lost_reason.value
    assert isinstance(exc, StreamResetError)
    assert exc.code == ErrorCode.REFUSED_STREAM
    assert exc.remote is True
    assert pair.client.streams == {}


def test_no_acceptor_refuses_every_stream() -> None:
    """A MuxProtocol without an acceptor refuses every peer stream."""
    mux, tr = connect(Role.SERVER, Clock(), acceptor=None)
    take_frames(tr)
    mux.dataReceived(encode_syn(3) + encode_syn(5))
    assert take_frames(tr) == [
        Rst(3, ErrorCode.REFUSED_STREAM),
        Rst(5, ErrorCode.REFUSED_STREAM),
    ]


def test_open_stream_attaches_protocol_and_sends_syn() -> None:
    """open_stream sends a SYN and calls connectionMade with the MuxStream as transport."""
    mux, tr = connect(Role.CLIENT, Clock())
    take_frames(tr)
    proto = Recorder()

    stream = mux.open_stream(proto)

    assert isinstance(stream, MuxStream)
    assert proto.made == 1
    assert proto.transport is stream
    assert stream.protocol is proto
    assert mux.streams[stream.stream_id] is stream
    assert take_frames(tr) == [Syn(3)]
    typed = mux.open_stream(Recorder(), stream_type=0x1234)
    assert take_frames(tr) == [Syn(5, 0, 0x1234)]
    assert typed.stream_type == 0x1234


def test_write_from_connection_made_follows_the_syn() -> None:
    """Data a protocol writes in connectionMade goes out right after its SYN."""

    class Greeter(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.write(b"hello")  # type: ignore[union-attr]

    mux, tr = connect(Role.CLIENT, Clock())
    take_frames(tr)
    mux.open_stream(Greeter())
    assert take_frames(tr) == [Syn(3), Data(3, b"hello")]


def test_accepted_protocol_may_write_from_connection_made() -> None:
    """An accepted protocol writing in connectionMade reaches the opener."""

    class Banner(Recorder):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.write(b"banner")  # type: ignore[union-attr]

    pair = Pair(server_acceptor=Acceptor(Banner))
    client_proto = Recorder()
    pair.client.open_stream(client_proto)
    pair.pump()
    assert bytes(client_proto.received) == b"banner"


# ---------------------------------------------------------------------------
# Data, writeSequence, addresses


def test_data_flows_both_ways() -> None:
    """Bytes written on either end of a stream arrive, in order, at the other end."""
    acceptor = Acceptor()
    pair = Pair(server_acceptor=acceptor)
    client_proto = Recorder()
    client_stream = pair.client.open_stream(client_proto)
    client_stream.write(b"ping")
    client_stream.write(b" more")
    pair.pump()
    server_proto = acceptor.protocols[0]
    assert bytes(server_proto.received) == b"ping more"

    acceptor.streams[0].write(b"pong")
    pair.pump()
    assert bytes(client_proto.received) == b"pong"


def test_large_write_is_split_into_max_size_frames() -> None:
    """A write larger than one frame goes out as DATA frames of at most 16383 bytes, in order."""
    mux, tr = connect(Role.CLIENT, Clock())
    stream = mux.open_stream(Recorder())
    take_frames(tr)
    data = payload(40000)

    stream.write(data)

    frames = take_frames(tr)
    assert all(isinstance(fr, Data) for fr in frames)
    assert [len(fr.data) for fr in frames] == [MAX_PAYLOAD, MAX_PAYLOAD, 40000 - 2 * MAX_PAYLOAD]
    assert data_on(frames, stream.stream_id) == data


def test_write_sequence_sends_the_buffers_in_order() -> None:
    """writeSequence delivers the concatenation of its buffers."""
    acceptor = Acceptor()
    pair = Pair(server_acceptor=acceptor)
    stream = pair.client.open_stream(Recorder())
    stream.writeSequence([b"a", b"bc", b"", b"def"])
    pair.pump()
    assert bytes(acceptor.protocols[0].received) == b"abcdef"


def test_empty_write_sends_nothing() -> None:
    """Writing b'' puts no frame on the wire (an empty DATA frame is never sent)."""
    mux, tr = connect(Role.CLIENT, Clock())
    stream = mux.open_stream(Recorder())
    take_frames(tr)
    stream.write(b"")
    stream.writeSequence([])
    assert tr.value() == b""


def test_get_peer_and_host_default_to_the_session_transport() -> None:
    """getPeer/getHost of a stream are the session transport's unless overridden."""
    host = IPv4Address("TCP", "10.0.0.1", 8080)
    peer = IPv4Address("TCP", "10.0.0.2", 40000)
    tr = StringTransport(hostAddress=host, peerAddress=peer)
    mux, _ = connect(Role.SERVER, Clock(), transport=tr)
    stream = mux.open_stream(Recorder())

    assert stream.getPeer() == peer
    assert stream.getHost() == host

    visitor = IPv4Address("TCP", "203.0.113.9", 51000)
    public = IPv4Address("TCP", "198.51.100.1", 8081)
    stream.peer_address = visitor
    stream.host_address = public
    assert stream.getPeer() == visitor
    assert stream.getHost() == public


# ---------------------------------------------------------------------------
# Backpressure: stream -> peer (send window)


def _stream_on_clock() -> tuple[Clock, MuxProtocol, StringTransport, MuxStream]:
    """A client session on a fake clock with one stream open, its SYN taken."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    stream = mux.open_stream(Recorder())
    take_frames(tr)
    return clock, mux, tr, stream


def test_producer_paused_when_send_window_exhausted_and_resumed_on_wndinc() -> None:
    """A streaming producer pauses once more than PAUSE_PENDING bytes wait for the peer's window, and resumes only when WNDINC has drained them all; a window of less than one frame is held back for at most SUBFRAME_HOLD."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    a = mux.open_stream(Recorder())
    b = mux.open_stream(Recorder())
    take_frames(tr)
    pa, pb = FakePushProducer(), FakePushProducer()
    a.registerProducer(pa, True)
    b.registerProducer(pb, True)
    assert not pa.paused and not pb.paused
    whole = WHOLE_WINDOW  # 4 frames, 4 bytes short of the window
    data = payload(whole + PAUSE_PENDING + 1)

    # Whole frames up to the window; up to PAUSE_PENDING bytes may wait
    # without pausing the producer.
    a.write(data[:-1])
    frames = take_frames(tr)
    assert [len(fr.data) for fr in frames] == [MAX_PAYLOAD] * 4  # type: ignore[attr-defined]
    sent = data_on(frames, a.stream_id)
    assert sent == data[:whole]
    assert mux.session.pending(a.stream_id) == PAUSE_PENDING
    assert not pa.paused
    a.write(data[-1:])
    assert take_frames(tr) == []
    assert pa.paused and pa.pauses == 1
    assert not pb.paused and pb.pauses == 0

    # The other stream is unaffected.
    b.write(b"y" * 1000)
    assert take_frames(tr) == [Data(b.stream_id, b"y" * 1000)]
    assert not pb.paused

    # A grant that leaves less than a frame of window waits for more...
    mux.dataReceived(encode_wndinc(a.stream_id, 1000))
    assert take_frames(tr) == []
    clock.advance(SUBFRAME_HOLD / 2)
    assert take_frames(tr) == []
    # ... for at most SUBFRAME_HOLD, then goes, and the producer stays paused
    # even though less than PAUSE_PENDING now waits.
    clock.advance(SUBFRAME_HOLD / 2)
    more = data_on(take_frames(tr), a.stream_id)
    assert more == data[whole : INITIAL_WINDOW + 1000]
    assert 0 < mux.session.pending(a.stream_id) < PAUSE_PENDING
    assert pa.paused and pa.resumes == 0

    # Enough window: the rest goes and the producer resumes.
    mux.dataReceived(encode_wndinc(a.stream_id, 2 * INITIAL_WINDOW))
    rest = data_on(take_frames(tr), a.stream_id)
    assert sent + more + rest == data
    assert not pa.paused and pa.resumes == 1
    assert pb.pauses == 0 and pb.resumes == 0


def test_a_stream_that_keeps_sending_whole_frames_is_not_released_early() -> None:
    """The sub-frame rest goes only after SUBFRAME_HOLD without progress: a stream that sent whole frames meanwhile starts holding anew."""
    clock, mux, tr, a = _stream_on_clock()
    a.write(payload(200_000))
    assert len(data_on(take_frames(tr), a.stream_id)) == WHOLE_WINDOW  # 4 bytes held
    clock.advance(SUBFRAME_HOLD / 2)
    mux.dataReceived(encode_wndinc(a.stream_id, MAX_PAYLOAD))  # progress: one more frame
    assert [len(fr.data) for fr in take_frames(tr)] == [MAX_PAYLOAD]  # type: ignore[attr-defined]
    clock.advance(SUBFRAME_HOLD / 2)  # the first hold's timer: this stream's hold is younger
    assert take_frames(tr) == []
    clock.advance(SUBFRAME_HOLD)  # the next timer: held a whole SUBFRAME_HOLD without progress
    assert data_on(take_frames(tr), a.stream_id) == payload(200_000)[WHOLE_WINDOW + MAX_PAYLOAD:INITIAL_WINDOW + MAX_PAYLOAD]
    assert mux.session.send_window(a.stream_id) == 0
    assert not mux.session.holding_subframe
    clock.advance(10 * SUBFRAME_HOLD)
    assert take_frames(tr) == []


def test_the_hold_timer_ends_with_the_connection() -> None:
    """A session that loses its connection while a stream holds back a sub-frame remainder leaves no release timer behind."""
    clock, mux, tr, a = _stream_on_clock()
    a.write(payload(100_000))
    assert mux.session.holding_subframe
    held = [c for c in clock.getDelayedCalls() if c.func == mux._release_subframe]
    assert len(held) == 1 and held[0].active()
    mux.connectionLost(Failure(error.ConnectionDone()))
    assert not held[0].active()
    assert not [c for c in clock.getDelayedCalls() if c.func == mux._release_subframe]


def test_a_grant_of_a_frame_or_more_sends_whole_frames_at_once() -> None:
    """With more queued than the window, a WNDINC that makes a frame's worth of window sends whole frames at once, no sub-frame remainder and no timer wait."""
    clock, mux, tr, a = _stream_on_clock()
    data = payload(200_000)
    a.write(data)
    sent = data_on(take_frames(tr), a.stream_id)
    assert len(sent) == 4 * MAX_PAYLOAD
    mux.dataReceived(encode_wndinc(a.stream_id, MAX_PAYLOAD))  # 4 + 16383 of window
    one = take_frames(tr)
    assert [len(fr.data) for fr in one] == [MAX_PAYLOAD]  # type: ignore[attr-defined]
    mux.dataReceived(encode_wndinc(a.stream_id, 2 * MAX_PAYLOAD + 100))  # 4 + 32866
    two = take_frames(tr)
    assert [len(fr.data) for fr in two] == [MAX_PAYLOAD] * 2  # type: ignore[attr-defined]
    assert mux.session.send_window(a.stream_id) == 104
    # the tail of the data goes as a sub-frame once the window covers it
    mux.dataReceived(encode_wndinc(a.stream_id, 200_000))
    rest = data_on(take_frames(tr), a.stream_id)
    assert len(rest) == 200_000 - 7 * MAX_PAYLOAD
    assert sent + data_on(one, a.stream_id) + data_on(two, a.stream_id) + rest == data
    assert mux.session.pending(a.stream_id) == 0
    clock.advance(SUBFRAME_HOLD)  # the hold's timer, if any, has nothing to add
    assert take_frames(tr) == []


def test_send_window_backpressure_between_two_mux_protocols() -> None:
    """Between two MuxProtocols a paused producer resumes once the peer consumed and granted window, with every byte delivered in order."""
    acceptor = Acceptor()
    pair = Pair(server_acceptor=acceptor)
    stream = pair.client.open_stream(Recorder())
    producer = FakePushProducer()
    stream.registerProducer(producer, True)
    data = payload(200000)

    stream.write(data)
    assert producer.paused
    pair.pump()

    assert bytes(acceptor.protocols[0].received) == data
    assert not producer.paused
    assert producer.resumes == 1


def test_producer_registered_on_blocked_stream_starts_paused() -> None:
    """A producer registered while more than PAUSE_PENDING bytes wait for window is paused at once; with less waiting it is not."""
    mux, tr = connect(Role.CLIENT, Clock())
    stream = mux.open_stream(Recorder())
    stream.write(payload(INITIAL_WINDOW + PAUSE_PENDING + 1))
    producer = FakePushProducer()
    stream.registerProducer(producer, True)
    assert producer.paused

    other = mux.open_stream(Recorder())
    other.write(payload(INITIAL_WINDOW + 1))
    relaxed = FakePushProducer()
    other.registerProducer(relaxed, True)
    assert not relaxed.paused


def test_pull_producer_is_asked_for_more_while_window_allows() -> None:
    """A non-streaming producer is resumed through the clock while the stream can send, and again after WNDINC."""
    clock, mux, tr, stream = _stream_on_clock()
    chunk = payload(16384)

    class Pull:
        calls = 0

        def resumeProducing(self) -> None:
            self.calls += 1
            stream.write(chunk)

        def stopProducing(self) -> None:
            pass

    pull = Pull()
    stream.registerProducer(pull, False)
    assert pull.calls == 0
    for _ in range(10):
        clock.advance(0)
    # Four chunks fill the window exactly; the fifth has to wait, and then
    # nothing more is asked for.
    assert pull.calls == 5
    assert len(data_on(take_frames(tr), stream.stream_id)) == INITIAL_WINDOW
    mux.dataReceived(encode_wndinc(stream.stream_id, INITIAL_WINDOW))
    for _ in range(10):
        clock.advance(0)
    assert pull.calls == 9
    stream.unregisterProducer()
    clock.advance(0)
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# Backpressure: peer -> protocol (receive window)


def _server_with_raw_client(acceptor: Acceptor) -> tuple[MuxProtocol, StringTransport, ScriptedPeer]:
    mux, tr = connect(Role.SERVER, Clock(), acceptor=acceptor)
    return mux, tr, ScriptedPeer.facing(mux, tr)


def test_paused_protocol_holds_data_and_withholds_wndinc() -> None:
    """While a stream's protocol is paused, arriving data is held and no WNDINC goes out, so the peer stops at 64 KiB."""
    acceptor = Acceptor(PausingRecorder)
    mux, tr, peer = _server_with_raw_client(acceptor)
    take_frames(tr)
    data = payload(100000)
    sid = peer.session.open_stream()
    peer.session.send_data(sid, data)

    mux.dataReceived(peer.session.data_to_send())

    proto = acceptor.protocols[0]
    assert proto.received == b""
    frames = take_frames(tr)
    assert not any(isinstance(fr, WndInc) for fr in frames)
    # the peer sent whole frames up to its window (the rest of it is less
    # than a frame and waits for a WNDINC)
    assert peer.session.send_window(sid) == INITIAL_WINDOW - WHOLE_WINDOW
    assert peer.session.pending(sid) == 100000 - WHOLE_WINDOW

    acceptor.streams[0].resumeProducing()

    assert bytes(proto.received) == data[:WHOLE_WINDOW]
    granted = sum(fr.increment for fr in take_frames(tr) if isinstance(fr, WndInc) and fr.stream_id == sid)
    assert granted >= INITIAL_WINDOW // 2
    peer.session.receive_data(encode_wndinc(sid, granted))
    peer.exchange()
    assert bytes(proto.received) == data


def test_resume_delivers_held_data_in_order_then_fin() -> None:
    """resumeProducing delivers held chunks in arrival order, and a FIN that came meanwhile only after them."""
    acceptor = Acceptor(PausingRecorder)
    mux, tr, peer = _server_with_raw_client(acceptor)
    sid = peer.session.open_stream()
    for part in (b"one ", b"two ", b"three"):
        peer.session.send_data(sid, part)
        peer.exchange()
    peer.session.end_stream(sid)
    peer.exchange()

    proto = acceptor.protocols[0]
    assert [kind for kind, _ in proto.log] == ["made"]

    acceptor.streams[0].resumeProducing()

    assert proto.log[1:] == [
        ("data", b"one "),
        ("data", b"two "),
        ("data", b"three"),
        ("read_lost", None),
    ]


def test_pausing_again_during_delivery_keeps_the_rest_held() -> None:
    """A protocol that pauses again while held data is delivered gets no more until the next resume."""

    class OneAtATime(PausingRecorder):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            self.transport.pauseProducing()  # type: ignore[union-attr]

    acceptor = Acceptor(OneAtATime)
    mux, tr, peer = _server_with_raw_client(acceptor)
    sid = peer.session.open_stream()
    for part in (b"a", b"b", b"c"):
        peer.session.send_data(sid, part)
        peer.exchange()
    proto, stream = acceptor.protocols[0], acceptor.streams[0]

    stream.resumeProducing()
    assert bytes(proto.received) == b"a"
    stream.resumeProducing()
    assert bytes(proto.received) == b"ab"
    stream.resumeProducing()
    assert bytes(proto.received) == b"abc"


def test_peer_exceeding_the_window_is_a_flow_control_error() -> None:
    """A peer that sends more than the granted window gets GOAWAY(FLOW_CONTROL_ERROR)."""
    acceptor = Acceptor(PausingRecorder)
    mux, tr = connect(Role.SERVER, Clock(), acceptor=acceptor)
    take_frames(tr)
    chunk = b"z" * MAX_PAYLOAD
    wire = encode_syn(3)
    sent = 0
    while sent + MAX_PAYLOAD <= INITIAL_WINDOW:
        wire += encode(Data(3, chunk))
        sent += MAX_PAYLOAD
    wire += encode(Data(3, b"z" * (INITIAL_WINDOW - sent + 1)))

    mux.dataReceived(wire)

    goaways = [fr for fr in take_frames(tr) if isinstance(fr, GoAway)]
    assert [g.error_code for g in goaways] == [ErrorCode.FLOW_CONTROL_ERROR]
    assert tr.disconnecting


# ---------------------------------------------------------------------------
# Session socket full / one slow stream


def test_mux_is_the_streaming_producer_of_its_socket() -> None:
    """connectionMade registers the MuxProtocol as its transport's streaming producer."""
    mux, tr = connect(Role.CLIENT, Clock())
    assert tr.producer is mux
    assert tr.streaming is True


def test_full_socket_pauses_every_stream_producer() -> None:
    """When Twisted pauses the MuxProtocol every stream's producer pauses, and they resume with it (unless window-blocked)."""
    mux, tr = connect(Role.CLIENT, Clock())
    streams = [mux.open_stream(Recorder()) for _ in range(3)]
    producers = [FakePushProducer() for _ in streams]
    for stream, producer in zip(streams, producers):
        stream.registerProducer(producer, True)
    # The third stream is also out of send window.
    streams[2].write(payload(INITIAL_WINDOW + PAUSE_PENDING + 10))
    assert [p.paused for p in producers] == [False, False, True]

    tr.producer.pauseProducing()  # what the reactor does on a full buffer

    assert [p.paused for p in producers] == [True, True, True]
    late = mux.open_stream(Recorder())
    late_producer = FakePushProducer()
    late.registerProducer(late_producer, True)
    assert late_producer.paused

    tr.producer.resumeProducing()

    assert [p.paused for p in producers] == [False, False, True]
    assert not late_producer.paused
    assert [p.pauses for p in producers] == [1, 1, 1]


def test_slow_stream_does_not_stall_others() -> None:
    """A stream whose protocol stopped reading holds back only its own data; another stream keeps flowing."""
    acceptor = Acceptor(PausingRecorder, Recorder)
    pair = Pair(server_acceptor=acceptor)
    slow = pair.client.open_stream(Recorder())
    fast = pair.client.open_stream(Recorder())
    slow_data, fast_data = payload(150000, 1), payload(150000, 2)

    slow.write(slow_data)
    fast.write(fast_data)
    pair.pump()

    slow_proto, fast_proto = acceptor.protocols
    assert bytes(fast_proto.received) == fast_data
    assert slow_proto.received == b""
    assert pair.client.session.pending(slow.stream_id) == 150000 - WHOLE_WINDOW
    assert not pair.client.paused and not pair.server.paused

    # More on the fast stream still flows while the slow one is held.
    fast.write(b"still going")
    pair.pump()
    assert bytes(fast_proto.received).endswith(b"still going")

    acceptor.streams[0].resumeProducing()
    pair.pump()
    assert bytes(slow_proto.received) == slow_data


# ---------------------------------------------------------------------------
# Half-close, close, reset


def test_lose_write_connection_sends_fin_and_reply_still_arrives() -> None:
    """loseWriteConnection sends FIN and the peer's reply to it is still delivered."""
    acceptor = Acceptor(ReplyOnFin)
    pair = Pair(server_acceptor=acceptor)
    client_proto = HalfCloseRecorder()
    stream = pair.client.open_stream(client_proto)
    stream.write(b"question")
    pair.pump()

    stream.loseWriteConnection()
    wire = pair.ct.value()
    assert FrameDecoder().feed(wire) == [Data(stream.stream_id, b"", fin=True)]
    pair.pump()

    server_proto = acceptor.protocols[0]
    assert bytes(server_proto.received) == b"question"
    assert server_proto.read_lost == 1
    assert bytes(client_proto.received) == b"re:question"
    kinds = [kind for kind, _ in client_proto.log]
    assert kinds == ["made", "data", "read_lost", "lost"]
    assert client_proto.lost_reason is not None
    assert client_proto.lost_reason.check(error.ConnectionDone)
    assert pair.client.streams == {} and pair.server.streams == {}


def test_peer_fin_is_delivered_as_read_connection_lost() -> None:
    """A half-closeable protocol gets readConnectionLost on the peer's FIN and can still write."""
    acceptor = Acceptor(HalfCloseRecorder)
    pair = Pair(server_acceptor=acceptor)
    client_proto = HalfCloseRecorder()
    stream = pair.client.open_stream(client_proto)
    stream.write(b"data")
    stream.loseWriteConnection()
    pair.pump()

    server_proto, server_stream = acceptor.protocols[0], acceptor.streams[0]
    assert [kind for kind, _ in server_proto.log] == ["made", "data", "read_lost"]
    assert server_proto.lost == 0
    assert not server_stream.disconnected

    server_stream.write(b"late reply")
    pair.pump()
    assert bytes(client_proto.received) == b"late reply"
    server_stream.loseWriteConnection()
    pair.pump()
    assert server_proto.lost_reason is not None
    assert server_proto.lost_reason.check(error.ConnectionDone)
    assert client_proto.lost_reason is not None
    assert client_proto.lost_reason.check(error.ConnectionDone)


def test_peer_fin_closes_stream_of_protocol_without_half_close() -> None:
    """A protocol without IHalfCloseableProtocol has its stream closed (ConnectionDone) when the peer sends FIN."""
    acceptor = Acceptor(Recorder)
    pair = Pair(server_acceptor=acceptor)
    client_proto = HalfCloseRecorder()
    stream = pair.client.open_stream(client_proto)
    stream.write(b"bye")
    stream.loseWriteConnection()
    pair.pump()

    server_proto = acceptor.protocols[0]
    assert [kind for kind, _ in server_proto.log] == ["made", "data", "lost"]
    assert server_proto.lost_reason is not None
    assert server_proto.lost_reason.check(error.ConnectionDone)
    # The server's close is a FIN the client sees as end of its reading side.
    assert client_proto.read_lost == 1
    assert client_proto.lost_reason is not None
    assert client_proto.lost_reason.check(error.ConnectionDone)
    assert pair.client.streams == {} and pair.server.streams == {}


def test_lose_connection_is_a_clean_close() -> None:
    """loseConnection sends FIN and ends the local protocol with ConnectionDone at once (Go-style close)."""
    acceptor = Acceptor(HalfCloseRecorder)
    pair = Pair(server_acceptor=acceptor)
    client_proto = Recorder()
    stream = pair.client.open_stream(client_proto)
    stream.write(b"x")
    take_frames(pair.ct)
    pair.server.dataReceived(encode_syn(3) + encode(Data(3, b"x")))

    stream.loseConnection()

    assert take_frames(pair.ct) == [Data(3, b"", fin=True)]
    assert client_proto.lost_reason is not None
    assert client_proto.lost_reason.check(error.ConnectionDone)
    assert stream.disconnected
    assert stream.protocol is None  # no stream <-> protocol cycle left
    stream.write(b"ignored")
    assert pair.ct.value() == b""


def test_peer_rst_ends_protocol_with_stream_reset_error() -> None:
    """A peer RST ends the stream's protocol with StreamResetError carrying the peer's code."""
    mux, tr = connect(Role.CLIENT, Clock())
    proto = Recorder()
    stream = mux.open_stream(proto)
    producer = FakePushProducer()
    stream.registerProducer(producer, True)

    mux.dataReceived(encode_rst(stream.stream_id, ErrorCode.INTERNAL_ERROR))

    assert proto.lost == 1
    assert proto.lost_reason is not None
    exc = proto.lost_reason.value
    assert isinstance(exc, StreamResetError)
    assert isinstance(exc, error.ConnectionLost)
    assert exc.code == ErrorCode.INTERNAL_ERROR
    assert exc.remote is True
    assert "INTERNAL_ERROR" in str(exc)
    assert producer.stopped
    assert mux.streams == {}
    assert stream.protocol is None


def test_abort_connection_sends_rst_cancel() -> None:
    """abortConnection sends RST(CANCEL); both ends see StreamResetError(CANCEL)."""
    acceptor = Acceptor()
    pair = Pair(server_acceptor=acceptor)
    client_proto = Recorder()
    stream = pair.client.open_stream(client_proto)
    pair.pump()
    stream.write(payload(INITIAL_WINDOW + 100))  # some of it still queued
    take_frames(pair.ct)

    stream.abortConnection()

    assert take_frames(pair.ct) == [Rst(stream.stream_id, ErrorCode.CANCEL)]
    assert client_proto.lost_reason is not None
    exc = client_proto.lost_reason.value
    assert isinstance(exc, StreamResetError)
    assert exc.code == ErrorCode.CANCEL and exc.remote is False
    assert pair.client.session.pending(stream.stream_id) == 0

    pair.server.dataReceived(encode_rst(stream.stream_id, ErrorCode.CANCEL))
    server_proto = acceptor.protocols[0]
    assert server_proto.lost_reason is not None
    exc = server_proto.lost_reason.value
    assert isinstance(exc, StreamResetError)
    assert exc.code == ErrorCode.CANCEL and exc.remote is True


def test_data_for_a_closed_stream_is_answered_with_rst_and_does_not_reach_protocol() -> None:
    """Data arriving after a Go-style close is answered with RST(STREAM_CLOSED) and not delivered."""
    mux, tr = connect(Role.CLIENT, Clock())
    proto = Recorder()
    stream = mux.open_stream(proto)
    stream.loseConnection()
    take_frames(tr)

    mux.dataReceived(encode(Data(stream.stream_id, b"late")))

    assert take_frames(tr) == [Rst(stream.stream_id, ErrorCode.STREAM_CLOSED)]
    assert proto.received == b""
    assert proto.lost == 1


def test_stream_protocol_raising_resets_only_its_stream() -> None:
    """A stream protocol raising from dataReceived gets its stream reset with RST(INTERNAL_ERROR); the session and other streams carry on."""

    class Broken(Recorder):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            raise ValueError("bug in the application")

    acceptor = Acceptor(Broken, Recorder)
    mux, tr = connect(Role.SERVER, Clock(), acceptor=acceptor)
    mux.dataReceived(encode_syn(3) + encode_syn(5))
    take_frames(tr)

    mux.dataReceived(encode(Data(3, b"boom")) + encode(Data(5, b"fine")))

    assert take_frames(tr) == [Rst(3, ErrorCode.INTERNAL_ERROR)]
    broken, healthy = acceptor.protocols
    assert broken.lost_reason is not None
    exc = broken.lost_reason.value
    assert isinstance(exc, StreamResetError)
    assert exc.code == ErrorCode.INTERNAL_ERROR and exc.remote is False
    assert bytes(healthy.received) == b"fine" and healthy.lost == 0
    assert not mux.session.ended and not tr.disconnecting
    mux.dataReceived(encode(Data(5, b" still")))
    assert bytes(healthy.received) == b"fine still"


def test_acceptor_raising_resets_only_that_stream() -> None:
    """An acceptor that raises gets that stream reset with RST(INTERNAL_ERROR) and the session carries on."""
    calls: list[int] = []

    def acceptor(stream: MuxStream) -> Recorder:
        calls.append(stream.stream_id)
        if stream.stream_id == 3:
            raise RuntimeError("acceptor bug")
        return Recorder()

    mux, tr = connect(Role.SERVER, Clock(), acceptor=acceptor)
    take_frames(tr)
    mux.dataReceived(encode_syn(3) + encode_syn(5))

    assert calls == [3, 5]
    assert take_frames(tr) == [Rst(3, ErrorCode.INTERNAL_ERROR)]
    assert list(mux.streams) == [5]
    assert not mux.session.ended


# ---------------------------------------------------------------------------
# Heartbeats


HEARTBEAT = SessionConfig(heartbeat=True, heartbeat_interval=3.0, heartbeat_tolerance=13.0)


def test_heartbeat_timeout_closes_session() -> None:
    """With no heartbeat echo, after the tolerance the session sends GOAWAY, ends every stream, closes the transport and fires ended."""
    clock = Clock()
    tr = StringTransportWithDisconnection()
    mux, _ = connect(Role.CLIENT, clock, HEARTBEAT, transport=tr)
    proto = Recorder()
    mux.open_stream(proto)
    ended = ended_results(mux)
    frames = take_frames(tr)
    hb_syn = frames[0]
    assert isinstance(hb_syn, Syn) and hb_syn.stream_type == 0xFFFFFEFF

    clock.advance(3)
    assert [fr for fr in take_frames(tr) if isinstance(fr, Data)] == [
        Data(hb_syn.stream_id, b"\x00\x00\x00\x01")
    ]
    for _ in range(12):  # up to t=15: still within tolerance
        clock.advance(1)
    assert not ended and proto.lost == 0 and tr.connected

    clock.advance(1)  # t=16: 13 s without an echo

    goaways = [fr for fr in take_frames(tr) if isinstance(fr, GoAway)]
    assert len(goaways) == 1
    assert proto.lost == 1
    assert proto.lost_reason is not None
    assert proto.lost_reason.check(StreamResetError)
    assert not tr.connected  # loseConnection was called
    assert len(ended) == 1 and "heartbeat" in ended[0].reason
    assert mux.session.heartbeat_timed_out
    assert clock.getDelayedCalls() == []


def test_heartbeat_timeout_waits_for_transport_then_aborts() -> None:
    """After a heartbeat timeout ended fires only when the transport is gone, and a transport that never closes is aborted after CLOSE_TIMEOUT."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock, HEARTBEAT)
    ended = ended_results(mux)
    clock.advance(3)
    for _ in range(13):
        clock.advance(1)
    assert tr.disconnecting and not tr.disconnected
    assert any(isinstance(fr, GoAway) for fr in take_frames(tr))
    assert ended == []

    clock.advance(CLOSE_TIMEOUT)
    assert tr.disconnected  # abortConnection
    mux.connectionLost(Failure(error.ConnectionAborted()))
    assert len(ended) == 1
    assert clock.getDelayedCalls() == []


def test_heartbeat_echoes_keep_session_alive() -> None:
    """Two MuxProtocols echoing each other's heartbeats stay up past 30 s of clock time."""
    clock = Clock()
    pair = Pair(clock, HEARTBEAT, server_acceptor=Acceptor())
    rtts: list[float] = []
    pair.client.heartbeat_acknowledged = rtts.append  # type: ignore[method-assign]
    client_ended, server_ended = ended_results(pair.client), ended_results(pair.server)
    stream = pair.client.open_stream(Recorder())
    pair.pump()

    for _ in range(40):
        clock.advance(1)
        pair.pump()

    assert client_ended == [] and server_ended == []
    assert not pair.client.session.ended and not pair.server.session.ended
    assert len(rtts) >= 10 and set(rtts) == {0.0}
    stream.write(b"alive")
    pair.pump()
    assert pair.server.streams[stream.stream_id].protocol.received == b"alive"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# Transport lost, protocol errors


def test_transport_lost_ends_all_streams_and_session() -> None:
    """connectionLost on the MuxProtocol ends every stream protocol, fires ended and leaves no delayed call."""
    clock = Clock()
    acceptor = Acceptor()
    mux, tr = connect(Role.SERVER, clock, HEARTBEAT, acceptor=acceptor)
    local_proto = HalfCloseRecorder()
    local = mux.open_stream(local_proto)
    producer = FakePushProducer()
    local.registerProducer(producer, True)
    mux.dataReceived(encode_syn(3))
    remote_proto = acceptor.protocols[0]
    ended = ended_results(mux)
    assert clock.getDelayedCalls() != []

    mux.connectionLost(Failure(error.ConnectionLost("gone")))

    for proto in (local_proto, remote_proto):
        assert proto.lost == 1
        assert proto.lost_reason is not None
        assert proto.lost_reason.check(StreamResetError)
    assert producer.stopped
    assert len(ended) == 1
    assert ended[0].error_code is None and ended[0].remote is True
    assert mux.streams == {}
    assert clock.getDelayedCalls() == []
    tr.clear()
    local.write(b"after")  # no exception, nothing written
    assert tr.value() == b""


def test_transport_lost_after_close_cancels_abort_timer() -> None:
    """A local close() sends GOAWAY and loseConnection; the transport going away then cancels the abort timer."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    proto = Recorder()
    mux.open_stream(proto)
    take_frames(tr)
    ended = ended_results(mux)

    mux.close()

    assert take_frames(tr) == [GoAway(0, ErrorCode.NO_ERROR)]
    assert tr.disconnecting
    assert proto.lost == 1
    assert len(clock.getDelayedCalls()) == 1
    mux.connectionLost(Failure(error.ConnectionDone()))
    assert len(ended) == 1
    assert clock.getDelayedCalls() == []


def test_garbage_closes_session_with_goaway_protocol_error() -> None:
    """Garbage bytes end the session with GOAWAY(PROTOCOL_ERROR), without raising."""
    clock = Clock()
    acceptor = Acceptor()
    mux, tr = connect(Role.SERVER, clock, acceptor=acceptor)
    mux.dataReceived(encode_syn(3))
    take_frames(tr)
    ended = ended_results(mux)

    mux.dataReceived(b"\xff" * 16)  # unknown frame type 31

    goaways = [fr for fr in take_frames(tr) if isinstance(fr, GoAway)]
    assert len(goaways) == 1
    assert goaways[0].error_code == ErrorCode.PROTOCOL_ERROR
    assert goaways[0].last_stream_id == 3
    assert tr.disconnecting
    proto = acceptor.protocols[0]
    assert proto.lost_reason is not None
    assert proto.lost_reason.check(StreamResetError)
    assert proto.lost_reason.value.code == ErrorCode.PROTOCOL_ERROR

    mux.dataReceived(b"\x00" * 100)  # later input is ignored, still no exception
    assert tr.value() == b""

    mux.connectionLost(Failure(error.ConnectionDone()))
    assert len(ended) == 1 and ended[0].error_code == ErrorCode.PROTOCOL_ERROR
    assert clock.getDelayedCalls() == []


def test_frame_for_unopened_stream_is_protocol_error() -> None:
    """DATA for a stream id the peer never opened ends the session with GOAWAY(PROTOCOL_ERROR)."""
    mux, tr = connect(Role.SERVER, Clock(), acceptor=Acceptor())
    take_frames(tr)
    mux.dataReceived(encode_data_header(9, 3) + b"abc")
    goaways = [fr for fr in take_frames(tr) if isinstance(fr, GoAway)]
    assert [g.error_code for g in goaways] == [ErrorCode.PROTOCOL_ERROR]
    assert tr.disconnecting


def test_peer_goaway_ends_streams_it_never_saw() -> None:
    """A peer GOAWAY resets our streams above its last id with REFUSED_STREAM and forbids new ones."""
    mux, tr = connect(Role.CLIENT, Clock())
    seen_proto, unseen_proto = Recorder(), Recorder()
    mux.open_stream(seen_proto)
    mux.open_stream(unseen_proto)
    received: list[object] = []
    mux.goaway_received = received.append  # type: ignore[method-assign]

    mux.dataReceived(encode_goaway(3, ErrorCode.NO_ERROR))

    assert len(received) == 1
    assert seen_proto.lost == 0
    assert unseen_proto.lost_reason is not None
    assert unseen_proto.lost_reason.value.code == ErrorCode.REFUSED_STREAM
    with pytest.raises(SessionClosedError):
        mux.open_stream(Recorder())


def test_go_style_goaway_ends_session_and_closes_transport() -> None:
    """A Go v1 GOAWAY (length promising more than its body) ends the session, resets every stream and closes the transport."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    proto = Recorder()
    mux.open_stream(proto)
    take_frames(tr)
    ended = ended_results(mux)

    # length 16, but only the 8-byte body follows (upstream's bug).
    mux.dataReceived(struct.pack(">HBBIII", 16, 0, 6, 0, 0, ErrorCode.NO_ERROR))

    assert proto.lost == 1
    assert proto.lost_reason is not None
    assert proto.lost_reason.check(StreamResetError)
    assert tr.disconnecting
    mux.connectionLost(Failure(error.ConnectionDone()))
    assert len(ended) == 1 and ended[0].remote is True
    assert clock.getDelayedCalls() == []


def test_open_stream_after_session_end_raises() -> None:
    """open_stream on an ended session raises SessionClosedError and runs nothing."""
    mux, tr = connect(Role.CLIENT, Clock())
    mux.connectionLost(Failure(error.ConnectionDone()))
    proto = Recorder()
    with pytest.raises(SessionClosedError):
        mux.open_stream(proto)
    assert proto.made == 0
    assert mux.streams == {}


def test_stream_protocol_closing_the_session_from_data_received() -> None:
    """A stream protocol may close the whole session from dataReceived; everything ends once, without raising."""
    clock = Clock()
    tr = StringTransportWithDisconnection()
    holder: list[MuxProtocol] = []

    class Closer(Recorder):
        def dataReceived(self, data: bytes) -> None:
            super().dataReceived(data)
            holder[0].close(ErrorCode.NO_ERROR, "done")

    acceptor = Acceptor(Closer, Recorder)
    mux, _ = connect(Role.SERVER, clock, acceptor=acceptor, transport=tr)
    holder.append(mux)
    ended = ended_results(mux)
    lost_when_ended: list[list[int]] = []
    mux.ended.addCallback(
        lambda e: lost_when_ended.append([p.lost for p in acceptor.protocols]) or e
    )
    mux.dataReceived(encode_syn(3) + encode_syn(5) + encode(Data(3, b"quit")))

    assert [p.lost for p in acceptor.protocols] == [1, 1]
    assert lost_when_ended == [[1, 1]]  # ended fires after every stream ended
    assert not tr.connected
    assert len(ended) == 1
    assert clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# Real loopback TCP: half-close end to end


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, reactor: object, acceptor: Acceptor) -> None:
        self.reactor = reactor
        self.acceptor = acceptor
        self.muxes: list[MuxProtocol] = []
        self.connected: Deferred[MuxProtocol] = Deferred()

    def buildProtocol(self, addr: object) -> MuxProtocol:
        mux = MuxProtocol(Role.SERVER, self.reactor, acceptor=self.acceptor)  # type: ignore[arg-type]
        self.muxes.append(mux)
        if not self.connected.called:
            self.connected.callback(mux)
        return mux


class _WaitingHalfClose(HalfCloseRecorder):
    """A HalfCloseRecorder whose ``done`` fires (with None) on connectionLost."""

    def __init__(self) -> None:
        super().__init__()
        self.done: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        super().connectionLost(reason)
        self.done.callback(None)


def _kinds(proto: Recorder) -> list[str]:
    """The protocol's event kinds, runs of "data" folded into one (TCP may split reads)."""
    kinds: list[str] = []
    for kind, _ in proto.log:
        if not (kind == "data" and kinds and kinds[-1] == "data"):
            kinds.append(kind)
    return kinds


async def _loopback(reactor: object, acceptor: Acceptor) -> tuple[object, _ServerFactory, MuxProtocol]:
    factory = _ServerFactory(reactor, acceptor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client = MuxProtocol(Role.CLIENT, reactor)  # type: ignore[arg-type]
    try:
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client
        ).addTimeout(5, reactor)
    except BaseException:
        await port.stopListening()
        raise
    return port, factory, client


async def _teardown(reactor: object, port: object, factory: _ServerFactory, client: MuxProtocol) -> None:
    try:
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.ended.addTimeout(5, reactor)
        for mux in factory.muxes:
            await mux.ended.addTimeout(5, reactor)
    finally:
        await port.stopListening()  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_loopback_half_close_reply_arrives(reactor) -> None:
    """Over real TCP, a stream half-closed by the client still gets the server's reply, then ends cleanly."""
    acceptor = Acceptor(ReplyOnFin)
    port, factory, client = await _loopback(reactor, acceptor)
    try:
        proto = _WaitingHalfClose()
        stream = client.open_stream(proto)
        stream.write(b"hello ")
        stream.write(b"relay")
        stream.loseWriteConnection()

        await proto.done.addTimeout(5, reactor)

        assert proto.lost_reason is not None
        assert proto.lost_reason.check(error.ConnectionDone)
        assert bytes(proto.received) == b"re:hello relay"
        assert _kinds(proto) == ["made", "data", "read_lost", "lost"]
        assert bytes(acceptor.protocols[0].received) == b"hello relay"
        assert acceptor.protocols[0].read_lost == 1
        assert client.streams == {}
    finally:
        await _teardown(reactor, port, factory, client)
    assert client.end_event is not None


@pytest_twisted.ensureDeferred
async def test_loopback_bulk_transfer_with_half_close(reactor) -> None:
    """Over real TCP, 1 MiB sent then half-closed arrives whole (window updates flowing) and the digest reply comes back."""
    acceptor = Acceptor(lambda: ReplyOnFin(lambda b: hashlib.sha256(b).hexdigest().encode()))
    port, factory, client = await _loopback(reactor, acceptor)
    try:
        data = payload(1 << 20, 3)
        proto = _WaitingHalfClose()
        stream = client.open_stream(proto)
        producer = FakePushProducer()
        stream.registerProducer(producer, True)
        stream.write(data)
        assert producer.paused  # far more than one window
        stream.loseWriteConnection()

        await proto.done.addTimeout(5, reactor)

        assert proto.lost_reason is not None
        assert proto.lost_reason.check(error.ConnectionDone)
        assert _kinds(proto) == ["made", "data", "read_lost", "lost"]
        assert bytes(proto.received) == hashlib.sha256(data).hexdigest().encode()
        assert proto.read_lost == 1
        assert producer.resumes >= 1
        assert bytes(acceptor.protocols[0].received) == data
    finally:
        await _teardown(reactor, port, factory, client)


@pytest_twisted.ensureDeferred
async def test_loopback_read_size_grows_with_open_streams(reactor) -> None:
    """A session socket reads 64 KiB per open stream, never less than 64 KiB (a 0-byte read would be EOF) nor more than 1 MiB."""
    acceptor = Acceptor(Recorder)
    port, factory, client = await _loopback(reactor, acceptor)

    async def arrived(n: int) -> None:
        await wait_for(
            reactor,
            lambda: len(acceptor.protocols) >= n and bool(acceptor.protocols[n - 1].received),
            what=f"stream {n}'s byte",
        )

    try:
        server = await factory.connected.addTimeout(5, reactor)
        assert server.transport.bufferSize == 65536  # type: ignore[union-attr]
        streams = []
        sizes = []
        for n in range(1, 19):
            streams.append(client.open_stream(Recorder()))
            streams[-1].write(b"x")
            await arrived(n)
            sizes.append(server.transport.bufferSize)  # type: ignore[union-attr]
        assert sizes == [65536 * n for n in range(1, 17)] + [1 << 20, 1 << 20]
        for stream in streams:
            stream.abortConnection()
        # the read with the last RST leaves no stream open: 64 KiB, not 0
        await wait_for(reactor, lambda: not server.streams, what="the streams to close")
        assert server.transport.bufferSize == 65536  # type: ignore[union-attr]
        client.open_stream(Recorder()).write(b"y")
        await arrived(19)
        assert bytes(acceptor.protocols[18].received) == b"y"
    finally:
        await _teardown(reactor, port, factory, client)


def test_held_fin_waits_for_company_or_fin_hold() -> None:
    """A stream with fin_hold: its FIN waits up to that long, leaves sooner with any other write (in the same write, first, and no timer is left), and a session that ends cancels the wait; a stream without sends its FIN at once."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    held = mux.open_stream(Recorder())
    held.fin_hold = 0.001
    plain = mux.open_stream(Recorder())
    take_frames(tr)

    held.loseWriteConnection()
    assert tr.value() == b""
    clock.advance(0.001)
    assert take_frames(tr) == [Data(held.stream_id, b"", fin=True)]

    again = mux.open_stream(Recorder())
    again.fin_hold = 0.001
    take_frames(tr)
    again.loseConnection()
    assert tr.value() == b""
    plain.write(b"x")  # any other write takes the FIN along, first
    assert take_frames(tr) == [Data(again.stream_id, b"", fin=True), Data(plain.stream_id, b"x")]
    assert clock.getDelayedCalls() == []  # the flush that took it ended the wait

    plain.loseWriteConnection()  # no fin_hold: at once
    assert take_frames(tr) == [Data(plain.stream_id, b"", fin=True)]

    last = mux.open_stream(Recorder())
    last.fin_hold = 0.001
    last.loseWriteConnection()
    mux.connectionLost(Failure(error.ConnectionDone()))
    assert clock.getDelayedCalls() == []


def test_flush_within_keeps_the_earliest_deadline() -> None:
    """flush_within: a shorter wait brings a pending flush forward, a longer one leaves it; one timer at a time."""
    clock = Clock()
    mux, tr = connect(Role.CLIENT, clock)
    take_frames(tr)
    stream = mux.open_stream(Recorder(), flush=False)  # a SYN that waits
    mux.flush_within(0.01)
    mux.flush_within(0.002)
    mux.flush_within(0.05)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.0019)
    assert tr.value() == b""
    clock.advance(0.0001)
    assert [(type(f).__name__, f.stream_id) for f in take_frames(tr)] == [("Syn", stream.stream_id)]
    assert clock.getDelayedCalls() == []
