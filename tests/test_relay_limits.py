"""
The relay's edge limits end to end in process, on a MemoryRelay (no
sockets, time advances only with the clock): each refusal happens, is
counted by its reason, opens no stream, and is logged at most once per
source per interval; the idle timeout closes a silent visitor on the clock;
the control backlog reaches the listener; ``Relay.reload_config`` swaps the
limits from the --config file and keeps them on a bad one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.logger import Logger

from tcprelay.mux import events as ev
from tcprelay.relay.guard import REFUSAL_LOG_INTERVAL
from tcprelay.relay.metrics import RelayCollector
from tests.memory_relay import MemoryRelay


def _capture(relay: MemoryRelay) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    relay.relay.guard.log = Logger(observer=events.append)
    return events


def _streams_opened(peer: Any) -> int:
    """Visitor streams the service has seen (a silent visitor's SYN waits up to 1 ms: call after advancing)."""
    return sum(isinstance(e, ev.StreamOpened) for e in peer.events)


def _metrics(relay: MemoryRelay) -> str:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RelayCollector(relay.relay))
    return generate_latest(registry).decode()


def test_visitors_per_ip_refused_counted_logged_once_no_stream() -> None:
    """Beyond --max-visitors-per-ip one IP is refused (no stream, counted, one log line per interval); other IPs and freed slots pass."""
    relay = MemoryRelay("--max-visitors-per-ip", "2")
    log = _capture(relay)
    peer, port = relay.registered()
    a, b = relay.visitor(port, "10.0.0.1"), relay.visitor(port, "10.0.0.1")
    assert a is not None and b is not None
    relay.advance(0.01)
    opened = _streams_opened(peer)
    assert opened == 2
    assert relay.visitor(port, "10.0.0.1") is None
    assert relay.visitor(port, "10.0.0.1") is None
    assert relay.visitor(port, "10.0.0.2") is not None
    relay.advance(0.01)
    assert _streams_opened(peer) == opened + 1  # the refused ones opened none
    stats = relay.relay.stats
    assert stats.visitors_limited["ip_limit"] == 2 and stats.visitors_refused == 2
    assert len(log) == 1
    assert log[0]["log_format"].startswith("visitor {source} refused")
    assert log[0]["source"] == "10.0.0.1" and log[0]["reason"] == "ip_limit"
    a.leave(clean=False)  # a reset ends both sides at once
    relay.settle()
    assert relay.visitor(port, "10.0.0.1") is not None
    assert 'tcprelay_visitors_limited_total{reason="ip_limit"} 2.0' in _metrics(relay)


def test_refusal_log_again_after_interval_with_skipped_count() -> None:
    """A source refused again after the log interval gets a new line saying how many were skipped."""
    relay = MemoryRelay("--deny", "10.0.0.0/8")
    log = _capture(relay)
    _, port = relay.registered()
    for _ in range(3):
        assert relay.visitor(port, "10.1.1.1") is None
    assert len(log) == 1
    relay.advance(REFUSAL_LOG_INTERVAL)
    assert relay.visitor(port, "10.1.1.1") is None
    assert len(log) == 2 and log[1]["more"] == " (2 more since the last line)"
    assert relay.relay.stats.visitors_limited["denied"] == 4


def test_visitors_per_service_and_relay_wide() -> None:
    """--max-visitors-per-service bounds one service, --max-visitors all of them."""
    relay = MemoryRelay("--max-visitors-per-service", "2", "--max-visitors", "3", ports=2)
    _, port1 = relay.registered()
    _, port2 = relay.registered()
    assert relay.visitor(port1, "10.0.0.1") and relay.visitor(port1, "10.0.0.2")
    assert relay.visitor(port1, "10.0.0.3") is None
    assert relay.visitor(port2, "10.0.0.3") is not None
    assert relay.visitor(port2, "10.0.0.4") is None
    limited = relay.relay.stats.visitors_limited
    assert limited["service_limit"] == 1 and limited["relay_limit"] == 1
    assert relay.relay.visitor_count == 3


def test_visitor_rate_token_bucket_on_the_clock() -> None:
    """--visitor-rate/--visitor-burst: the burst passes, the next is refused until a token is back."""
    relay = MemoryRelay("--visitor-rate", "2", "--visitor-burst", "3")
    peer, port = relay.registered()
    accepted = [relay.visitor(port, f"10.0.0.{i}") is not None for i in range(4)]
    assert accepted == [True, True, True, False]
    relay.advance(0.49)
    assert relay.visitor(port, "10.0.0.9") is None
    relay.advance(0.01)
    assert relay.visitor(port, "10.0.0.9") is not None
    assert relay.relay.stats.visitors_limited["rate_limit"] == 2
    relay.advance(0.01)
    assert _streams_opened(peer) == 4


def test_allow_list_relay_wide_and_per_credential() -> None:
    """--allow refuses everything outside it; a credential's own allow list narrows its services further."""
    relay = MemoryRelay("--allow", "10.0.0.0/8,192.0.2.0/24")
    from tcprelay.relay.limits import AddressFilter, parse_networks
    import attrs

    _, port = relay.registered()
    assert relay.visitor(port, "198.51.100.1") is None
    assert relay.visitor(port, "::1") is None
    assert relay.visitor(port, "192.0.2.1") is not None
    tunnel = relay.relay.tunnel_at(port)
    tunnel.credential = "ab" * 8  # type: ignore[union-attr]
    limits = attrs.evolve(
        relay.relay.config.limits,
        credentials={"ab" * 8: AddressFilter(allow=parse_networks(["10.0.0.0/8"]))},
    )
    relay.relay.guard.configure(limits)
    assert relay.visitor(port, "192.0.2.1") is None
    assert relay.visitor(port, "10.2.3.4") is not None
    limited = relay.relay.stats.visitors_limited
    assert limited["denied"] == 2 and limited["credential_denied"] == 1


def test_control_sessions_per_ip_and_pending() -> None:
    """--max-sessions-per-ip and --max-pending-sessions refuse in buildProtocol; registering frees a pending slot."""
    relay = MemoryRelay("--max-sessions-per-ip", "2", "--max-pending-sessions", "3", ports=4)
    log = _capture(relay)
    first = relay.service("10.0.0.1")
    relay.service("10.0.0.1")
    assert relay.control_refused("10.0.0.1")
    assert not relay.control_refused("10.0.0.2")  # third pending
    assert relay.control_refused("10.0.0.3")  # pending limit
    kind, _ = first.legacy_handshake()
    assert kind == "address"
    assert not relay.control_refused("10.0.0.3")
    limited = relay.relay.stats.sessions_limited
    assert limited == {"ip_limit": 1, "pending_limit": 1}
    assert [e["reason"] for e in log] == ["ip_limit", "pending_limit"]
    assert len(relay.relay.sessions) == 4
    text = _metrics(relay)
    assert 'tcprelay_sessions_limited_total{reason="pending_limit"} 1.0' in text


def _pass(relay: MemoryRelay, seconds: float, step: float = 0.25) -> None:
    """Let time pass as a real clock does: in small steps."""
    for _ in range(round(seconds / step)):
        relay.advance(step)


def test_idle_timeout_closes_a_silent_visitor() -> None:
    """--idle-timeout 8: bytes either way keep a visitor; 8 s (plus at most a quarter) of silence close it."""
    relay = MemoryRelay("--idle-timeout", "8")
    peer, port = relay.registered()
    streams = relay.relay.stream_count  # the service's own (handshake)
    quiet = relay.visitor(port)
    chatty = relay.visitor(port)
    assert quiet is not None and chatty is not None
    relay.advance(0.01)
    for _ in range(4):
        _pass(relay, 3)
        chatty.send(b"x")
        relay.settle()
    assert quiet.closed_by_relay and quiet.lost
    assert not chatty.closed_by_relay
    assert relay.relay.stats.visitors_idle_closed == 1
    # the service's bytes count too
    sid = [e.stream_id for e in peer.events if isinstance(e, ev.StreamOpened)][-1]
    for _ in range(4):
        _pass(relay, 3)
        peer.send(sid, b"y")
        relay.settle()
    assert bytes(chatty.received).endswith(b"y") and not chatty.closed_by_relay
    _pass(relay, 7.75)
    assert not chatty.closed_by_relay
    _pass(relay, 2.25)
    assert chatty.closed_by_relay
    assert relay.relay.stats.visitors_idle_closed == 2
    # a service that does not close its side is reset one step later
    relay.advance(0.001)  # (a FIN may wait FIN_HOLD for company)
    assert sid in peer.ended_streams  # the stream's FIN
    _pass(relay, 2.5)
    assert relay.relay.visitor_count == 0 and relay.relay.stream_count == streams


def test_idle_timeout_off_by_default() -> None:
    """Without --idle-timeout a silent visitor stays however long."""
    relay = MemoryRelay()
    _, port = relay.registered()
    visitor = relay.visitor(port)
    assert visitor is not None
    relay.advance(10**6)
    assert not visitor.closed_by_relay


def _backlog(relay: MemoryRelay) -> int:
    [(_, _, backlog, _)] = [entry for entry in relay.clock.tcpServers if entry[0] == 0]
    return int(backlog)


def test_control_backlog_reaches_the_listener() -> None:
    """The control port listens with --control-backlog (1024 by default); an endpoint's own backlog= wins."""
    assert _backlog(MemoryRelay()) == 1024
    assert _backlog(MemoryRelay("--control-backlog", "77")) == 77
    relay = MemoryRelay("--control", "tcp:0:interface=127.0.0.1:backlog=5", "--control-backlog", "77")
    assert _backlog(relay) == 5


def test_reload_config_swaps_limits_and_keeps_them_on_a_bad_file(tmp_path: Path) -> None:
    """Relay.reload_config re-reads --config: new limits apply to new visitors; a bad file keeps the old ones with one log line."""
    config = tmp_path / "relay.toml"
    config.write_text('deny = ["10.0.0.0/8"]\n')
    relay = MemoryRelay("--config", str(config))
    events: list[dict[str, Any]] = []
    relay.relay.log = Logger(observer=events.append)
    _, port = relay.registered()
    assert relay.visitor(port, "10.0.0.1") is None
    assert relay.visitor(port, "192.0.2.1") is not None

    config.write_text('deny = ["192.0.2.0/24"]\nmax-visitors-per-ip = 1\n')
    assert relay.relay.reload_config()
    assert relay.visitor(port, "10.0.0.1") is not None
    assert relay.visitor(port, "10.0.0.1") is None  # per IP: 1
    assert relay.visitor(port, "192.0.2.2") is None
    assert "SIGHUP: reloaded" in events[-1]["log_format"]

    config.write_text('max-visitors-per-ip = "lots"\n')
    assert not relay.relay.reload_config()
    assert len(events) == 2 and "keeping the old settings" in events[-1]["log_format"]
    assert relay.relay.config.limits.max_visitors_per_ip == 1
    config.write_text("this is [not toml\n")
    assert not relay.relay.reload_config()
    assert relay.visitor(port, "192.0.2.3") is None
