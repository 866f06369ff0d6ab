"""
Tests for the cluster layer's parts: the node link header (sans-IO), the
Redis URL and options, the agent's failover endpoint, and the claim
scripts run in a real ``redis-server`` (tests.redis_server) through
:class:`~tcprelay.relay.cluster.RedisLink`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from tcprelay import tap
from tcprelay.agent.expose import FailoverEndpoint
from tcprelay.relay import cluster_scripts as scripts
from tcprelay.relay.cluster import RedisLink, RedisUnavailable, parse_redis_url
from tcprelay.relay.nodelink import (
    MAX_SKEW,
    LinkError,
    LinkHeader,
    LinkHeaderReader,
    encode_link_header,
)
from tcprelay.testing import free_port_block
from tests.redis_server import RedisServer, redis_server
from tests.relay_helpers import deferred_later, wait_for

__all__ = ["redis_server"]

SECRET = b"cluster secret"


# -- the node link header ------------------------------------------------------------


def test_link_header_round_trip_byte_by_byte() -> None:
    """A link header fed one byte at a time is read back whole, with what followed it."""
    now = 1_700_000_000.0
    data = encode_link_header(LinkHeader("http", "app.example.test", "node2", now), SECRET)
    reader = LinkHeaderReader(SECRET, now + 1)
    for byte in data[:-1]:
        assert reader.feed(bytes([byte])) is None
    header, rest = reader.feed(data[-1:] + b"GET /") or (None, b"")
    assert header is not None
    assert (header.kind, header.name, header.sender) == ("http", "app.example.test", "node2")
    assert rest == b"GET /"


@pytest.mark.parametrize(
    "mangle, why",
    [
        (lambda d: b"XXXX" + d[4:], "not a node link header"),
        (lambda d: d[:4] + b"\x09" + d[5:], "unknown node link version"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad MAC"),
    ],
)
def test_link_header_refuses_bad_ones(mangle: Any, why: str) -> None:
    """A wrong magic, version or MAC is refused with a reason."""
    now = time.time()
    data = mangle(encode_link_header(LinkHeader("port", "8081", "n", now), SECRET))
    with pytest.raises(LinkError, match=why):
        LinkHeaderReader(SECRET, now).feed(data)


def test_link_header_refuses_another_secret_and_a_stale_one() -> None:
    """A header made with another secret, or too old, is refused."""
    now = time.time()
    data = encode_link_header(LinkHeader("port", "8081", "n", now), b"other")
    with pytest.raises(LinkError, match="bad MAC"):
        LinkHeaderReader(SECRET, now).feed(data)
    old = encode_link_header(LinkHeader("port", "8081", "n", now - MAX_SKEW - 5), SECRET)
    with pytest.raises(LinkError, match="stale"):
        LinkHeaderReader(SECRET, now).feed(old)


# -- options -----------------------------------------------------------------------------


def test_redis_urls() -> None:
    """redis:// URLs give host, port (6379), database (0) and password."""
    assert parse_redis_url("redis://10.0.0.5") == parse_redis_url("redis://10.0.0.5:6379/0")
    address = parse_redis_url("redis://:s3cret@redis.example:6380/2")
    assert (address.host, address.port, address.db, address.password) == ("redis.example", 6380, 2, "s3cret")
    for bad in ("http://x", "redis://", "redis://h/db"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def _options(tmp_path: Any, *extra: str) -> tap.Options:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    options = tap.Options()
    options.parseOptions(["--control", "tcp:0", "--ports", "20000-20003", *[a.replace("SECRET", str(secret)) for a in extra]])
    return options


def test_cluster_options(tmp_path: Any) -> None:
    """--cluster needs --node-address; the node name defaults to the address; the secret to None (kept in Redis)."""
    options = _options(
        tmp_path, "--cluster", "redis://127.0.0.1:6400/3", "--node-address", "10.0.0.1:7000",
        "--cluster-secret", "SECRET",
    )
    config = options["cluster-config"]
    assert (config.node_name, config.node_host, config.node_port, config.secret) == ("10.0.0.1:7000", "10.0.0.1", 7000, b"s")
    assert config.ttl == 5.0 and config.refresh == 1.0 and config.redis.db == 3
    with pytest.raises(usage.UsageError, match="--node-address"):
        _options(tmp_path, "--cluster", "redis://127.0.0.1", "--cluster-secret", "SECRET")
    assert _options(tmp_path, "--cluster", "redis://127.0.0.1", "--node-address", "h:1")["cluster-config"].secret is None
    with pytest.raises(usage.UsageError, match="--cluster-secret"):
        _options(tmp_path, "--cluster", "redis://127.0.0.1", "--node-address", "h:1", "--cluster-secret", "/nonexistent")
    with pytest.raises(usage.UsageError, match="needs --cluster"):
        _options(tmp_path, "--node-name", "n1")
    with pytest.raises(usage.UsageError, match="--cluster"):
        _options(tmp_path, "--cluster", "localhost:6379", "--node-address", "h:1", "--cluster-secret", "SECRET")


def test_make_service_adds_the_cluster_without_listening(tmp_path: Any) -> None:
    """With --cluster, makeService adds a 'cluster' child and sets it on the relay; nothing listens yet."""
    options = _options(
        tmp_path, "--cluster", "redis://127.0.0.1:6400", "--node-address", "127.0.0.1:7000",
        "--cluster-secret", "SECRET", "--node-name", "n1",
    )
    reactor = MemoryReactorClock()
    service = tap.makeService(options, reactor)
    cluster = service.getServiceNamed("cluster")
    assert service.relay.cluster is cluster and cluster.node == "n1"
    assert reactor.tcpServers == [] and reactor.tcpClients == []


# -- the agent's failover ----------------------------------------------------------------


class _Endpoint:
    def __init__(self, name: str, works: bool) -> None:
        self.name = name
        self.works = works
        self.tries = 0

    def connect(self, factory: object) -> Deferred[Any]:
        self.tries += 1
        return succeed(self.name) if self.works else fail(ConnectionRefusedError(self.name))


def test_failover_endpoint_moves_on() -> None:
    """Each connect starts after the endpoint that worked last and skips the ones that fail."""
    a, b, c = _Endpoint("a", True), _Endpoint("b", False), _Endpoint("c", True)
    endpoint = FailoverEndpoint([a, b, c])
    got: list[Any] = []
    endpoint.connect(object()).addCallback(got.append)
    endpoint.connect(object()).addCallback(got.append)  # b fails, then c
    endpoint.connect(object()).addCallback(got.append)
    assert got == ["a", "c", "a"] and b.tries == 1
    a.works = c.works = False
    failures: list[Any] = []
    endpoint.connect(object()).addErrback(failures.append)
    assert "no relay reachable" in failures[0].getErrorMessage()


# -- the scripts in a real Redis -----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def link(reactor: Any, redis_server: RedisServer) -> Any:
    """A RedisLink connected to the test's redis-server, stopped when the test ends."""
    link = RedisLink(reactor, parse_redis_url(redis_server.url))
    link.startService()
    try:
        await wait_for(reactor, lambda: link.up, timeout=10, what="a connection to redis-server")
        yield link
    finally:
        await link.stopService()


def _claim(link: RedisLink, key: str, node: str, cred: str = "c1", lease: str = "", pool: bool = False, ttl: int = 3000) -> Deferred[Any]:
    return link.eval(scripts.CLAIM, [key], [node, cred, lease, "1" if pool else "0", ttl])


def _refresh(link: RedisLink, node: str, routes: list[tuple[str, str, bool, list[str]]], ttl: int = 3000) -> Deferred[Any]:
    keys = [f"tcprelay:node:{node}"]
    args: list[Any] = [node, ttl, json.dumps({"name": node, "address": f"{node}:1", "routes": []}), "tcprelay:"]
    for key, cred, pool, tokens in routes:
        keys.append(key)
        args += [cred, "1" if pool else "0", json.dumps(tokens)]
    return link.eval(scripts.REFRESH, keys, args)


KEY = "tcprelay:route:http:app.example.test"


@pytest_twisted.ensureDeferred
async def test_claims_are_decided_once_for_the_cluster(link: RedisLink, redis_server: RedisServer) -> None:
    """The first node's claim wins; another node is refused (taken, or another credential's), or joins a pool of its credential."""
    assert await _claim(link, KEY, "n1") == ["ok", "n1"]
    assert await _claim(link, KEY, "n1") == ["local", "n1"]
    assert await _claim(link, KEY, "n2") == ["taken", "n1"]
    assert await _claim(link, KEY, "n2", cred="c2") == ["other", "n1"]
    assert await _claim(link, KEY, "n2", pool=True) == ["taken", "n1"]
    pooled = "tcprelay:route:http:pool.example.test"
    assert await _claim(link, pooled, "n1", pool=True) == ["ok", "n1"]
    assert await _claim(link, pooled, "n2") == ["pooled", "n1"]
    assert await _claim(link, pooled, "n2", pool=True) == ["joined", "n1"]
    await link.eval(scripts.RELEASE, [pooled], ["n1"])
    assert pooled in redis_server.keys()  # n2 still serves it
    await link.eval(scripts.RELEASE, [pooled], ["n2"])
    assert redis_server.keys() == [KEY]


@pytest_twisted.ensureDeferred
async def test_a_lease_token_moves_a_route_and_its_old_node_learns_it(link: RedisLink, redis_server: RedisServer) -> None:
    """A claim presenting the lease token (and credential) of an agent of another node takes the route; that node's next refresh reports it lost."""
    assert await _claim(link, KEY, "n1") == ["ok", "n1"]
    result = await _refresh(link, "n1", [(KEY, "c1", False, ["tok"])])
    assert json.loads(result[0]) in ([], {})
    assert await _claim(link, KEY, "n2", lease="wrong") == ["taken", "n1"]
    assert await _claim(link, KEY, "n2", cred="c2", lease="tok") == ["other", "n1"]
    assert await _claim(link, KEY, "n2", lease="tok") == ["moved", "n1"]
    result = await _refresh(link, "n1", [(KEY, "c1", False, ["tok"])])
    assert json.loads(result[0]) == [[1, "*"]]
    nodes = sorted(json.loads(raw)["name"] for raw in result[1:])
    assert nodes == ["n1"]  # n2 never refreshed its node key here


@pytest_twisted.ensureDeferred
async def test_a_dead_nodes_entries_expire_and_leave_deletes_a_nodes_keys(
    reactor: Any, link: RedisLink, redis_server: RedisServer
) -> None:
    """An entry not refreshed within its TTL is free for anyone; a node that leaves deletes its node key and its entries, the last one the secret too."""
    assert await _claim(link, KEY, "n1", ttl=300) == ["ok", "n1"]
    started = time.monotonic()
    while (await _claim(link, KEY, "n2", cred="c2", ttl=300))[0] != "ok":
        assert time.monotonic() - started < 5, "the entry did not expire"
        await deferred_later(reactor, 0.05)
    assert time.monotonic() - started >= 0.25
    await _refresh(link, "n2", [(KEY, "c2", False, [])])
    await _refresh(link, "n3", [])
    assert await link.eval(scripts.SECRET, ["tcprelay:secret"], ["first"]) == "first"
    assert await link.eval(scripts.SECRET, ["tcprelay:secret"], ["second"]) == "first"
    assert redis_server.keys() == sorted([KEY, "tcprelay:node:n2", "tcprelay:node:n3", "tcprelay:secret"])
    await link.eval(scripts.LEAVE, ["tcprelay:node:n2", KEY], ["n2", "", "tcprelay:"])
    assert redis_server.keys() == ["tcprelay:node:n3", "tcprelay:secret"]
    await link.eval(scripts.LEAVE, ["tcprelay:node:n3"], ["n3", "", "tcprelay:"])
    assert redis_server.keys() == []


@pytest_twisted.ensureDeferred
async def test_a_refresh_recreates_what_a_restarted_redis_lost(link: RedisLink, redis_server: RedisServer) -> None:
    """A refresh into an empty Redis (restarted without persistence) re-asserts the node's routes."""
    await _refresh(link, "n1", [(KEY, "c1", False, ["tok"])])
    redis_server.command("FLUSHALL")
    await _refresh(link, "n1", [(KEY, "c1", False, ["tok"])])
    assert await _claim(link, KEY, "n2") == ["taken", "n1"]
    assert await _claim(link, KEY, "n2", lease="tok") == ["moved", "n1"]


@pytest_twisted.ensureDeferred
async def test_commands_fail_at_once_without_redis(reactor: Any) -> None:
    """With no Redis to talk to, a command fails at once with RedisUnavailable (it does not wait for one)."""
    port = free_port_block(1)
    link = RedisLink(reactor, parse_redis_url(f"redis://127.0.0.1:{port}/0"))
    link.startService()
    try:
        with pytest.raises(RedisUnavailable, match="no connection to Redis"):
            await _claim(link, KEY, "n1")
    finally:
        await link.stopService()


# -- the relay's claims while Redis is unreachable -----------------------------------------


def _cluster_relay(tmp_path: Any) -> Any:
    """A relay on a memory reactor whose cluster has no connection to Redis (never started)."""
    from tcprelay.relay.cluster import Cluster, ClusterConfig
    from tcprelay.relay.config import RelayConfig
    from tcprelay.relay.core import Relay
    from tcprelay.relay.pool import PortPool

    reactor = MemoryReactorClock()
    config = RelayConfig(ports=range(20000, 20002), domains=("example.test",), http_port=8000)
    relay = Relay(config, PortPool(config.ports, reactor), reactor)
    relay.cluster = Cluster(
        relay,
        ClusterConfig(parse_redis_url("redis://127.0.0.1:1/0"), "n1", "127.0.0.1", 7000, b"s"),
        reactor,
    )
    return relay


def test_claims_are_refused_retryably_while_redis_is_unreachable(tmp_path: Any) -> None:
    """Without Redis, a name or port claim fails at once with a retryable refusal that says why, and the port goes back to the pool."""
    from tcprelay.relay.core import RouteRefused

    relay = _cluster_relay(tmp_path)
    failures: list[Any] = []
    relay.claim_name("http", "app", None, None).addErrback(failures.append)
    relay.claim_port(None, None, None, lambda position: None).addErrback(failures.append)
    assert len(failures) == 2
    for failure in failures:
        assert failure.check(RouteRefused) and failure.value.retry
        assert "registry is unreachable" in str(failure.value)
    assert relay.pool.free == 2 and len(relay.ports) == 0
    assert relay.cluster.stats.claims_refused_unavailable == 2
    # nothing is left marked as being claimed
    assert relay.cluster._claims == set()


def test_a_port_another_node_holds_is_skipped() -> None:
    """A port claim the cluster refuses because another node holds the port keeps it out of the pool and takes the next one."""
    from tcprelay.relay.core import RouteRefused

    relay = _cluster_relay(None)
    cluster = relay.cluster
    ports_listened: list[int] = []
    relay.ports.listen = lambda route: ports_listened.append(route.port)  # type: ignore[method-assign]
    relay.ports.mirror = lambda port: True  # type: ignore[method-assign]

    def claim(route: Any, credential: Any, lease: Any, pool: Any) -> Deferred[str]:
        if route.port == 20000:
            refusal = RouteRefused("port 20000 is taken (on node n2)", retry=True, owner="n2")
            return fail(refusal)
        return succeed("ok")

    cluster.claim = claim  # type: ignore[method-assign]
    routes: list[Any] = []
    relay.claim_port(None, None, None, lambda position: None).addCallback(routes.append)
    assert [r.port for r in routes] == [20001] and ports_listened == [20001]
    assert cluster.remote_ports == {20000: "n2"} and relay.pool.free == 0


# -- two relays of one cluster, in this process --------------------------------------------


@pytest_twisted.async_yield_fixture
async def cluster_node(reactor: Any, redis_server: RedisServer) -> Any:
    """Makes relays of one cluster (only their Redis connections started; their ports
    on 127.0.0.1): ``await cluster_node(name, first_port)``; all stopped at the end."""
    from tcprelay.relay.cluster import Cluster, ClusterConfig
    from tcprelay.relay.config import RelayConfig
    from tcprelay.relay.core import Relay
    from tcprelay.relay.pool import PortPool

    started: list[Any] = []

    async def make(name: str, first_port: int) -> Any:
        config = RelayConfig(
            ports=range(first_port, first_port + 2),
            public_interface="127.0.0.1",
            domains=("example.test",),
            http_port=8000,
        )
        relay = Relay(config, PortPool(config.ports, reactor), reactor)
        relay.cluster = Cluster(
            relay, ClusterConfig(parse_redis_url(redis_server.url), name, "127.0.0.1", 1, b"s"), reactor
        )
        relay.cluster.redis.startService()
        started.append(relay)
        await wait_for(reactor, lambda: relay.cluster.up, timeout=10, what=f"{name}'s connection to redis-server")
        return relay

    try:
        yield make
    finally:
        for relay in started:
            await relay.cluster.redis.stopService()


@pytest_twisted.ensureDeferred
async def test_two_relays_never_give_out_one_name_or_port(cluster_node: Any) -> None:
    """Two relays of a cluster: the second is refused a name the first holds, saying where, and takes the next port when the first holds its pool's first one."""
    from tcprelay.relay.core import RouteRefused

    first = free_port_block(2)
    one = await cluster_node("n1", first)
    two = await cluster_node("n2", first)
    routes: list[Any] = []
    try:
        name = await one.claim_name("http", "app", None, "c1")
        assert name.name == "app.example.test"
        with pytest.raises(RouteRefused, match=r"http name app.example.test is taken \(not pooled, on node n1\)") as refused:
            await two.claim_name("http", "app", None, "c1")
        assert refused.value.retry and refused.value.owner == "n1"
        port1 = await one.claim_port(None, None, "c1", lambda position: None)
        routes.append((one, port1))
        port2 = await two.claim_port(None, None, "c1", lambda position: None)
        routes.append((two, port2))
        assert (port1.port, port2.port) == (first, first + 1)
        assert two.cluster.remote_ports == {first: "n1"}
    finally:
        for relay, route in routes:
            await relay.release_route(route)
