"""
Pure unit tests of :mod:`tcprelay.handshake`: the control-stream messages,
the legacy/extended reply reader, the HMAC challenge-response and the PROXY
protocol headers (checked against Twisted's own PROXY parsers).
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from tcprelay import handshake as hs


def frame(body: bytes) -> bytes:
    """A raw length-prefixed message around ``body``."""
    return struct.pack(">H", len(body)) + body


def frame_json(obj: object) -> bytes:
    """A raw length-prefixed message holding ``obj`` as JSON."""
    return frame(json.dumps(obj).encode("utf-8"))


# -- messages -----------------------------------------------------------------


def test_message_round_trip() -> None:
    """An encoded message decodes to its type, the current version and its fields."""
    data = hs.encode_message("register", mac="ab" * 32, port=8081, lease=None, proxy=True)
    (length,) = struct.unpack(">H", data[:2])
    assert length == len(data) - 2
    assert hs.MessageReader().feed(data) == [
        {"type": "register", "v": hs.VERSION, "mac": "ab" * 32, "port": 8081, "lease": None, "proxy": True}
    ]


def test_several_messages_in_one_chunk_come_out_in_order() -> None:
    """Messages arriving back to back in one read are all returned, in order."""
    data = (
        hs.encode_message("queued", position=2)
        + hs.encode_message("queued", position=1)
        + hs.encode_message("ready", address="localhost:8081", port=8081)
    )
    messages = hs.MessageReader().feed(data)
    assert [(m["type"], m.get("position")) for m in messages] == [
        ("queued", 2),
        ("queued", 1),
        ("ready", None),
    ]


def test_byte_at_a_time_feeding_yields_the_same_messages() -> None:
    """Feeding one byte at a time gives each message exactly once, when its last byte arrives."""
    data = hs.encode_message("hello", nonce="00" * 32, auth=True) + hs.encode_message(
        "refused", reason="no", code=7
    )
    reader = hs.MessageReader()
    got = []
    for i in range(len(data)):
        out = reader.feed(data[i : i + 1])
        if out:
            got.append((i, out))
    first_end = len(hs.encode_message("hello", nonce="00" * 32, auth=True)) - 1
    assert [i for i, _ in got] == [first_end, len(data) - 1]
    assert got[0][1][0]["type"] == "hello" and got[0][1][0]["auth"] is True
    assert got[1][1][0] == {"type": "refused", "v": 1, "reason": "no", "code": 7}


def test_unknown_fields_and_newer_versions_are_accepted() -> None:
    """Fields a reader does not know are kept but ignored, and a higher version still decodes."""
    data = frame_json({"type": "hello", "v": 7, "nonce": "aa", "future": {"x": [1, 2]}})
    (message,) = hs.MessageReader().feed(data)
    assert message["type"] == "hello" and message["nonce"] == "aa" and message["v"] == 7


def test_message_of_exactly_max_size_is_accepted() -> None:
    """A message body of exactly MAX_MESSAGE bytes is within the limit."""
    head = b'{"type":"x","v":1,"pad":"'
    body = head + b"a" * (hs.MAX_MESSAGE - len(head) - 2) + b'"}'
    assert len(body) == hs.MAX_MESSAGE
    (message,) = hs.MessageReader().feed(frame(body))
    assert message["type"] == "x"


def test_oversize_length_is_rejected_before_the_body_arrives() -> None:
    """A length prefix over MAX_MESSAGE is a HandshakeError as soon as the two length bytes are in."""
    reader = hs.MessageReader()
    with pytest.raises(hs.HandshakeError, match="exceeds"):
        reader.feed(struct.pack(">H", hs.MAX_MESSAGE + 1))
    with pytest.raises(hs.HandshakeError):
        hs.MessageReader().feed(b"\xff\xff")


def test_encoding_an_oversize_message_is_refused() -> None:
    """The encoder never produces a message the peer would have to reject."""
    with pytest.raises(ValueError):
        hs.encode_message("register", pad="a" * hs.MAX_MESSAGE)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{not json", id="malformed-json"),
        pytest.param(b"\xff\xfe\xfd", id="not-utf8"),
        pytest.param(b"[1, 2, 3]", id="not-an-object"),
        pytest.param(b'"hello"', id="bare-string"),
        pytest.param(b'{"v": 1}', id="missing-type"),
        pytest.param(b'{"type": 5, "v": 1}', id="type-not-string"),
        pytest.param(b'{"type": "hello"}', id="missing-version"),
        pytest.param(b'{"type": "hello", "v": "1"}', id="version-string"),
        pytest.param(b'{"type": "hello", "v": 0}', id="version-zero"),
        pytest.param(b'{"type": "hello", "v": 1.5}', id="version-float"),
        pytest.param(b"[" * 2000 + b"]" * 2000, id="deeply-nested"),
        pytest.param(b'{"type": "x", "v": 1, "a": ' + b"[" * 1500 + b"]" * 1500 + b"}", id="nested-field"),
    ],
)
def test_malformed_message_is_a_handshake_error(body: bytes) -> None:
    """Any body that is not a JSON object with a string type and a valid version is a HandshakeError."""
    assert len(body) <= hs.MAX_MESSAGE
    with pytest.raises(hs.HandshakeError):
        hs.MessageReader().feed(frame(body))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_random_bytes_raise_only_handshake_error(chunks: list[bytes]) -> None:
    """Whatever bytes arrive, in whatever chunks, the reader returns dicts or raises HandshakeError."""
    reader = hs.MessageReader()
    try:
        for chunk in chunks:
            for message in reader.feed(chunk):
                assert isinstance(message, dict) and isinstance(message["type"], str)
    except hs.HandshakeError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=10,
        ),
        max_size=5,
    ),
    st.integers(min_value=1, max_value=17),
)
def test_well_formed_json_bodies_raise_only_handshake_error(values: list[object], step: int) -> None:
    """Valid JSON that is not a proper message (and proper ones) never raises anything but HandshakeError."""
    data = b"".join(frame_json(v) for v in values) + hs.encode_message("ok", n=len(values))
    reader = hs.MessageReader()
    try:
        out = []
        for i in range(0, len(data), step):
            out += reader.feed(data[i : i + step])
    except hs.HandshakeError:
        return
    assert out[-1]["type"] == "ok"


# -- legacy or extended -----------------------------------------------------------


def test_bare_host_port_then_eof_is_legacy() -> None:
    """A relay that answers with a bare ``localhost:8081`` is recognised as legacy."""
    reader = hs.LegacyOrMessageReader()
    assert reader.feed(b"localhost:8081") == []
    assert reader.legacy is True
    assert reader.legacy_address() == "localhost:8081"


def test_legacy_reply_byte_at_a_time() -> None:
    """A legacy reply split into single bytes is still recognised and read whole."""
    reader = hs.LegacyOrMessageReader()
    for b in b"127.0.0.1:9001":
        assert reader.feed(bytes([b])) == []
    assert reader.legacy is True
    assert reader.legacy_address() == "127.0.0.1:9001"


def test_extended_messages_are_not_taken_for_legacy() -> None:
    """Length-prefixed messages are read as the extended dialect, even one byte at a time."""
    data = hs.encode_message("hello", nonce="ab", auth=False) + hs.encode_message("queued", position=1)
    reader = hs.LegacyOrMessageReader()
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
        if i == 0:
            assert reader.legacy is None
    assert reader.legacy is False
    assert [m["type"] for m in out] == ["hello", "queued"]


@pytest.mark.parametrize("text", [b"", b"localhost", b"localhost:", b":8081", b"host:80x1"])
def test_bad_legacy_address_is_a_handshake_error(text: bytes) -> None:
    """A legacy reply that is not HOST:PORT is a HandshakeError at end of stream."""
    reader = hs.LegacyOrMessageReader()
    reader.feed(text)
    with pytest.raises(hs.HandshakeError):
        reader.legacy_address()


def test_overlong_legacy_reply_is_a_handshake_error() -> None:
    """A 'legacy' reply that never ends is cut off instead of buffered without limit."""
    reader = hs.LegacyOrMessageReader()
    with pytest.raises(hs.HandshakeError):
        for _ in range(100):
            reader.feed(b"x" * 64)


# -- challenge-response ----------------------------------------------------------


def test_mac_with_the_right_secret_is_accepted() -> None:
    """A MAC computed under the shared secret over the relay's nonce passes the check."""
    nonce = hs.make_nonce()
    assert len(nonce) == 64 and nonce != hs.make_nonce()
    mac = hs.compute_mac(b"s3cret", nonce)
    assert hs.check_mac([b"s3cret"], nonce, mac)


def test_mac_with_a_wrong_secret_is_rejected() -> None:
    """A MAC computed under another secret fails the check."""
    nonce = hs.make_nonce()
    assert not hs.check_mac([b"s3cret"], nonce, hs.compute_mac(b"guess", nonce))


def test_mac_for_another_nonce_is_rejected() -> None:
    """A MAC computed over a different (tampered or replayed) nonce fails the check."""
    nonce = hs.make_nonce()
    other = ("0" if nonce[0] != "0" else "1") + nonce[1:]
    assert not hs.check_mac([b"s3cret"], nonce, hs.compute_mac(b"s3cret", other))
    assert not hs.check_mac([b"s3cret"], nonce, hs.compute_mac(b"s3cret", hs.make_nonce()))


@pytest.mark.parametrize("mac", [None, 123, b"bytes", ["a"], {"m": 1}, "", "é" * 64])
def test_mac_of_the_wrong_kind_is_rejected(mac: object) -> None:
    """A missing, non-string or non-ASCII MAC fails the check without raising."""
    assert not hs.check_mac([b"s3cret"], hs.make_nonce(), mac)


def test_any_of_several_secrets_is_accepted() -> None:
    """With several accepted secrets, a MAC under any one of them passes and others fail."""
    secrets = [b"first", b"second", b"third"]
    nonce = hs.make_nonce()
    for secret in secrets:
        assert hs.check_mac(secrets, nonce, hs.compute_mac(secret, nonce))
    assert not hs.check_mac(secrets, nonce, hs.compute_mac(b"fourth", nonce))
    assert not hs.check_mac([], nonce, hs.compute_mac(b"first", nonce))


def test_mac_does_not_contain_the_secret() -> None:
    """The MAC is a fixed-size hex digest that does not carry the secret."""
    secret = b"a-very-recognisable-secret"
    mac = hs.compute_mac(secret, "ab" * 32)
    assert re.fullmatch("[0-9a-f]{64}", mac), mac
    assert secret.hex() not in mac and secret.decode() not in mac


# -- PROXY protocol ----------------------------------------------------------


def test_proxy_v2_ipv4_parses_with_twisted() -> None:
    """A v2 IPv4 header is read by Twisted's parser as the same source and destination."""
    header = hs.encode_proxy_v2(hs.ProxyHeader("192.0.2.7", 51234, "127.0.0.1", 8081))
    info = V2Parser.parse(header)
    assert info.source == IPv4Address("TCP", "192.0.2.7", 51234)
    assert info.destination == IPv4Address("TCP", "127.0.0.1", 8081)


def test_proxy_v2_ipv6_parses_with_twisted() -> None:
    """A v2 IPv6 header is read by Twisted's parser as the same addresses and ports."""
    header = hs.encode_proxy_v2(hs.ProxyHeader("2001:db8::1", 40000, "::1", 443))
    info = V2Parser.parse(header)
    assert isinstance(info.source, IPv6Address) and isinstance(info.destination, IPv6Address)
    assert ipaddress.ip_address(info.source.host) == ipaddress.ip_address("2001:db8::1")
    assert info.source.port == 40000
    assert ipaddress.ip_address(info.destination.host) == ipaddress.ip_address("::1")
    assert info.destination.port == 443


def test_proxy_v2_streaming_parse_leaves_the_payload() -> None:
    """Twisted's incremental v2 parser finds the header's end and hands back what followed."""
    header = hs.encode_proxy_v2(hs.ProxyHeader("10.1.2.3", 1, "10.3.2.1", 65535))
    info, rest = V2Parser().feed(header + b"GET / HTTP/1.0\r\n")
    assert info is not None and rest == b"GET / HTTP/1.0\r\n"
    assert info.source.port == 1 and info.destination.port == 65535


def test_proxy_v1_ipv4_parses_with_twisted() -> None:
    """A v1 TCP4 line ends in CRLF and is read by Twisted's parser as the same addresses."""
    line = hs.encode_proxy_v1(hs.ProxyHeader("192.0.2.7", 51234, "127.0.0.1", 8081))
    assert line == b"PROXY TCP4 192.0.2.7 127.0.0.1 51234 8081\r\n"
    info, rest = V1Parser().feed(line + b"payload")
    assert rest == b"payload"
    assert info.source == IPv4Address("TCP", "192.0.2.7", 51234)
    assert info.destination == IPv4Address("TCP", "127.0.0.1", 8081)


def test_proxy_v1_ipv6_parses_with_twisted() -> None:
    """A v1 TCP6 line is read by Twisted's parser as IPv6 addresses."""
    line = hs.encode_proxy_v1(hs.ProxyHeader("2001:db8::1", 40000, "::1", 443))
    assert line.startswith(b"PROXY TCP6 ") and line.endswith(b"\r\n")
    info = V1Parser.parse(line[:-2])
    assert info.source == IPv6Address("TCP", "2001:db8::1", 40000)
    assert info.destination == IPv6Address("TCP", "::1", 443)


def test_proxy_v1_mixed_families_name_ipv6_addresses_only() -> None:
    """A v1 TCP6 line never carries a bare IPv4 address (an IPv4 one is written IPv4-mapped)."""
    line = hs.encode_proxy_v1(hs.ProxyHeader("192.0.2.7", 5000, "::", 8081))
    info = V1Parser.parse(line.rstrip(b"\r\n"))
    for addr in (info.source, info.destination):
        assert isinstance(addr, IPv6Address)
        assert ipaddress.ip_address(addr.host).version == 6
    assert ipaddress.IPv6Address(info.source.host).ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")


@pytest.mark.parametrize(
    "header",
    [
        hs.ProxyHeader("192.0.2.7", 51234, "127.0.0.1", 8081),
        hs.ProxyHeader("2001:db8::1", 40000, "::1", 443),
        hs.ProxyHeader("192.0.2.7", 0, "::", 65535),
    ],
    ids=["ipv4", "ipv6", "mixed"],
)
def test_proxy_v2_reader_round_trip(header: hs.ProxyHeader) -> None:
    """ProxyV2Reader reads back what encode_proxy_v2 wrote, fed whole or a byte at a time."""
    data = hs.encode_proxy_v2(header) + b"hello"
    whole = hs.ProxyV2Reader()
    assert whole.feed(data) == b"hello"
    assert whole.done and whole.header == header
    slow = hs.ProxyV2Reader()
    results = [slow.feed(data[i : i + 1]) for i in range(len(data) - 5)]
    assert results[:-1] == [None] * (len(results) - 1) and results[-1] == b""
    assert slow.done and slow.header == header


def test_proxy_v2_reader_accepts_a_local_command_without_address() -> None:
    """A v2 LOCAL header (no address) completes with no header and passes the payload on."""
    local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + b"\x00\x00"
    reader = hs.ProxyV2Reader()
    assert reader.feed(local + b"x") == b"x"
    assert reader.done and reader.header is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", id="proxy-v1"),
        pytest.param(b"\r\n\r\nX", id="bad-signature-early"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c", id="version-1"),
        pytest.param(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x02\x01" + b"\x00" * 600, id="too-long"),
    ],
)
def test_proxy_v2_reader_rejects_non_proxy_data(data: bytes) -> None:
    """Data that is not a PROXY v2 header is a HandshakeError, whether fed whole or byte by byte."""
    with pytest.raises(hs.HandshakeError):
        hs.ProxyV2Reader().feed(data)
    reader = hs.ProxyV2Reader()
    with pytest.raises(hs.HandshakeError):
        for i in range(len(data)):
            reader.feed(data[i : i + 1])


def test_twisted_rejects_what_proxy_v2_reader_rejects() -> None:
    """The reader's idea of a non-PROXY stream agrees with Twisted's parser."""
    with pytest.raises(InvalidProxyHeader):
        V2Parser.parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
