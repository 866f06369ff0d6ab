"""
Pooled routes: several agents of one credential share a name or a port
(tcprelay.relay.pooled).

The choice of member and the pool's bookkeeping are tested on their own;
the rest in process (RelayFixture, real loopback sockets, tcprelay's own
agent): visitors spread over the agents, one agent leaving drops only its
own visitors and the route stays up, and claims that may not join are
refused.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread

from tcprelay.agent.client import Agent, AgentConfig
from tcprelay.relay.interfaces import TunnelUnavailable
from tcprelay.relay.metrics import status
from tcprelay.relay.pooled import PooledTunnel, choose
from tcprelay.relay.routes import NameRoute
from tcprelay.testing import free_ports
from tests.relay_helpers import bounded, wait_for
from tests.test_names import DOMAIN, Named, named, request, visit  # noqa: F401 (fixture)

# -- choosing a member ---------------------------------------------------------


def test_choose_takes_the_fewest_open_visitors() -> None:
    assert choose([3, 1, 2], 0) == 1
    assert choose([0, 5], 1) == 0


def test_choose_breaks_ties_round_robin_from_start() -> None:
    assert choose([1, 1, 1], 0) == 0
    assert choose([1, 1, 1], 1) == 1
    assert choose([1, 1, 1], 5) == 2
    assert choose([2, 1, 1], 0) == 1
    assert choose([1, 2, 1], 2) == 2
    assert choose([1, 2, 1], 1) == 2


def test_choose_needs_a_member() -> None:
    with pytest.raises(ValueError):
        choose([], 0)


class FakeMember:
    """Just what the pool reads of a member tunnel."""

    def __init__(self, label: str, credential: Optional[str] = "c") -> None:
        self.label = label
        self.credential = credential
        self.visitors: set[object] = set()
        self.bytes_to_service = 0
        self.bytes_to_visitor = 0
        self.closed: list[str] = []

    def close(self, reason: str) -> None:
        self.closed.append(reason)

    def stream_count(self) -> int:
        return len(self.visitors)


def test_pick_rotates_over_idle_members_and_prefers_the_least_busy() -> None:
    pool = PooledTunnel(NameRoute("http", "a.example.test"), "c")
    a, b, c = FakeMember("a"), FakeMember("b"), FakeMember("c")
    for member in (a, b, c):
        pool.add(member)  # type: ignore[arg-type]
    assert [pool.pick().label for _ in range(4)] == ["a", "b", "c", "a"]
    b.visitors.add(object())
    assert [pool.pick().label for _ in range(3)] == ["c", "a", "c"]
    assert len(pool.visitors) == 1 and pool.stream_count() == 1


def test_members_leave_one_by_one_and_the_pool_keeps_their_bytes() -> None:
    pool = PooledTunnel(NameRoute("http", "a.example.test"), "c")
    a, b = FakeMember("a"), FakeMember("b")
    pool.add(a)  # type: ignore[arg-type]
    pool.add(b)  # type: ignore[arg-type]
    a.bytes_to_service, a.bytes_to_visitor = 10, 20
    b.bytes_to_service = 1
    assert pool.remove(a) is False, "b is left"  # type: ignore[arg-type]
    assert a not in pool and pool.members == [b]
    assert (pool.bytes_to_service, pool.bytes_to_visitor) == (11, 20)
    assert pool.pick() is b
    pool.close("bye")
    assert b.closed == ["bye"]
    assert pool.remove(b) is True, "b was the last"  # type: ignore[arg-type]
    with pytest.raises(TunnelUnavailable):
        pool.pick()


def test_a_member_of_another_credential_cannot_join() -> None:
    pool = PooledTunnel(NameRoute("http", "a.example.test"), "c")
    assert not pool.admits("other") and not pool.admits(None)
    with pytest.raises(ValueError):
        pool.add(FakeMember("x", credential="other"))  # type: ignore[arg-type]


# -- in process ----------------------------------------------------------------


class Echo(Protocol):
    """A local service that answers every read with its ``text``."""

    def __init__(self, text: bytes) -> None:
        self.text = text

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.text)  # type: ignore[union-attr]


def pooled_agent(named: Named, text: bytes, **config: Any) -> Agent:
    """An agent asking to pool (the http name ``app`` unless ``kind``/``port`` say otherwise)."""
    assert named.relay is not None
    settings: dict[str, Any] = {"kind": "http", "name": "app", "pool": True}
    settings.update(config)
    if settings["kind"] == "port":
        settings.pop("name")
    made = Agent(
        named.relay.control_endpoint,
        AgentConfig(proxy=False, backoff_initial=0.05, backoff_max=0.1, **settings),
        named.reactor,
        lambda stream, header: Echo(text),
    )
    named.agents.append(made)
    made.startService()
    return made


def crash(agent: Agent, reactor: Any) -> None:
    """Drop ``agent``'s session as a dying agent's would be, and keep it from coming back."""
    agent.relay = TCP4ClientEndpoint(reactor, "127.0.0.1", free_ports(1)[0])
    agent.session.transport.abortConnection()  # type: ignore[union-attr]


class Held:
    """A visitor connection kept open across a test's steps (blocking socket, in threads)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, port: int, data: bytes) -> Deferred[tuple[Held, bytes]]:
        def run() -> tuple[Held, bytes]:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(data)
            return cls(sock), sock.recv(65536)

        return deferToThread(run)

    def ask(self, data: bytes) -> Deferred[bytes]:
        """Send ``data``; what comes back (b'' once the relay has closed the connection)."""

        def run() -> bytes:
            try:
                self.sock.sendall(data)
                return self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return b""

        return deferToThread(run)

    def close(self) -> None:
        self.sock.close()


def pool_of(named: Named, route: Any) -> PooledTunnel:
    assert named.relay is not None
    tunnel = named.relay.relay.registry.lookup(route)
    assert isinstance(tunnel, PooledTunnel), tunnel
    return tunnel


APP = NameRoute("http", f"app.{DOMAIN}")


@pytest_twisted.ensureDeferred
async def test_pooled_agents_share_a_name_and_both_get_visitors(reactor: Any, named: Named) -> None:
    await named.start()
    a = pooled_agent(named, b"A!")
    b = pooled_agent(named, b"B!")
    url = f"http://app.{DOMAIN}:{named.http_port}/"
    assert await bounded(a.when_ready(), reactor) == url
    assert await bounded(b.when_ready(), reactor) == url
    assert len(pool_of(named, APP).members) == 2
    replies = [
        await bounded(visit(reactor, named.http_port, request(f"app.{DOMAIN}")), reactor)
        for _ in range(20)
    ]
    assert set(replies) == {b"A!", b"B!"}
    assert replies.count(b"A!") > 0 and replies.count(b"B!") > 0
    assert named.relay is not None
    services = status(named.relay.relay)["services"]
    assert len(services) == 1, "a pooled route is shown once"
    (service,) = services
    assert service["pooled"] is True and service["agents"] == 2 and len(service["members"]) == 2


@pytest_twisted.ensureDeferred
async def test_one_agent_leaving_drops_only_its_own_visitors(reactor: Any, named: Named) -> None:
    """
    Two open visitors go one to each agent (the fewest open visitors).
    When one agent is lost, its visitor is closed, the other's carries on,
    the name stays up with no lease held, and new visitors reach the agent
    left.
    """
    await named.start("--lease", "30")
    a = pooled_agent(named, b"A!")
    b = pooled_agent(named, b"B!")
    await bounded(a.when_ready(), reactor)
    await bounded(b.when_ready(), reactor)
    pool = pool_of(named, APP)
    first, first_reply = await bounded(Held.open(named.http_port, request(f"app.{DOMAIN}")), reactor)
    second, second_reply = await bounded(Held.open(named.http_port, request(f"app.{DOMAIN}")), reactor)
    try:
        assert {first_reply, second_reply} == {b"A!", b"B!"}, "one visitor on each agent"
        on_a, on_b = (first, second) if first_reply == b"A!" else (second, first)
        assert [len(m.visitors) for m in pool.members] == [1, 1]
        crash(a, reactor)
        await wait_for(reactor, lambda: len(pool.members) == 1, what="agent A out of the pool")
        assert named.relay is not None
        relay = named.relay.relay
        assert relay.find_named("http", f"app.{DOMAIN}") is pool, "the name stays up"
        assert relay.registry.lease_count() == 0, "no lease while an agent serves the name"
        assert await bounded(on_a.ask(b"more"), reactor) == b"", "A's visitor is gone with A"
        assert await bounded(on_b.ask(b"more"), reactor) == b"B!", "B's visitor carries on"
        for _ in range(5):
            reply = await bounded(visit(reactor, named.http_port, request(f"app.{DOMAIN}")), reactor)
            assert reply == b"B!"
    finally:
        first.close()
        second.close()


@pytest_twisted.ensureDeferred
async def test_the_last_agent_leaving_holds_the_name_for_the_pool(reactor: Any, named: Named) -> None:
    """The last agent's loss holds the name for its lease; an unpooled agent
    cannot take it, an agent of the same pool can."""
    await named.start("--lease", "30")
    a = pooled_agent(named, b"A!")
    await bounded(a.when_ready(), reactor)
    pool = pool_of(named, APP)
    crash(a, reactor)
    assert named.relay is not None
    relay = named.relay.relay
    await wait_for(reactor, lambda: relay.registry.lease_count() == 1, what="the name held")
    assert pool.ended.called and relay.registry.lookup(APP) is None
    thief = pooled_agent(named, b"T!", pool=False)
    await wait_for(reactor, lambda: thief._attempt >= 2, what="the unpooled agent refused")
    assert thief.address is None
    c = pooled_agent(named, b"C!")
    await bounded(c.when_ready(), reactor)
    assert relay.registry.lease_count() == 0, "the pool's lease was taken up"
    assert await bounded(visit(reactor, named.http_port, request(f"app.{DOMAIN}")), reactor) == b"C!"


class Refusals:
    """An observer that records the reasons an agent was refused or lost."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def ready(self, *a: object) -> None: ...

    def queued(self, *a: object) -> None: ...

    def lost(self, reason: str, retry_in: object) -> None:
        self.reasons.append(reason)

    def refused(self, reason: str, fatal: bool) -> None:
        self.reasons.append(reason)


def observed_agent(named: Named, refusals: Refusals, **config: Any) -> Agent:
    assert named.relay is not None
    made = Agent(
        named.relay.control_endpoint,
        AgentConfig(proxy=False, backoff_initial=0.05, backoff_max=0.1, **config),
        named.reactor,
        lambda stream, header: Echo(b"X!"),
        observer=refusals,
    )
    named.agents.append(made)
    made.startService()
    return made


@pytest_twisted.ensureDeferred
async def test_a_name_is_shared_only_when_both_ask_to_pool(reactor: Any, named: Named) -> None:
    await named.start()
    pooled = pooled_agent(named, b"P!")
    await bounded(pooled.when_ready(), reactor)
    unpooled = Refusals()
    observed_agent(named, unpooled, kind="http", name="app")
    await wait_for(reactor, lambda: any("app." in r and "is taken" in r for r in unpooled.reasons), what="the unpooled claim refused")
    solo = pooled_agent(named, b"S!", name="solo", pool=False)
    await bounded(solo.when_ready(), reactor)
    late = Refusals()
    observed_agent(named, late, kind="http", name="solo", pool=True)
    await wait_for(reactor, lambda: any("not pooled" in r for r in late.reasons), what="the pooled claim of an unpooled name refused")
    assert len(pool_of(named, APP).members) == 1


@pytest_twisted.ensureDeferred
async def test_a_pooled_claim_with_another_secret_is_refused(reactor: Any, named: Named) -> None:
    await named.start("--secret", "one", "--secret", "two")
    first = pooled_agent(named, b"1!", secret=b"one")
    await bounded(first.when_ready(), reactor)
    other = Refusals()
    observed_agent(named, other, kind="http", name="app", pool=True, secret=b"two")
    await wait_for(reactor, lambda: any("pooled for another credential" in r for r in other.reasons), what="the refusal")
    same = pooled_agent(named, b"2!", secret=b"one")
    await bounded(same.when_ready(), reactor)
    assert len(pool_of(named, APP).members) == 2


# -- port routes -----------------------------------------------------------------


def visit_port(reactor: Any, port: int) -> Deferred[bytes]:
    return visit(reactor, port, b"hi")


@pytest_twisted.ensureDeferred
async def test_pooled_agents_share_a_port(reactor: Any, named: Named) -> None:
    """The joining agent asks for the first one's port: no new port is claimed."""
    await named.start("--lease", "30")
    assert named.relay is not None
    relay = named.relay.relay
    a = pooled_agent(named, b"A!", kind="port")
    await bounded(a.when_ready(), reactor)
    port = a.port
    assert port
    used = relay.pool.in_use
    b = pooled_agent(named, b"B!", kind="port", port=port)
    await bounded(b.when_ready(), reactor)
    assert b.port == port and relay.pool.in_use == used, "b joined a's port"
    route = relay.tunnel_at(port).route  # type: ignore[union-attr]
    pool = pool_of(named, route)
    assert len(pool.members) == 2
    replies = [await bounded(visit_port(reactor, port), reactor) for _ in range(20)]
    assert replies.count(b"A!") > 0 and replies.count(b"B!") > 0
    held, reply = await bounded(Held.open(port, b"hi"), reactor)
    try:
        keeper, lost = (b, a) if reply == b"B!" else (a, b)
        crash(lost, reactor)
        await wait_for(reactor, lambda: len(pool.members) == 1, what="one agent out of the pool")
        assert relay.tunnel_at(port) is pool and relay.registry.lease_count() == 0
        assert await bounded(held.ask(b"more"), reactor) == reply, "the other agent's visitor carries on"
        want = b"B!" if keeper is b else b"A!"
        for _ in range(3):
            assert await bounded(visit_port(reactor, port), reactor) == want
    finally:
        held.close()


@pytest_twisted.ensureDeferred
async def test_a_port_is_shared_only_with_a_pooled_claim_of_its_credential(reactor: Any, named: Named) -> None:
    """An unpooled claim of a pooled port gets another port, as any claim of
    a taken port does; a pooled claim with another secret is refused."""
    await named.start("--secret", "one", "--secret", "two")
    assert named.relay is not None
    relay = named.relay.relay
    a = pooled_agent(named, b"A!", kind="port", secret=b"one")
    await bounded(a.when_ready(), reactor)
    port = a.port
    assert port
    unpooled = pooled_agent(named, b"U!", kind="port", port=port, pool=False, secret=b"one")
    await bounded(unpooled.when_ready(), reactor)
    assert unpooled.port != port
    other = Refusals()
    observed_agent(named, other, kind="port", port=port, pool=True, secret=b"two")
    await wait_for(reactor, lambda: any("pooled for another credential" in r for r in other.reasons), what="the refusal")
    pool = pool_of(named, relay.tunnel_at(port).route)  # type: ignore[union-attr]
    assert len(pool.members) == 1


# -- asking to pool ----------------------------------------------------------------


def test_expose_pool_flag() -> None:
    from tcprelay.cli import ExposeOptions

    options = ExposeOptions()
    options.parseOptions(["--relay", "relay.example:7000", "--pool", "8080"])
    assert options["pool"]
    plain = ExposeOptions()
    plain.parseOptions(["--relay", "relay.example:7000", "8080"])
    assert not plain["pool"]


@pytest.mark.parametrize(("value", "pool"), [("yes", True), ("no", False), ("TRUE", True)])
def test_endpoint_pool_argument(value: str, pool: bool) -> None:
    from twisted.internet.testing import MemoryReactor

    from tcprelay.agent.endpoint import parse_endpoint

    endpoint = parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", pool=value)
    assert endpoint.config.pool is pool
    assert parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9").config.pool is False
    with pytest.raises(ValueError, match="pool must be yes or no"):
        parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", pool="maybe")
