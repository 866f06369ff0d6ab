"""
Reading the name a visitor asks for, sans-IO: the ``Host`` of an HTTP/1.x
request head, the SNI of a TLS ClientHello.

Both readers are fed the visitor's bytes as they arrive (any split) and
answer :data:`MORE` (keep reading), a :class:`Name` or a :class:`Refusal`.
They keep what they were fed so that the entrance forwards every byte,
unchanged, once the name is known; they never hold more than their limit.
Names come back normalised by :func:`normalise_name`.
"""

from __future__ import annotations

import re
from typing import Final, Optional, Union

import attrs

__all__ = [
    "HEAD_LIMIT",
    "MORE",
    "HelloReader",
    "HostReader",
    "Name",
    "Refusal",
    "normalise_name",
    "tls_alert",
]

HEAD_LIMIT: Final = 16 * 1024
"""Most bytes read from a visitor before its name is known (HTTP request
head, TLS records up to the end of the ClientHello)."""


@attrs.frozen
class Name:
    """The visitor asked for ``name`` (normalised)."""

    name: str


@attrs.frozen
class Refusal:
    """
    The visitor cannot be routed: ``reason`` for the log, ``status`` for
    an HTTP answer (400), ``alert`` for a TLS one (a TLS alert description).
    """

    reason: str
    status: int = 400
    alert: int = 50  # decode_error


class _More:
    def __repr__(self) -> str:
        return "MORE"


MORE: Final = _More()
"""Not enough bytes yet."""

Result = Union[_More, Name, Refusal]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
UNRECOGNIZED_NAME: Final = 112
DECODE_ERROR: Final = 50


def normalise_name(text: str) -> Optional[str]:
    """
    A host name as routes hold it: lower case, no trailing dot, non-ASCII
    labels in their IDNA (punycode) form; None when it is no host name.
    A leading ``*.`` (a wildcard route) is kept.
    """
    text = text.strip().rstrip(".")
    if not text or len(text) > 253:
        return None
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    labels = []
    for label in text.split("."):
        if not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        label = label.lower()
        if not _LABEL.match(label):
            return None
        labels.append(label)
    name = ".".join(labels)
    if len(name) > 253:
        return None
    return "*." + name if wildcard else name


# -- HTTP/1.x -------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/1\.[0-9]$")


class HostReader:
    """The ``Host`` of the first request of an HTTP/1.x connection."""

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        """Everything fed so far (at most ``limit`` bytes plus one read)."""
        self.result: Result = MORE

    def feed(self, data: bytes) -> Result:
        """Take more of the visitor's bytes; the verdict so far."""
        if self.result is not MORE:
            return self.result
        start = max(0, len(self.data) - 3)
        self.data += data
        end = self.data.find(b"\r\n\r\n", start)
        if end < 0:
            if len(self.data) > self.limit:
                self.result = Refusal(f"request head over {self.limit} bytes")
            elif self.data and not self.data[:1].isalpha() and self.data[:2] != b"\r\n":
                self.result = Refusal("not an HTTP request")
            return self.result
        if end > self.limit:
            self.result = Refusal(f"request head over {self.limit} bytes")
            return self.result
        self.result = self._parse(bytes(self.data[:end]))
        return self.result

    @staticmethod
    def _parse(head: bytes) -> Result:
        lines = head.split(b"\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # RFC 9112 2.2: empty lines before the request line
        if not lines:
            return Refusal("empty request")
        match = _REQUEST_LINE.match(lines[0])
        if match is None:
            return Refusal("malformed request line")
        target = match.group(2)
        hosts = []
        for line in lines[1:]:
            field, colon, value = line.partition(b":")
            if not colon or not field or field != field.strip() or b" " in field:
                return Refusal("malformed header line")
            if field.lower() == b"host":
                hosts.append(value.strip())
        if len(hosts) != 1:
            return Refusal("no Host header" if not hosts else "several Host headers")
        host = hosts[0]
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            # absolute form: its authority is the host (RFC 9112 3.2.2)
            authority = target.split(b"//", 1)[1].split(b"/", 1)[0]
            host = authority.rsplit(b"@", 1)[-1]
        try:
            text = host.decode("utf-8")
        except UnicodeDecodeError:
            return Refusal("Host is not text")
        if text.startswith("["):
            return Refusal("Host is an IP address")
        name = normalise_name(text.rsplit(":", 1)[0] if ":" in text else text)
        if name is None or name.startswith("*."):
            return Refusal(f"Host {text!r} is not a host name")
        return Name(name)


# -- TLS ----------------------------------------------------------------------------


class HelloReader:
    """The server name (SNI) of a TLS ClientHello, across records and reads."""

    def __init__(self, limit: int = HEAD_LIMIT) -> None:
        self.limit = limit
        self.data = bytearray()
        """Everything fed so far (at most ``limit`` bytes plus one read)."""
        self.result: Result = MORE
        self.record_version = b"\x03\x01"
        self._handshake = bytearray()
        self._pos = 0  # bytes of ``data`` consumed as whole records

    def feed(self, data: bytes) -> Result:
        """Take more of the visitor's bytes; the verdict so far."""
        if self.result is not MORE:
            return self.result
        self.data += data
        self.result = self._records()
        if self.result is MORE and len(self.data) > self.limit:
            self.result = Refusal(f"ClientHello over {self.limit} bytes")
        return self.result

    def _records(self) -> Result:
        data = self.data
        while len(data) - self._pos >= 5:
            pos = self._pos
            kind, major = data[pos], data[pos + 1]
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            if kind != 0x16 or major != 3:
                return Refusal("not a TLS handshake")
            if pos == 0:
                self.record_version = bytes(data[1:3])
            if length == 0 or length > 16384 + 2048:
                return Refusal("bad TLS record length")
            if len(data) - pos - 5 < length:
                return MORE
            self._handshake += data[pos + 5 : pos + 5 + length]
            self._pos = pos + 5 + length
            hello = self._hello()
            if hello is not MORE:
                return hello
        if not self._pos and data[:1] and data[0] != 0x16:
            return Refusal("not a TLS handshake")
        return MORE

    def _hello(self) -> Result:
        hs = self._handshake
        if len(hs) < 4:
            return MORE
        if hs[0] != 1:
            return Refusal("first handshake message is not a ClientHello")
        length = int.from_bytes(hs[1:4], "big")
        if length > self.limit:
            return Refusal(f"ClientHello over {self.limit} bytes")
        if len(hs) < 4 + length:
            return MORE
        try:
            name = _server_name(bytes(hs[4 : 4 + length]))
        except (IndexError, ValueError) as e:
            return Refusal(f"malformed ClientHello ({e})")
        if name is None:
            return Refusal("no server name (SNI) in the ClientHello", alert=UNRECOGNIZED_NAME)
        normalised = normalise_name(name)
        if normalised is None or normalised.startswith("*."):
            return Refusal(f"server name {name!r} is not a host name", alert=UNRECOGNIZED_NAME)
        return Name(normalised)


def _server_name(body: bytes) -> Optional[str]:
    """The host_name of a ClientHello body's server_name extension (RFC 6066 3)."""
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # legacy_session_id
    suites = int.from_bytes(body[pos : pos + 2], "big")
    pos += 2 + suites
    pos += 1 + body[pos]  # legacy_compression_methods
    if pos > len(body):
        raise ValueError("truncated")
    if pos == len(body):
        return None  # no extensions at all
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    if end > len(body):
        raise ValueError("extensions overrun the message")
    pos += 2
    while pos + 4 <= end:
        kind = int.from_bytes(body[pos : pos + 2], "big")
        size = int.from_bytes(body[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + size > end:
            raise ValueError("extension overruns the message")
        if kind == 0:
            ext = body[pos : pos + size]
            listed = int.from_bytes(ext[0:2], "big")
            at = 2
            while at + 3 <= 2 + listed <= len(ext):
                name_type = ext[at]
                name_len = int.from_bytes(ext[at + 1 : at + 3], "big")
                raw = ext[at + 3 : at + 3 + name_len]
                if len(raw) != name_len:
                    raise ValueError("server name overruns its extension")
                if name_type == 0:
                    try:
                        return raw.decode("ascii")
                    except UnicodeDecodeError:
                        raise ValueError("server name is not ASCII") from None
                at += 3 + name_len
            raise ValueError("server_name extension without a host_name")
        pos += size
    return None


def tls_alert(description: int, version: bytes = b"\x03\x01") -> bytes:
    """A fatal TLS alert record (``description``: 112 unrecognized_name, 50 decode_error)."""
    return b"\x15" + version + b"\x00\x02\x02" + bytes([description])
