"""
muxado v2 frame codec (the framing of ngrok's agent SDKs): constants, frame
values, encoders and an incremental decoder.

Sans-IO: nothing here does I/O or imports Twisted.  The decoder takes bytes
as they arrive and returns frame values; a framing violation raises
:class:`FrameError` carrying the error code the session puts in its GOAWAY.

Wire format (all integers big-endian), from ngrok-rust ``muxado/src/codec.rs``::

    0                 3        4           8
    +-----------------+--------+-----------+----------------
    | length (24 bit) |type|flg| stream id | payload (length bytes)
    +-----------------+--------+-----------+----------------

Types RST=0 (4-byte error code), DATA=1, WNDINC=2 (4-byte increment),
GOAWAY=3 (stream id 0; last stream id, error code, message).  Flags FIN=0x1,
SYN=0x2: SYN is a flag of a stream's first DATA frame (there is no SYN
frame).  Only the low 31 bits of a stream id count.

Unlike v1 (:mod:`tcprelay.mux.frames`: 14-bit length, a type byte and a
flags byte, a separate SYN frame), the length takes 24 bits and type and
flags share one byte.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Union

import attrs

from tcprelay.mux.common import Buffer, DecoderBase, FrameError, Rst, WndInc, code_namer

__all__ = [
    "HEADER_SIZE",
    "LENGTH_MAX",
    "HEARTBEAT_STREAM_TYPE",
    "Data",
    "ErrorCode",
    "Flag",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "GoAway",
    "Rst",
    "WndInc",
    "encode",
    "encode_data_header",
    "encode_goaway",
    "encode_rst",
    "encode_wndinc",
    "error_name",
]

HEADER_SIZE: Final = 8
LENGTH_MAX: Final = 0xFFFFFF
"""Largest payload the 24-bit length field can describe."""
STREAM_ID_MASK: Final = 0x7FFFFFFF
WINDOW_MASK: Final = 0x7FFFFFFF
HEARTBEAT_STREAM_TYPE: Final = 0xFFFFFFFF
"""The typed-stream type of the heartbeat (its first 4 bytes)."""

_HEADER = struct.Struct(">II")
_HEADER_U32 = struct.Struct(">III")
_HEADER_U32U32 = struct.Struct(">IIII")
_U32 = struct.Struct(">I")


class FrameType(enum.IntEnum):
    """The frame types of muxado v2 (4-bit field)."""

    RST = 0
    DATA = 1
    WNDINC = 2
    GOAWAY = 3


class Flag(enum.IntFlag):
    """Flag bits (the low 4 bits of the type byte)."""

    FIN = 0x1
    SYN = 0x2


class ErrorCode(enum.IntEnum):
    """Error codes of RST and GOAWAY (ngrok-rust ``muxado/src/errors.rs``)."""

    NONE = 0x00
    PROTOCOL = 0x01
    INTERNAL = 0x02
    FLOW_CONTROL = 0x03
    STREAM_CLOSED = 0x04
    STREAM_REFUSED = 0x05
    STREAM_CANCELLED = 0x06
    STREAM_RESET = 0x07
    FRAME_SIZE = 0x08
    ACCEPT_QUEUE_FULL = 0x09
    ENHANCE_YOUR_CALM = 0x0A
    REMOTE_GONE_AWAY = 0x0B
    STREAMS_EXHAUSTED = 0x0C
    WRITE_TIMEOUT = 0x0D
    SESSION_CLOSED = 0x0E
    PEER_EOF = 0x0F


error_name: Final = code_namer(ErrorCode)
"""A readable name for an error code received from a peer (any u32)."""


@attrs.frozen
class Data:
    """Stream payload; ``syn`` opens the stream, ``fin`` half-closes the sender's direction."""

    stream_id: int
    data: bytes
    fin: bool = False
    syn: bool = False


@attrs.frozen
class GoAway:
    """
    The sender is going away; the session is over.  The decoder stops after
    it (see :class:`FrameDecoder`), so ``message`` is for logs only.
    """

    last_stream_id: int
    error_code: int
    message: bytes = b""


Frame = Union[Data, Rst, WndInc, GoAway]


def _first_word(length: int, ftype: int, flags: int) -> int:
    return (length << 8) | (ftype << 4) | flags


def encode_data_header(stream_id: int, length: int, fin: bool = False, syn: bool = False) -> bytes:
    """The 8-byte header of a DATA frame carrying ``length`` bytes."""
    flags = (1 if fin else 0) | (2 if syn else 0)
    return _HEADER.pack((length << 8) | 0x10 | flags, stream_id & STREAM_ID_MASK)


def encode_rst(stream_id: int, error_code: int) -> bytes:
    """An RST frame."""
    return _HEADER_U32.pack(_first_word(4, FrameType.RST, 0), stream_id & STREAM_ID_MASK, error_code)


def encode_wndinc(stream_id: int, increment: int) -> bytes:
    """A WNDINC frame."""
    return _HEADER_U32.pack(
        _first_word(4, FrameType.WNDINC, 0), stream_id & STREAM_ID_MASK, increment & WINDOW_MASK
    )


def encode_goaway(last_stream_id: int, error_code: int, message: bytes = b"") -> bytes:
    """A GOAWAY with an honest length (8 + the message), as ngrok-rust decodes it."""
    message = message[: 4096]
    return (
        _HEADER_U32U32.pack(
            _first_word(8 + len(message), FrameType.GOAWAY, 0),
            0,
            last_stream_id & STREAM_ID_MASK,
            error_code,
        )
        + message
    )


def encode(frame: Frame) -> bytes:
    """Encode any frame value (for tests and tools)."""
    if isinstance(frame, Data):
        if len(frame.data) > LENGTH_MAX:
            raise ValueError("DATA payload larger than 2**24-1 bytes")
        return encode_data_header(frame.stream_id, len(frame.data), frame.fin, frame.syn) + bytes(
            frame.data
        )
    if isinstance(frame, Rst):
        return encode_rst(frame.stream_id, frame.error_code)
    if isinstance(frame, WndInc):
        return encode_wndinc(frame.stream_id, frame.increment)
    return encode_goaway(frame.last_stream_id, frame.error_code, frame.message)


class FrameDecoder(DecoderBase):
    """
    Incremental decoder: :meth:`feed` bytes in any split, get whole frames.

    ``max_data`` bounds a DATA frame's payload (a larger one is a
    FRAME_SIZE error before its payload is waited for): the session passes
    its receive window, since a frame larger than the window is a
    flow-control violation anyway, and this bounds what a frame can make
    the decoder buffer.

    A GOAWAY ends the session, so the decoder stops after it
    (:attr:`finished`): ngrok-rust writes the message's length alone in the
    header but sends the 8-byte body before the message, so a GOAWAY's
    length cannot be trusted to find the next frame.  A length of 8 or more
    is read as 8 + message (ngrok-rust then sent more than that, never
    less); with a shorter one the message is what followed the 8-byte body
    in the same read.  Messages are for logs.
    """

    __slots__ = ("max_data",)

    def __init__(self, max_data: int = LENGTH_MAX) -> None:
        super().__init__()
        self.max_data = max_data

    def feed(self, data: Buffer) -> list[Frame]:
        """Decode every complete frame now available."""
        if self.finished:
            return []
        buf = self._buf
        if buf:
            if len(buf) >= HEADER_SIZE:
                word = _U32.unpack_from(buf, 0)[0]
                if (word >> 4) & 0xF == FrameType.DATA and (word >> 8) <= self.max_data:
                    if len(buf) + len(data) < HEADER_SIZE + (word >> 8):
                        buf += data  # still inside one DATA frame: no parse, no copy
                        return []
            buf += data
            src: Buffer = bytes(buf)
            buf.clear()
        else:
            src = data
        frames: list[Frame] = []
        try:
            pos = self._parse(src, frames)
        except FrameError:
            self.finished = True
            raise
        if pos < len(src) and not self.finished:
            buf += memoryview(src)[pos:]
        return frames

    def _parse(self, src: Buffer, frames: list[Frame]) -> int:
        end = len(src)
        pos = 0
        unpack = _HEADER.unpack_from
        view = memoryview(src)
        append = frames.append
        while end - pos >= HEADER_SIZE:
            word, sid = unpack(src, pos)
            length = word >> 8
            ftype = (word >> 4) & 0xF
            flags = word & 0xF
            sid &= STREAM_ID_MASK
            body = pos + HEADER_SIZE
            if ftype == FrameType.DATA:
                if sid == 0:
                    raise FrameError(ErrorCode.PROTOCOL, "DATA frame on stream 0")
                if length > self.max_data:
                    raise FrameError(
                        ErrorCode.FRAME_SIZE,
                        f"DATA frame of {length} bytes is larger than the window ({self.max_data})",
                    )
                if end - body < length:
                    break
                pos = body + length
                append(Data(sid, bytes(view[body:pos]), bool(flags & 1), bool(flags & 2)))
                continue
            if ftype == FrameType.RST or ftype == FrameType.WNDINC:
                name = FrameType(ftype).name
                if sid == 0:
                    raise FrameError(ErrorCode.PROTOCOL, f"{name} frame on stream 0")
                if length != 4:
                    raise FrameError(ErrorCode.FRAME_SIZE, f"{name} must carry 4 bytes, not {length}")
                if end - body < 4:
                    break
                value = _U32.unpack_from(src, body)[0]
                pos = body + 4
                if ftype == FrameType.RST:
                    append(Rst(sid, value))
                else:
                    append(WndInc(sid, value & WINDOW_MASK))
                continue
            if ftype == FrameType.GOAWAY:
                if sid != 0:
                    raise FrameError(ErrorCode.PROTOCOL, f"GOAWAY on stream {sid}, not 0")
                size = min(max(length, 8), 8 + 4096)
                if end - body < size:
                    break
                last, code = struct.unpack_from(">II", src, body)
                # honest (8 + message) or ngrok-rust's (message only): both
                # have sent at least ``size`` bytes; after a short one, the
                # message is what followed in this read
                stop = body + size if length >= 8 else min(end, body + 8 + 4096)
                message = bytes(view[body + 8 : stop])
                append(GoAway(last & STREAM_ID_MASK, code, message))
                self.finished = True
                return end
            raise FrameError(ErrorCode.PROTOCOL, f"unknown frame type {ftype}")
        return pos
