"""
Telling TLS from muxado by a connection's first bytes, so that a control
port and an agent that disagree about TLS say so instead of failing
without a word.

A TLS connection starts with a record header: content type (22 handshake,
21 alert), then the protocol version, major 3 and minor 0 to 4.  A muxado
v1 frame starts with a 16-bit length field (14 bits used) and a flags
byte: a first frame announcing 0x1603 (5635) bytes with flags 0..4 is not
what any muxado client sends first.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "TLS_ALERT",
    "TLS_HANDSHAKE",
    "looks_like_tls",
    "NOT_TLS_ERRORS",
    "tls_error_means_not_tls",
]

TLS_HANDSHAKE = 0x16
TLS_ALERT = 0x15

_HEADER = 3


def looks_like_tls(head: bytes, record_types: tuple[int, ...] = (TLS_HANDSHAKE,)) -> Optional[bool]:
    """
    Whether ``head``, the first bytes received on a connection, start a TLS
    record of one of ``record_types``: True or False, or None while too
    few bytes have come to tell (and they could still be TLS).
    """
    checks = (
        lambda b: b in record_types,
        lambda b: b == 3,
        lambda b: b <= 4,
    )
    for byte, check in zip(head[:_HEADER], checks):
        if not check(byte):
            return False
    return True if len(head) >= _HEADER else None


NOT_TLS_ERRORS = (
    "wrong version number",
    "packet length too long",
    "unknown protocol",
    "record layer failure",
    "http request",
    "wrong ssl version",
)
"""OpenSSL's reasons when what came from the peer was not TLS at all."""


def tls_error_means_not_tls(message: str) -> bool:
    """Whether an OpenSSL error text says the peer does not speak TLS."""
    text = message.lower()
    return any(reason in text for reason in NOT_TLS_ERRORS)
