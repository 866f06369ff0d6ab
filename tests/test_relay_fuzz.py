"""
Fuzzing a real relay session in process: hypothesis writes frame sequences
(well-formed, malformed and anything between, split at random points) to
the relay's control session, with visitors coming and going and time
passing, on the RelayFixture of tests/memory_relay.py.  Whatever the peer
sends, the relay must not raise or log a failure, must not stop serving
others, and once the peer is gone must hold nothing for it: no session,
tunnel, stream, visitor, port or timer.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprelay.mux.frames import (
    HEARTBEAT_STREAM_TYPE,
    encode_data_header,
    encode_goaway,
    encode_rst,
    encode_syn,
    encode_wndinc,
)
from tcprelay.handshake import CONTROL_STREAM_TYPE
from tests import fuzz_harness as fuzz
from tests.memory_relay import MemoryRelay

stream_ids = st.one_of(st.integers(0, 12), st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF, 1 << 31]))
error_codes = st.one_of(st.integers(0, 8), st.integers(0, 0xFFFFFFFF))

frames = st.one_of(
    st.builds(
        encode_syn,
        stream_ids.map(lambda i: i & 0x7FFFFFFF),
        st.integers(0, 0x7FFFFFFF),
        st.sampled_from([0, 1, CONTROL_STREAM_TYPE, HEARTBEAT_STREAM_TYPE, 0x7FFFFFFF]),
    ),
    st.builds(
        lambda sid, data, fin: encode_data_header(sid & 0x7FFFFFFF, len(data), fin) + data,
        stream_ids,
        st.binary(max_size=300),
        st.booleans(),
    ),
    st.builds(lambda sid, n: encode_wndinc(sid & 0x7FFFFFFF, n), stream_ids, st.integers(0, 0x7FFFFFFF)),
    st.builds(lambda sid, code: encode_rst(sid & 0x7FFFFFFF, code), stream_ids, error_codes),
    st.builds(
        lambda sid, code, text: encode_goaway(sid & 0x7FFFFFFF, code, text),
        stream_ids,
        error_codes,
        st.binary(max_size=40),
    ),
    # a header of any type, length and flags, then whatever
    st.builds(
        lambda word, sid, tail: struct.pack(">II", word, sid) + tail,
        st.integers(0, 0xFFFFFFFF),
        stream_ids,
        st.binary(max_size=40),
    ),
    st.binary(min_size=1, max_size=24),
)

actions = fuzz.actions(frames)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(legacy=st.booleans(), script=st.lists(actions, max_size=12))
def test_relay_session_survives_any_frames(legacy: bool, script: list[Any]) -> None:
    with fuzz.logged_failures() as failures:
        relay = MemoryRelay(ports=2)
        bystander, bystander_port = relay.registered()
        fuzzer = relay.service(auto_ack=False)
        port = None
        if legacy:
            kind, address = fuzzer.legacy_handshake()
            port = int(address.rpartition(":")[2])
        visitors = []
        for action in script:
            if action[0] == "frames":
                data = b"".join(action[1])
                step = action[2]
                for i in range(0, len(data), step):
                    fuzzer.wire.write(data[i : i + step])
            elif action[0] == "visitor":
                fuzz.visitor_action(relay, port, action, visitors)
            elif action[0] == "time":
                relay.clock.advance(action[1])
            relay.settle()

        # The bystander was not disturbed.
        visitor = relay.visitor(bystander_port)
        assert visitor is not None
        visitor.send(b"ping")
        relay.settle()
        assert bystander.goaway is None
        assert b"ping" in b"".join(bytes(d) for d in bystander.received.values())
        visitor.leave()
        relay.settle()

        # The fuzzer leaves: nothing of it may remain.
        fuzzer.close()
        for v in visitors:
            v.leave(clean=False)
        relay.settle()
        bystander.close()
        relay.advance(120, step=5)
        fuzz.assert_nothing_held(relay, 2, failures)
