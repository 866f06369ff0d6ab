"""
The ngrok agent protocol's messages over muxado v2 typed streams, sans-IO.

Read from ngrok-rust (``ngrok/src/internals/proto.rs``, ``raw_session.rs``):
the client opens a typed stream per request (Auth 0, Bind 1, Unbind 2,
StartTunnelWithLabel 7), writes one JSON object and reads the reply to the
end of the stream; it does not half-close first, so the server finds the
end of the object itself (:class:`JsonReader`).  An error reply is
``{"Error": "text"}``.  Each visitor is a stream the server opens, of type
Proxy (3): an 8-byte little-endian length, a JSON header
(:func:`encode_proxy_header`), then the visitor's bytes.

Field names are PascalCase in ngrok-rust (``AuthToken``) and differ in case
in ngrok-go (``Authtoken``): :func:`field` looks them up ignoring case and
underscores.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final, Mapping, Optional

__all__ = [
    "AUTH",
    "BIND",
    "UNBIND",
    "PROXY",
    "RESTART",
    "STOP",
    "UPDATE",
    "BIND_LABELED",
    "STOP_TUNNEL",
    "REQUEST_NAMES",
    "MAX_REQUEST",
    "JsonReader",
    "RequestError",
    "edge_type",
    "encode_proxy_header",
    "encode_reply",
    "error_reply",
    "field",
]

AUTH: Final = 0
BIND: Final = 1
UNBIND: Final = 2
PROXY: Final = 3
RESTART: Final = 4
STOP: Final = 5
UPDATE: Final = 6
BIND_LABELED: Final = 7
STOP_TUNNEL: Final = 9

REQUEST_NAMES: Final = {
    AUTH: "Auth",
    BIND: "Bind",
    UNBIND: "Unbind",
    PROXY: "Proxy",
    RESTART: "Restart",
    STOP: "Stop",
    UPDATE: "Update",
    BIND_LABELED: "StartTunnelWithLabel",
    8: "SrvInfo",
    STOP_TUNNEL: "StopTunnel",
}
"""The typed-stream types of the agent protocol, by number."""

MAX_REQUEST: Final = 65536
"""Largest request the relay reads (a Bind with a traffic policy is a few KiB)."""

_EDGE_TYPES: Final = {"tcp": "1", "tls": "2", "http": "3", "https": "3"}


class RequestError(Exception):
    """A request that cannot be read: too large, not a JSON object, or cut short."""


class JsonReader:
    """
    Finds the end of one JSON object in bytes that arrive in pieces: the
    top-level braces are counted outside strings, so each byte is looked at
    once; :meth:`feed` returns the decoded object once it is complete.
    Whitespace before it is skipped; anything else before it, or more than
    ``limit`` bytes, raises :class:`RequestError`.
    """

    __slots__ = ("_buf", "_depth", "_in_string", "_escape", "_scanned", "limit", "done")

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scanned = 0
        self.limit = limit
        self.done = False

    def feed(self, data: bytes) -> Optional[dict[str, Any]]:
        """Add ``data``; the request once complete (then :attr:`done`), else None."""
        if self.done:
            return None
        buf = self._buf
        if not buf:
            data = data.lstrip()
            if not data:
                return None
            if data[:1] != b"{":
                raise RequestError("the request is not a JSON object")
        buf += data
        depth, in_string, escape = self._depth, self._in_string, self._escape
        pos = self._scanned
        end = len(buf)
        while pos < end:
            c = buf[pos]
            pos += 1
            if in_string:
                if escape:
                    escape = False
                elif c == 0x5C:  # backslash
                    escape = True
                elif c == 0x22:  # quote
                    in_string = False
            elif c == 0x22:
                in_string = True
            elif c == 0x7B or c == 0x5B:  # { [
                depth += 1
            elif c == 0x7D or c == 0x5D:  # } ]
                depth -= 1
                if depth == 0:
                    self.done = True
                    try:
                        value = json.loads(bytes(buf[:pos]))
                    except ValueError as e:
                        raise RequestError(f"the request is not valid JSON ({e})") from None
                    if not isinstance(value, dict):
                        raise RequestError("the request is not a JSON object")
                    return value
        self._depth, self._in_string, self._escape, self._scanned = depth, in_string, escape, pos
        if len(buf) > self.limit:
            raise RequestError(f"the request is larger than {self.limit} bytes")
        return None


def _key(name: str) -> str:
    return name.replace("_", "").lower()


def field(message: object, name: str, default: Any = None) -> Any:
    """
    ``message[name]`` for a JSON object, with the name matched ignoring
    case and underscores (``AuthToken``, ``Authtoken``, ``auth_token``), or
    ``default`` when absent (or ``message`` is not an object).
    """
    if not isinstance(message, Mapping):
        return default
    if name in message:
        return message[name]
    wanted = _key(name)
    for key, value in message.items():
        if isinstance(key, str) and _key(key) == wanted:
            return value
    return default


def text_field(message: object, name: str) -> str:
    """A field that should be a string: '' when absent or of another type."""
    value = field(message, name, "")
    return value if isinstance(value, str) else ""


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """A reply as the SDK reads it: compact JSON."""
    return json.dumps(reply, separators=(",", ":")).encode("utf-8")


def error_reply(text: str, code: str = "") -> bytes:
    """
    ``{"Error": text}``: the SDK raises it as the request's error.  ngrok's
    own servers put an error code (``ERR_NGROK_...``) on the last line; the
    SDK shows it apart when present.
    """
    return encode_reply({"Error": f"{text}\n{code}" if code else text})


def edge_type(proto: str) -> str:
    """The proxy header's EdgeType for a bind protocol: '1' tcp, '2' tls, '3' http(s)."""
    return _EDGE_TYPES.get(proto, "0")


def encode_proxy_header(
    bind_id: str, client_addr: str, proto: str, passthrough_tls: bool = False
) -> bytes:
    """
    The start of a Proxy stream (after its type): an 8-byte little-endian
    length, then the JSON header ``Id`` (the bind's), ``ClientAddr`` (the
    visitor's ``host:port``), ``Proto``, ``EdgeType`` and ``PassthroughTLS``.
    """
    header = encode_reply(
        {
            "Id": bind_id,
            "ClientAddr": client_addr,
            "Proto": proto,
            "EdgeType": edge_type(proto),
            "PassthroughTLS": passthrough_tls,
        }
    )
    return struct.pack("<q", len(header)) + header


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
