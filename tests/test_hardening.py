"""
Hardening: what a misbehaving peer (service or visitor) can make the relay
spend, and the limits that stop it.  In-process, on a clock (see
tests/memory_relay.py); the loopback floods are in tests/e2e/test_floods.py.
"""

from __future__ import annotations

from tcprelay.mux.frames import ErrorCode
from tests.memory_relay import MemoryRelay



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

from twisted.internet.task import Clock  # noqa: E402

from tcprelay.mux import events as ev  # noqa: E402
from tcprelay.mux.frames import encode_rst  # noqa: E402
from tcprelay.mux.session import Role, SessionConfig  # noqa: E402
from tests.adapter_helpers import connect  # noqa: E402
from tests.muxpeer import ScriptedPeer  # noqa: E402

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
