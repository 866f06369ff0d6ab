"""
Command-line values shared by the relay's options (:mod:`tcprelay.tap`)
and the agent's (:mod:`tcprelay.cli`), with no dependency on either.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from tcprelay._reactor import MAX_BUSY_POLL

__all__ = [
    "busy_poll_option",
    "checked_endpoint",
    "normalise_endpoint",
    "parse_port_range",
    "positive",
]


def normalise_endpoint(description: str) -> str:
    """
    Turn the shorthand of a bare port (``"8080"``) into ``"tcp:8080"``.
    Anything else is taken to be an endpoint string already.
    """
    if description.isascii() and description.isdigit():
        port = int(description)
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"port out of range: {description}")
        return f"tcp:{port}"
    return description


def checked_endpoint(name: str, description: str, check: bool = True) -> str:
    """
    The server endpoint string ``--name description`` stands for
    (:func:`normalise_endpoint`), parsed (``check``) against a reactor that
    never runs; UsageError when it does not parse.
    """
    spec = normalise_endpoint(description)
    if check:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactor

        try:
            serverFromString(MemoryReactor(), spec)
        except Exception as e:
            raise usage.UsageError(f"--{name} {spec!r}: {e}") from None
    return spec


def positive(name: str, value: Any, integer: bool = False) -> Any:
    """``--name value`` as a positive number (``integer``: a whole one); UsageError otherwise."""
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
    if number <= 0:
        raise usage.UsageError(f"--{name} must be positive, not {value!r}")
    return number


def busy_poll_option(value: Any) -> float:
    """``--busy-poll`` microseconds (0-10000) as seconds; UsageError otherwise."""
    try:
        micros = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--busy-poll must be a number, not {value!r}") from None
    if not 0 <= micros <= MAX_BUSY_POLL * 1e6:
        raise usage.UsageError(
            f"--busy-poll must be between 0 and {MAX_BUSY_POLL * 1e6:.0f} microseconds"
        )
    return micros / 1e6


def parse_port_range(text: str) -> range:
    """
    Parse ``LOW-HIGH`` (inclusive) or a single port into a range.
    Raises ValueError with a readable message.
    """
    low_s, sep, high_s = text.partition("-")
    try:
        low = int(low_s)
        high = int(high_s) if sep else low
    except ValueError:
        raise ValueError(f"port range {text!r} is not LOW-HIGH") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"port range {text!r} must satisfy 1 <= LOW <= HIGH <= 65535")
    return range(low, high + 1)
