"""The Host and SNI readers of tcprelay.relay.sniff, fed every possible split."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcprelay.relay.sniff import (
    HEAD_LIMIT,
    MORE,
    HelloReader,
    HostReader,
    Name,
    Refusal,
    normalise_name,
    tls_alert,
)


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's own TLS client (a real ClientHello)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake bytes in TLS records of at most ``size`` bytes."""
    assert hello[0] == 0x16
    length = int.from_bytes(hello[3:5], "big")
    body, rest = hello[5 : 5 + length], hello[5 + length :]
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"\x16" + hello[1:3] + len(piece).to_bytes(2, "big") + piece
    return out + rest


def feed_split(reader: HostReader | HelloReader, data: bytes, at: int) -> object:
    first = reader.feed(data[:at])
    if first is not MORE:
        return first
    return reader.feed(data[at:])


# -- names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("App.Example.COM", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        ("bücher.example.com", "xn--bcher-kva.example.com"),
        ("xn--bcher-kva.example.com", "xn--bcher-kva.example.com"),
        ("*.Example.com", "*.example.com"),
        ("", None),
        ("-bad.example.com", None),
        ("a..b", None),
        ("a b.example.com", None),
        ("x" * 64 + ".com", None),
    ],
)
def test_normalise_name(text: str, expected: str | None) -> None:
    assert normalise_name(text) == expected


# -- HTTP -------------------------------------------------------------------------

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: App.Example.com:8080\r\nAccept: */*\r\n\r\nbody"


def test_host_is_read_at_every_split() -> None:
    for at in range(len(REQUEST) + 1):
        reader = HostReader()
        assert feed_split(reader, REQUEST, at) == Name("app.example.com"), at
        # what was read is kept whole (a read after the verdict is not taken)
        assert REQUEST.startswith(bytes(reader.data)) and b"\r\n\r\n" in reader.data


def test_host_waits_for_the_whole_head() -> None:
    reader = HostReader()
    assert reader.feed(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n") is MORE
    assert reader.feed(b"\r\n") == Name("a.example.com")


@pytest.mark.parametrize(
    "head, reason",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "no Host header"),
        (b"GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\n\r\n", "several Host headers"),
        (b"GARBAGE\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1\r\nHost a.example.com\r\n\r\n", "malformed header line"),
        (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", "Host is an IP address"),
        (b"GET / HTTP/1.1\r\nHost: not_a host\r\n\r\n", "is not a host name"),
        (b"\x16\x03\x01\x00\x05hello", "not an HTTP request"),
    ],
)
def test_bad_heads_are_refused_with_400(head: bytes, reason: str) -> None:
    result = HostReader().feed(head)
    assert isinstance(result, Refusal) and reason in result.reason and result.status == 400


def test_absolute_form_target_names_the_host() -> None:
    head = b"GET http://B.example.com/x HTTP/1.1\r\nHost: a.example.com\r\n\r\n"
    assert HostReader().feed(head) == Name("b.example.com")


def test_utf8_host_is_normalised_to_idna() -> None:
    head = "GET / HTTP/1.1\r\nHost: bücher.example.com\r\n\r\n".encode("utf-8")
    assert HostReader().feed(head) == Name("xn--bcher-kva.example.com")


def test_oversize_head_is_refused_without_holding_more_than_the_limit() -> None:
    reader = HostReader()
    line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    assert reader.feed(b"GET / HTTP/1.1\r\n") is MORE
    result = MORE
    fed = 0
    while result is MORE:
        result = reader.feed(line)
        fed += 1
        assert fed < 100
    assert isinstance(result, Refusal) and "over" in result.reason
    assert len(reader.data) <= HEAD_LIMIT + len(line)


@given(st.binary(max_size=200), st.integers(0, 200))
def test_host_reader_never_raises(data: bytes, at: int) -> None:
    result = feed_split(HostReader(), data, min(at, len(data)))
    assert result is MORE or isinstance(result, (Name, Refusal))


# -- TLS ---------------------------------------------------------------------------------


def test_sni_is_read_at_every_split() -> None:
    hello = client_hello("App.Example.com")
    for at in range(len(hello) + 1):
        reader = HelloReader()
        assert feed_split(reader, hello, at) == Name("app.example.com"), at
        assert hello.startswith(bytes(reader.data))


@pytest.mark.parametrize("size", [1, 7, 100, 512])
def test_sni_is_read_across_records(size: int) -> None:
    hello = refragment(client_hello("a.example.com"), size)
    reader = HelloReader()
    result = MORE
    for i in range(0, len(hello), 13):
        result = reader.feed(hello[i : i + 13])
        if result is not MORE:
            break
    assert result == Name("a.example.com")


def test_missing_sni_is_refused_with_unrecognized_name() -> None:
    result = HelloReader().feed(client_hello(None))
    assert isinstance(result, Refusal) and result.alert == 112 and "SNI" in result.reason


def test_idna_sni() -> None:
    assert HelloReader().feed(client_hello("xn--bcher-kva.example.com")) == Name("xn--bcher-kva.example.com")


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x00",
        b"\x17\x03\x03\x00\x10" + b"x" * 16,
        b"\x16\x03\x01\x00\x08\x02\x00\x00\x04abcd",
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04abcd",
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    assert isinstance(HelloReader().feed(data), Refusal)


def test_oversize_hello_is_refused() -> None:
    reader = HelloReader()
    header = b"\x16\x03\x01" + (16000).to_bytes(2, "big")
    body = b"\x01" + (40000).to_bytes(3, "big") + b"\x00" * (16000 - 4)
    assert isinstance(reader.feed(header + body), Refusal)


@given(st.binary(max_size=300), st.integers(0, 300))
def test_hello_reader_never_raises(data: bytes, at: int) -> None:
    result = feed_split(HelloReader(), data, min(at, len(data)))
    assert result is MORE or isinstance(result, (Name, Refusal))


@given(st.integers(0, 10_000))
def test_truncations_of_a_real_hello_never_raise(cut: int) -> None:
    hello = client_hello("a.example.com")
    damaged = bytearray(hello)
    if damaged:
        damaged[cut % len(damaged)] ^= 0xFF
    result = HelloReader().feed(bytes(damaged))
    assert result is MORE or isinstance(result, (Name, Refusal))


def test_alert_record() -> None:
    assert tls_alert(112) == b"\x15\x03\x01\x00\x02\x02\x70"
