"""
A control port and an agent that disagree about TLS say so (docs/relay.rst
"Bad input", docs/agent.rst "TLS"), on memory transports and a clock:

- the relay's control session that receives a TLS ClientHello ends with one
  line saying so, and one whose TLS handshake fails on bytes that are not
  TLS says that too;
- the agent that receives a TLS record, or whose TLS handshake fails on
  bytes that are not TLS, or that is closed on without a word, gives that
  as the reason of the loss, and keeps its backoff.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from twisted.internet import error
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tcprelay._sniff import looks_like_tls, tls_error_means_not_tls
from tcprelay.agent import client
from tcprelay.mux.frames import ErrorCode
from tcprelay.relay.doors.muxado import TLS_ON_PLAIN_PORT
from tests.memory_relay import MemoryRelay
from tests.test_agent_reconnect import Harness

CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 16
"""The start of a TLS ClientHello: record type 22, version 3.1, length, handshake type 1."""

TLS_ALERT = bytes.fromhex("15030300020246")
"""A TLS alert record (protocol_version), as some TLS servers send to a plain client."""

SSL_NOT_TLS = "[('SSL routines', '', 'wrong version number')]"


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def _texts(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def test_sniffing_first_bytes() -> None:
    assert looks_like_tls(CLIENT_HELLO) is True
    assert looks_like_tls(b"\x16") is None and looks_like_tls(b"\x16\x03") is None
    assert looks_like_tls(b"") is None
    assert looks_like_tls(b"\x00\x08\x01\x00") is False  # a muxado SYN
    assert looks_like_tls(b"GET / HTTP/1.1\r\n") is False
    assert looks_like_tls(b"\x16\x04\x01") is False
    assert looks_like_tls(TLS_ALERT) is False  # an alert, not a handshake record
    assert looks_like_tls(TLS_ALERT, (0x15, 0x16)) is True
    assert tls_error_means_not_tls(SSL_NOT_TLS)
    assert not tls_error_means_not_tls("[('SSL routines', '', 'certificate verify failed')]")


@pytest.mark.parametrize("chunk", [1, len(CLIENT_HELLO)])
def test_relay_closes_a_tls_client_hello_with_one_line(logged: list[dict[str, Any]], chunk: int) -> None:
    """A ClientHello on the plain control port (even one byte at a time) ends that session at once, with one line saying it is TLS, and GOAWAY(PROTOCOL_ERROR)."""
    relay = MemoryRelay()
    peer = relay.service()
    for i in range(0, len(CLIENT_HELLO), chunk):
        peer.wire.write(CLIENT_HELLO[i : i + chunk])
    relay.settle()
    assert not relay.relay.sessions
    lines = [t for t in _texts(logged) if "TLS" in t]
    assert lines == [f"session {peer_label(relay)} ended: {TLS_ON_PLAIN_PORT}"], _texts(logged)
    assert relay.relay.stats.protocol_errors == {ErrorCode.PROTOCOL_ERROR: 1}
    assert any(getattr(e, "error_code", None) == ErrorCode.PROTOCOL_ERROR for e in peer.events), peer.events


def peer_label(relay: MemoryRelay) -> str:
    return f"127.0.0.1:{relay._next_port}"


def test_relay_takes_muxado_sent_a_byte_at_a_time() -> None:
    """The check holds back at most the first bytes: a service that sends its handshake in 1-byte writes still registers."""
    relay = MemoryRelay()
    peer = relay.service()
    wire = peer.wire
    real_write = wire.write
    wire.write = lambda data: [real_write(data[i : i + 1]) for i in range(len(data))]  # type: ignore[method-assign]
    kind, address = peer.legacy_handshake()
    assert kind == "address", address


def test_relay_says_when_its_tls_handshake_fails_on_plain_bytes(logged: list[dict[str, Any]]) -> None:
    """On a TLS control port the session sees no byte and a TLS error that means 'not TLS': one line says the agent does not speak TLS."""
    relay = MemoryRelay()
    peer = relay.service()
    from OpenSSL import SSL

    peer.wire.lose(SSL.Error([("SSL routines", "", "wrong version number")]))
    lines = [t for t in _texts(logged) if "TLS" in t]
    assert len(lines) == 1, _texts(logged)
    assert "the control port speaks TLS and the agent does not" in lines[0]


def _lost_reason(h: Harness) -> str:
    return h.observer.lost_calls[-1][0]


def test_agent_names_a_tls_relay_from_its_first_bytes() -> None:
    """A relay that answers with a TLS record: the loss is reported as 'speaks TLS', and the agent retries with its usual backoff."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.protocol.dataReceived(TLS_ALERT[:2])
    assert not h.observer.lost_calls  # two bytes cannot tell yet
    relay.protocol.dataReceived(TLS_ALERT[2:])
    relay.transport.loseConnection()
    assert _lost_reason(h) == client.RELAY_SPEAKS_TLS
    assert h.pending_delay() == pytest.approx(0.5)


def test_agent_names_a_plain_relay_when_its_tls_handshake_fails() -> None:
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    from OpenSSL import SSL

    relay.protocol.connectionLost(Failure(SSL.Error([("SSL routines", "", "wrong version number")])))
    assert _lost_reason(h).startswith(client.RELAY_SPEAKS_NO_TLS), h.observer.lost_calls
    assert "wrong version number" in _lost_reason(h)
    assert h.pending_delay() == pytest.approx(0.5)


def test_agent_names_a_relay_that_closes_without_a_word() -> None:
    """Closed on before any byte (what a TLS control port does to a plain agent): the reason hints at TLS."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.protocol.connectionLost(Failure(error.ConnectionDone()))
    assert _lost_reason(h) == client.RELAY_SILENT


def test_agent_loss_after_muxado_keeps_its_own_reason() -> None:
    """Once the relay spoke muxado, a loss is reported as before."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.say("hello", nonce="n0nce", auth=False)
    relay.drop()
    assert "TLS" not in _lost_reason(h) and "without a word" not in _lost_reason(h)
