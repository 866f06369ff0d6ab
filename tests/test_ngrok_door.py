"""
The ngrok door in process (tcprelay.relay.doors.ngrok), driven by a
scripted SDK (tests/ngrokpeer.py) on the memory relay: the golden bytes of
every reply (Auth, Bind, Unbind, errors, refused requests) and of a visitor's
Proxy stream, leases, backpressure, half-close and drain.  The real SDK is
in tests/e2e/test_ngrok_e2e.py.
"""

from __future__ import annotations

import json
import re
import struct

import pytest

from tcprelay.mux2 import rpc
from tcprelay.mux2.frames import ErrorCode
from tcprelay.mux2.session import WINDOW
from tests.memory_relay import MemoryRelay
from tests.ngrokpeer import NgrokPeer

SECRET = b"door-secret"


@pytest.fixture
def mr() -> MemoryRelay:
    return MemoryRelay("--ngrok", "tcp:0:interface=127.0.0.1", ports=3, secrets=[SECRET])


def authed(mr: MemoryRelay) -> NgrokPeer:
    peer = NgrokPeer(mr)
    assert "Error" not in peer.auth(SECRET.decode())
    return peer


def test_auth_reply_golden(mr: MemoryRelay) -> None:
    """Auth with a secret: Version (the SDK's first choice), a ClientId, and Extra, byte for byte."""
    peer = NgrokPeer(mr)
    body = json.dumps({"Version": ["3", "2"], "ClientId": "", "Extra": {"AuthToken": "door-secret"}}).encode()
    reply = peer.raw_request(rpc.AUTH, body)
    client_id = json.loads(reply)["ClientId"]
    assert re.fullmatch(r"[0-9a-f]{32}", client_id)
    assert reply == (
        b'{"Version":"3","ClientId":"' + client_id.encode() + b'","Extra":{"Version":"tcprelay 0.1.0",'
        b'"Region":"","Cookie":"","AccountName":"","SessionDuration":0,"PlanName":"","Banner":""}}'
    )
    assert peer.protocol.credential is not None


def test_auth_go_spelling(mr: MemoryRelay) -> None:
    """ngrok-go's Authtoken is the same field."""
    peer = NgrokPeer(mr)
    reply = peer.request(rpc.AUTH, {"Version": ["2"], "ClientId": "", "Extra": {"Authtoken": "door-secret"}})
    assert reply["Version"] == "2" and "Error" not in reply


def test_wrong_token_golden_and_closed(mr: MemoryRelay) -> None:
    """A wrong token: the error the SDK raises, counted; the session is closed a little later."""
    peer = NgrokPeer(mr)
    body = json.dumps({"Version": ["3"], "ClientId": "", "Extra": {"AuthToken": "nope"}}).encode()
    assert peer.raw_request(rpc.AUTH, body) == (
        b'{"Error":"authentication failed: the authtoken is not one of this relay\'s secrets\\nERR_NGROK_105"}'
    )
    assert mr.relay.stats.auth_failures == 1
    assert peer.request(rpc.BIND, {"Proto": "tcp"}) == {"Error": "authentication failed"}
    mr.clock.advance(6)
    peer.pump()
    assert peer.lost


def test_open_relay_takes_any_token() -> None:
    """Without secrets the relay is open, as for the other doors."""
    mr = MemoryRelay("--ngrok", "tcp:0:interface=127.0.0.1", ports=2)
    peer = NgrokPeer(mr)
    assert "Error" not in peer.auth("")
    assert peer.protocol.credential is None
    assert peer.bind()["URL"].startswith("tcp://127.0.0.1:")


def test_bind_before_auth(mr: MemoryRelay) -> None:
    """A Bind before Auth is refused."""
    assert NgrokPeer(mr).request(rpc.BIND, {"Proto": "tcp"}) == {"Error": "Bind before Auth"}


def test_bind_tcp_reply_golden(mr: MemoryRelay) -> None:
    """A tcp Bind gets a port of the range: Id (naming the port), URL, Proto, Opts (Addr, ProxyProto), Extra.Token."""
    peer = authed(mr)
    body = json.dumps(
        {"Id": "", "Proto": "tcp", "ForwardsTo": "x", "ForwardsProto": "", "Opts": {"Addr": "", "ProxyProto": 0},
         "Extra": {"Token": ""}}
    ).encode()
    reply = peer.raw_request(rpc.BIND, body)
    bind_id = json.loads(reply)["Id"]
    match = re.fullmatch(r"tcp-(\d+)-[0-9a-f]{16}", bind_id)
    assert match is not None
    port = int(match.group(1))
    assert port in mr.relay.config.ports
    address = f"127.0.0.1:{port}"
    assert reply == (
        b'{"Id":"' + bind_id.encode() + b'","URL":"tcp://' + address.encode() + b'","Proto":"tcp",'
        b'"Opts":{"Addr":"' + address.encode() + b'","ProxyProto":0},"Extra":{"Token":""}}'
    )
    assert mr.listening(port)
    assert mr.relay.tunnel_at(port).dialect == "ngrok"  # type: ignore[union-attr]


def test_bind_asks_for_a_port(mr: MemoryRelay) -> None:
    """Opts.Addr may name a port of the range; one outside it is refused."""
    peer = authed(mr)
    wanted = mr.relay.config.ports[2]
    assert peer.bind(Addr=f":{wanted}")["Opts"]["Addr"].endswith(f":{wanted}")
    reply = peer.bind(Addr="relay:1")
    assert reply["Error"].startswith("bind tcp refused: port 1 is outside the relay's range")
    assert mr.relay.stats.services_refused == 1


def test_visitor_proxy_stream_golden(mr: MemoryRelay) -> None:
    """A visitor becomes a Proxy stream: type 3, the LE length and JSON header, then its bytes; replies and FIN both ways."""
    peer = authed(mr)
    reply = peer.bind()
    port = int(reply["URL"].rpartition(":")[2])
    visitor = mr.visitor(port, first=b"hello")
    assert visitor is not None
    peer.pump()
    (sid, kind), = peer.opened.items()
    assert kind == rpc.PROXY and sid % 2 == 0
    peer_port = visitor.transport.getPeer().port
    header = (
        b'{"Id":"' + reply["Id"].encode() + b'","ClientAddr":"127.0.0.1:' + str(peer_port).encode()
        + b'","Proto":"tcp","EdgeType":"1","PassthroughTLS":false}'
    )
    assert bytes(peer.data[sid]) == struct.pack("<q", len(header)) + header + b"hello"
    peer.send(sid, b"world")
    assert visitor.read() == b"world"
    visitor.protocol.readConnectionLost()  # the visitor's FIN
    mr.clock.advance(0.001)  # a FIN may wait FIN_HOLD for company
    peer.pump()
    assert sid in peer.fin
    peer.send(sid, b"bye", fin=True)
    assert visitor.read() == b"bye"
    mr.settle()
    peer.pump()
    assert visitor.closed_by_relay


def test_proxy_proto_v1(mr: MemoryRelay) -> None:
    """Opts.ProxyProto 1: a PROXY v1 line with the visitor's address follows the proxy header."""
    peer = authed(mr)
    port = int(peer.bind(ProxyProto=1)["URL"].rpartition(":")[2])
    visitor = mr.visitor(port, first=b"x")
    assert visitor is not None
    peer.pump()
    (sid,) = peer.opened
    data = bytes(peer.data[sid])
    size = struct.unpack("<q", data[:8])[0]
    rest = data[8 + size :]
    vport = visitor.transport.getPeer().port
    assert rest == f"PROXY TCP4 127.0.0.1 127.0.0.1 {vport} {port}\r\n".encode() + b"x"


def test_visitor_that_never_reads_is_bounded_by_the_window(mr: MemoryRelay) -> None:
    """With the visitor's socket paused, the SDK can send 256 KiB on its stream and no more is taken."""
    peer = authed(mr)
    port = int(peer.bind()["URL"].rpartition(":")[2])
    visitor = mr.visitor(port)
    assert visitor is not None
    peer.pump()
    (sid,) = peer.opened
    visitor.transport.producer.pauseProducing()  # the visitor's socket is full
    visitor.transport.clear()
    peer.send(sid, b"z" * (4 * WINDOW))
    peer.pump()
    # what the relay took is one window: the rest waits in the SDK
    assert peer.client.send_window(sid) == 0
    assert peer.client.pending(sid) == 3 * WINDOW
    assert len(visitor.transport.value()) <= WINDOW
    visitor.transport.producer.resumeProducing()
    total = 0
    for _ in range(20):
        peer.pump()
        total += len(visitor.transport.value())
        visitor.transport.clear()
    assert total == 4 * WINDOW


def test_unbind(mr: MemoryRelay) -> None:
    """Unbind gives the port up at once (no lease) and replies {}."""
    peer = authed(mr)
    reply = peer.bind()
    port = int(reply["URL"].rpartition(":")[2])
    assert peer.request(rpc.UNBIND, {"Id": reply["Id"]}) == {}
    mr.settle()
    assert not mr.listening(port)
    assert mr.relay.registry.lease_count() == 0
    assert "Error" in peer.request(rpc.UNBIND, {"Id": reply["Id"]})


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (rpc.BIND_LABELED, "tcprelay does not implement StartTunnelWithLabel (labeled tunnels, edges): "
         "use an endpoint (tcp, http or tls) instead"),
        (rpc.RESTART, "tcprelay does not implement the Restart request"),
        (rpc.STOP, "tcprelay does not implement the Stop request"),
        (rpc.UPDATE, "tcprelay does not implement the Update request"),
        (rpc.STOP_TUNNEL, "tcprelay does not implement the StopTunnel request"),
    ],
)
def test_refused_requests_golden(mr: MemoryRelay, kind: int, text: str) -> None:
    """Requests tcprelay does not implement get an Error reply naming them."""
    peer = authed(mr)
    assert peer.raw_request(kind, b"{}") == rpc.encode_reply({"Error": text})


def test_bad_request_gets_an_error(mr: MemoryRelay) -> None:
    """A request that is not JSON gets an Error reply; the session lives."""
    peer = NgrokPeer(mr)
    assert json.loads(peer.raw_request(rpc.AUTH, b"not json"))["Error"].startswith("Auth: ")
    assert not peer.protocol.session.ended


def test_unknown_bind_proto(mr: MemoryRelay) -> None:
    """A Proto the relay does not serve is refused."""
    assert authed(mr).bind("udp")["Error"] == "bind udp refused: tcprelay binds tcp, http, https and tls endpoints"


def test_reconnect_with_the_same_id_gets_the_same_port(mr: MemoryRelay) -> None:
    """The session is lost: its port is held for the bind's Id, and a new session binding that Id gets it."""
    peer = authed(mr)
    reply = peer.bind()
    port = int(reply["URL"].rpartition(":")[2])
    peer.lose()
    mr.settle()
    assert mr.relay.registry.lease_count() == 1
    again = authed(mr)
    assert again.bind(bind_id=reply["Id"])["URL"] == reply["URL"]
    assert mr.listening(port)


def test_reconnect_replaces_a_live_old_session(mr: MemoryRelay) -> None:
    """A reconnecting SDK whose old session the relay still thinks alive takes its bind over."""
    peer = authed(mr)
    reply = peer.bind()
    again = authed(mr)
    assert again.bind(bind_id=reply["Id"])["URL"] == reply["URL"]
    assert not peer.protocol.tunnels


def test_id_names_its_port_after_a_restart(mr: MemoryRelay) -> None:
    """With no lease (a restarted relay), a tcp Id still gets the port it names when free."""
    wanted = mr.relay.config.ports[1]
    reply = authed(mr).bind(bind_id=f"tcp-{wanted}-0123456789abcdef")
    assert reply["URL"] == f"tcp://127.0.0.1:{wanted}"
    assert reply["Id"] == f"tcp-{wanted}-0123456789abcdef"


def test_heartbeat_is_echoed_by_the_door(mr: MemoryRelay) -> None:
    """The SDK's heartbeat stream is echoed and does not count as a stream."""
    peer = authed(mr)
    sid = peer.client.open_stream(0xFFFFFFFF)
    peer.send(sid, b"\x01\x02\x03\x04")
    assert bytes(peer.data[sid]) == b"\x01\x02\x03\x04"
    assert peer.protocol.stream_count() == 0


def test_silent_sdk_is_closed(mr: MemoryRelay) -> None:
    """An SDK that says its heartbeat is 1 s (+1 s) and then stays silent is closed as timed out."""
    peer = NgrokPeer(mr)
    peer.auth(SECRET.decode(), HeartbeatInterval=1_000_000_000, HeartbeatTolerance=1_000_000_000)
    assert peer.protocol.session.idle_timeout == mr.relay.config.session.heartbeat_tolerance
    mr.clock.advance(mr.relay.config.session.heartbeat_tolerance * 2)
    mr.clock.advance(mr.relay.config.session.heartbeat_tolerance)
    peer.pump()
    assert peer.lost
    assert mr.relay.stats.heartbeat_timeouts == 1


def test_drain_closes_routes_and_session(mr: MemoryRelay) -> None:
    """On drain, the port closes and the SDK gets a GOAWAY."""
    peer = authed(mr)
    port = int(peer.bind()["URL"].rpartition(":")[2])
    mr.relay.drain()
    mr.settle()
    peer.pump()
    assert not mr.listening(port)
    assert peer.ended is not None and peer.ended.remote and peer.ended.error_code == ErrorCode.NONE


def test_http_bind_claims_a_name() -> None:
    """An http Bind with a Hostname claims that name on the shared HTTP entrance; Opts come back."""
    mr = MemoryRelay(
        "--ngrok", "tcp:0:interface=127.0.0.1", "--http", "tcp:0:interface=127.0.0.1",
        "--domain", "example.test", ports=2,
    )
    peer = NgrokPeer(mr)
    peer.auth()
    opts = {"Hostname": "app", "Auth": "", "Subdomain": "", "HostHeaderRewrite": False, "ProxyProto": 0}
    reply = peer.bind("http", **opts)
    assert reply["URL"].startswith("http://app.example.test")
    assert reply["Proto"] == "http" and reply["Opts"]["Hostname"] == "app.example.test"
    assert mr.relay.find_named("http", "app.example.test") is not None
    other = NgrokPeer(mr)
    other.auth()
    assert "is taken" in other.bind("http", **opts)["Error"]


def test_ngrok_option(tmp_path: object) -> None:
    """--ngrok takes an endpoint (a bare port becomes tcp:), refuses a bad one, and adds the door to the service."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python import usage

    from tcprelay import tap
    from tcprelay.relay.doors.ngrok import NgrokDoor

    def parse(*argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--control", "tcp:18080", *argv])
        return options

    assert parse("--ngrok", "4443")["ngrok"] == "tcp:4443"
    assert parse()["ngrok"] is None
    with pytest.raises(usage.UsageError, match="--ngrok 'ssl:4443:privateKey=/nonexistent"):
        parse("--ngrok", "ssl:4443:privateKey=/nonexistent/key.pem")
    service = tap.makeService(parse("--ngrok", "tcp:4443"), MemoryReactorClock())
    doors = [s for s in service if isinstance(s, NgrokDoor)]
    assert len(doors) == 1 and doors[0].name == "ngrok"


def test_a_lost_session_leaves_no_reference_cycle(mr: MemoryRelay, no_cyclic_gc: None) -> None:
    """An SDK session that bound a port, served a visitor and was lost is freed by reference counting, tunnel and mux2 session with it (the daemon freezes long-lived objects between full sweeps: tcprelay.process)."""
    import weakref

    peer = authed(mr)
    port = int(peer.bind()["URL"].rpartition(":")[2])
    visitor = mr.visitor(port, first=b"hello")
    assert visitor is not None
    peer.pump()
    (sid, _), = peer.opened.items()
    peer.send(sid, b"world")
    assert visitor.read() == b"world"
    (tunnel,) = peer.protocol.tunnels.values()
    refs = [weakref.ref(o) for o in (peer.protocol, peer.protocol.session, tunnel)]
    del tunnel
    peer.lose()
    mr.settle()
    assert visitor.closed_by_relay and not mr.relay.sessions
    del peer, visitor
    assert [ref() for ref in refs] == [None, None, None]
