"""
The muxado v2 frame codec byte for byte (tcprelay.mux2.frames): every frame
type's golden bytes as ngrok-rust's codec.rs writes and reads them, the
decoder across any split, and its refusals.
"""

from __future__ import annotations

import pytest

from tcprelay.mux2 import frames as f
from tcprelay.mux2.frames import Data, ErrorCode, FrameDecoder, FrameError, GoAway, Rst, WndInc

GOLDEN = [
    # DATA, no flags: length 2, type 1 (0x10), stream 3
    (Data(3, b"hi"), bytes.fromhex("00000210 00000003") + b"hi"),
    # DATA with SYN (0x2) carrying a stream type (Auth, 0)
    (Data(3, b"\0\0\0\0", syn=True), bytes.fromhex("00000412 00000003 00000000")),
    # DATA with FIN (0x1), empty: a half-close
    (Data(2, b"", fin=True), bytes.fromhex("00000011 00000002")),
    # DATA with SYN and FIN
    (Data(5, b"x", fin=True, syn=True), bytes.fromhex("00000113 00000005") + b"x"),
    # RST: type 0, 4-byte error code (STREAM_REFUSED)
    (Rst(5, ErrorCode.STREAM_REFUSED), bytes.fromhex("00000400 00000005 00000005")),
    # WNDINC: type 2, 4-byte increment (128 KiB)
    (WndInc(3, 0x20000), bytes.fromhex("00000420 00000003 00020000")),
    # GOAWAY: type 3, stream 0, last stream id, error code, message; honest length 8 + 3
    (GoAway(3, ErrorCode.PROTOCOL, b"bye"), bytes.fromhex("00000b30 00000000 00000003 00000001") + b"bye"),
    (GoAway(0, ErrorCode.NONE), bytes.fromhex("00000830 00000000 00000000 00000000")),
]


@pytest.mark.parametrize(("frame", "wire"), GOLDEN)
def test_golden_encode(frame: f.Frame, wire: bytes) -> None:
    """Each frame encodes to the bytes ngrok-rust's codec writes."""
    assert f.encode(frame) == wire


@pytest.mark.parametrize(("frame", "wire"), GOLDEN)
def test_golden_decode(frame: f.Frame, wire: bytes) -> None:
    """Each frame's bytes decode to it, whole and one byte at a time."""
    assert FrameDecoder().feed(wire) == [frame]
    decoder = FrameDecoder()
    found = []
    for i in range(len(wire)):
        found += decoder.feed(wire[i : i + 1])
    assert found == [frame]


def test_header_fields_are_24_4_4_bits() -> None:
    """The first word is length << 8 | type << 4 | flags; the top bit of the stream id is ignored."""
    header = f.encode_data_header(0x7FFFFFFF, 0xFFFFFF, fin=True, syn=True)
    assert header == bytes.fromhex("ffffff13 7fffffff")
    assert FrameDecoder().feed(bytes.fromhex("00000110 80000009") + b"z") == [Data(9, b"z")]


def test_rust_goaway_with_message_length_only() -> None:
    """ngrok-rust writes only the message's length in a GOAWAY header: the 8-byte body is read anyway, and decoding stops."""
    wire = bytes.fromhex("00000330 00000000 00000007 0000000e") + b"bye" + f.encode(Data(3, b"late"))
    decoder = FrameDecoder()
    frames = decoder.feed(wire)
    assert len(frames) == 1 and isinstance(frames[0], GoAway)
    assert (frames[0].last_stream_id, frames[0].error_code) == (7, ErrorCode.SESSION_CLOSED)
    assert decoder.finished and decoder.feed(b"more") == []


def test_several_frames_in_one_read() -> None:
    """Frames back to back come out in order; a partial tail waits for its rest."""
    wire = f.encode(Data(3, b"a")) + f.encode(WndInc(3, 1)) + f.encode(Data(3, b"bc", fin=True))
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-1]) == [Data(3, b"a"), WndInc(3, 1)]
    assert decoder.buffered == 9
    assert decoder.feed(wire[-1:]) == [Data(3, b"bc", fin=True)]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes.fromhex("00000040 00000001"), ErrorCode.PROTOCOL),  # type 4: unknown
        (bytes.fromhex("000000f0 00000001"), ErrorCode.PROTOCOL),  # type 15
        (bytes.fromhex("00000010 00000000"), ErrorCode.PROTOCOL),  # DATA on stream 0
        (bytes.fromhex("00000400 00000000 00000000"), ErrorCode.PROTOCOL),  # RST on stream 0
        (bytes.fromhex("00000500 00000001"), ErrorCode.FRAME_SIZE),  # RST of 5 bytes
        (bytes.fromhex("00000320 00000001"), ErrorCode.FRAME_SIZE),  # WNDINC of 3 bytes
        (bytes.fromhex("00000830 00000001"), ErrorCode.PROTOCOL),  # GOAWAY on a stream
    ],
)
def test_refusals(wire: bytes, code: ErrorCode) -> None:
    """A malformed header raises FrameError with the code the GOAWAY carries, before any body arrives."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as info:
        decoder.feed(wire)
    assert info.value.code == code
    assert decoder.finished


def test_data_larger_than_the_window_is_refused_at_its_header() -> None:
    """A DATA frame longer than ``max_data`` is a FRAME_SIZE error before its payload is buffered."""
    decoder = FrameDecoder(max_data=0x40000)
    with pytest.raises(FrameError) as info:
        decoder.feed(f.encode_data_header(3, 0x40001))
    assert info.value.code == ErrorCode.FRAME_SIZE
    assert FrameDecoder(max_data=0x40000).feed(f.encode_data_header(3, 0x40000)) == []


def test_large_frame_split_in_many_reads() -> None:
    """A 256 KiB frame arriving in 1000-byte reads comes out once, whole."""
    payload = bytes(range(256)) * 1024
    wire = f.encode(Data(3, payload))
    decoder = FrameDecoder(max_data=len(payload))
    out = []
    for i in range(0, len(wire), 1000):
        out += decoder.feed(wire[i : i + 1000])
    assert out == [Data(3, payload)]


def test_error_names() -> None:
    """Known codes have ngrok's names; others are UNKNOWN_n."""
    assert f.error_name(0x0A) == "ENHANCE_YOUR_CALM"
    assert f.error_name(99) == "UNKNOWN_99"
