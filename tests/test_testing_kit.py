"""
Tests of :mod:`tcprelay.testing` as users meet it: the Trial example
(tests/kit_examples/trial_example.py) passes under ``python -m
twisted.trial``, and :class:`~tcprelay.testing.RelayFixture` tears down
leaving no delayed calls, readers, writers or listening ports behind.  The
pytest-twisted example is tests/kit_examples/test_pytest_example.py,
collected with the rest of the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol

from tcprelay.testing import RelayFixture

REPO = Path(__file__).resolve().parents[1]


def test_trial_example_passes(tmp_path: Path) -> None:
    """The Trial example runs green under python -m twisted.trial, whose clean-reactor checks it passes too."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twisted.trial",
            f"--temp-directory={tmp_path / '_trial_temp'}",
            "tests.kit_examples.trial_example",
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "PASSED (successes=1)" in output, output
    assert "DirtyReactor" not in output, output


class _Echo(Protocol):
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.factory.peers.append((peer.host, peer.port))  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Client(Protocol):
    def __init__(self) -> None:
        self.echoed: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.echoed.called:
            self.echoed.callback(data)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


async def _refused(reactor, port: int) -> bool:  # type: ignore[no-untyped-def]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    try:
        protocol = await connectProtocol(endpoint, Protocol())
    except ConnectionRefusedError:
        return True
    protocol.transport.loseConnection()  # type: ignore[union-attr]
    return False


@pytest_twisted.ensureDeferred
async def test_fixture_stop_leaves_no_ports_delayed_calls_or_sockets(reactor) -> None:  # type: ignore[no-untyped-def]
    """After RelayFixture.stop the served factory saw the visitor's real address, and no delayed call, reader, writer or listening port of the relay is left."""
    calls_before = set(reactor.getDelayedCalls())
    readers_before = set(reactor.getReaders())
    writers_before = set(reactor.getWriters())

    relay = await RelayFixture.start(reactor)
    try:
        factory = Factory.forProtocol(_Echo)
        factory.peers = []  # type: ignore[attr-defined]
        port = await relay.serve(factory)
        public = port.getHost()
        control = relay.control_port
        assert public.host == "127.0.0.1" and public.port in relay.relay.pool.ports

        client = _Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, public.host, public.port, timeout=5), client)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        assert await client.echoed.addTimeout(5, reactor) == b"ping"
        local = client.transport.getHost()  # type: ignore[union-attr]
        assert factory.peers == [(local.host, local.port)]  # type: ignore[attr-defined]
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed.addTimeout(5, reactor)

        await relay.stop()

        assert not relay.relay.sessions and not relay.relay.tunnels()
        leftover = [c for c in reactor.getDelayedCalls() if c not in calls_before and c.active()]
        assert leftover == []
        assert set(reactor.getReaders()) - readers_before == set()
        assert set(reactor.getWriters()) - writers_before == set()
        assert await _refused(reactor, control)
        assert await _refused(reactor, public.port)
    finally:
        await relay.stop()  # again, harmless, when the test failed before its own stop


@pytest_twisted.ensureDeferred
async def test_fixture_stop_with_a_visitor_still_connected(reactor) -> None:  # type: ignore[no-untyped-def]
    """stop() also closes visitors that are still connected, and leaves nothing of the relay behind."""
    calls_before = set(reactor.getDelayedCalls())
    readers_before = set(reactor.getReaders())

    relay = await RelayFixture.start(reactor)
    try:
        factory = Factory.forProtocol(_Echo)
        factory.peers = []  # type: ignore[attr-defined]
        port = await relay.serve(factory)
        public = port.getHost()
        client = _Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, public.host, public.port, timeout=5), client)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        assert await client.echoed.addTimeout(5, reactor) == b"ping"

        await relay.stop()
        await client.closed.addTimeout(5, reactor)

        leftover = [c for c in reactor.getDelayedCalls() if c not in calls_before and c.active()]
        assert leftover == []
        assert set(reactor.getReaders()) - readers_before == set()
        assert await _refused(reactor, relay.control_port)
        assert await _refused(reactor, public.port)
    finally:
        await relay.stop()  # again, harmless, when the test failed before its own stop


pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")


def test_free_port_blocks_given_one_after_another_never_overlap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two blocks asked for before either is bound (an SSH port, then a
    relay's ports) do not share a port, even when the random pick repeats."""
    from tcprelay import testing

    class Repeating:
        """The same base first on every call, then the next ones."""

        def __init__(self) -> None:
            self.picks = iter([30001, 30001, 30003, 30010])

        def randrange(self, low: int, high: int) -> int:
            return next(self.picks)

    monkeypatch.setattr(testing.random, "Random", Repeating)
    monkeypatch.setattr(testing, "_HANDED_OUT", testing.collections.deque(maxlen=64))
    first = testing.free_port_block(1)
    second = testing.free_port_block(4)
    assert first == 30001
    assert second == 30003 and first not in range(second, second + 4)
