"""
The agent's reconnection schedule (tcprelay.agent.client.Agent), on a Clock.

Every connection attempt goes to a fake client endpoint that the test answers
by hand: refused, or connected to a StringTransport behind which a bare
sans-IO Session plays the relay, frame by frame.  No reactor, no sockets.

What is proved is what docs/agent.rst ("Leases and reconnects") promises:
the waits are backoff_initial, doubling, capped at backoff_max, each
multiplied by a random factor between 0.8 and 1.2; they start again from
backoff_initial after a registration; a refusal for good is not retried;
and a stopped agent leaves nothing scheduled.
"""

from __future__ import annotations

import random
from typing import Any, Optional

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import handshake as hs
from tcprelay.agent.client import Agent, AgentConfig, AgentRefused, AgentSession
from tcprelay.mux.events import DataReceived, StreamOpened
from tcprelay.mux.session import Role, Session, SessionConfig

NOMINAL = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
"""The documented waits before jitter with the defaults (0.5 s doubling, 30 s cap)."""


class FixedRng:
    """A stand-in for random.Random whose uniform() returns a chosen point of the range asked for."""

    def __init__(self, at: float = 0.5) -> None:
        self.at = at
        self.asked: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.asked.append((a, b))
        return a + (b - a) * self.at


class Observer:
    """Records what the agent reports."""

    def __init__(self) -> None:
        self.lost_calls: list[tuple[str, Optional[float]]] = []
        self.refused_calls: list[tuple[str, bool]] = []
        self.ready_calls: list[tuple[str, int, bool]] = []

    def ready(self, address: str, port: int, legacy: bool) -> None:
        self.ready_calls.append((address, port, legacy))

    def queued(self, position: int) -> None:
        pass

    def lost(self, reason: str, retry_in: Optional[float]) -> None:
        self.lost_calls.append((reason, retry_in))

    def refused(self, reason: str, fatal: bool) -> None:
        self.refused_calls.append((reason, fatal))


class FakeRelay:
    """
    The relay's side of one connection: a server-role sans-IO Session facing
    the agent's AgentSession over a StringTransportWithDisconnection.
    """

    def __init__(self, protocol: AgentSession, transport: StringTransportWithDisconnection) -> None:
        self.protocol = protocol
        self.transport = transport
        self.session = Session(Role.SERVER, SessionConfig(heartbeat=False), 0.0)
        self.control: Optional[int] = None
        self.messages: list[dict[str, Any]] = []
        self._reader = hs.MessageReader()

    def exchange(self) -> None:
        """Move bytes both ways until neither side has more to say."""
        for _ in range(1000):
            moved = False
            data = self.transport.value()
            if data:
                self.transport.clear()
                moved = True
                for event in self.session.receive_data(data):
                    if isinstance(event, StreamOpened) and event.stream_type == hs.CONTROL_STREAM_TYPE:
                        self.control = event.stream_id
                        self.session.accept_stream(event.stream_id)
                    elif isinstance(event, DataReceived) and event.stream_id == self.control:
                        self.session.acknowledge(event.stream_id, len(event.data))
                        self.messages.extend(self._reader.feed(event.data))
            out = self.session.data_to_send()
            if out and self.transport.connected:
                self.protocol.dataReceived(out)
                moved = True
            if not moved:
                return
        raise AssertionError("exchange never went quiet")

    def say(self, kind: str, **fields: Any) -> None:
        """Send one handshake message on the control stream and let the agent answer."""
        self.exchange()
        assert self.control is not None, "the agent opened no control stream"
        self.session.send_data(self.control, hs.encode_message(kind, **fields))
        self.exchange()

    def register(self, port: int = 9001) -> None:
        """Play a successful extended handshake: hello, the agent's register, ready."""
        self.say("hello", nonce="n0nce", auth=False)
        assert [m["type"] for m in self.messages] == ["register"], self.messages
        self.say("ready", port=port, address=f"relay.test:{port}", lease="token")

    def drop(self) -> None:
        """The TCP connection is lost under the session."""
        self.transport.loseConnection()


class Attempt:
    """One connection attempt the agent made, answered by the test."""

    def __init__(self, factory: IProtocolFactory, deferred: Deferred[Any]) -> None:
        self.factory = factory
        self.deferred = deferred
        self.cancelled = False

    def refuse(self) -> None:
        """The attempt fails as a refused TCP connection does."""
        self.deferred.errback(Failure(error.ConnectionRefusedError()))

    def accept(self) -> FakeRelay:
        """The TCP connection is made: the session starts, the Deferred fires."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        assert isinstance(protocol, AgentSession)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.deferred.callback(protocol)
        return FakeRelay(protocol, transport)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """A client endpoint that records each connect() and leaves the answer to the test."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            attempt.cancelled = True
            d.errback(Failure(CancelledError()))

        d: Deferred[Any] = Deferred(cancel)
        attempt = Attempt(factory, d)
        self.attempts.append(attempt)
        return d

    @property
    def last(self) -> Attempt:
        return self.attempts[-1]


class Harness:
    """An Agent on a Clock with a FakeEndpoint, a FixedRng (or the given rng) and an Observer."""

    def __init__(self, config: AgentConfig = AgentConfig(), rng: Any = None) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.observer = Observer()
        self.rng = FixedRng() if rng is None else rng
        self.agent = Agent(
            self.endpoint, config, self.clock, lambda stream, header: None,
            self.observer, rng=self.rng,
        )

    def pending_delay(self) -> float:
        """The delay of the one call scheduled on the clock: a reconnection, with no session timer left behind."""
        calls = self.clock.getDelayedCalls()
        assert len(calls) == 1 and calls == self.reconnections(), calls
        return calls[0].getTime() - self.clock.seconds()

    def reconnections(self) -> list[Any]:
        """The reconnections scheduled on the clock."""
        return [c for c in self.clock.getDelayedCalls() if c.func == self.agent._connect]

    def wait_for_next_attempt(self, delay: float) -> None:
        """Advance to a microsecond before ``delay``: no attempt; then past it: exactly one new attempt."""
        before = len(self.endpoint.attempts)
        self.clock.advance(delay - 1e-6)
        assert len(self.endpoint.attempts) == before
        self.clock.advance(2e-6)
        assert len(self.endpoint.attempts) == before + 1


def _refused_delays(h: Harness, count: int) -> list[float]:
    """Refuse ``count`` attempts in a row; the scheduled delay after each."""
    delays = []
    for i in range(count):
        h.endpoint.last.refuse()
        delay = h.pending_delay()
        delays.append(delay)
        if i < count - 1:
            h.wait_for_next_attempt(delay)
    return delays


def test_delays_start_at_the_initial_double_and_stop_at_the_max() -> None:
    """Refused attempts are retried after 0.5, 1, 2, 4, 8, 16 s, then every 30 s (jitter factor 1)."""
    h = Harness()
    h.agent.startService()
    assert len(h.endpoint.attempts) == 1  # the first attempt goes at once
    delays = _refused_delays(h, len(NOMINAL))
    assert delays == pytest.approx(NOMINAL)
    assert [retry_in for _, retry_in in h.observer.lost_calls] == pytest.approx(NOMINAL)
    assert all("cannot reach the relay" in why for why, _ in h.observer.lost_calls)


def test_configured_initial_and_max_are_used() -> None:
    """backoff_initial and backoff_max from AgentConfig set the first wait and the cap."""
    h = Harness(AgentConfig(backoff_initial=2.0, backoff_max=5.0))
    h.agent.startService()
    assert _refused_delays(h, 4) == pytest.approx([2.0, 4.0, 5.0, 5.0])


@pytest.mark.parametrize("at, factor", [(0.0, 0.8), (1.0, 1.2)])
def test_jitter_factor_spans_point_eight_to_one_point_two(at: float, factor: float) -> None:
    """The jitter is drawn from uniform(0.8, 1.2) and multiplies the capped wait, so its ends give 0.8x and 1.2x."""
    h = Harness(rng=FixedRng(at))
    h.agent.startService()
    delays = _refused_delays(h, len(NOMINAL))
    assert delays == pytest.approx([n * factor for n in NOMINAL])
    assert h.rng.asked == [(0.8, 1.2)] * len(NOMINAL)


def test_seeded_jitter_stays_within_its_bounds_and_varies() -> None:
    """With a seeded random.Random every wait lies within 0.8..1.2 times its nominal value, and the waits are not all alike."""
    h = Harness(rng=random.Random(20240601))
    h.agent.startService()
    delays = _refused_delays(h, 40)
    nominal = NOMINAL + [30.0] * (40 - len(NOMINAL))
    ratios = [d / n for d, n in zip(delays, nominal)]
    assert all(0.8 <= r <= 1.2 for r in ratios), ratios
    assert len({round(r, 6) for r in ratios}) > 30


def test_without_an_rng_the_random_module_draws_the_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """An Agent given no rng takes its jitter from the random module's uniform()."""
    drawn = FixedRng(1.0)
    monkeypatch.setattr(random, "uniform", drawn.uniform)
    clock, endpoint = Clock(), FakeEndpoint()
    agent = Agent(endpoint, AgentConfig(), clock, lambda stream, header: None)
    agent.startService()
    endpoint.last.refuse()
    assert drawn.asked == [(0.8, 1.2)]
    assert clock.getDelayedCalls()[0].getTime() == pytest.approx(0.6)


def test_delay_starts_again_after_a_registration() -> None:
    """After a session that registered is lost, the next wait is backoff_initial again, and the schedule grows from there."""
    h = Harness()
    h.agent.startService()
    delays = _refused_delays(h, 3)
    assert delays == pytest.approx([0.5, 1.0, 2.0])
    h.wait_for_next_attempt(delays[-1])
    relay = h.endpoint.last.accept()
    relay.register()
    assert h.observer.ready_calls == [("relay.test:9001", 9001, False)]
    assert h.clock.getDelayedCalls() and not h.reconnections()  # heartbeats only
    relay.drop()
    assert h.pending_delay() == pytest.approx(0.5)
    h.wait_for_next_attempt(0.5)
    # asks for its port back with its lease token
    relay = h.endpoint.last.accept()
    relay.say("hello", nonce="again", auth=False)
    assert relay.messages[-1]["port"] == 9001 and relay.messages[-1]["lease"] == "token"
    relay.drop()
    assert h.pending_delay() == pytest.approx(1.0)


def test_a_session_lost_before_registering_keeps_the_delay_growing() -> None:
    """A TCP connection that ends before the relay's ready is a failed attempt: the waits keep doubling."""
    h = Harness()
    h.agent.startService()
    h.endpoint.last.refuse()
    h.wait_for_next_attempt(h.pending_delay())
    relay = h.endpoint.last.accept()
    relay.say("hello", nonce="n0nce", auth=False)
    relay.drop()
    assert h.pending_delay() == pytest.approx(1.0)


def test_an_unanswered_handshake_is_given_up_after_its_timeout_and_retried() -> None:
    """A relay that accepts the connection but never answers is dropped after handshake_timeout, then retried with backoff."""
    h = Harness(AgentConfig(handshake_timeout=30.0, session=SessionConfig(heartbeat=False)))
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.exchange()
    h.clock.advance(29.9)
    assert relay.transport.connected and h.observer.lost_calls == []
    h.clock.advance(0.1)
    assert not relay.transport.connected
    assert h.observer.refused_calls == [("the relay did not answer the handshake", False)]
    assert h.pending_delay() == pytest.approx(0.5)


def test_a_retryable_refusal_is_retried() -> None:
    """A refusal the relay marks retryable (or does not mark) is reported as not fatal and retried with backoff."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.say("refused", reason="queue timeout")
    assert h.observer.refused_calls == [("relay refused: queue timeout", False)]
    assert h.pending_delay() == pytest.approx(0.5)
    h.wait_for_next_attempt(0.5)


def test_a_refusal_for_good_stops_reconnecting() -> None:
    """A refusal marked retry=false ends the agent with AgentRefused and schedules nothing more."""
    h = Harness()
    done = h.agent.when_done()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.say("hello", nonce="n0nce", auth=False)
    relay.say("refused", reason="authentication failed", retry=False)
    assert not relay.transport.connected
    assert h.observer.refused_calls == [("relay refused: authentication failed", True)]
    assert h.observer.lost_calls == []
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(3600)
    assert len(h.endpoint.attempts) == 1
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(AgentRefused)


def test_a_relay_asking_for_a_secret_the_agent_lacks_stops_reconnecting() -> None:
    """A hello that requires auth when the agent has no secret is a refusal for good: no retry."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.say("hello", nonce="n0nce", auth=True)
    assert h.observer.refused_calls == [("the relay requires a secret (--secret-file)", True)]
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(3600)
    assert len(h.endpoint.attempts) == 1


def test_stop_while_a_retry_waits_cancels_it() -> None:
    """stopService between attempts cancels the scheduled reconnection: nothing on the clock, no later attempt."""
    h = Harness()
    h.agent.startService()
    h.endpoint.last.refuse()
    assert len(h.clock.getDelayedCalls()) == 1
    stopped = h.agent.stopService()
    assert h.clock.getDelayedCalls() == []
    results: list[object] = []
    stopped.addCallback(results.append)
    h.agent.when_done().addCallback(results.append)
    assert results == [None, None]
    h.clock.advance(3600)
    assert len(h.endpoint.attempts) == 1


def test_stop_while_connecting_cancels_the_attempt_and_schedules_nothing() -> None:
    """stopService during a connection attempt cancels it, and its failure schedules no retry."""
    h = Harness()
    h.agent.startService()
    stopped = h.agent.stopService()
    assert h.endpoint.last.cancelled
    assert h.observer.lost_calls == []
    assert h.clock.getDelayedCalls() == []
    results: list[object] = []
    stopped.addCallback(results.append)
    assert results == [None]
    h.clock.advance(3600)
    assert len(h.endpoint.attempts) == 1


def test_stop_with_a_live_session_leaves_and_leaves_no_timers() -> None:
    """stopService on a registered session sends leave and closes it; once it is gone nothing is scheduled and no reconnection follows."""
    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.register()
    assert h.clock.getDelayedCalls()  # heartbeats run while the session is up
    stopped = h.agent.stopService()
    relay.exchange()
    assert relay.messages[-1]["type"] == "leave"
    assert not relay.transport.connected
    results: list[object] = []
    stopped.addCallback(results.append)
    assert results == [None]
    assert h.observer.lost_calls == []
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(3600)
    assert len(h.endpoint.attempts) == 1


def test_the_lease_file_is_private_when_created_and_when_replaced(tmp_path) -> None:
    """The lease file (and the file it is replaced from) is mode 0600 whatever the umask allows, as docs/agent.rst asks (the token claims the port)."""
    import os
    import stat

    path = tmp_path / "state" / "lease.json"
    stale = tmp_path / "state" / "lease.json.tmp"
    previous = os.umask(0o022)
    try:
        h = Harness(AgentConfig(lease_file=str(path)))
        h.agent.startService()
        relay = h.endpoint.last.accept()
        relay.register(9001)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        # a leftover world-readable .tmp and a 0644 lease from an older agent
        stale.write_text("{}")
        stale.chmod(0o644)
        path.chmod(0o644)
        relay.drop()
        h.wait_for_next_attempt(h.pending_delay())
        relay = h.endpoint.last.accept()
        relay.register(9001)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not stale.exists()
    assert '"lease": "token"' in path.read_text()
    h.agent.stopService()


def test_a_lost_session_leaves_no_reference_cycle(no_cyclic_gc: None) -> None:
    """A session that registered and was lost is freed by reference counting (its control stream's protocol and handshake timer refer back to it), so that the daemon's frozen heap keeps none between full sweeps (tcprelay.process)."""
    import weakref

    h = Harness()
    h.agent.startService()
    relay = h.endpoint.last.accept()
    relay.register()
    session = weakref.ref(relay.protocol)
    control = weakref.ref(relay.protocol.control)
    relay.drop()
    # the test's own transport keeps its protocol and producer (a socket's does not)
    relay.transport.protocol = relay.transport.producer = None
    del relay
    assert h.pending_delay() == pytest.approx(0.5)
    assert session() is None and control() is None
    h.agent.stopService()
