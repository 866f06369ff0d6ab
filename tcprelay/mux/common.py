"""
What the muxado v1 (:mod:`tcprelay.mux`) and v2 (:mod:`tcprelay.mux2`)
codecs and sessions share, sans-IO: the framing error, the error-name
helper, the frame values both versions have alike (RST, WNDINC), the
decoders' buffer, stream states and their transitions, the stream record,
and the error codes and codec a session's shared part
(:class:`tcprelay.mux.sessionbase.SessionBase`) is given.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Callable, Final, Optional, Protocol, Sequence, Union

import attrs

__all__ = [
    "HALF_CLOSED_LOCAL",
    "MAX_WINDOW",
    "OPEN",
    "SENDING",
    "TRANSITIONS",
    "Buffer",
    "Codec",
    "Decoder",
    "DecoderBase",
    "ErrorCodes",
    "FrameError",
    "Heartbeat",
    "Role",
    "Rst",
    "SessionClosedError",
    "StreamClosedError",
    "StreamInput",
    "StreamRecord",
    "StreamState",
    "WndInc",
    "code_namer",
]

Buffer = Union[bytes, bytearray, memoryview]

MAX_WINDOW: Final = 0x7FFFFFFF


class FrameError(Exception):
    """
    The peer broke the framing rules; the session must end with GOAWAY
    carrying :attr:`code` (an error code of the version's codec).
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def code_namer(codes: type[enum.IntEnum]) -> Callable[[int], str]:
    """An ``error_name`` function for one version's error codes."""

    def error_name(code: int) -> str:
        """A readable name for an error code received from a peer (any u32)."""
        try:
            return codes(code).name
        except ValueError:
            return f"UNKNOWN_{code}"

    return error_name


class Role(enum.Enum):
    """Which end of the TCP connection we are: the dialler is the client."""

    CLIENT = "client"
    SERVER = "server"


class StreamState(enum.Enum):
    """Lifecycle of one stream; see :data:`TRANSITIONS`."""

    OPEN = "open"
    HALF_CLOSED_LOCAL = "half-closed (local)"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class StreamInput(enum.Enum):
    SEND_FIN = "send FIN"
    RECV_FIN = "receive FIN"


TRANSITIONS: Final[dict[tuple[StreamState, StreamInput], StreamState]] = {
    (StreamState.OPEN, StreamInput.SEND_FIN): StreamState.HALF_CLOSED_LOCAL,
    (StreamState.OPEN, StreamInput.RECV_FIN): StreamState.HALF_CLOSED_REMOTE,
    (StreamState.HALF_CLOSED_LOCAL, StreamInput.RECV_FIN): StreamState.CLOSED,
    (StreamState.HALF_CLOSED_REMOTE, StreamInput.SEND_FIN): StreamState.CLOSED,
}
"""Clean transitions.  RST, or the session ending, closes from any state."""

OPEN: Final = StreamState.OPEN
HALF_CLOSED_LOCAL: Final = StreamState.HALF_CLOSED_LOCAL
# States in which the peer may still send (compared by identity: enum
# hashing costs a Python call per frame).
SENDING: Final = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
"""States in which we may still send."""


class SessionClosedError(Exception):
    """The session has ended, or the peer went away and no stream can open."""


class StreamClosedError(Exception):
    """The stream is gone, or its sending direction is already finished."""


class Heartbeat(enum.Enum):
    """Whose heartbeat a stream carries, if any."""

    NONE = 0
    OURS = 1
    THEIRS = 2


@attrs.define(eq=False)
class StreamRecord:
    """Book-keeping for one stream (internal to the sessions)."""

    id: int
    local: bool
    send_window: int
    recv_window: int
    stream_type: Optional[int] = None
    """None only for a v2 peer stream whose type (first 4 bytes) has not arrived."""
    type_bytes: bytes = b""
    """v2: the part of a peer stream's type received so far."""
    heartbeat: Heartbeat = Heartbeat.NONE
    state: StreamState = StreamState.OPEN
    recv_credit: int = 0
    pending: deque[Buffer] = attrs.Factory(deque)
    pending_len: int = 0
    fin_queued: bool = False
    forget_on_fin: bool = False
    accepted: bool = True
    heard: bool = False
    """The peer has sent something on the stream (data, FIN or WNDINC)."""


@attrs.frozen
class Rst:
    """Reset one stream."""

    stream_id: int
    error_code: int


@attrs.frozen
class WndInc:
    """Grant the peer ``increment`` more bytes of send window on a stream."""

    stream_id: int
    increment: int


class Codec(Protocol):
    """What a session's shared part takes from a version's frames module."""

    def encode_rst(self, stream_id: int, error_code: int, /) -> bytes: ...

    def encode_wndinc(self, stream_id: int, increment: int, /) -> bytes: ...

    def encode_goaway(self, last_stream_id: int, error_code: int, debug: bytes = b"", /) -> bytes: ...

    @property
    def error_name(self) -> Callable[[int], str]: ...


class Decoder(Protocol):
    @property
    def buffered(self) -> int: ...

    def feed(self, data: bytes, /) -> Sequence[object]: ...


class DecoderBase:
    """What both versions' incremental frame decoders keep."""

    __slots__ = ("_buf", "finished")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.finished = False
        """Set after a framing error, or a frame after which nothing can be
        trusted to be a frame: the decoder must not be fed again."""

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)


@attrs.frozen
class ErrorCodes:
    """The error codes, of one version's numbering, that the shared part sends."""

    protocol: int
    flow_control: int
    stream_closed: int
    refused: int
    cancel: int
    flood: int
    """GOAWAY code of a flood (too many RSTs provoked)."""
    session_ended: int
    """StreamClosed code of the streams a session's end closes."""
