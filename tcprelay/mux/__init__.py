"""
Sans-IO muxado v1: frame codec (:mod:`.frames`), session and stream state
(:mod:`.session`) and the events they report (:mod:`.events`).

Nothing in this package performs I/O or imports Twisted; see
:mod:`tcprelay.protocol` for the Twisted adapter.
"""

from tcprelay.mux.events import (
    DataReceived,
    Event,
    GoAwayReceived,
    HeartbeatAcknowledged,
    SendWindowOpened,
    SessionEnded,
    StreamClosed,
    StreamEnded,
    StreamOpened,
)
from tcprelay.mux.frames import ErrorCode, FrameError, FrameType
from tcprelay.mux.session import (
    Role,
    Session,
    SessionClosedError,
    SessionConfig,
    StreamClosedError,
    StreamState,
)

__all__ = [
    "DataReceived",
    "ErrorCode",
    "Event",
    "FrameError",
    "FrameType",
    "GoAwayReceived",
    "HeartbeatAcknowledged",
    "Role",
    "SendWindowOpened",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionEnded",
    "StreamClosed",
    "StreamClosedError",
    "StreamEnded",
    "StreamOpened",
    "StreamState",
]
