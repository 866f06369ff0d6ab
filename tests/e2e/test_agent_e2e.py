"""
End-to-end tests of the agent side: the real ``tcprelay expose`` and the
``tcprelay:`` endpoint against the real ``twistd tcprelay`` (and the Go
``legacyrelay``), with plain-socket visitors and a local echo service.

Helpers and fixtures come from :mod:`tests.e2e.support` (the fixtures
through conftest.py), the test certificates from
:mod:`tests.e2e.agent_fixtures`.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from tcprelay import handshake as hs
from tcprelay.mux.frames import ErrorCode
from tests.e2e.agent_fixtures import make_pki
from tests.muxpeer import ScriptedPeer
from tests.e2e.support import (
    HOST,
    STARTUP,
    TCPRELAY,
    TWISTD,
    EchoServer,
    Procs,
    echo_round_trip,
    exit_status_name,
    free_port_block,
    recv_exactly,
    recv_to_eof,
    start_agent,
    start_legacy_relay,
    start_relay,
    visit,
)

EchoFactory = Callable[[], EchoServer]


def no_tracebacks(lines: list[str]) -> None:
    """Bad input is reported in one line, never with a traceback."""
    bad = [line for line in lines if "Traceback" in line or "Unhandled" in line]
    assert not bad, "\n".join(lines)


# -- expose ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "first"),
    [
        (["--version"], 0, "tcprelay 0."),
        (["--help"], 0, "Usage: tcprelay COMMAND [options]"),
        (["expose"], 2, "tcprelay: missing LOCAL, the local service to publish"),
        (["expose", "3000", "--relay", "127.0.0.1:9", "--backoff-max", "-1"], 2,
         "tcprelay: --backoff-max must be at least 0.5 seconds"),
    ],
)
def test_expose_command_line_answers(tmp_path: Path, argv: list[str], code: int, first: str) -> None:
    """The installed ``tcprelay`` command: its own version and name, and a usage error that says what is wrong, at once."""
    result = subprocess.run(
        [str(TCPRELAY), *argv],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == code, result
    output = (result.stdout if code == 0 else result.stderr).splitlines()
    assert output and output[0].startswith(first), result
    assert "Traceback" not in result.stderr


def test_expose_prints_address_and_echoes_with_half_close(procs: Procs, echo_servers: EchoFactory) -> None:
    """`tcprelay expose` prints the public address alone on stdout and visitors' bytes echo exactly, FIN included."""
    relay = start_relay(procs)
    echo = echo_servers()
    agent = start_agent(procs, echo.port, relay.address)
    host, port = agent.address()
    assert host == "localhost" and port in relay.ports
    assert agent.proc.lines("out") == [f"localhost:{port}"]

    data = hashlib.sha256(b"seed").digest() * 8192  # 256 KiB: several windows' worth
    assert echo_round_trip(port, data) == data
    echo.wait_received(0, lambda got: got == data)

    # A second visitor in turn: short request, half-close, reply still arrives whole.
    with visit(port) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b"ping"
    no_tracebacks(agent.proc.lines() + relay.proc.lines())


def test_agent_reconnects_to_restarted_relay_on_the_same_port(procs: Procs, echo_servers: EchoFactory) -> None:
    """After the relay restarts, the agent reconnects by itself and gets the same public port back."""
    relay = start_relay(procs, pool=3)
    echo = echo_servers()
    # Another agent takes the first port, so ours is not simply the pool's first.
    other = start_agent(procs, echo.port, relay.address, "--backoff-max", "1", name="other")
    assert other.port() == relay.ports[0]
    agent = start_agent(procs, echo.port, relay.address, "--backoff-max", "1")
    port = agent.port()
    assert port == relay.ports[1]
    assert echo_round_trip(port, b"before") == b"before"

    relay.proc.signal(signal.SIGTERM)
    assert relay.proc.wait_exit(15) == 0, relay.proc.describe()
    agent.proc.wait_line(r"relay connection lost", 10, stream="err")

    again = start_relay(procs, pool=3, control=relay.control)
    again.proc.wait_line(rf"registered at localhost:{port}\b", 15)
    agent.proc.wait_line(rf"tunnel up at localhost:{port}\b", 10, stream="err", count=2)
    assert echo_round_trip(port, b"after") == b"after"
    assert agent.proc.running and agent.proc.lines("out") == [f"localhost:{port}"]
    other.proc.wait_line(rf"tunnel up at localhost:{relay.ports[0]}\b", 10, stream="err", count=2)


def test_restarted_agent_gets_its_leased_port_back(procs: Procs, echo_servers: EchoFactory, tmp_path: Path) -> None:
    """A killed agent's port is held for its lease: another agent queues instead of taking it, and the restarted agent gets it."""
    relay = start_relay(procs, "--lease", "30", pool=1)
    (only,) = relay.ports
    echo = echo_servers()
    lease_a = tmp_path / "a-lease.json"
    a1 = start_agent(procs, echo.port, relay.address, lease_file=lease_a, name="agentA")
    assert a1.port() == only
    saved = json.loads(lease_a.read_text())
    assert saved["port"] == only and isinstance(saved["lease"], str)

    a1.proc.signal(signal.SIGKILL)
    a1.proc.wait_exit(5)
    relay.proc.wait_line(rf"port {only} held for its lease", 10)

    b = start_agent(procs, echo.port, relay.address, name="agentB")
    b.proc.wait_line(r"queue position 1\b", STARTUP, stream="err")

    a2 = start_agent(procs, echo.port, relay.address, lease_file=lease_a, name="agentA2")
    assert a2.port() == only
    assert echo_round_trip(only, b"mine again") == b"mine again"
    assert b.proc.lines("out") == [], "agent B must not have been given the leased port"
    assert b.proc.running


# -- auth -------------------------------------------------------------------------


def test_wrong_secret_exits_3_once_and_right_secrets_register(
    procs: Procs, echo_servers: EchoFactory, tmp_path: Path
) -> None:
    """With auth on, a wrong secret ends the agent with exit 3 after one attempt, and either listed secret registers."""
    secrets = tmp_path / "secrets"
    secrets.write_text("# relay secrets\nfirst-secret\n\n  second-secret  \n")
    relay = start_relay(procs, "--secrets-file", secrets, pool=3)
    echo = echo_servers()

    wrong = start_agent(procs, echo.port, relay.address, "--secret", "not-it", "--backoff-max", "1", name="wrong")
    none = start_agent(procs, echo.port, relay.address, "--backoff-max", "1", name="nosecret")
    second_file = tmp_path / "agent-secret"
    second_file.write_text("second-secret\n")
    good1 = start_agent(procs, echo.port, relay.address, "--secret", "first-secret", name="good1")
    good2 = start_agent(procs, echo.port, relay.address, "--secret-file", second_file, name="good2")

    assert wrong.proc.wait_exit(10) == 3, wrong.proc.describe()
    assert none.proc.wait_exit(10) == 3, none.proc.describe()
    assert wrong.proc.lines("out") == [] and none.proc.lines("out") == []
    assert wrong.proc.matching(r"authentication failed", "err")
    assert none.proc.matching(r"requires a secret", "err")

    port1, port2 = good1.port(), good2.port()
    assert {port1, port2} <= set(relay.ports) and port1 != port2
    assert echo_round_trip(port1, b"one") == b"one"
    assert echo_round_trip(port2, b"two") == b"two"
    # The wrong agent tried exactly once: one failure line in the relay log.
    assert len(relay.proc.matching(r"refused: authentication failed")) == 1, relay.proc.describe()
    no_tracebacks(relay.proc.lines())


def test_legacy_go_service_is_refused_when_auth_is_on(procs: Procs, tmp_path: Path) -> None:
    """With auth on, an untyped (legacy) handshake from the Go echo service is refused with a clear log line."""
    from tests.interop import gobuild

    gobuild.require_go()
    legacyecho = gobuild.build("legacyecho")
    relay = start_relay(procs, "--secret", "s3cret", pool=2)
    service = procs.start([legacyecho, "-relay", relay.address, "-timeout", "0"], "legacyecho")
    relay.proc.wait_line(r"refused: authentication required: untyped \(legacy\) handshake refused", 10)
    code = service.wait_exit(10)
    assert not service.matching(r"^ADDRESS ", "out"), service.describe()
    assert code in (0, 1), exit_status_name(code)
    no_tracebacks(relay.proc.lines())


# -- hostile handshakes -------------------------------------------------------------


def _hello(client: ScriptedPeer, sid: int) -> dict[str, object]:
    client.pump_until(lambda: bool(client.messages(sid)))
    hello = client.messages(sid)[0]
    assert hello["type"] == "hello" and isinstance(hello["nonce"], str)
    return hello


@pytest.mark.parametrize(
    "attack",
    ["bad-mac", "mac-for-other-nonce", "oversize", "malformed-json", "nested-json", "missing-version"],
)
def test_tampered_handshake_is_refused_and_others_carry_on(
    procs: Procs, echo_servers: EchoFactory, attack: str
) -> None:
    """A register with a bad MAC or a broken message gets refused/GOAWAY, and a registered agent's visitors are unaffected."""
    relay = start_relay(procs, "--secret", "s3cret", pool=2)
    echo = echo_servers()
    good = start_agent(procs, echo.port, relay.address, "--secret", "s3cret")
    good_port = good.port()

    client = ScriptedPeer.dial(relay.control)
    try:
        sid = client.open_stream(hs.CONTROL_STREAM_TYPE)
        hello = _hello(client, sid)
        assert hello["auth"] is True
        nonce = str(hello["nonce"])
        if attack == "bad-mac":
            payload = hs.encode_message("register", mac="00" * 32, port=0, lease=None, proxy=False)
        elif attack == "mac-for-other-nonce":
            payload = hs.encode_message(
                "register", mac=hs.compute_mac(b"s3cret", hs.make_nonce()), port=0, proxy=False
            )
        elif attack == "oversize":
            payload = struct.pack(">H", hs.MAX_MESSAGE + 1) + b"{" * 64
        elif attack == "malformed-json":
            payload = struct.pack(">H", 9) + b'{"type":}'
        elif attack == "nested-json":
            body = b"[" * 2000 + b"]" * 2000
            payload = struct.pack(">H", len(body)) + body
        else:
            body = json.dumps({"type": "register", "mac": hs.compute_mac(b"s3cret", nonce)}).encode()
            payload = struct.pack(">H", len(body)) + body
        client.send(sid, payload)
        client.pump_until(lambda: client.goaway is not None)

        messages = [m for m in client.messages(sid) if m["type"] != "hello"]
        kinds = [m["type"] for m in messages]
        assert "ready" not in kinds
        assert kinds == ["refused"], kinds
        expected = ErrorCode.REFUSED_STREAM if "mac" in attack else ErrorCode.PROTOCOL_ERROR
        assert messages[0]["code"] == expected
        assert client.goaway is not None and client.goaway.error_code == expected
        client.pump_until(lambda: client.eof, timeout=10)  # the relay closes the session
    finally:
        client.close()

    line = "authentication failed" if "mac" in attack else "bad handshake"
    relay.proc.wait_line(rf"refused: {line}", 5)
    assert len(relay.proc.matching(r"registered at")) == 1
    assert echo_round_trip(good_port, b"still here") == b"still here"
    assert good.proc.running and good.proc.lines("out") == [f"localhost:{good_port}"]
    no_tracebacks(relay.proc.lines() + good.proc.lines())


# -- pool --------------------------------------------------------------------------


def test_queued_agent_reports_position_then_gets_freed_port(procs: Procs, echo_servers: EchoFactory) -> None:
    """With the pool full, a second agent reports queue position 1 and gets the port once the first agent stops."""
    relay = start_relay(procs, "--wait-timeout", "20", pool=1)
    (only,) = relay.ports
    echo = echo_servers()
    a = start_agent(procs, echo.port, relay.address, name="agentA")
    assert a.port() == only
    b = start_agent(procs, echo.port, relay.address, name="agentB")
    b.proc.wait_line(r"queue position 1\b", STARTUP, stream="err")
    assert b.proc.lines("out") == []

    a.proc.signal(signal.SIGTERM)
    assert a.proc.wait_exit(10) == 0, a.proc.describe()
    assert b.port(timeout=10) == only
    assert echo_round_trip(only, b"b now") == b"b now"


# -- TLS ---------------------------------------------------------------------------


def test_tls_control_port_with_ca_file(procs: Procs, echo_servers: EchoFactory, tmp_path: Path) -> None:
    """Over a TLS control endpoint the agent that trusts the relay's CA registers; one trusting another CA never does."""
    pki = make_pki(tmp_path)
    control = free_port_block(3)
    spec = f"ssl:{control}:interface={HOST}:privateKey={pki.key}:certKey={pki.cert}"
    relay = start_relay(procs, pool=2, control=control, control_spec=spec)
    echo = echo_servers()

    untrusting = start_agent(
        procs, echo.port, f"localhost:{control}", "--ca-file", pki.other_ca, "--backoff-max", "1", name="untrusting"
    )
    trusting = start_agent(procs, echo.port, f"localhost:{control}", "--ca-file", pki.ca, name="trusting")
    port = trusting.port()
    assert port in relay.ports
    assert echo_round_trip(port, b"secure") == b"secure"

    untrusting.proc.wait_line(r"relay connection lost", 10, stream="err", count=2)
    untrusting.proc.no_line_for(r".", 1.0, stream="out")
    assert untrusting.proc.running
    assert untrusting.proc.matching(r"relay connection lost .*certificate verify failed", "err")
    assert len(relay.proc.matching(r"registered at")) == 1

    # Leaving over TLS is prompt (the close does not wait for an abort timer)
    # and frees the port at once.
    stopped = time.monotonic()
    trusting.proc.signal(signal.SIGTERM)
    assert trusting.proc.wait_exit(5) == 0
    assert time.monotonic() - stopped < 3


def test_tls_mismatch_is_named_on_both_sides(procs: Procs, echo_servers: EchoFactory, tmp_path: Path) -> None:
    """
    A plain agent at a TLS control port, and a TLS agent at a plain one: each
    side says what is wrong (not only "connection lost"), and the agents keep
    retrying with backoff.
    """
    pki = make_pki(tmp_path)
    tls_control = free_port_block(3)
    spec = f"ssl:{tls_control}:interface={HOST}:privateKey={pki.key}:certKey={pki.cert}"
    tls_relay = start_relay(procs, pool=2, control=tls_control, control_spec=spec, name="tls-relay")
    plain_relay = start_relay(procs, pool=2, name="plain-relay")
    echo = echo_servers()

    plain = start_agent(procs, echo.port, f"{HOST}:{tls_control}", "--backoff-max", "1", name="plain")
    tls = start_agent(procs, echo.port, f"localhost:{plain_relay.control}", "--ca-file", pki.ca,
                      "--backoff-max", "1", name="tls")

    plain.proc.wait_line(r"^tcprelay: relay connection lost \(the relay closed the connection without a word"
                         r" \(a TLS control port .*--ca-file", 10, stream="err", count=2)
    tls_relay.proc.wait_line(r"ended: the TLS handshake failed .*the control port speaks TLS and the agent does not",
                             10, count=2)
    tls.proc.wait_line(r"^tcprelay: relay connection lost \(the relay's control port does not speak TLS: "
                       r"use --relay HOST:PORT without --ca-file", 10, stream="err", count=2)
    plain_relay.proc.wait_line(r"ended: this looks like a TLS ClientHello; the control port expects muxado "
                               r"\(plain TCP\)", 10, count=2)
    assert plain.proc.running and tls.proc.running
    assert not plain.proc.matching(".", "out") and not tls.proc.matching(".", "out")
    for proc in (plain.proc, tls.proc, tls_relay.proc, plain_relay.proc):
        no_tracebacks(proc.lines())


# -- tcprelay: endpoint -------------------------------------------------------------


def test_twistd_web_listens_through_the_relay(procs: Procs, tmp_path: Path) -> None:
    """`twistd web --listen tcprelay:...` serves a page to a visitor of the relay's public port."""
    relay = start_relay(procs, pool=2)
    site = tmp_path / "site"
    site.mkdir()
    content = b"served through tcprelay\n" * 10
    (site / "page.txt").write_bytes(content)
    web = procs.start(
        [
            TWISTD, "-n", "--pidfile=", "web",
            "--listen", f"tcprelay:host={HOST}:port={relay.control}",
            "--path", site,
        ],
        "twistd-web",
    )
    match = relay.proc.wait_line(r"registered at localhost:(\d+)", STARTUP)
    port = int(match.group(1))
    with visit(port) as sock:
        sock.sendall(b"GET /page.txt HTTP/1.0\r\nHost: example\r\n\r\n")
        response = recv_to_eof(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], response[:200]
    assert body == content
    # Stopping twistd stops the listening port: the agent leaves the relay.
    web.signal(signal.SIGTERM)
    assert web.wait_exit(15) in (0, -signal.SIGTERM), web.describe()  # twistd re-raises SIGTERM
    relay.proc.wait_line(rf"at localhost:{port} left", 10)


@pytest_twisted.ensureDeferred
async def test_server_endpoint_string_sees_public_port_and_visitor_address(reactor, procs: Procs) -> None:
    """serverFromString("tcprelay:...") listens on a public port, and its protocols see the visitor's real address."""
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
    from twisted.internet.protocol import Factory, Protocol

    relay = start_relay(procs, pool=2)
    peers: Deferred[object] = Deferred()

    class Greeter(Protocol):
        def connectionMade(self) -> None:
            peers.callback(self.transport.getPeer())
            self.transport.write(b"hi\n")

    class Visitor(Protocol):
        def __init__(self) -> None:
            self.got = Deferred()

        def dataReceived(self, data: bytes) -> None:
            if not self.got.called:
                self.got.callback(data)

    endpoint = serverFromString(reactor, f"tcprelay:host={HOST}:port={relay.control}")
    port = await endpoint.listen(Factory.forProtocol(Greeter)).addTimeout(STARTUP, reactor)
    visitor_proto = Visitor()
    try:
        public = port.getHost().port
        assert public in relay.ports
        visitor = await connectProtocol(TCP4ClientEndpoint(reactor, HOST, public), visitor_proto).addTimeout(
            10, reactor
        )
        peer = await peers.addTimeout(10, reactor)
        assert await visitor_proto.got.addTimeout(10, reactor) == b"hi\n"
        local = visitor.transport.getHost()
        assert peer == IPv4Address("TCP", local.host, local.port)
    finally:
        if visitor_proto.transport is not None:
            visitor_proto.transport.loseConnection()
        await port.stopListening().addTimeout(10, reactor)


# -- legacy relay --------------------------------------------------------------------


def test_agent_falls_back_to_legacy_go_relay(procs: Procs, echo_servers: EchoFactory) -> None:
    """Against the original Go relay the agent prints localhost:<port> and forwards plain visitor streams."""
    relay = start_legacy_relay(procs, 2)
    echo = echo_servers()
    agent = start_agent(procs, echo.port, relay.address, "--proxy-protocol", "v2")
    host, port = agent.address()
    assert (host, port) == ("localhost", relay.ports[0])
    relay.proc.wait_line(rf"^REGISTERED {port}$", 5, stream="out")
    agent.proc.wait_line(r"legacy relay", 5, stream="err")

    with visit(port) as sock:
        sock.sendall(b"plain bytes")
        assert recv_exactly(sock, 11) == b"plain bytes"
    # No PROXY header reached the local service: the first bytes are the visitor's own.
    assert echo.wait_received(0, lambda got: len(got) >= 11) == b"plain bytes"


# -- PROXY headers to the local service ----------------------------------------------


@pytest.mark.parametrize("mode", ["v2", "v1", "none"])
def test_proxy_protocol_to_local_service(procs: Procs, echo_servers: EchoFactory, mode: str) -> None:
    """The local service gets the visitor's address as a PROXY v2 header, a v1 line, or nothing, as asked."""
    relay = start_relay(procs, pool=2)
    echo = echo_servers()
    agent = start_agent(procs, echo.port, relay.address, "--proxy-protocol", mode)
    port = agent.port()
    data = b"visitor payload"
    with visit(port) as sock:
        source = sock.getsockname()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        echoed = recv_to_eof(sock)
    got = echo.wait_received(0, lambda b: b.endswith(data))
    assert echoed == got

    if mode == "none":
        assert got == data
        return
    if mode == "v2":
        info, rest = V2Parser().feed(got)
    else:
        assert got.startswith(b"PROXY TCP4 ")
        info, rest = V1Parser().feed(got)
    assert info is not None, got
    assert info.source == IPv4Address("TCP", source[0], source[1])
    assert info.destination == IPv4Address("TCP", HOST, port)
    assert rest == data
