"""
The control-stream dialects and the visitor-address header, sans-IO.

Legacy (the original Go relay): the service's first stream is plain; the
relay writes ``HOST:PORT`` in ASCII and FIN.

Extended (tcprelay's agent and library): the agent opens its first stream
with stream type :data:`CONTROL_STREAM_TYPE`, so the relay knows the
dialect from the SYN.  Both sides then exchange messages, each a 2-byte
big-endian length followed by that many bytes of a UTF-8 JSON object with a
``"type"`` and a ``"v"`` (version) field; unknown fields are ignored and
messages over :data:`MAX_MESSAGE` bytes end the conversation::

    relay -> agent   hello     {v, nonce, auth}
    agent -> relay   register  {v, mac, port, lease, proxy}
    relay -> agent   queued    {v, position}            (zero or more)
    relay -> agent   ready     {v, address, host, port, lease, lease_seconds}
                  or refused   {v, reason, code, retry}
    agent -> relay   leave     {v}        (stopping for good: free the port)

``mac`` is HMAC-SHA256 under the shared secret of
``b"tcprelay-register-v1:" + nonce``, hex encoded; the secret itself never
crosses the wire.  Visitor streams to an extended agent have stream type
:data:`VISITOR_STREAM_TYPE`; when the agent asked for ``proxy`` they start
with a PROXY protocol v2 header naming the visitor.  ``register`` may also
carry ``route`` and ``name`` (a named route on the shared HTTP or TLS
entrance) and ``pool: true`` (share the route with the other agents of the
same credential that ask to pool: see :mod:`tcprelay.relay.pooled`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
import struct
from hashlib import sha256
from typing import Any, Final, Optional

import attrs

__all__ = [
    "CONTROL_STREAM_TYPE",
    "VISITOR_STREAM_TYPE",
    "VERSION",
    "MAX_MESSAGE",
    "HandshakeError",
    "MessageReader",
    "encode_message",
    "make_nonce",
    "compute_mac",
    "check_mac",
    "ProxyHeader",
    "encode_proxy_v2",
    "encode_proxy_v1",
    "ProxyV2Reader",
    "LegacyOrMessageReader",
]

CONTROL_STREAM_TYPE: Final = 0x54435243
"""Stream type ('TCRC') of an extended agent's control stream."""
VISITOR_STREAM_TYPE: Final = 0x54435256
"""Stream type ('TCRV') of a visitor stream to an extended agent."""
VERSION: Final = 1
MAX_MESSAGE: Final = 4096
_MAC_CONTEXT: Final = b"tcprelay-register-v1:"


class HandshakeError(Exception):
    """The peer broke the handshake rules (size, syntax, order)."""


def encode_message(kind: str, **fields: Any) -> bytes:
    """One length-prefixed message."""
    body = json.dumps({"type": kind, "v": VERSION, **fields}, separators=(",", ":"))
    data = body.encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ValueError("message too large")
    return struct.pack(">H", len(data)) + data


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HandshakeError(f"malformed message: {e}") from None
    except RecursionError:
        # 4 KiB of "[[[[..." nests deeper than the interpreter allows.
        raise HandshakeError("malformed message: nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise HandshakeError("message is not an object with a type")
    version = message.get("v")
    if not isinstance(version, int) or version < 1:
        raise HandshakeError("message has no valid version")
    return message


class MessageReader:
    """Incremental reader of length-prefixed messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Return every complete message; HandshakeError on bad input."""
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            (length,) = struct.unpack_from(">H", self._buf)
            if length > MAX_MESSAGE:
                raise HandshakeError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
            if len(self._buf) < 2 + length:
                break
            body = bytes(self._buf[2 : 2 + length])
            del self._buf[: 2 + length]
            out.append(_decode(body))
        return out


class LegacyOrMessageReader:
    """
    The agent's reader of the relay's first words: either extended messages
    or a legacy relay's bare ``HOST:PORT`` ended by FIN.

    A legacy reply starts with ASCII text, whose first two bytes read as a
    length are far above :data:`MAX_MESSAGE`, so the two cannot be confused.
    """

    def __init__(self) -> None:
        self.legacy: Optional[bool] = None
        self._legacy_text = bytearray()
        self._messages = MessageReader()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Feed bytes; messages for the extended dialect, [] for legacy."""
        if self.legacy is None:
            probe = bytes(self._legacy_text) + data
            if len(probe) < 2:
                self._legacy_text += data
                return []
            (length,) = struct.unpack_from(">H", probe)
            self.legacy = length > MAX_MESSAGE
            self._legacy_text.clear()
            data = probe
        if self.legacy:
            self._legacy_text += data
            if len(self._legacy_text) > 1024:
                raise HandshakeError("legacy address reply is too long")
            return []
        return self._messages.feed(data)

    def legacy_address(self) -> str:
        """At end-of-stream: the legacy relay's ``HOST:PORT``."""
        try:
            text = self._legacy_text.decode("ascii").strip()
        except UnicodeDecodeError:
            raise HandshakeError("legacy address is not ASCII") from None
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise HandshakeError(f"legacy address {text!r} is not HOST:PORT")
        return text


def make_nonce() -> str:
    """A fresh 32-byte challenge, hex."""
    return os.urandom(32).hex()


def compute_mac(secret: bytes, nonce: str) -> str:
    """The agent's answer to a relay nonce."""
    return hmac.new(secret, _MAC_CONTEXT + nonce.encode("ascii"), sha256).hexdigest()


def check_mac(secrets: list[bytes], nonce: str, mac: object) -> bool:
    """Constant-time check of ``mac`` against every accepted secret."""
    return matching_secret(secrets, nonce, mac) is not None


def matching_secret(secrets: list[bytes], nonce: str, mac: object) -> Optional[bytes]:
    """
    The accepted secret ``mac`` was computed with, or None.  Every secret is
    compared, in constant time, whichever matches.
    """
    if not isinstance(mac, str):
        return None
    given = mac.encode("ascii", "replace")
    found: Optional[bytes] = None
    for secret in secrets:
        if hmac.compare_digest(compute_mac(secret, nonce).encode("ascii"), given):
            found = secret
    return found


@attrs.frozen
class ProxyHeader:
    """A visitor's address and the public address it connected to."""

    source_host: str
    source_port: int
    dest_host: str
    dest_port: int

    @property
    def ipv6(self) -> bool:
        return ":" in self.source_host or ":" in self.dest_host


_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"


def _v6(host: str) -> bytes:
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv4Address):
        addr = ipaddress.IPv6Address(f"::ffff:{addr}")
    return addr.packed


def encode_proxy_v2(header: ProxyHeader) -> bytes:
    """PROXY protocol v2 (PROXY command, TCP over IPv4 or IPv6)."""
    if header.ipv6:
        body = (
            _v6(header.source_host)
            + _v6(header.dest_host)
            + struct.pack(">HH", header.source_port, header.dest_port)
        )
        family = 0x21
    else:
        body = (
            socket.inet_aton(header.source_host)
            + socket.inet_aton(header.dest_host)
            + struct.pack(">HH", header.source_port, header.dest_port)
        )
        family = 0x11
    return _V2_SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(body)) + body


def encode_proxy_v1(header: ProxyHeader) -> bytes:
    """PROXY protocol v1 text line."""
    if header.ipv6:
        # One family per line: an IPv4 end of a mixed pair is written mapped.
        family = "TCP6"
        source = str(ipaddress.IPv6Address(_v6(header.source_host)))
        dest = str(ipaddress.IPv6Address(_v6(header.dest_host)))
    else:
        family, source, dest = "TCP4", header.source_host, header.dest_host
    return (
        f"PROXY {family} {source} {dest} "
        f"{header.source_port} {header.dest_port}\r\n"
    ).encode("ascii")


class ProxyV2Reader:
    """Reads one PROXY v2 header off the front of a stream."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.header: Optional[ProxyHeader] = None
        self.done = False

    def feed(self, data: bytes) -> Optional[bytes]:
        """
        Feed bytes; once the header is complete returns what followed it
        (possibly b""), before that None.  HandshakeError on a bad header.
        """
        self._buf += data
        if len(self._buf) < 16:
            if not _V2_SIGNATURE.startswith(bytes(self._buf[:12])):
                raise HandshakeError("visitor stream lacks a PROXY v2 header")
            return None
        if bytes(self._buf[:12]) != _V2_SIGNATURE or self._buf[12] >> 4 != 2:
            raise HandshakeError("visitor stream lacks a PROXY v2 header")
        (length,) = struct.unpack_from(">H", self._buf, 14)
        if length > 512:
            raise HandshakeError("PROXY v2 header too long")
        if len(self._buf) < 16 + length:
            return None
        family = self._buf[13]
        body = bytes(self._buf[16 : 16 + length])
        rest = bytes(self._buf[16 + length :])
        self._buf.clear()
        self.done = True
        if family == 0x11 and length >= 12:
            self.header = ProxyHeader(
                socket.inet_ntoa(body[0:4]),
                struct.unpack(">H", body[8:10])[0],
                socket.inet_ntoa(body[4:8]),
                struct.unpack(">H", body[10:12])[0],
            )
        elif family == 0x21 and length >= 36:
            self.header = ProxyHeader(
                _unmap(body[0:16]),
                struct.unpack(">H", body[32:34])[0],
                _unmap(body[16:32]),
                struct.unpack(">H", body[34:36])[0],
            )
        return rest


def _unmap(packed: bytes) -> str:
    addr = ipaddress.IPv6Address(packed)
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)
