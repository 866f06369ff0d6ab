"""
Events a :class:`tcprelay.mux.session.Session` reports to its adapter.

Every event is a frozen value.  For one stream the order is always
``StreamOpened`` (peer-opened streams only), any number of ``DataReceived``,
at most one ``StreamEnded``, then exactly one ``StreamClosed``.
``SessionEnded`` is the last event of a session.
"""

from __future__ import annotations

from typing import Optional, Union

import attrs

__all__ = [
    "StreamOpened",
    "DataReceived",
    "StreamEnded",
    "StreamClosed",
    "SendWindowOpened",
    "GoAwayReceived",
    "HeartbeatAcknowledged",
    "SessionEnded",
    "Event",
]


@attrs.frozen
class StreamOpened:
    """The peer opened a stream (an application stream, never an extension)."""

    stream_id: int
    stream_type: int
    priority: int


@attrs.frozen
class DataReceived:
    """
    Payload for a stream.  The adapter must call
    ``Session.acknowledge(stream_id, len(data))`` once the bytes are consumed,
    or the peer's window stays shut.
    """

    stream_id: int
    data: bytes


@attrs.frozen
class StreamEnded:
    """The peer finished its direction of the stream (FIN)."""

    stream_id: int


@attrs.frozen
class StreamClosed:
    """
    The stream is gone, both directions.

    ``error_code`` is None for a clean end (FIN both ways, or our own
    Go-style close), otherwise the RST or session error code; ``remote`` says
    whether the peer caused it.
    """

    stream_id: int
    error_code: Optional[int] = None
    remote: bool = False
    reason: str = ""


@attrs.frozen
class SendWindowOpened:
    """Data queued behind the stream's send window has all been framed."""

    stream_id: int


@attrs.frozen
class GoAwayReceived:
    """The peer sent GOAWAY; no new stream may be opened to it."""

    last_stream_id: int
    error_code: int
    debug: bytes


@attrs.frozen
class HeartbeatAcknowledged:
    """The peer echoed our heartbeat; ``sent_at`` is when we sent it."""

    sent_at: float


@attrs.frozen
class SessionEnded:
    """
    The session is over.  The adapter sends what ``data_to_send`` still holds
    and closes the transport.  ``error_code`` is None when the transport was
    lost without a GOAWAY.
    """

    error_code: Optional[int]
    reason: str
    remote: bool


Event = Union[
    StreamOpened,
    DataReceived,
    StreamEnded,
    StreamClosed,
    SendWindowOpened,
    GoAwayReceived,
    HeartbeatAcknowledged,
    SessionEnded,
]
