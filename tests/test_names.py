"""
Named routes in process: agents claim names on the relay's shared HTTP and
TLS entrances, visitors are routed by Host and SNI (RelayFixture, real
loopback sockets, tcprelay's own agent).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from tcprelay.agent.client import Agent, AgentConfig, AgentRefused
from tcprelay.testing import RelayFixture, free_ports
from tests.relay_helpers import bounded, wait_for

DOMAIN = "example.test"


class Answer(Protocol):
    """A local service: records what it reads, answers the first read with ``text``."""

    def __init__(self, text: bytes, seen: list[bytes]) -> None:
        self.text = text
        self.seen = seen
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        first = not self.data
        self.data += data
        if first:
            self.transport.write(self.text)  # type: ignore[union-attr]

    def connectionLost(self, reason: object = None) -> None:
        self.seen.append(self.data)


class Named:
    """A relay with --http and --tls entrances, and the agents of a test."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.http_port, self.tls_port = free_ports(2)
        self.agents: list[Agent] = []
        self.relay: Optional[RelayFixture] = None

    async def start(self, *args: str) -> RelayFixture:
        self.relay = await bounded(
            RelayFixture.start(
                self.reactor,
                "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
                "--tls", f"tcp:{self.tls_port}:interface=127.0.0.1",
                "--domain", DOMAIN,
                *args,
            ),
            self.reactor,
        )
        return self.relay

    def agent(self, kind: str, name: str, text: bytes, seen: list[bytes], **config: Any) -> Agent:
        assert self.relay is not None
        made = Agent(
            self.relay.control_endpoint,
            AgentConfig(kind=kind, name=name, proxy=False, backoff_initial=0.05, **config),
            self.reactor,
            lambda stream, header: Answer(text, seen),
        )
        self.agents.append(made)
        made.startService()
        return made

    async def stop(self) -> None:
        for made in self.agents:
            await bounded(made.stopService(), self.reactor)
        if self.relay is not None:
            await bounded(self.relay.stop(), self.reactor)


@pytest.fixture
def named(reactor: Any) -> Any:
    env = Named(reactor)
    yield env
    pytest_twisted.blockon(Deferred.fromCoroutine(env.stop()))


def visit(reactor: Any, port: int, data: bytes) -> Deferred[bytes]:
    """Send ``data`` to ``port`` from a thread-free blocking socket in a thread; what comes back to EOF."""
    from twisted.internet.threads import deferToThread

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(data)
            got = b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    if got.endswith(b"!"):
                        break
            except (socket.timeout, ConnectionResetError):
                pass
            return got

    return deferToThread(run)


def request(host: str) -> bytes:
    return f"GET /x HTTP/1.1\r\nHost: {host}\r\nUser-Agent: test\r\n\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_http_visitors_reach_the_agent_of_their_host(reactor: Any, named: Named) -> None:
    """Two agents, names a and b: each Host reaches its own, with the request head forwarded unchanged."""
    await named.start()
    seen_a: list[bytes] = []
    seen_b: list[bytes] = []
    a = named.agent("http", "a", b"from a!", seen_a)
    b = named.agent("http", "b", b"from b!", seen_b)
    assert await bounded(a.when_ready(), reactor) == f"http://a.{DOMAIN}:{named.http_port}/"
    assert await bounded(b.when_ready(), reactor) == f"http://b.{DOMAIN}:{named.http_port}/"
    assert await bounded(visit(reactor, named.http_port, request(f"A.{DOMAIN}")), reactor) == b"from a!"
    assert await bounded(visit(reactor, named.http_port, request(f"b.{DOMAIN}:{named.http_port}")), reactor) == b"from b!"
    await wait_for(reactor, lambda: seen_a and seen_b, what="the visitors' ends")
    assert seen_a == [request(f"A.{DOMAIN}")]


@pytest_twisted.ensureDeferred
async def test_unknown_host_gets_404_naming_it(reactor: Any, named: Named) -> None:
    await named.start()
    reply = await bounded(visit(reactor, named.http_port, request(f"nobody.{DOMAIN}")), reactor)
    assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert f"no tunnel for nobody.{DOMAIN}".encode() in reply
    assert named.relay.relay.stats.visitors_unrouted == 1  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_malformed_and_oversize_heads_get_400(reactor: Any, named: Named) -> None:
    await named.start()
    bad = await bounded(visit(reactor, named.http_port, b"NOT HTTP AT ALL\r\n\r\n"), reactor)
    assert bad.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    big = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 20000 + b"\r\n\r\n"
    reply = await bounded(visit(reactor, named.http_port, big), reactor)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"over 16384" in reply


@pytest_twisted.ensureDeferred
async def test_slow_head_gets_408(reactor: Any, named: Named) -> None:
    await named.start("--head-timeout", "0.3")
    reply = await bounded(visit(reactor, named.http_port, b"GET / HTTP/1.1\r\nHost: a"), reactor)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


@pytest_twisted.ensureDeferred
async def test_wildcard_route_and_exact_name_first(reactor: Any, named: Named) -> None:
    await named.start()
    wild = named.agent("http", "*.w", b"wildcard!", [])
    exact = named.agent("http", "x.w", b"exact!", [])
    assert await bounded(wild.when_ready(), reactor) == f"http://*.w.{DOMAIN}:{named.http_port}/"
    await bounded(exact.when_ready(), reactor)
    assert await bounded(visit(reactor, named.http_port, request(f"y.w.{DOMAIN}")), reactor) == b"wildcard!"
    assert await bounded(visit(reactor, named.http_port, request(f"deep.y.w.{DOMAIN}")), reactor) == b"wildcard!"
    assert await bounded(visit(reactor, named.http_port, request(f"x.w.{DOMAIN}")), reactor) == b"exact!"


def client_hello(server_hostname: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


@pytest_twisted.ensureDeferred
async def test_tls_visitors_are_routed_by_sni_untouched(reactor: Any, named: Named) -> None:
    """The ClientHello reaches the agent of its server name byte for byte (the relay does not terminate TLS)."""
    await named.start()
    seen: list[bytes] = []
    agent = named.agent("tls", "s", b"!", seen)
    assert await bounded(agent.when_ready(), reactor) == f"https://s.{DOMAIN}:{named.tls_port}/"
    hello = client_hello(f"s.{DOMAIN}")
    assert await bounded(visit(reactor, named.tls_port, hello), reactor) == b"!"
    await wait_for(reactor, lambda: seen, what="the visitor's end")
    assert seen == [hello]


@pytest_twisted.ensureDeferred
async def test_unknown_sni_gets_unrecognized_name_alert(reactor: Any, named: Named) -> None:
    await named.start()
    reply = await bounded(visit(reactor, named.tls_port, client_hello(f"nobody.{DOMAIN}")), reactor)
    assert reply[:1] == b"\x15" and reply[-2:] == b"\x02\x70"


@pytest_twisted.ensureDeferred
async def test_a_taken_name_is_refused_until_free(reactor: Any, named: Named) -> None:
    """A second agent asking for a name in use is refused (and retries); it gets the name once the first leaves."""
    await named.start()
    first = named.agent("http", "app", b"first!", [])
    await bounded(first.when_ready(), reactor)
    refusals: list[str] = []

    class Observer:
        def ready(self, *a: object) -> None: ...
        def queued(self, *a: object) -> None: ...
        def lost(self, reason: str, retry_in: object) -> None:
            refusals.append(reason)
        def refused(self, reason: str, fatal: bool) -> None:
            refusals.append(reason)

    second = Agent(
        named.relay.control_endpoint,  # type: ignore[union-attr]
        AgentConfig(kind="http", name="app", proxy=False, backoff_initial=0.05, backoff_max=0.1),
        reactor,
        lambda s, h: Answer(b"second!", []),
        observer=Observer(),
    )
    named.agents.append(second)
    second.startService()
    await wait_for(reactor, lambda: any("is taken" in r for r in refusals), what="the refusal")
    await bounded(first.stopService(), reactor)
    await bounded(second.when_ready(), reactor)
    assert await bounded(visit(reactor, named.http_port, request(f"app.{DOMAIN}")), reactor) == b"second!"


@pytest_twisted.ensureDeferred
async def test_a_name_outside_the_domains_is_refused_for_good(reactor: Any, named: Named) -> None:
    await named.start()
    agent = named.agent("http", "app.elsewhere.org.", b"", [])
    with pytest.raises(AgentRefused, match="under none of this relay's domains"):
        await bounded(agent.when_done(), reactor)


@pytest_twisted.ensureDeferred
async def test_a_reconnecting_agent_keeps_its_name(reactor: Any, named: Named) -> None:
    """A lost session's name is held for its lease: another agent cannot take it, the same agent gets it back."""
    await named.start("--lease", "30")
    agent = named.agent("http", "keep", b"kept!", [])
    await bounded(agent.when_ready(), reactor)
    relay = named.relay
    assert relay is not None
    from twisted.internet.endpoints import TCP4ClientEndpoint

    agent.relay = TCP4ClientEndpoint(reactor, "127.0.0.1", free_ports(1)[0])  # cannot come back yet
    agent.session.transport.abortConnection()  # type: ignore[union-attr]
    await wait_for(reactor, lambda: relay.relay.registry.lease_count() == 1, what="the name held")
    assert relay.relay.find_named("http", f"keep.{DOMAIN}") is None
    thief = named.agent("http", "keep", b"stolen!", [], backoff_max=0.1)
    await wait_for(reactor, lambda: thief._attempt >= 2, what="the other agent refused")
    assert thief.address is None
    agent.relay = relay.control_endpoint
    await wait_for(reactor, lambda: agent.session is not None and agent.session.ready and relay.relay.find_named("http", f"keep.{DOMAIN}") is not None, what="the agent back")
    assert relay.relay.registry.lease_count() == 0, "the lease was taken up"
    assert await bounded(visit(reactor, named.http_port, request(f"keep.{DOMAIN}")), reactor) == b"kept!"


@pytest_twisted.ensureDeferred
async def test_the_endpoint_serves_a_factory_under_a_name(reactor: Any, named: Named) -> None:
    """serverFromString("tcprelay:...:kind=http:name=web") listens on a name; getHost() is the name and the entrance's port."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory

    relay = await named.start()
    endpoint = serverFromString(reactor, f"tcprelay:host=127.0.0.1:port={relay.control_port}:kind=http:name=web")
    port = await bounded(endpoint.listen(Factory.forProtocol(lambda: Answer(b"web!", []))), reactor)
    try:
        host = port.getHost()
        assert (host.host, host.port) == (f"web.{DOMAIN}", named.http_port)
        assert await bounded(visit(reactor, named.http_port, request(f"web.{DOMAIN}")), reactor) == b"web!"
    finally:
        await bounded(port.stopListening(), reactor)


@pytest_twisted.ensureDeferred
async def test_status_and_metrics_show_named_routes(reactor: Any, named: Named) -> None:
    """/status lists a named route by kind and name; unrouted visitors are counted under a fixed metric."""
    from tcprelay.relay.metrics import RelayCollector, status

    relay = await named.start()
    agent = named.agent("http", "st", b"!", [])
    await bounded(agent.when_ready(), reactor)
    await bounded(visit(reactor, named.http_port, request(f"nope.{DOMAIN}")), reactor)
    doc = status(relay.relay)
    [service] = doc["services"]
    assert service["route"] == {"kind": "http", "name": f"st.{DOMAIN}"}
    assert service["address"] == f"http://st.{DOMAIN}:{named.http_port}/"
    assert doc["visitors"]["unrouted"] == 1
    [family] = [m for m in RelayCollector(relay.relay).collect() if m.name == "tcprelay_visitors_unrouted"]
    assert [s.value for s in family.samples if s.name.endswith("_total")] == [1]


@pytest_twisted.ensureDeferred
async def test_named_visitor_address_reaches_the_agent(reactor: Any, named: Named) -> None:
    """With PROXY on (extended agents), a named route's visitor arrives with its real address and the entrance's."""
    relay = await named.start()
    headers: list[Any] = []

    def handler(stream: Any, header: Any) -> Answer:
        headers.append(header)
        return Answer(b"!", [])

    agent = Agent(relay.control_endpoint, AgentConfig(kind="http", name="px", proxy=True), reactor, handler)
    named.agents.append(agent)
    agent.startService()
    await bounded(agent.when_ready(), reactor)
    assert await bounded(visit(reactor, named.http_port, request(f"px.{DOMAIN}")), reactor) == b"!"
    [header] = headers
    assert header.source_host == "127.0.0.1" and header.source_port > 0
    assert (header.dest_host, header.dest_port) == ("127.0.0.1", named.http_port)


@pytest_twisted.ensureDeferred
async def test_a_client_hello_in_tiny_records_and_reads_is_routed(reactor: Any, named: Named) -> None:
    """A ClientHello cut into 1-byte TLS records, sent a few bytes at a time, is routed and forwarded byte for byte."""
    import time

    from twisted.internet.threads import deferToThread

    from tests.test_sniff import refragment

    await named.start()
    seen: list[bytes] = []
    agent = named.agent("tls", "tiny", b"!", seen)
    await bounded(agent.when_ready(), reactor)
    hello = refragment(client_hello(f"tiny.{DOMAIN}"), 1)

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", named.tls_port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(hello), 700):
                sock.sendall(hello[i : i + 700])
                time.sleep(0.01)
            return sock.recv(10)

    assert await bounded(deferToThread(run), reactor) == b"!"
    await wait_for(reactor, lambda: seen, what="the visitor's end")
    assert seen == [hello]
