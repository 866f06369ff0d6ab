"""
muxado v1 frame codec: constants, frame values, encoders and an incremental
decoder.

Sans-IO: nothing here does I/O or imports Twisted.  The decoder takes bytes as
they arrive (one at a time or many frames at once) and returns frame values;
a framing violation raises :class:`FrameError` carrying the muxado error code
the session must put in its GOAWAY.

Wire format (all integers big-endian), see docs/protocol.rst::

    0      2     3     4           8
    +------+-----+-----+-----------+----------------
    |length|flags|type | stream id | payload (length bytes)
    +------+-----+-----+-----------+----------------

Only the low 14 bits of ``length``, the low 5 bits of ``type`` and the low 31
bits of ``stream id`` count.

Why one module of this size: the codec is one wire format whose encoders and
decoder must agree byte for byte; splitting them would put the two halves of
each frame's layout in different files.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Union

import attrs

from tcprelay.mux.common import Buffer, DecoderBase, FrameError, Rst, WndInc, code_namer

__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "HEARTBEAT_STREAM_TYPE",
    "MIN_EXTENSION_TYPE",
    "FrameType",
    "ErrorCode",
    "Flag",
    "FrameError",
    "Syn",
    "Rst",
    "Data",
    "WndInc",
    "GoAway",
    "Frame",
    "FrameDecoder",
    "encode_syn",
    "encode_rst",
    "encode_data_header",
    "encode_wndinc",
    "encode_goaway",
    "encode",
    "error_name",
]

HEADER_SIZE: Final = 8
MAX_PAYLOAD: Final = 0x3FFF
"""Largest payload a frame can carry (14-bit length)."""
STREAM_ID_MASK: Final = 0x7FFFFFFF
WINDOW_MASK: Final = 0x7FFFFFFF
MIN_EXTENSION_TYPE: Final = 0xFFFFFFFF - 0x100
"""Stream types from here upwards belong to session extensions."""
HEARTBEAT_STREAM_TYPE: Final = MIN_EXTENSION_TYPE
"""Stream type of the heartbeat extension (0xFFFFFEFF)."""
HEARTBEAT_PRIORITY: Final = 0x7FFFFFFF

_HEADER = struct.Struct(">HBBI")
_U32 = struct.Struct(">I")
_U32U32 = struct.Struct(">II")
_HEADER_U32 = struct.Struct(">HBBII")
_HEADER_U32U32 = struct.Struct(">HBBIII")


class FrameType(enum.IntEnum):
    """The frame types of muxado v1 (5-bit field)."""

    SYN = 1
    RST = 2
    DATA = 3
    WNDINC = 4
    PRI = 5
    GOAWAY = 6


class ErrorCode(enum.IntEnum):
    """Error codes carried by RST and GOAWAY."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    FLOW_CONTROL_ERROR = 3
    STREAM_CLOSED = 4
    FRAME_SIZE_ERROR = 5
    REFUSED_STREAM = 6
    CANCEL = 7


class Flag(enum.IntFlag):
    """Header flag bits."""

    FIN = 0x1
    PRIORITY = 0x2
    STREAM_TYPE = 0x4


error_name: Final = code_namer(ErrorCode)
"""A readable name for an error code received from a peer (any u32)."""


@attrs.frozen
class Syn:
    """Open a stream.  ``priority`` and ``stream_type`` are 0 when absent."""

    stream_id: int
    priority: int = 0
    stream_type: int = 0
    fin: bool = False


@attrs.frozen
class Data:
    """Stream payload; ``fin`` half-closes the sender's direction."""

    stream_id: int
    data: bytes
    fin: bool = False


@attrs.frozen
class GoAway:
    """
    The sender is going away.

    ``final`` is True when the header promised more than the 8-byte body.  A
    Go v1 peer always does that (it claims 16 + len(debug) bytes and sends
    8), so the bytes after the body cannot be trusted to be frames: the
    decoder stops there and the session is finished.  ``debug`` then holds
    whatever followed the body in the same read, for logging only.
    """

    last_stream_id: int
    error_code: int
    debug: bytes = b""
    final: bool = False


Frame = Union[Syn, Rst, Data, WndInc, GoAway]


def encode_syn(
    stream_id: int, priority: int = 0, stream_type: int = 0, fin: bool = False
) -> bytes:
    """Encode a SYN; optional fields are present only when non-zero."""
    flags = Flag.FIN if fin else 0
    sid = stream_id & STREAM_ID_MASK
    if priority and stream_type:
        flags |= Flag.PRIORITY | Flag.STREAM_TYPE
        return _HEADER_U32U32.pack(8, flags, FrameType.SYN, sid, priority, stream_type)
    if priority:
        return _HEADER_U32.pack(4, flags | Flag.PRIORITY, FrameType.SYN, sid, priority)
    if stream_type:
        return _HEADER_U32.pack(
            4, flags | Flag.STREAM_TYPE, FrameType.SYN, sid, stream_type
        )
    return _HEADER.pack(0, flags, FrameType.SYN, sid)


def encode_rst(stream_id: int, error_code: int) -> bytes:
    """Encode an RST frame."""
    return _HEADER_U32.pack(4, 0, FrameType.RST, stream_id, error_code)


def encode_data_header(stream_id: int, length: int, fin: bool = False) -> bytes:
    """Encode the 8-byte header of a DATA frame carrying ``length`` bytes."""
    return _HEADER.pack(length, 1 if fin else 0, FrameType.DATA, stream_id)


def encode_wndinc(stream_id: int, increment: int) -> bytes:
    """Encode a WNDINC frame."""
    return _HEADER_U32.pack(4, 0, FrameType.WNDINC, stream_id, increment)


def encode_goaway(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    """Encode a GOAWAY with an honest length (8 + len(debug))."""
    debug = debug[: MAX_PAYLOAD - 8]
    return (
        _HEADER_U32U32.pack(
            8 + len(debug), 0, FrameType.GOAWAY, 0, last_stream_id, error_code
        )
        + debug
    )


def encode(frame: Frame) -> bytes:
    """Encode any frame value (convenience for tests and tools)."""
    if isinstance(frame, Data):
        if len(frame.data) > MAX_PAYLOAD:
            raise ValueError("DATA payload larger than 16383 bytes")
        return encode_data_header(frame.stream_id, len(frame.data), frame.fin) + bytes(
            frame.data
        )
    if isinstance(frame, Syn):
        return encode_syn(frame.stream_id, frame.priority, frame.stream_type, frame.fin)
    if isinstance(frame, Rst):
        return encode_rst(frame.stream_id, frame.error_code)
    if isinstance(frame, WndInc):
        return encode_wndinc(frame.stream_id, frame.increment)
    return encode_goaway(frame.last_stream_id, frame.error_code, frame.debug)


_SYN_LENGTHS: Final = {0: 0, 2: 4, 4: 4, 6: 8}


def view_tail(data: bytes, pos: int) -> memoryview:
    """The bytes of ``data`` from ``pos`` on, without copying."""
    return memoryview(data)[pos:]


class FrameDecoder(DecoderBase):
    """
    Incremental decoder: :meth:`feed` bytes in any split, get whole frames.

    Called by the session for every read from the socket.  After it raises
    :class:`FrameError`, or after it returns a GOAWAY whose length was not
    honest, it must not be fed again (:attr:`finished` is set).
    """

    __slots__ = ("merge_data",)

    def __init__(self, merge_data: bool = False) -> None:
        super().__init__()
        self.merge_data = merge_data
        """Join consecutive DATA frames of one stream (see ``_parse``)."""

    def feed(self, data: bytes) -> list[Frame]:
        """Decode every complete frame now available."""
        if self.finished:
            return []
        buf = self._buf
        frames: list[Frame] = []
        runs: dict[int, list[Buffer]] = {}
        start = 0
        try:
            if buf:
                # Finish the frame a previous read left incomplete, copying
                # only its missing bytes (not the whole read) into ``buf``.
                start = self._complete(data, frames, runs)
                if buf or self.finished:
                    return frames
            view = memoryview(data)
            try:
                pos = self._parse(data, view, frames, start, runs)
            finally:
                view.release()
        except FrameError:
            self.finished = True
            del buf[:]
            raise
        if pos < len(data):
            buf += view_tail(data, pos)
        return frames

    def _complete(self, data: bytes, frames: list[Frame], runs: dict[int, list[Buffer]]) -> int:
        """
        Move into ``_buf`` the bytes of ``data`` that complete its pending
        frame and decode that frame; return how many bytes of ``data`` were
        used.  ``_buf`` is left empty once the frame is complete.  A DATA
        frame without FIN seeds ``runs``, so that it joins its stream's
        later frames of the same read.
        """
        buf = self._buf
        used = 0
        if len(buf) < HEADER_SIZE:
            used = min(HEADER_SIZE - len(buf), len(data))
            buf += data[:used]
            if len(buf) < HEADER_SIZE:
                return used
        size = self._frame_size(buf)
        more = min(size - len(buf), len(data) - used)
        if more > 0:
            buf += data[used : used + more]
            used += more
        if len(buf) < size:
            return used
        length, _, ftype, _ = _HEADER.unpack_from(buf, 0)
        if ftype & 0x1F == FrameType.GOAWAY and length & MAX_PAYLOAD > 8:
            # what followed the body in this read: the GOAWAY's debug text
            extra = min((length & MAX_PAYLOAD) - 8, len(data) - used)
            buf += data[used : used + extra]
            used += extra
        found: list[Frame] = []
        view = memoryview(buf)
        try:
            self._parse(buf, view, found, 0, {})
        finally:
            view.release()
        del buf[:]
        for frame in found:
            if self.merge_data and type(frame) is Data and not frame.fin and frame.data:
                runs[frame.stream_id] = [frame.data]
            else:
                frames.append(frame)
        return used

    def _frame_size(self, header: bytes | bytearray) -> int:
        """
        Header plus the body bytes :meth:`_parse` needs to decode the frame
        that ``header`` starts (a GOAWAY: its 8-byte body only, see there);
        a wrong length or type raises at once, as it does there.
        """
        fields: tuple[int, int, int, int] = _HEADER.unpack_from(header, 0)
        length, flags, ftype, _ = fields
        length &= MAX_PAYLOAD
        ftype &= 0x1F
        if ftype == FrameType.DATA:
            return HEADER_SIZE + length
        if ftype == FrameType.GOAWAY:
            if length < 8:
                raise FrameError(
                    ErrorCode.FRAME_SIZE_ERROR,
                    f"GOAWAY length {length} is shorter than its 8-byte body",
                )
            return HEADER_SIZE + 8
        self._check_length(ftype, flags, length)
        return HEADER_SIZE + length

    def _parse(
        self,
        src: bytes | bytearray,
        view: memoryview,
        frames: list[Frame],
        pos: int,
        runs: dict[int, list[Buffer]],
    ) -> int:
        """
        Append the frames found in ``src`` from ``pos`` on; return how far
        it got.  ``runs`` holds DATA already found for a stream (see below).

        With ``merge_data``, the DATA frames of each stream found in one
        read come out as one Data value per stream (a peer splits its writes
        into 16383-byte frames and interleaves streams): one copy of the
        payload and one event per stream and read instead of one per frame.
        Data is emitted before any SYN, RST, GOAWAY or PRI that followed it
        (only WNDINC, which concerns the other direction, is passed over),
        and a stream's FIN ends its run.  A bare FIN (a stream that sent no
        data in this read) comes out after the other streams' data of the
        read, so that delivering data never waits for a stream's teardown.
        Frame boundaries carry no meaning in muxado; the session uses this,
        tests that inspect frames do not.
        """
        merge = self.merge_data
        end = len(src)
        unpack_header = _HEADER.unpack_from
        append = frames.append

        def flush_run(sid: int, fin: bool = False) -> None:
            run = runs.pop(sid, None)
            if run is None:
                if fin:
                    append(Data(sid, b"", True))
                return
            data = bytes(run[0]) if len(run) == 1 else b"".join(run)
            append(Data(sid, data, fin))

        # Streams whose bare FIN (no data of theirs in this read) waits
        # until the other streams' data has gone out.
        fins: list[int] = []

        def flush_all() -> None:
            for sid in list(runs):
                flush_run(sid)
            if fins:
                for sid in fins:
                    append(Data(sid, b"", True))
                fins.clear()

        while end - pos >= HEADER_SIZE:
            length, flags, ftype, sid = unpack_header(src, pos)
            length &= MAX_PAYLOAD
            ftype &= 0x1F
            sid &= STREAM_ID_MASK
            body = pos + HEADER_SIZE
            if ftype == 3:  # DATA, the hot path
                if end - body < length:
                    break
                pos = body + length
                if not merge:
                    append(Data(sid, bytes(view[body:pos]), bool(flags & 1)))
                    continue
                if fins and sid in fins:
                    flush_all()  # a frame after its stream's FIN keeps its place
                run = runs.get(sid)
                if run is None and not length and flags & 1:
                    fins.append(sid)
                    continue
                if run is None:
                    runs[sid] = [view[body:pos]]
                else:
                    run.append(view[body:pos])
                if flags & 1:
                    flush_run(sid, True)
                continue
            if (runs or fins) and ftype != FrameType.WNDINC:
                # WNDINC concerns the other direction and splits no run.  Any
                # other frame keeps its place after the data before it: a
                # new stream (SYN) may depend on what another stream said
                # first (the agent's "ready" before the first visitor).
                flush_all()
            if ftype == FrameType.GOAWAY:
                if length < 8:
                    raise FrameError(
                        ErrorCode.FRAME_SIZE_ERROR,
                        f"GOAWAY length {length} is shorter than its 8-byte body",
                    )
                if end - body < 8:
                    break
                last, code = _U32U32.unpack_from(src, body)
                if length == 8:
                    pos = body + 8
                    append(GoAway(last & STREAM_ID_MASK, code))
                    continue
                # A Go v1 peer claims 16 + len(debug) bytes but sends only the
                # 8-byte body: take the body and frame nothing after it.
                rest = bytes(view[body + 8 : body + length])
                append(GoAway(last & STREAM_ID_MASK, code, rest, True))
                self.finished = True
                return end
            # Fixed-size frames: check the length before waiting for it.
            self._check_length(ftype, flags, length)
            if end - body < length:
                break
            if ftype == FrameType.WNDINC:
                append(WndInc(sid, _U32.unpack_from(src, body)[0] & WINDOW_MASK))
            elif ftype == FrameType.SYN:
                priority = stream_type = 0
                off = body
                if flags & Flag.PRIORITY:
                    priority = _U32.unpack_from(src, off)[0]
                    off += 4
                if flags & Flag.STREAM_TYPE:
                    stream_type = _U32.unpack_from(src, off)[0]
                append(Syn(sid, priority, stream_type, bool(flags & 1)))
            elif ftype == FrameType.RST:
                append(Rst(sid, _U32.unpack_from(src, body)[0]))
            # PRI (5): defined but unimplemented upstream; skipped whole.
            pos = body + length
        if runs or fins:
            flush_all()
        return pos

    @staticmethod
    def _check_length(ftype: int, flags: int, length: int) -> None:
        """Raise FrameError for an unknown type or a wrong fixed length."""
        if ftype == FrameType.SYN:
            want = _SYN_LENGTHS[flags & 6]
            if length != want:
                raise FrameError(
                    ErrorCode.FRAME_SIZE_ERROR,
                    f"SYN with flags {flags:#x} must carry {want} bytes, not {length}",
                )
        elif ftype == FrameType.RST or ftype == FrameType.WNDINC:
            if length != 4:
                raise FrameError(
                    ErrorCode.FRAME_SIZE_ERROR,
                    f"{FrameType(ftype).name} must carry 4 bytes, not {length}",
                )
        elif ftype != FrameType.PRI:
            raise FrameError(ErrorCode.PROTOCOL_ERROR, f"unknown frame type {ftype}")
