"""
Unit tests for the muxado v1 frame codec (tcprelay.mux.frames): exact wire
bytes, header masks, length rules and the incremental decoder.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprelay.mux import frames as f
from tcprelay.mux.frames import (
    Data,
    ErrorCode,
    FrameDecoder,
    FrameError,
    GoAway,
    Rst,
    Syn,
    WndInc,
)

FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

HEARTBEAT_SYN_3 = bytes.fromhex("0008 0601 00000003 7fffffff fffffeff")


def decode(data: bytes) -> list[f.Frame]:
    """Decode ``data`` in one feed with a fresh decoder."""
    return FrameDecoder().feed(data)


def decode_bytewise(data: bytes) -> list[f.Frame]:
    """Decode ``data`` one byte per feed with a fresh decoder."""
    decoder = FrameDecoder()
    out: list[f.Frame] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    return out


def header(length: int, flags: int, ftype: int, sid: int) -> bytes:
    """A raw 8-byte frame header."""
    return (
        length.to_bytes(2, "big")
        + bytes([flags, ftype])
        + sid.to_bytes(4, "big")
    )


# ----------------------------------------------------------------------
# Exact wire bytes, both ways


WIRE_CASES = [
    pytest.param(
        Syn(3, priority=0x7FFFFFFF, stream_type=0xFFFFFEFF),
        HEARTBEAT_SYN_3,
        id="heartbeat-syn",
    ),
    pytest.param(Syn(5), bytes.fromhex("0000 0001 00000005"), id="plain-syn"),
    pytest.param(
        Syn(7, priority=9), bytes.fromhex("0004 0201 00000007 00000009"), id="syn-pri"
    ),
    pytest.param(
        Syn(2, stream_type=0x42),
        bytes.fromhex("0004 0401 00000002 00000042"),
        id="syn-type",
    ),
    pytest.param(
        Syn(9, fin=True), bytes.fromhex("0000 0101 00000009"), id="syn-fin"
    ),
    pytest.param(
        Rst(5, ErrorCode.STREAM_CLOSED),
        bytes.fromhex("0004 0002 00000005 00000004"),
        id="rst",
    ),
    pytest.param(
        Data(5, b"abc"), bytes.fromhex("0003 0003 00000005") + b"abc", id="data"
    ),
    pytest.param(
        Data(6, b"", fin=True), bytes.fromhex("0000 0103 00000006"), id="data-fin"
    ),
    pytest.param(
        Data(6, b"xy", fin=True),
        bytes.fromhex("0002 0103 00000006") + b"xy",
        id="data-payload-fin",
    ),
    pytest.param(
        WndInc(5, 0x8000), bytes.fromhex("0004 0004 00000005 00008000"), id="wndinc"
    ),
    pytest.param(
        GoAway(7, ErrorCode.NO_ERROR),
        bytes.fromhex("0008 0006 00000000 00000007 00000000"),
        id="goaway",
    ),
]


@pytest.mark.parametrize("frame,wire", WIRE_CASES)
def test_encode_exact_bytes(frame: f.Frame, wire: bytes) -> None:
    """Every frame type encodes to exactly the bytes muxado v1 puts on the wire."""
    assert f.encode(frame) == wire


@pytest.mark.parametrize("frame,wire", WIRE_CASES)
def test_decode_exact_bytes(frame: f.Frame, wire: bytes) -> None:
    """The exact wire bytes of every frame type decode back to the same frame."""
    assert decode(wire) == [frame]


def test_heartbeat_syn_encoder_helper() -> None:
    """encode_syn with the heartbeat constants yields the documented heartbeat SYN."""
    assert (
        f.encode_syn(3, f.HEARTBEAT_PRIORITY, f.HEARTBEAT_STREAM_TYPE)
        == HEARTBEAT_SYN_3
    )
    assert f.HEARTBEAT_STREAM_TYPE == 0xFFFFFEFF


def test_goaway_debug_has_honest_length() -> None:
    """An encoded GOAWAY with debug text claims exactly 8 + len(debug) bytes."""
    wire = f.encode_goaway(4, ErrorCode.PROTOCOL_ERROR, b"oops")
    assert wire == bytes.fromhex("000c 0006 00000000 00000004 00000001") + b"oops"


def test_data_header_helper() -> None:
    """encode_data_header writes the length and FIN flag of a DATA frame."""
    assert f.encode_data_header(3, 16383, fin=True) == bytes.fromhex(
        "3fff 0103 00000003"
    )


def test_encode_refuses_oversized_data() -> None:
    """encode() refuses a DATA payload beyond the 14-bit length field."""
    f.encode(Data(1, b"x" * f.MAX_PAYLOAD))
    with pytest.raises(ValueError):
        f.encode(Data(1, b"x" * (f.MAX_PAYLOAD + 1)))


# ----------------------------------------------------------------------
# Header masks


def test_length_top_two_bits_ignored() -> None:
    """The top 2 bits of the length field are reserved and do not count."""
    wire = header(0xC003, 0, 3, 5) + b"abc" + f.encode(Data(5, b"z"))
    assert decode(wire) == [Data(5, b"abc"), Data(5, b"z")]


@pytest.mark.parametrize("high", [0x20, 0x40, 0x80, 0xE0])
def test_type_top_three_bits_ignored(high: int) -> None:
    """Only the low 5 bits of the type byte select the frame type."""
    wire = header(2, 0, high | 3, 5) + b"hi"
    assert decode(wire) == [Data(5, b"hi")]
    wire = header(4, 0, high | 4, 5) + (77).to_bytes(4, "big")
    assert decode(wire) == [WndInc(5, 77)]


def test_stream_id_top_bit_ignored() -> None:
    """The top bit of the stream id is reserved and masked off."""
    wire = header(1, 0, 3, 0x80000005) + b"q"
    assert decode(wire) == [Data(5, b"q")]
    syn = header(0, 0, 1, 0xFFFFFFFF)
    assert decode(syn) == [Syn(0x7FFFFFFF)]


def test_wndinc_increment_top_bit_ignored() -> None:
    """A WNDINC increment counts only its low 31 bits."""
    wire = header(4, 0, 4, 3) + bytes.fromhex("80000010")
    assert decode(wire) == [WndInc(3, 0x10)]


def test_goaway_last_id_top_bit_ignored() -> None:
    """A GOAWAY's last stream id counts only its low 31 bits."""
    wire = header(8, 0, 6, 0) + bytes.fromhex("80000009 00000000")
    assert decode(wire) == [GoAway(9, 0)]


def test_rst_and_goaway_accept_any_error_code() -> None:
    """Unknown error codes are accepted on receipt (any u32)."""
    wire = f.encode_rst(5, 0xFFFFFFFF) + f.encode_goaway(0, 0xDEADBEEF)
    assert decode(wire) == [Rst(5, 0xFFFFFFFF), GoAway(0, 0xDEADBEEF)]
    assert f.error_name(0xDEADBEEF) == "UNKNOWN_3735928559"
    assert f.error_name(6) == "REFUSED_STREAM"


# ----------------------------------------------------------------------
# Length rules


@pytest.mark.parametrize(
    "flags,length",
    [(0, 4), (0, 8), (2, 0), (2, 8), (4, 0), (4, 8), (6, 4), (6, 0), (6, 12), (1, 4)],
)
def test_syn_length_must_match_flags(flags: int, length: int) -> None:
    """A SYN whose length is not 4 x (priority/type flags set) is FRAME_SIZE_ERROR."""
    wire = header(length, flags, 1, 3) + b"\0" * length
    with pytest.raises(FrameError) as exc:
        decode(wire)
    assert exc.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_syn_length_checked_on_header_alone() -> None:
    """A bad SYN length is reported as soon as the header arrives, before any body."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as exc:
        decoder.feed(header(16, 0, 1, 3))
    assert exc.value.code == ErrorCode.FRAME_SIZE_ERROR
    assert decoder.finished


@pytest.mark.parametrize("ftype", [2, 4])
@pytest.mark.parametrize("length", [0, 3, 5, 8])
def test_rst_and_wndinc_must_be_four_bytes(ftype: int, length: int) -> None:
    """RST and WNDINC bodies of any length but 4 are FRAME_SIZE_ERROR."""
    with pytest.raises(FrameError) as exc:
        decode(header(length, 0, ftype, 3) + b"\0" * length)
    assert exc.value.code == ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("ftype", [0, 7, 8, 15, 31, 0x20, 0xFF])
def test_unknown_type_is_protocol_error(ftype: int) -> None:
    """A frame type outside 1..6 (after masking) is PROTOCOL_ERROR."""
    with pytest.raises(FrameError) as exc:
        decode(header(0, 0, ftype, 3))
    assert exc.value.code == ErrorCode.PROTOCOL_ERROR


def test_decoder_stops_after_error() -> None:
    """After a FrameError the decoder is finished and ignores further input."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(header(0, 0, 9, 3))
    assert decoder.finished
    assert decoder.feed(f.encode(Data(3, b"late"))) == []


def test_bad_frame_after_good_ones_in_one_read_raises() -> None:
    """A read holding good frames then a bad one raises FrameError (the session dies)."""
    decoder = FrameDecoder()
    with pytest.raises(FrameError):
        decoder.feed(f.encode(Data(3, b"ok")) + header(0, 0, 0, 3))


def test_pri_frame_is_skipped() -> None:
    """A PRI frame (type 5) is skipped whole and decoding carries on."""
    wire = header(4, 0, 5, 3) + b"\1\2\3\4" + f.encode(Data(3, b"after"))
    assert decode(wire) == [Data(3, b"after")]
    assert decode_bytewise(wire) == [Data(3, b"after")]


def test_max_payload_data() -> None:
    """A DATA frame of 16383 bytes (the 14-bit maximum) decodes whole."""
    payload = bytes(range(256)) * 63 + bytes(255)
    assert len(payload) == f.MAX_PAYLOAD
    assert decode(f.encode(Data(3, payload))) == [Data(3, payload)]


# ----------------------------------------------------------------------
# GOAWAY


def test_goaway_length_8_decoding_continues() -> None:
    """A GOAWAY of length 8 is a normal frame: frames after it still decode."""
    wire = f.encode(GoAway(4, 0)) + f.encode(Data(3, b"more")) + f.encode(Rst(3, 7))
    decoder = FrameDecoder()
    assert decoder.feed(wire) == [GoAway(4, 0), Data(3, b"more"), Rst(3, 7)]
    assert not decoder.finished


def test_goaway_shorter_than_body_is_frame_size_error() -> None:
    """A GOAWAY claiming fewer than 8 bytes is FRAME_SIZE_ERROR."""
    with pytest.raises(FrameError) as exc:
        decode(header(4, 0, 6, 0) + b"\0" * 4)
    assert exc.value.code == ErrorCode.FRAME_SIZE_ERROR


GO_BUG_GOAWAY = header(16, 0, 6, 0) + bytes.fromhex("00000004 00000002")
"""What a Go v1 peer writes: length 16 + len(debug) but only the 8-byte body."""


def test_go_bug_goaway_yields_final_goaway_then_eof() -> None:
    """The Go v1 GOAWAY (length 16, 8 body bytes, EOF) yields GoAway(final=True)."""
    decoder = FrameDecoder()
    assert decoder.feed(GO_BUG_GOAWAY) == [
        GoAway(4, ErrorCode.INTERNAL_ERROR, b"", final=True)
    ]
    assert decoder.finished
    assert decoder.feed(b"\0" * 8 + f.encode(Data(3, b"x"))) == []


def test_go_bug_goaway_does_not_wait_for_promised_length() -> None:
    """The Go-bug GOAWAY is delivered when its 8th body byte arrives, byte by byte."""
    decoder = FrameDecoder()
    got: list[f.Frame] = []
    for i, b in enumerate(GO_BUG_GOAWAY):
        got += decoder.feed(bytes([b]))
        if i < len(GO_BUG_GOAWAY) - 1:
            assert got == []
    assert got == [GoAway(4, ErrorCode.INTERNAL_ERROR, b"", final=True)]
    assert decoder.finished


def test_go_bug_goaway_after_other_frames() -> None:
    """Frames ahead of a Go-bug GOAWAY in the same read are all returned first."""
    wire = f.encode(Data(2, b"bye")) + GO_BUG_GOAWAY
    assert decode(wire) == [Data(2, b"bye"), GoAway(4, 2, b"", final=True)]


def test_bytes_after_long_goaway_are_not_framed() -> None:
    """Bytes after a GOAWAY body whose length exceeds 8 are not decoded as frames."""
    trailing = f.encode(Data(3, b"nope"))
    frames = decode(GO_BUG_GOAWAY + trailing)
    assert len(frames) == 1
    goaway = frames[0]
    assert isinstance(goaway, GoAway) and goaway.final
    assert goaway.debug == trailing[:8]


def test_honest_goaway_with_debug_carries_debug() -> None:
    """An honest GOAWAY with debug text read whole returns that text (and is final)."""
    frames = decode(f.encode_goaway(3, ErrorCode.PROTOCOL_ERROR, b"bad syn"))
    assert frames == [GoAway(3, 1, b"bad syn", final=True)]


def test_goaway_encoder_truncates_debug_to_fit() -> None:
    """encode_goaway never claims more than the 14-bit length can hold."""
    wire = f.encode_goaway(0, 1, b"d" * 20000)
    assert int.from_bytes(wire[:2], "big") == f.MAX_PAYLOAD
    assert len(wire) == 8 + f.MAX_PAYLOAD


# ----------------------------------------------------------------------
# Incremental decoding


def test_partial_header_is_buffered() -> None:
    """Bytes short of a whole frame are held (buffered) until the rest arrives."""
    wire = f.encode(Data(3, b"hello"))
    decoder = FrameDecoder()
    assert decoder.feed(wire[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(wire[5:10]) == []
    assert decoder.feed(wire[10:] + wire[:3]) == [Data(3, b"hello")]
    assert decoder.buffered == 3


def test_returned_payload_is_independent_of_input_buffer() -> None:
    """Decoded payload is a copy: mutating the fed buffer later does not change it."""
    buf = bytearray(f.encode(Data(3, b"abcd")))
    decoder = FrameDecoder()
    decoder.feed(bytes(buf[:10]))
    frames = decoder.feed(bytes(buf[10:]))
    buf[:] = b"\0" * len(buf)
    assert frames == [Data(3, b"abcd")]
    assert type(frames[0].data) is bytes  # type: ignore[union-attr]


u31 = st.integers(0, 0x7FFFFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

frame_strategy = st.one_of(
    st.builds(Syn, u31, u32, u32, st.booleans()),
    st.builds(Rst, u31, u32),
    st.builds(Data, u31, st.binary(max_size=300), st.booleans()),
    st.builds(Data, u31, st.binary(min_size=16000, max_size=f.MAX_PAYLOAD), st.booleans()),
    st.builds(WndInc, u31, u31),
    st.builds(GoAway, u31, u32),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length, sorted)."""
    if not data:
        return [data]
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@FAST
@given(
    frames=st.lists(frame_strategy, max_size=12),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
    go_bug_end=st.booleans(),
)
def test_any_split_decodes_same_frames(
    frames: list[f.Frame], cuts: list[int], go_bug_end: bool
) -> None:
    """Random frames fed in random pieces, or byte by byte, decode to the same list."""
    wire = b"".join(f.encode(fr) for fr in frames)
    expected = list(frames)
    if go_bug_end:
        wire += GO_BUG_GOAWAY
        expected.append(GoAway(4, 2, b"", final=True))
    assert decode(wire) == expected
    decoder = FrameDecoder()
    got: list[f.Frame] = []
    for piece in split(wire, cuts):
        got += decoder.feed(piece)
    assert got == expected
    assert decoder.buffered == 0
    if len(wire) < 40_000:
        assert decode_bytewise(wire) == expected


@FAST
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_arbitrary_bytes_decode_or_raise_frame_error(
    data: bytes, cuts: list[int]
) -> None:
    """Arbitrary bytes in arbitrary pieces either decode or raise FrameError, nothing else."""
    decoder = FrameDecoder()
    for piece in split(data, cuts):
        try:
            frames = decoder.feed(piece)
        except FrameError as e:
            assert isinstance(e.code, ErrorCode)
            assert decoder.finished
            return
        for fr in frames:
            assert isinstance(fr, (Syn, Rst, Data, WndInc, GoAway))


@FAST
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_arbitrary_bytes_split_invariance(data: bytes, cuts: list[int]) -> None:
    """However arbitrary bytes are split, the decoder reports the same frames or error."""

    def run(pieces: list[bytes]) -> tuple[list[f.Frame], object]:
        decoder = FrameDecoder()
        out: list[f.Frame] = []
        try:
            for piece in pieces:
                out += decoder.feed(piece)
        except FrameError as e:
            return out, e.code
        return out, None

    whole_frames, whole_err = run([data])
    frames, err = run(split(data, cuts))
    # A long GOAWAY's debug holds "whatever followed in the same read", so it
    # may differ between splits; everything else must match exactly.
    assert err == whole_err
    if whole_err is None:
        assert [without_debug(x) for x in frames] == [
            without_debug(x) for x in whole_frames
        ]


def without_debug(fr: f.Frame) -> f.Frame:
    """The frame with any GOAWAY debug bytes dropped."""
    if isinstance(fr, GoAway):
        return GoAway(fr.last_stream_id, fr.error_code, b"", fr.final)
    return fr


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(st.sampled_from([3, 5]), st.binary(max_size=100), st.booleans()),
        max_size=30,
    ),
    split=st.integers(min_value=1, max_value=64),
)
def test_merged_data_carries_the_same_bytes_and_fins(
    chunks: list[tuple[int, bytes, bool]], split: int
) -> None:
    """With merge_data, per stream the same bytes arrive in order and every FIN still ends its run."""
    wire = b"".join(f.encode(Data(sid, data, fin)) for sid, data, fin in chunks)
    plain = FrameDecoder().feed(wire)
    merging = FrameDecoder(merge_data=True)
    merged = []
    for i in range(0, len(wire), split):
        merged += merging.feed(wire[i : i + split])

    def per_stream(frames: list) -> dict[int, list[tuple[bytes, bool]]]:
        out: dict[int, list[tuple[bytes, bool]]] = {}
        for frame in frames:
            runs = out.setdefault(frame.stream_id, [(b"", False)])
            data, _ = runs[-1]
            runs[-1] = (data + frame.data, frame.fin)
            if frame.fin:
                runs.append((b"", False))
        return out

    assert per_stream(merged) == per_stream(plain)
    assert len(merged) <= len(plain)


def test_merging_decoder_puts_a_bare_fin_after_other_streams_data() -> None:
    """With merge_data, a stream's bare FIN waits for the other streams' data of the same read, but never for a later SYN or for its own stream's frames."""
    fin5, fin9 = Data(5, b"", True), Data(9, b"", True)
    wire = b"".join(f.encode(fr) for fr in [fin5, Data(7, b"x"), fin9, Data(7, b"y")])
    assert FrameDecoder(merge_data=True).feed(wire) == [Data(7, b"xy"), fin5, fin9]
    # a SYN after the FIN keeps its place behind it
    wire = b"".join(f.encode(fr) for fr in [fin5, Syn(11), Data(7, b"x")])
    assert FrameDecoder(merge_data=True).feed(wire) == [fin5, Syn(11), Data(7, b"x")]
    # data for the same stream after its FIN (a peer's mistake) stays after it
    wire = b"".join(f.encode(fr) for fr in [fin5, Data(5, b"late")])
    assert FrameDecoder(merge_data=True).feed(wire) == [fin5, Data(5, b"late")]
    # a plain decoder keeps the wire order
    wire = b"".join(f.encode(fr) for fr in [fin5, Data(7, b"x")])
    assert FrameDecoder().feed(wire) == [fin5, Data(7, b"x")]
