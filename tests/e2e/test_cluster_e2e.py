"""
A relay cluster end to end: three real ``twistd tcprelay --cluster`` nodes
on loopback sharing a real ``redis-server`` (started by the test on a free
port), real ``tcprelay expose`` agents, plain-socket visitors.

Every node listens on the same public port range, each on its own
loopback address (127.0.0.1, .2, .3: what separate machines would be), and
on an HTTP entrance of its own.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import attrs
import pytest

from tests.e2e.support import (
    HOST,
    EchoServer,
    HttpService,
    Procs,
    RelayProc,
    free_port_block,
    recv_exactly,
    start_agent,
    start_relay,
)
from tests.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

DOMAIN = "example.test"
TTL = 3.0
"""--cluster-ttl of the test nodes: a dead node's entries are gone after it."""
TAKEOVER = 10.0
"""Seconds an agent of a killed node may take to be back on another node
(reconnect backoff about 0.5 s, then one claim; with slack for a loaded
machine)."""


@attrs.define
class Node:
    relay: RelayProc
    name: str
    public: str
    """The node's public address (its own loopback address)."""
    http: int
    metrics: int
    link: int
    tls: int

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics}/status", timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


class Cluster:
    """Three nodes (or more) sharing one Redis and one public port range."""

    def __init__(
        self, procs: Procs, redis: RedisServer, tmp: Path, count: int = 3, secret: bool = True
    ) -> None:
        """Start ``count`` nodes; with ``secret`` they are given a cluster
        secret file, else they share the one the first node keeps in Redis."""
        self.procs = procs
        self.redis = redis
        self.secret: Optional[Path] = None
        if secret:
            self.secret = tmp / "cluster-secret"
            self.secret.write_text("a cluster secret for the tests\n")
        self.ports_first = free_port_block(4)
        self.ports = range(self.ports_first, self.ports_first + 4)
        self.nodes: list[Node] = []
        for index in range(1, count + 1):
            self.nodes.append(self._start(index))
        for index, node in enumerate(self.nodes):
            for attempt in range(3):
                try:
                    node.relay.proc.wait_line(r"ControlFactory starting on", 20)
                    break
                except pytest.fail.Exception:
                    # another program took one of its ports meanwhile: new ones
                    if attempt == 2 or not node.relay.proc.matching("Address already in use"):
                        raise
                    node = self.nodes[index] = self._start(index + 1)
            node.relay.proc.wait_line(r"cluster: node \S+ connected to Redis", 20)

    def _start(self, index: int) -> Node:
        base = free_port_block(5)
        control, http, metrics, link, tls = base, base + 1, base + 2, base + 3, base + 4
        name = f"node{index}"
        public = f"127.0.0.{index}"
        relay = start_relay(
            self.procs,
            "--ports", f"{self.ports[0]}-{self.ports[-1]}",
            "--public-interface", public,
            "--public-host", public,
            "--http", f"tcp:{http}:interface={HOST}",
            "--tls", f"tcp:{tls}:interface={HOST}",
            "--domain", DOMAIN,
            "--metrics", f"tcp:{metrics}:interface={HOST}",
            "--cluster", self.redis.url,
            "--node-name", name,
            "--node-address", f"{HOST}:{link}",
            *(["--cluster-secret", self.secret] if self.secret is not None else []),
            "--cluster-ttl", str(TTL),
            "--lease", "30",
            control=control,
            wait=False,
            name=name,
        )
        return Node(relay, name, public, http, metrics, link, tls)

    def relays(self, *indexes: int) -> str:
        return ",".join(self.nodes[i].relay.address for i in indexes)


def _get(port: int, host: str, source: str = HOST) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/hello", headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _until(what: str, check: Callable[[], Any], timeout: float = 15.0, step: float = 0.05) -> Any:
    """Poll ``check`` until it returns a true value (exceptions count as false)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except (OSError, AssertionError, http.client.HTTPException, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s (last: {last!r})")
        time.sleep(step)


@pytest.fixture
def http_services() -> Any:
    made: list[HttpService] = []

    def make(name: str) -> HttpService:
        service = HttpService(name)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


def _echo(host: str, port: int, data: bytes, source: str = HOST) -> bytes:
    with socket.create_connection((host, port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(data)
        return recv_exactly(sock, len(data))


def _tls_hello(port: int, name: str) -> bool:
    """Start a TLS handshake for ``name`` at ``port``: True once bytes come back
    (the echo service returns the ClientHello, which no TLS client accepts)."""
    import ssl

    context = ssl.create_default_context()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=name):
                pass
        except ssl.SSLError:
            return True  # an answer that is no ServerHello: the echo
        except OSError:
            return False
    return False


def _url_port(url: str) -> int:
    match = re.search(r":(\d+)/$", url)
    assert match, url
    return int(match.group(1))


def test_visitors_at_any_node_reach_an_agent_of_node_1(
    procs: Procs, redis_server: RedisServer, tmp_path: Path, http_services: Any, echo_server: EchoServer
) -> None:
    """An agent on node 1 (HTTP name and TCP port) serves visitors arriving at nodes 2 and 3, who keep their address; /status shows the cluster; a clean stop leaves no key (the cluster secret kept in Redis included)."""
    cluster = Cluster(procs, redis_server, tmp_path, secret=False)
    n1, n2, n3 = cluster.nodes
    web = http_services("web")
    named = start_agent(procs, web.port, n1.relay.address, "--http", "app", "--proxy-protocol", "v1", name="agent-http")
    named.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    tcp = start_agent(procs, echo_server.port, n1.relay.address, name="agent-tcp")
    host, port = tcp.address(20)
    assert host == n1.public and port in cluster.ports
    host_name = f"app.{DOMAIN}"
    for node in (n2, n3, n1):
        status, body = _until(
            f"HTTP visitor at {node.name}", lambda node=node: _get(node.http, host_name, "127.0.0.9")
        )
        assert (status, body) == (200, b"service web\n")
        # the visitor's own address, and the one it dialled (the entrance of
        # the node it reached), reached the service (PROXY v1 from the agent)
        proxy = web.heads[-1].split(b"\r\n", 1)[0].split()
        assert proxy[:3] == [b"PROXY", b"TCP4", b"127.0.0.9"], web.heads[-1][:60]
        assert int(proxy[5]) == node.http, (proxy, node.name)
    for node in (n2, n3):
        data = f"through {node.name}".encode()
        assert _until(f"TCP visitor at {node.name}", lambda node=node, data=data: _echo(node.public, port, data) == data)
    # a TLS visitor (by SNI, not terminated) at node 3 reaches a --tls agent of node 1
    secure = start_agent(procs, echo_server.port, n1.relay.address, "--tls", "secure", name="agent-tls")
    secure.proc.wait_line(r"^(https://\S+)$", 20, stream="out")
    seen = len(echo_server.received)
    _until("TLS visitor at node 3", lambda: _tls_hello(n3.tls, f"secure.{DOMAIN}"))
    hello = echo_server.wait_received(seen, lambda data: f"secure.{DOMAIN}".encode() in data)
    assert hello[:1] == b"\x16"  # the ClientHello, as the visitor sent it
    expected = sorted([f"http:{host_name}", f"port:{port}", f"tls:secure.{DOMAIN}"])

    def cluster_view() -> Any:
        view = n2.status()["cluster"]
        nodes = {entry["name"]: entry for entry in view["nodes"]}
        node1 = nodes.get("node1")
        return (view, nodes) if node1 is not None and sorted(node1["routes"]) == expected else None

    status2, by_name = _until("node 2's /status listing node 1's routes", cluster_view, TTL)
    assert status2["node"] == "node2" and status2["redis"]["connected"] is True
    assert set(by_name) == {"node1", "node2", "node3"}
    assert by_name["node2"]["routes"] == [] and status2["forwarded_out"] >= 2
    assert n1.status()["cluster"]["forwarded_in"] >= 4
    assert redis_server.keys() != []
    for node in cluster.nodes:
        node.relay.proc.signal(signal.SIGTERM)
    for node in cluster.nodes:
        assert node.relay.proc.wait_exit(20) == 0
    assert redis_server.keys() == []


def test_two_agents_on_two_nodes_claim_one_name(
    procs: Procs, redis_server: RedisServer, tmp_path: Path, http_services: Any
) -> None:
    """The first claim of a name wins; an agent asking for it on another node is refused, saying which node holds it; agents that ask to pool share it across nodes."""
    cluster = Cluster(procs, redis_server, tmp_path)
    n1, n2, n3 = cluster.nodes
    a, b = http_services("a"), http_services("b")
    first = start_agent(procs, a.port, n1.relay.address, "--http", "solo", name="agent-a")
    first.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    second = start_agent(procs, b.port, n2.relay.address, "--http", "solo", name="agent-b")
    second.proc.wait_line(rf"refused: http name solo\.{DOMAIN} is taken .*on node node1", 20)
    assert second.proc.matching(r"^http://", "out") == []
    assert _get(n3.http, f"solo.{DOMAIN}") == (200, b"service a\n")

    p1 = start_agent(procs, a.port, n1.relay.address, "--http", "shared", "--pool", name="pool-a")
    p1.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    p2 = start_agent(procs, b.port, n2.relay.address, "--http", "shared", "--pool", name="pool-b")
    p2.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    seen = set()
    deadline = time.monotonic() + 15
    while seen != {b"service a\n", b"service b\n"} and time.monotonic() < deadline:
        status, body = _get(n3.http, f"shared.{DOMAIN}")
        assert status == 200, body
        seen.add(body)
    assert seen == {b"service a\n", b"service b\n"}


def test_an_agent_of_a_killed_node_is_back_on_the_next_node(
    procs: Procs, redis_server: RedisServer, tmp_path: Path, http_services: Any, echo_server: EchoServer
) -> None:
    """kill -9 of node 1: its agents reconnect to node 2 with the same name and port within the takeover time, and visitors at node 3 reach them."""
    cluster = Cluster(procs, redis_server, tmp_path)
    n1, n2, n3 = cluster.nodes
    web = http_services("web")
    relays = cluster.relays(0, 1, 2)
    named = start_agent(procs, web.port, relays, "--http", "app", name="agent-http")
    url = named.proc.wait_line(r"^(http://\S+)$", 20, stream="out").group(1)
    assert _url_port(url) == n1.http
    tcp = start_agent(procs, echo_server.port, relays, name="agent-tcp")
    _, port = tcp.address(20)
    assert _until("TCP visitor at node 3", lambda: _echo(n3.public, port, b"before") == b"before")
    killed = time.monotonic()
    n1.relay.proc.kill()
    url2 = named.proc.wait_line(r"^(http://\S+)$", TAKEOVER, stream="out", count=2).group(1)
    host2, port2 = tcp.address(TAKEOVER, count=2)
    back = time.monotonic() - killed
    print(f"takeover: both agents back on node 2 {back:.2f}s after kill -9 of node 1")
    assert _url_port(url2) == n2.http, url2
    assert host2 == n2.public and port2 == port
    assert back < TAKEOVER
    assert _until("HTTP visitor at node 3 after the failover", lambda: _get(n3.http, f"app.{DOMAIN}") == (200, b"service web\n"))
    assert _until("TCP visitor at node 3 after the failover", lambda: _echo(n3.public, port, b"after") == b"after")
    assert _echo(n2.public, port, b"local") == b"local"


def test_a_node_that_loses_redis_serves_its_routes_and_refuses_new_ones(
    procs: Procs, redis_server: RedisServer, tmp_path: Path, http_services: Any
) -> None:
    """Redis stopped: local routes keep serving and new claims are refused clearly (retryable); Redis back: the nodes re-assert their routes (and the cluster secret kept in Redis), claims and forwarding work again."""
    cluster = Cluster(procs, redis_server, tmp_path, secret=False)
    n1, n2, n3 = cluster.nodes
    web, other = http_services("web"), http_services("other")
    named = start_agent(procs, web.port, n1.relay.address, "--http", "app", name="agent-http")
    named.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    assert _until("HTTP visitor at node 2", lambda: _get(n2.http, f"app.{DOMAIN}") == (200, b"service web\n"))
    redis_server.stop()
    n1.relay.proc.wait_line(r"cluster: lost Redis", 10)
    assert _get(n1.http, f"app.{DOMAIN}") == (200, b"service web\n")
    # node 2 still forwards to the node it last learnt of; node 3, who never
    # asked, cannot know where the name lives and says so
    n2.relay.proc.wait_line(r"cluster: lost Redis", 10)
    n3.relay.proc.wait_line(r"cluster: lost Redis", 10)
    assert _get(n2.http, f"app.{DOMAIN}") == (200, b"service web\n")
    status, body = _get(n3.http, f"app.{DOMAIN}")
    assert status == 503 and b"registry is unreachable" in body, (status, body)
    late = start_agent(procs, other.port, n2.relay.address, "--http", "late", name="agent-late")
    late.proc.wait_line(r"refused: the cluster's registry is unreachable", 20)
    assert late.proc.matching(r"^http://", "out") == []
    redis_server.start()
    n1.relay.proc.wait_line(r"connected to Redis .*re-asserting its routes", 15)
    late.proc.wait_line(r"^(http://\S+)$", 30, stream="out")
    assert _until("HTTP visitor at node 3 after Redis is back", lambda: _get(n3.http, f"app.{DOMAIN}") == (200, b"service web\n"))
    assert _until("the late agent from node 1", lambda: _get(n1.http, f"late.{DOMAIN}") == (200, b"service other\n"))
    assert f"tcprelay:route:http:app.{DOMAIN}" in redis_server.keys()


def test_a_lease_presented_at_another_node_moves_the_route_from_a_live_one(
    procs: Procs, redis_server: RedisServer, tmp_path: Path, http_services: Any
) -> None:
    """An agent presenting another agent's lease token (a copied lease file) at node 2 gets the name; node 1, still alive, closes its own agent's tunnel of it, and visitors at node 1 reach the new agent."""
    cluster = Cluster(procs, redis_server, tmp_path, count=2)
    n1, n2 = cluster.nodes
    a, b = http_services("a"), http_services("b")
    lease_a = tmp_path / "lease-a.json"
    first = start_agent(procs, a.port, n1.relay.address, "--http", "app", name="agent-a", lease_file=lease_a)
    first.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    token = _until("agent a's lease file", lambda: json.loads(lease_a.read_text()).get("lease"))

    def token_in_redis() -> bool:
        record = json.loads(redis_server.command("GET", f"tcprelay:route:http:app.{DOMAIN}"))
        return token in (record["n"].get("node1") or {}).get("l", [])

    _until("agent a's lease token in node 1's entry", token_in_redis, TTL)
    lease_b = tmp_path / "lease-b.json"
    lease_b.write_text(lease_a.read_text())
    second = start_agent(procs, b.port, n2.relay.address, "--http", "app", name="agent-b", lease_file=lease_b)
    second.proc.wait_line(r"^(http://\S+)$", 20, stream="out")
    n2.relay.proc.wait_line(r"moved here from node node1", 10)
    n1.relay.proc.wait_line(r"was taken over by another node; closing it here", 2 * TTL)
    first.proc.wait_line(r"refused: http name app\.example\.test is taken .*on node node2", 20)
    assert _until("a visitor at node 1", lambda: _get(n1.http, f"app.{DOMAIN}") == (200, b"service b\n"))
