"""
The node-to-node link of a relay cluster: how a node hands a visitor of a
route it does not hold to the node that does.

The forwarding node connects to the owner's ``--node-address`` and sends,
before any of the visitor's bytes:

1. a link header (:func:`encode_link_header`): ``TRLK``, a version byte,
   the body's length (2 bytes, big-endian), the body (JSON: route kind and
   name, the sending node, a timestamp in milliseconds and a random nonce),
   then HMAC-SHA256 of everything before it under the cluster secret;
2. a PROXY v2 header with the visitor's address and the address it dialled;
3. what the visitor has already sent (an HTTP head, a ClientHello).

The owning node checks the MAC and the timestamp (within
:data:`MAX_SKEW` seconds), then treats the connection as a visitor of
that route from the original address.  A forwarded visitor whose route is
not held by the receiving node is refused: a visitor is forwarded at most
once, never in a loop.

The codec here is sans-IO (bytes in, values out); the Twisted side lives in
:mod:`tcprelay.relay.cluster`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from typing import Final, Optional

import attrs

__all__ = [
    "LINK_MAGIC",
    "MAX_SKEW",
    "LinkError",
    "LinkHeader",
    "LinkHeaderReader",
    "encode_link_header",
]

LINK_MAGIC: Final = b"TRLK"
LINK_VERSION: Final = 1
MAX_BODY: Final = 1024
"""Longest body a link header may have (a route name is at most 253 bytes)."""
MAX_SKEW: Final = 30.0
"""Seconds a link header's timestamp may differ from the receiver's clock."""
_MAC_SIZE: Final = 32
_PREFIX: Final = struct.Struct(">4sBH")
KINDS: Final = ("port", "http", "tls")


class LinkError(Exception):
    """A link header that is malformed, too large, forged or stale."""


@attrs.frozen
class LinkHeader:
    """What a forwarding node says about the visitor it hands over."""

    kind: str
    """The route's kind: ``port``, ``http`` or ``tls``."""
    name: str
    """The port number (as text) or the host name the visitor asked for."""
    sender: str
    """The forwarding node's name (for logs)."""
    timestamp: float
    """When it was sent (UNIX seconds)."""
    nonce: str = ""


def encode_link_header(header: LinkHeader, secret: bytes, nonce: Optional[str] = None) -> bytes:
    """The bytes of ``header``, authenticated with ``secret``."""
    body = json.dumps(
        {
            "k": header.kind,
            "n": header.name,
            "f": header.sender,
            "t": int(header.timestamp * 1000),
            "r": nonce if nonce is not None else (header.nonce or os.urandom(12).hex()),
        },
        separators=(",", ":"),
    ).encode("utf-8")
    if len(body) > MAX_BODY:
        raise ValueError("link header too long")
    head = _PREFIX.pack(LINK_MAGIC, LINK_VERSION, len(body)) + body
    return head + hmac.new(secret, head, hashlib.sha256).digest()


class LinkHeaderReader:
    """
    Reads one link header off the front of a node-to-node connection.
    :meth:`feed` returns None until the header is complete, then the
    header and the bytes that followed it; raises :class:`LinkError` on a
    bad one (the connection is then closed).
    """

    def __init__(self, secret: bytes, now: float) -> None:
        self._secret = secret
        self._now = now
        self._buf = bytearray()

    def feed(self, data: bytes) -> Optional[tuple[LinkHeader, bytes]]:
        """Feed bytes; ``(header, rest)`` once the header is complete."""
        buf = self._buf
        buf += data
        if len(buf) < _PREFIX.size:
            if not LINK_MAGIC.startswith(bytes(buf[:4])):
                raise LinkError("not a node link header")
            return None
        magic, version, length = _PREFIX.unpack_from(buf)
        if magic != LINK_MAGIC:
            raise LinkError("not a node link header")
        if version != LINK_VERSION:
            raise LinkError(f"unknown node link version {version}")
        if length > MAX_BODY:
            raise LinkError("node link header too long")
        end = _PREFIX.size + length
        if len(buf) < end + _MAC_SIZE:
            return None
        head = bytes(buf[:end])
        mac = bytes(buf[end : end + _MAC_SIZE])
        rest = bytes(buf[end + _MAC_SIZE :])
        buf.clear()
        expected = hmac.new(self._secret, head, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise LinkError("node link header with a bad MAC (wrong --cluster-secret?)")
        try:
            body = json.loads(head[_PREFIX.size :].decode("utf-8"))
            kind, name, sender, stamp = body["k"], body["n"], body["f"], body["t"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise LinkError("malformed node link header") from None
        if not (
            isinstance(kind, str)
            and kind in KINDS
            and isinstance(name, str)
            and isinstance(sender, str)
            and isinstance(stamp, int)
        ):
            raise LinkError("malformed node link header")
        timestamp = stamp / 1000.0
        if abs(timestamp - self._now) > MAX_SKEW:
            raise LinkError(f"stale node link header ({timestamp - self._now:+.0f}s off)")
        return LinkHeader(kind, name, sender, timestamp, str(body.get("r", ""))), rest
