"""
The SSH door's forwarding logic without sockets: a visitor's
``forwarded-tcpip`` channel (:class:`ForwardedChannel`) on a recording
connection, the route rules (:func:`named_kind`, :func:`lease_token`) and
the ``authorized_keys`` parser.
"""

from __future__ import annotations

from typing import Any

import pytest

from twisted.conch.ssh import forwarding, keys
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer
from twisted.internet.interfaces import IHalfCloseableProtocol

from tcprelay.relay.doors.ssh import ForwardedChannel, SshTunnel, lease_token, named_kind
from tcprelay.relay.doors.ssh_keys import load_host_key, parse_authorized_keys
from tcprelay.relay.routes import PortRoute


class FakeConn:
    """What a channel calls on its SSH connection, recorded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.stopped = False
        self.window = 65536
        self.label = "127.0.0.1:2222"
        self.peer = None
        self.credential = "ssh:SHA256:x"
        self.opened: list[tuple[Any, bytes]] = []

    def openChannel(self, channel: Any, extra: bytes) -> None:
        self.opened.append((channel, extra))

    def sendData(self, channel: Any, data: bytes) -> None:
        self.sent.append(("data", data))

    def sendEOF(self, channel: Any) -> None:
        self.sent.append(("eof", None))

    def sendClose(self, channel: Any) -> None:
        self.sent.append(("close", None))
        channel.localClosed = True

    def adjustWindow(self, channel: Any, n: int) -> None:
        if getattr(channel, "paused", False):
            return
        self.sent.append(("window", n))
        channel.localWindowLeft += n

    def data(self) -> bytes:
        return b"".join(d for kind, d in self.sent if kind == "data")


class Producer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.events: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.events.append("read-eof")

    def writeConnectionLost(self) -> None:
        self.events.append("write-eof")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.events.append("lost:" + type(reason.value).__name__)


class FakeVisitor:
    def __init__(self, first: bytes = b"") -> None:
        self.peer = IPv4Address("TCP", "203.0.113.7", 40000)
        self.first = first


def _tunnel() -> tuple[FakeConn, SshTunnel]:
    conn = FakeConn()
    tunnel = SshTunnel(conn, PortRoute(9001), "localhost", 9001, "tok")  # type: ignore[arg-type]
    return conn, tunnel


def _open(window: int = 1 << 20, first: bytes = b"") -> tuple[FakeConn, ForwardedChannel, Recorder, Producer]:
    conn, tunnel = _tunnel()
    channel = tunnel.open_stream(FakeVisitor(first))  # type: ignore[arg-type]
    protocol = Recorder()
    channel.attach(protocol)
    producer = Producer()
    channel.registerProducer(producer, True)
    channel.remoteWindowLeft = window
    channel.remoteMaxPacket = 32768
    channel.channelOpen(b"")
    return conn, channel, protocol, producer


def test_open_names_the_bind_and_the_visitor() -> None:
    conn, tunnel = _tunnel()
    channel = tunnel.open_stream(FakeVisitor(b"hello"))  # type: ignore[arg-type]
    [(opened, extra)] = conn.opened
    assert opened is channel
    assert forwarding.unpackOpen_forwarded_tcpip(extra) == (("localhost", 9001), ("203.0.113.7", 40000))
    assert conn.sent == []  # nothing before the agent confirms
    channel.remoteWindowLeft, channel.remoteMaxPacket = 1 << 20, 32768
    channel.channelOpen(b"")
    assert conn.data() == b"hello"
    assert tunnel.stream_count() == 1


def test_visitor_paused_while_the_agent_window_is_used_up() -> None:
    conn, channel, _, producer = _open(window=10)
    assert producer.calls == ["pause", "resume"]  # paused until open
    channel.write(b"0123456789abcdef")
    assert conn.data() == b"0123456789"
    assert producer.calls[-1] == "pause"
    channel.addWindowBytes(100)
    assert conn.data() == b"0123456789abcdef"
    assert producer.calls[-1] == "resume"


def test_eof_waits_for_buffered_bytes_then_follows_them() -> None:
    conn, channel, protocol, _ = _open(window=4)
    channel.write(b"abcdefgh")
    channel.loseWriteConnection()
    assert ("eof", None) not in conn.sent
    channel.addWindowBytes(4)
    assert conn.sent[-1] == ("eof", None)
    assert conn.data() == b"abcdefgh"
    assert protocol.events == ["write-eof"]


def test_no_window_granted_while_the_visitor_is_full() -> None:
    conn, channel, protocol, _ = _open()
    channel.pauseProducing()
    channel.localWindowLeft = 100  # the agent has sent most of the window
    conn.adjustWindow(channel, channel.localWindowSize - 100)
    assert not [s for s in conn.sent if s[0] == "window"]
    channel.resumeProducing()
    assert ("window", channel.localWindowSize - 100) in conn.sent


def test_agent_eof_then_close_end_the_visitor_cleanly() -> None:
    _, channel, protocol, _ = _open()
    channel.dataReceived(b"reply")
    channel.eofReceived()
    channel.closed()
    assert protocol.received == b"reply"
    assert protocol.events == ["read-eof", "lost:ConnectionDone"]


def test_lost_connection_aborts_the_visitor() -> None:
    conn, channel, protocol, _ = _open()
    conn.stopped = True
    channel.closed()
    assert protocol.events == ["lost:ConnectionLost"]


def test_agent_refusing_the_channel_ends_the_visitor() -> None:
    conn, tunnel = _tunnel()
    channel = tunnel.open_stream(FakeVisitor())  # type: ignore[arg-type]
    protocol = Recorder()
    channel.attach(protocol)
    channel.openFailed(Exception(b"connect failed", 2))
    assert protocol.events == ["lost:ConnectionLost"]


def test_abort_before_open_closes_at_once_on_open() -> None:
    conn, tunnel = _tunnel()
    channel = tunnel.open_stream(FakeVisitor(b"x"))  # type: ignore[arg-type]
    channel.attach(Recorder())
    channel.abortConnection()
    channel.remoteWindowLeft, channel.remoteMaxPacket = 1000, 1000
    channel.channelOpen(b"")
    assert conn.sent == [("close", None)]


def test_named_kind() -> None:
    assert named_kind("app", 80, http=True, tls=True) == "http"
    assert named_kind("app", 443, http=True, tls=True) == "tls"
    assert named_kind("app", 443, http=True, tls=False) is None
    for host in ("", "*", "localhost", "127.0.0.1", "::1", "10.0.0.1"):
        assert named_kind(host, 80, http=True, tls=True) is None
    assert named_kind("app", 8080, http=True, tls=True) is None


def test_lease_token_per_key_bind_and_index() -> None:
    a = lease_token("SHA256:a", "localhost", 0)
    assert a == lease_token("SHA256:a", "LOCALHOST", 0)
    assert len({a, lease_token("SHA256:b", "localhost", 0), lease_token("SHA256:a", "app", 0),
                lease_token("SHA256:a", "localhost", 9001), lease_token("SHA256:a", "localhost", 0, 1)}) == 5


def test_authorized_keys_with_options_comments_and_a_bad_line(tmp_path: Any) -> None:
    key, created = load_host_key(str(tmp_path / "k"))
    assert created
    public = key.public().toString("openssh").decode()
    text = (
        "# comment\n\n"
        f'permitlisten="9000-9010",restrict {public} alice@laptop\n'
        "ssh-ed25519 notbase64!!\n"
        f"{public}\n"
    )
    entries = parse_authorized_keys(text)
    assert len(entries) == 2
    assert entries[0].options == {"permitlisten": ["9000-9010"], "restrict": [""]}
    assert entries[0].comment == "alice@laptop"
    assert entries[0].key.blob() == key.public().blob()
    again, created = load_host_key(str(tmp_path / "k"))
    assert not created and again == key
    assert keys.Key.fromString((tmp_path / "k").read_bytes()).isPublic() is False


def test_ssh_options_need_both_files_and_a_readable_key_list(tmp_path: Any) -> None:
    import pytest
    from twisted.python import usage

    from tcprelay import tap

    def parse(*argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--control", "tcp:18080", *argv])
        return options

    with pytest.raises(usage.UsageError, match="--ssh needs --ssh-host-key"):
        parse("--ssh", "tcp:2222")
    with pytest.raises(usage.UsageError, match="--ssh-host-key needs --ssh"):
        parse("--ssh-host-key", str(tmp_path / "k"))
    with pytest.raises(usage.UsageError, match="--ssh-authorized-keys: cannot read"):
        parse("--ssh", "2222", "--ssh-host-key", str(tmp_path / "k"),
              "--ssh-authorized-keys", str(tmp_path / "missing"))
    (tmp_path / "public").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ4xHO8XpuZvohiH1tS8yVrsJOOJgYh3+KC5AWrYs8VK\n")
    (tmp_path / "authorized_keys").write_text("")
    with pytest.raises(usage.UsageError, match="holds a public key"):
        parse("--ssh", "2222", "--ssh-host-key", str(tmp_path / "public"),
              "--ssh-authorized-keys", str(tmp_path / "authorized_keys"))
    options = parse("--ssh", "2222", "--ssh-host-key", str(tmp_path / "k"),
                    "--ssh-authorized-keys", str(tmp_path / "authorized_keys"))
    assert options["ssh"] == "tcp:2222"
    assert not (tmp_path / "k").exists()  # created by the service on start, not by parsing


def test_permitlisten_becomes_claim_rules() -> None:
    """permitlisten options: ports, ranges, * and LABEL:80/443 names; none means anything; garbage is an error."""
    from twisted.conch.ssh import keys as ckeys
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tcprelay.relay.doors.ssh_keys import AuthorizedKey, key_rules

    key = ckeys.Key(ed25519.Ed25519PrivateKey.generate()).public()

    def rules(*values: str):  # type: ignore[no-untyped-def]
        return key_rules(AuthorizedKey(key, "fp", {"permitlisten": list(values)} if values else {}, ""))

    assert rules() is None
    r = rules('"9000-9002,9100"', '"app:80"', '"*.w:443"', '"localhost:9200"')
    assert r.ports == frozenset({9000, 9001, 9002, 9100, 9200})
    assert r.names == ("app", "*.w")
    assert r.allows_name("app.example.test", ["example.test"]) and not r.allows_name("b.example.test", ["example.test"])
    assert rules('"*"').ports is None
    with pytest.raises(ValueError, match="permitlisten"):
        rules('"nonsense"')
