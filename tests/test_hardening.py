"""
Hardening: what a misbehaving peer (service or visitor) can make the relay
spend, and the limits that stop it.  In-process, on a clock (see
tests/memory_relay.py); the loopback floods are in tests/e2e/test_floods.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from tcprelay.mux import events as ev
from tcprelay.mux.frames import (
    HEARTBEAT_STREAM_TYPE,
    Data,
    ErrorCode,
    FrameDecoder,
    GoAway,
    encode_data_header,
    encode_rst,
    encode_syn,
    encode_wndinc,
)
from tcprelay.mux.session import OUT_LIMIT, Role, Session, SessionConfig
from tests.adapter_helpers import connect
from tests.memory_relay import MemoryRelay
from tests.muxpeer import ScriptedPeer


def test_unknown_goaway_codes_share_one_metric_label() -> None:
    """GOAWAYs with codes muxado does not define are counted under one fixed label, however many codes peers invent."""
    from tcprelay.relay.metrics import RelayCollector

    relay = MemoryRelay(ports=4)
    for code in (0x1234, 0x5678, 0xFFFFFFFF):
        peer, _ = relay.registered()
        peer.session.go_away(code)
        peer.flush()
        relay.settle()
    peer, _ = relay.registered()
    peer.session.go_away(ErrorCode.INTERNAL_ERROR)
    peer.flush()
    relay.settle()
    [family] = [m for m in RelayCollector(relay.relay).collect() if m.name == "tcprelay_protocol_errors"]
    labels = {s.labels["code"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert labels == {"OTHER": 3, "INTERNAL_ERROR": 1}


# -- RST floods are counted per window of the clock ---------------------------


FLOOD = SessionConfig(heartbeat=True, reset_flood_limit=10, reset_flood_window=1.0)


def _refusing_server(config: SessionConfig = FLOOD) -> tuple[Clock, ScriptedPeer]:
    clock = Clock()
    mux, tr = connect(Role.SERVER, clock, config, acceptor=lambda stream: None)
    peer = ScriptedPeer.facing(mux, tr, config=SessionConfig(heartbeat=False))
    peer.exchange()
    return clock, peer


def _ended(peer: ScriptedPeer) -> bool:
    return peer.ended is not None or peer.goaway is not None


def test_streams_the_application_refuses_count_as_a_flood() -> None:
    """Streams refused by the application (REFUSED_STREAM) count towards the RST flood limit."""
    clock, peer = _refusing_server()
    for _ in range(10):
        peer.open_stream()
    peer.exchange()
    refused = [e for e in peer.events if isinstance(e, ev.StreamClosed) and e.error_code == ErrorCode.REFUSED_STREAM]
    assert len(refused) == 10 and not _ended(peer), "the limit itself is allowed"
    peer.open_stream()
    peer.exchange()
    assert peer.goaway is not None and peer.goaway.error_code == ErrorCode.PROTOCOL_ERROR
    assert b"flood" in peer.goaway.debug


def test_flood_window_runs_on_the_clock_without_heartbeats() -> None:
    """With the relay's heartbeat stream reset by the peer, the flood limit still counts per window, not per lifetime."""
    clock, peer = _refusing_server()
    hb = 2  # the server's first stream: its heartbeat
    peer.wire.write(encode_rst(hb, ErrorCode.STREAM_CLOSED))  # "no heartbeat extension here"
    for _ in range(5):  # 5 windows of 8 refusals: 40 in all, 8 per window
        for _ in range(8):
            peer.open_stream()
        peer.exchange()
        assert not _ended(peer)
        clock.advance(1.0)
    for _ in range(11):
        peer.open_stream()
    peer.exchange()
    assert peer.goaway is not None and b"flood" in peer.goaway.debug


# -- what is queued for a peer that does not read is bounded ------------------


def test_congested_session_holds_stream_data_until_released() -> None:
    """While the connection is congested no DATA is framed; release_held frames it, in order, once it is not."""
    session = Session(Role.SERVER, SessionConfig(heartbeat=False))
    sid = session.open_stream()
    session.data_to_send()
    session.congested = True
    session.send_data(sid, b"one ")
    session.send_data(sid, b"two", fin=True)
    assert not [f for f in FrameDecoder().feed(session.data_to_send()) if isinstance(f, Data) and f.data]
    assert session.has_held
    session.congested = False
    session.release_held()
    frames = [f for f in FrameDecoder().feed(session.data_to_send()) if isinstance(f, Data)]
    assert b"".join(f.data for f in frames) == b"one two" and frames[-1].fin
    assert not session.has_held


def test_one_output_holds_about_out_limit_of_data_however_large_the_windows() -> None:
    """However much window the peer grants at once, one data_to_send carries about OUT_LIMIT of data; the rest follows on release."""
    session = Session(Role.SERVER, SessionConfig(heartbeat=False))
    sids = [session.open_stream() for _ in range(8)]
    session.data_to_send()
    for sid in sids:
        session.send_data(sid, b"x" * 200_000)
    session.receive_data(b"".join(encode_wndinc(sid, 1 << 20) for sid in sids))
    sizes = []
    decoder = FrameDecoder()
    while True:
        data = session.data_to_send()
        payload = sum(len(f.data) for f in decoder.feed(data) if isinstance(f, Data))
        if not payload:
            break
        sizes.append(payload)
        session.release_held()
        session.receive_data(b"".join(encode_wndinc(sid, 1 << 20) for sid in sids))
    assert sum(sizes) == 8 * 200_000
    assert max(sizes) <= OUT_LIMIT + 200_000


def _cut_server(limit: int) -> tuple[object, ScriptedPeer]:
    clock = Clock()
    mux, tr = connect(Role.SERVER, clock, SessionConfig(heartbeat=False), acceptor=lambda s: None)
    mux.max_buffered = limit
    peer = ScriptedPeer.facing(mux, tr)
    return mux, peer


def test_session_over_its_buffer_cap_is_cut() -> None:
    """A peer that makes the relay queue more than max_buffered (here RSTs for refused streams) while its socket is full is cut at once."""
    mux, peer = _cut_server(limit=1000)
    mux.pauseProducing()  # the socket is full: the peer does not read
    for _ in range(60):  # 60 RSTs of 12 bytes: under the cap
        peer.open_stream()
    assert not mux.overflowed
    for _ in range(30):
        peer.open_stream()
    assert mux.overflowed
    assert peer.wire.tr.disconnecting  # type: ignore[attr-defined]
    assert mux.session.ended and mux.session.end_reason.error_code == ErrorCode.FLOW_CONTROL_ERROR


def test_buffer_cap_counts_nothing_while_the_socket_drains() -> None:
    """Bytes written while the socket takes them do not count towards the cap."""
    mux, peer = _cut_server(limit=1000)
    for _ in range(200):
        peer.open_stream()
        peer.exchange()
    assert not mux.overflowed and not mux.session.ended


def test_heartbeat_echo_flood_from_a_peer_that_does_not_read_is_cut() -> None:
    """A peer that opens a heartbeat stream, grants itself a huge window and never reads: once the socket is full the echo is held, and the session ends as a flood."""
    relay = MemoryRelay()
    peer = relay.service()
    control = next(iter(relay.relay.sessions))
    hb = 3
    peer.wire.write(encode_syn(hb, 0, HEARTBEAT_STREAM_TYPE) + encode_wndinc(hb, 1 << 30))
    control.pauseProducing()  # the peer's socket is full
    chunk = encode_data_header(hb, 16000) + b"h" * 16000
    for _ in range(20):
        peer.wire.write(chunk)
        if control.session.ended:
            break
    assert control.session.ended
    reason = control.session.end_reason.reason
    assert "flood" in reason or "does not read" in reason, reason


# -- streams a service leaves waiting ------------------------------------------


def test_stream_the_service_never_answers_is_reset() -> None:
    """A visitor that sent bytes on a stream the service never answers is closed, and the stream reset, within 1.25 x --open-timeout."""
    relay = MemoryRelay("--open-timeout", "4", "--half-close-timeout", "0")
    peer, port = relay.registered(auto_ack=False)
    visitor = relay.visitor(port)
    visitor.send(b"GET / HTTP/1.0\r\n\r\n")
    relay.settle()
    relay.advance(4)
    assert not visitor.closed_by_relay
    relay.advance(1)
    assert visitor.closed_by_relay
    [sid] = [e.stream_id for e in peer.events if isinstance(e, ev.StreamOpened)]
    assert peer.closed_streams[sid].error_code == ErrorCode.CANCEL
    assert relay.relay.stats.visitors_timed_out["unanswered"] == 1


def test_stream_the_service_answers_is_kept() -> None:
    """A window update is an answer: the stream stays however long the reply takes."""
    relay = MemoryRelay("--open-timeout", "4", "--half-close-timeout", "0")
    peer, port = relay.registered()  # auto_ack: the peer grants window as it reads
    visitor = relay.visitor(port)
    visitor.send(b"x" * 40000)  # over half of 64 KiB with what follows: a WNDINC comes back
    visitor.send(b"y" * 40000)
    relay.settle()
    relay.advance(30)
    assert not visitor.closed_by_relay
    assert relay.relay.stats.visitors_timed_out["unanswered"] == 0


def test_half_closed_stream_of_a_silent_service_is_reset() -> None:
    """A visitor that sent its bytes and left (FIN) is not kept by a silent service beyond 1.25 x --half-close-timeout."""
    relay = MemoryRelay("--open-timeout", "0", "--half-close-timeout", "8")
    peer, port = relay.registered()
    visitor = relay.visitor(port)
    visitor.send(b"bye")
    visitor.protocol.readConnectionLost()  # the visitor's FIN
    relay.settle()
    relay.advance(2)
    [sid] = [e.stream_id for e in peer.events if isinstance(e, ev.StreamOpened)]
    peer.send(sid, b"still here")  # activity restarts the limit
    relay.settle()
    relay.advance(8)
    assert not visitor.closed_by_relay
    relay.advance(4)
    assert visitor.closed_by_relay
    assert relay.relay.stats.visitors_timed_out["half_closed"] == 1
    assert relay.relay.visitor_count == 0


def _idle_and_waiting(relay: MemoryRelay, count: int) -> tuple[list[Any], Any]:
    """A service that acknowledges nothing, ``count`` idle visitors of it and one
    more that sent a request left unanswered: (the idle ones, the waiting one)."""
    peer, port = relay.registered(auto_ack=False)
    idle = [relay.visitor(port) for _ in range(count)]
    waiting = relay.visitor(port)
    assert waiting is not None and all(v is not None for v in idle)
    waiting.send(b"hello?")
    relay.settle()
    return idle, waiting


def test_watchdog_looks_at_its_visitors_a_slice_per_reactor_pass() -> None:
    """A check looks at no more than Watchdog.batch visitors in one reactor pass (a pass over 100,000 held visitors stalled the relay for some 190 ms), and a stream left unanswered among them is still reset in time."""
    relay = MemoryRelay(
        "--open-timeout", "4", "--half-close-timeout", "0", "--max-visitors-per-service", "0"
    )
    relay.relay.watchdog.batch = 10
    idle, waiting = _idle_and_waiting(relay, 24)
    [control] = relay.relay.sessions
    tunnel = control.tunnel
    passes: list[int] = []
    original = tunnel.expire_streams

    def spy(now: float, open_timeout: Any, half_close_timeout: Any, splices: Any = None) -> None:
        part = list(splices) if splices is not None else list(tunnel.visitors)
        passes.append(len(part))
        original(now, open_timeout, half_close_timeout, part)

    tunnel.expire_streams = spy
    relay.advance(1)  # the first check (every quarter of the 4 s)
    assert passes == [10, 10, 5]
    relay.advance(4)
    assert waiting.closed_by_relay
    assert not any(v.closed_by_relay for v in idle)  # type: ignore[union-attr]
    assert max(passes) <= 10
    assert relay.relay.stats.visitors_timed_out["unanswered"] == 1


def test_idle_visitors_cost_the_watchdog_no_state() -> None:
    """Only a visitor left waiting (unanswered, or half-closed) has a WatchState between checks: idle visitors cost a check no allocation."""
    relay = MemoryRelay("--open-timeout", "4", "--half-close-timeout", "8")
    idle, waiting = _idle_and_waiting(relay, 5)
    relay.advance(2)
    [control] = relay.relay.sessions
    watch = control.tunnel._watch
    assert len(watch) == 1
    waiting.leave()
    relay.settle()
    relay.advance(2)
    assert watch == {}


def test_visitors_per_service_are_capped() -> None:
    """--max-visitors-per-service bounds the descriptors one service holds: one more visitor is refused before any stream opens."""
    relay = MemoryRelay("--max-visitors-per-service", "2")
    peer, port = relay.registered()
    assert relay.visitor(port) is not None and relay.visitor(port) is not None
    opened = relay.relay.stream_count
    assert relay.visitor(port) is None
    assert relay.relay.stream_count == opened
    assert relay.relay.stats.visitors_refused == 1


# -- partial frames ---------------------------------------------------------------


def test_frame_left_unfinished_ends_the_session_at_the_frame_timeout() -> None:
    """A frame header followed by a trickle that never completes the frame ends the session at --frame-timeout."""
    relay = MemoryRelay("--frame-timeout", "5")
    peer, port = relay.registered()
    peer.wire.write(encode_data_header(3, 1000)[:6])  # half a header
    relay.clock.advance(4.9)
    relay.settle()
    assert peer.goaway is None
    relay.clock.advance(0.2)
    relay.settle()
    assert peer.goaway is not None and peer.goaway.error_code == ErrorCode.PROTOCOL_ERROR


def test_slow_frames_that_complete_are_fine() -> None:
    """Frames that complete, however slowly the bytes come, keep the session."""
    relay = MemoryRelay("--frame-timeout", "5", "--heartbeat-tolerance", "60")
    peer, port = relay.registered()
    visitor = relay.visitor(port)
    visitor.send(b"hi")
    relay.settle()
    [sid] = [e.stream_id for e in peer.events if isinstance(e, ev.StreamOpened)]
    frame = encode_data_header(sid, 8) + b"12345678"
    for _ in range(5):
        for i in range(0, len(frame), 4):
            peer.wire.write(frame[i : i + 4])  # raw: nothing of the peer's own between
            relay.clock.advance(1)
    visitor.read()
    assert bytes(visitor.received) == b"12345678" * 5
    assert not relay.fixture.relay.stats.protocol_errors


def test_agent_answers_every_stream_within_a_second() -> None:
    """A stream the relay opened hears from the agent within OWED_GRANT_DELAY (its extra window), even while the local service has nothing to say."""
    from tcprelay.protocol import OWED_GRANT_DELAY
    from tests.adapter_helpers import Acceptor

    clock = Clock()
    acceptor = Acceptor()
    mux, tr = connect(Role.CLIENT, clock, SessionConfig(heartbeat=False, receive_window=262144), acceptor=acceptor)
    relay = ScriptedPeer.facing(mux, tr, role=Role.SERVER)
    sid = relay.open_stream()
    relay.send(sid, b"GET /slow HTTP/1.1\r\n\r\n")
    relay.exchange()
    assert acceptor.protocols[0].received == b"GET /slow HTTP/1.1\r\n\r\n"
    assert not relay.session.heard_from(sid)
    clock.advance(OWED_GRANT_DELAY)
    relay.exchange()
    assert relay.session.heard_from(sid)
    assert relay.session.send_window(sid) > 65536 - 100


# -- leases belong to the credential that made them --------------------------


@pytest_twisted.ensureDeferred
async def test_a_lease_token_is_no_use_with_another_credential(reactor: Any) -> None:
    """Tenant B, with its own valid secret and tenant A's lease token, does not get A's held port; A gets it back."""
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Protocol

    from tcprelay.agent.client import Agent, AgentConfig
    from tcprelay.testing import RelayFixture, free_ports
    from tests.relay_helpers import bounded, wait_for

    relay = await bounded(RelayFixture.start(reactor, secrets=[b"secret-a", b"secret-b"], lease=30), reactor)
    agents: list[Agent] = []

    def agent(secret: bytes) -> Agent:
        made = Agent(relay.control_endpoint, AgentConfig(secret=secret, backoff_initial=0.05, backoff_max=0.1), reactor, lambda s, h: Protocol())
        agents.append(made)
        made.startService()
        return made

    try:
        a = agent(b"secret-a")
        await bounded(a.when_ready(), reactor)
        held_port, token = a.port, a.lease_token
        assert token
        # A loses its session and cannot reconnect for now: its port is leased.
        nowhere = free_ports(1)[0]
        a.relay = TCP4ClientEndpoint(reactor, "127.0.0.1", nowhere)
        a.session.transport.abortConnection()  # type: ignore[union-attr]
        await wait_for(reactor, lambda: relay.relay.registry.lease_count() == 1, what="the lease")

        b = Agent(relay.control_endpoint, AgentConfig(secret=b"secret-b", backoff_initial=0.05), reactor, lambda s, h: Protocol())
        b.lease_token, b.wanted_port = token, held_port
        agents.append(b)
        b.startService()
        await bounded(b.when_ready(), reactor)
        assert b.port != held_port
        assert relay.relay.registry.lease_count() == 1, "A's lease is untouched"

        a.relay = relay.control_endpoint
        await wait_for(reactor, lambda: a.port == held_port and a.session is not None and a.address is not None and relay.relay.tunnel_at(held_port) is not None, what="A back on its port")
        assert relay.relay.tunnel_at(held_port).credential != relay.relay.tunnel_at(b.port).credential  # type: ignore[union-attr]
    finally:
        for made in agents:
            await bounded(made.stopService(), reactor)
        await bounded(relay.stop(), reactor)


def test_timed_out_visitors_are_counted_in_metrics_and_status() -> None:
    """/metrics and /status count visitor streams ended by the watchdog, by a fixed set of reasons."""
    from tcprelay.relay.metrics import RelayCollector, status

    relay = MemoryRelay("--open-timeout", "2")
    peer, port = relay.registered(auto_ack=False)
    visitor = relay.visitor(port)
    visitor.send(b"anyone?")
    relay.advance(3)
    assert visitor.closed_by_relay
    [family] = [m for m in RelayCollector(relay.relay).collect() if m.name == "tcprelay_visitors_timed_out"]
    samples = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert samples == {"unanswered": 1, "half_closed": 0}
    assert status(relay.relay)["visitors_timed_out"] == {"unanswered": 1, "half_closed": 0}
