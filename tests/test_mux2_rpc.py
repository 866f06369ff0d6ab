"""
The ngrok agent protocol's messages (tcprelay.mux2.rpc): the incremental
JSON reader, field names in either case, and the golden bytes of every
message the relay writes (error, Auth and Bind replies are checked in
tests/test_ngrok_door.py as the door writes them; the proxy header here).
"""

from __future__ import annotations

import json
import struct

import pytest

from tcprelay.mux2 import rpc


def test_proxy_header_golden() -> None:
    """A Proxy stream starts with an 8-byte little-endian length and the JSON header."""
    header = rpc.encode_proxy_header("tcp-20001-ab", "127.0.0.1:5000", "tcp")
    body = b'{"Id":"tcp-20001-ab","ClientAddr":"127.0.0.1:5000","Proto":"tcp","EdgeType":"1","PassthroughTLS":false}'
    assert header == struct.pack("<q", len(body)) + body
    assert header[:8] == bytes([len(body), 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(("proto", "edge"), [("tcp", "1"), ("tls", "2"), ("http", "3"), ("https", "3"), ("x", "0")])
def test_edge_types(proto: str, edge: str) -> None:
    """EdgeType is the string ngrok-rust's EdgeType parses: 1 tcp, 2 tls, 3 http(s)."""
    assert rpc.edge_type(proto) == edge


def test_error_reply_golden() -> None:
    """An error is {"Error": text}, with an ngrok error code on its last line when given."""
    assert rpc.error_reply("no") == b'{"Error":"no"}'
    assert rpc.error_reply("no", "ERR_NGROK_105") == b'{"Error":"no\\nERR_NGROK_105"}'


def test_ipv6_client_addr() -> None:
    """An IPv6 visitor's ClientAddr has its host in brackets."""
    assert rpc.host_port("::1", 80) == "[::1]:80"
    assert rpc.host_port("10.0.0.1", 80) == "10.0.0.1:80"


def test_reader_finds_the_end_of_the_object_without_fin() -> None:
    """The request is complete at its closing brace, whatever comes in between (strings with braces, escapes)."""
    text = json.dumps({"Extra": {"AuthToken": 'a}"{\\'}, "Version": ["3", "2"]}).encode()
    reader = rpc.JsonReader()
    for i in range(len(text) - 1):
        assert reader.feed(text[i : i + 1]) is None
    assert reader.feed(text[-1:]) == json.loads(text)
    assert reader.done


def test_reader_skips_leading_whitespace() -> None:
    """Whitespace before the object is skipped."""
    assert rpc.JsonReader().feed(b"  \n {}") == {}


@pytest.mark.parametrize("data", [b"[1]", b"nope", b'"x"'])
def test_reader_refuses_what_is_not_an_object(data: bytes) -> None:
    """A request that is not a JSON object is refused at once."""
    with pytest.raises(rpc.RequestError):
        rpc.JsonReader().feed(data)


def test_reader_refuses_invalid_json() -> None:
    """Balanced braces around invalid JSON are refused."""
    with pytest.raises(rpc.RequestError):
        rpc.JsonReader().feed(b"{nope}")


def test_reader_limit() -> None:
    """A request over the limit is refused before it is complete."""
    reader = rpc.JsonReader(limit=100)
    reader.feed(b'{"a":"' + b"x" * 90)
    with pytest.raises(rpc.RequestError):
        reader.feed(b"x" * 20)


@pytest.mark.parametrize("name", ["AuthToken", "Authtoken", "authtoken", "auth_token"])
def test_field_names_in_any_case(name: str) -> None:
    """AuthToken (Rust), Authtoken (Go), and other spellings are the same field."""
    assert rpc.field({name: "s"}, "AuthToken") == "s"
    assert rpc.text_field({name: 5}, "AuthToken") == ""
    assert rpc.field([], "AuthToken", 1) == 1
