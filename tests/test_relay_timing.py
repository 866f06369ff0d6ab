"""
The relay's time limits, on a clock: each limit is checked just before and
just after it passes, with no wall-clock time involved (see
tests/memory_relay.py for the harness).
"""

from __future__ import annotations

import pytest

from tcprelay.mux import events as ev
from tcprelay.mux.frames import Data, ErrorCode, FrameDecoder, Syn
from tcprelay.relay.doors import muxado as door
from tests.memory_relay import MemoryRelay
from tests.muxpeer import ScriptedPeer

EPSILON = 1e-6


def _end_clean(relay: MemoryRelay, peer: ScriptedPeer) -> None:
    peer.session.go_away()
    peer.flush()
    peer.close()


def _end_reset(relay: MemoryRelay, peer: ScriptedPeer) -> None:
    peer.close()


def _end_garbage(relay: MemoryRelay, peer: ScriptedPeer) -> None:
    peer.wire.write(b"\xde\xad\xbe\xef" * 4)


def _end_silent(relay: MemoryRelay, peer: ScriptedPeer) -> None:
    """Stop reading and answering: the heartbeat runs out (interval + tolerance)."""
    peer.eof = True  # the peer takes nothing in and says nothing more
    relay.clock.advance(0.2)
    assert relay.relay.sessions, "not yet: the tolerance has not passed"
    for _ in range(10):
        relay.clock.advance(0.1)


@pytest.mark.parametrize(
    "end, args",
    [
        pytest.param(_end_clean, (), id="clean-close"),
        pytest.param(_end_reset, (), id="tcp-reset"),
        pytest.param(_end_garbage, (), id="protocol-error"),
        pytest.param(
            _end_silent,
            ("--heartbeat-interval", "0.2", "--heartbeat-tolerance", "0.6"),
            id="heartbeat-timeout",
        ),
    ],
)
def test_session_end_closes_port_and_visitors_at_once(end, args) -> None:  # type: ignore[no-untyped-def]
    """However a session ends, its visitors are closed, its port stops listening and returns to the pool with no time passing."""
    relay = MemoryRelay(*args, ports=1)
    peer, port = relay.registered()
    visitors = [relay.visitor(port) for _ in range(2)]
    for v in visitors:
        assert v is not None
        v.send(b"hi")
    relay.settle()
    assert relay.relay.visitor_count == 2 and relay.relay.pool.free == 0

    end(relay, peer)
    relay.settle()

    assert all(v.closed_by_relay for v in visitors)  # type: ignore[union-attr]
    assert not relay.listening(port)
    assert relay.relay.pool.free == 1
    assert relay.relay.tunnel_at(port) is None
    assert relay.relay.visitor_count == 0 and relay.relay.stream_count == 0
    assert not relay.relay.sessions


def test_waiting_service_is_refused_when_wait_timeout_passes() -> None:
    """A service waiting for a port is refused (GOAWAY REFUSED_STREAM) exactly when --wait-timeout passes."""
    relay = MemoryRelay("--wait-timeout", "0.5", ports=1)
    relay.registered()
    waiting = relay.service()
    sid = waiting.open_stream(0)
    relay.settle()
    assert relay.relay.pool.queued == 1

    relay.advance(0.5 - EPSILON)
    assert waiting.goaway is None and relay.relay.pool.queued == 1

    relay.advance(2 * EPSILON)
    assert waiting.goaway is not None
    assert waiting.goaway.error_code == ErrorCode.REFUSED_STREAM
    assert sid not in waiting.ended_streams, "no address was sent"
    assert relay.relay.pool.queued == 0
    assert relay.relay.stats.services_refused == 1


def test_session_without_handshake_is_closed_at_the_deadline() -> None:
    """A connection that never asks for a port gets GOAWAY(PROTOCOL_ERROR) exactly at --handshake-timeout."""
    relay = MemoryRelay("--handshake-timeout", "0.3")
    silent = relay.service()
    relay.settle()

    relay.advance(0.3 - EPSILON)
    assert silent.goaway is None and not silent.eof

    relay.advance(2 * EPSILON)
    assert silent.goaway is not None
    assert silent.goaway.error_code == ErrorCode.PROTOCOL_ERROR
    assert silent.eof, "the relay closed the connection"
    assert relay.relay.stats.protocol_errors == {ErrorCode.PROTOCOL_ERROR: 1}

    _, port = relay.registered()
    assert relay.listening(port), "a service that does the handshake is unaffected"


def test_stop_gives_up_on_a_busy_visitor_at_the_drain_timeout() -> None:
    """Stopping waits for open visitors until --drain-timeout, then closes them and completes."""
    relay = MemoryRelay("--drain-timeout", "0.5")
    peer, port = relay.registered()
    visitor = relay.visitor(port)
    assert visitor is not None
    visitor.send(b"hang")
    relay.settle()

    stopping = relay.fixture.service.stopService()
    relay.settle()
    assert not relay.listening(port), "the public port closes at once"
    relay.advance(0.5 - EPSILON)
    assert not stopping.called and not visitor.closed_by_relay

    relay.advance(2 * EPSILON)
    assert visitor.closed_by_relay
    assert stopping.called
    assert not relay.relay.sessions


def _syns(data: bytes) -> list[int]:
    return [f.stream_id for f in FrameDecoder().feed(data) if isinstance(f, Syn)]


def test_silent_visitor_syn_leaves_after_the_syn_hold() -> None:
    """A visitor that says nothing: its SYN waits SYN_HOLD for the visitor's first bytes, then goes alone."""
    relay = MemoryRelay()
    peer, port = relay.registered()
    before = len(peer.events)
    visitor = relay.visitor(port)
    assert visitor is not None
    relay.settle()
    assert len(peer.events) == before, "the SYN is held"

    relay.advance(door.SYN_HOLD - EPSILON / 1000)
    assert len(peer.events) == before

    relay.advance(EPSILON)
    [sid] = [e.stream_id for e in peer.events[before:] if isinstance(e, ev.StreamOpened)]
    peer.send(sid, b"220 hello\r\n")
    relay.settle()
    assert bytes(visitor.received) == b"220 hello\r\n"


def test_visitor_bytes_ride_with_the_syn() -> None:
    """A visitor that speaks at once: its SYN and first bytes leave together, with no time passing."""
    relay = MemoryRelay()
    peer, port = relay.registered()
    visitor = relay.visitor(port)
    assert visitor is not None
    visitor.send(b"hello")
    data = peer.wire.tr.value()  # type: ignore[attr-defined]
    frames = FrameDecoder().feed(data)
    [syn] = [f for f in frames if isinstance(f, Syn)]
    assert any(isinstance(f, Data) and f.stream_id == syn.stream_id and f.data == b"hello" for f in frames)

