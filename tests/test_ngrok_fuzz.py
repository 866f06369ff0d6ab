"""
Fuzzing the ngrok door in process: hypothesis writes muxado v2 frame
sequences (typed requests with real and broken JSON, heartbeats, windows,
resets, GOAWAY, malformed headers, split at random points) to an SDK
session of the door, with visitors coming and going and time passing, on the
memory relay; a bystander SDK session serves a port meanwhile.  Whatever
the fuzzer sends, the relay must not raise or log a failure, must keep
serving the bystander, and once the fuzzer is gone must hold nothing for
it.  The sans-IO session alone is fuzzed too.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprelay.mux import events as ev
from tcprelay.mux.session import Role, SessionClosedError, StreamClosedError
from tcprelay.mux2 import frames as f
from tcprelay.mux2.session import Session
from tests import fuzz_harness as fuzz
from tests.memory_relay import MemoryRelay
from tests.ngrokpeer import NgrokPeer

stream_ids = st.one_of(st.integers(0, 12), st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF]))
error_codes = st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF))
stream_types = st.sampled_from([0, 1, 2, 3, 4, 7, 9, 0xFFFFFFFF, 12345])
requests = st.sampled_from(
    [
        json.dumps({"Version": ["3"], "ClientId": "", "Extra": {"AuthToken": "s"}}).encode(),
        json.dumps({"Version": ["3"], "ClientId": "", "Extra": {"Authtoken": "wrong"}}).encode(),
        json.dumps({"Id": "", "Proto": "tcp", "Opts": {"Addr": ""}}).encode(),
        json.dumps({"Id": "tcp-1-ab", "Proto": "tcp", "Opts": {"Addr": ":0"}}).encode(),
        json.dumps({"Id": "x", "Proto": "http", "Opts": {"Hostname": "a"}}).encode(),
        json.dumps({"Id": "x"}).encode(),
        b"{", b"}", b'{"a": "}', b"[]", b"\x00\xff",
    ]
)
payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda t, r: t.to_bytes(4, "big") + r, stream_types, requests),
    requests,
)

frames = st.one_of(
    st.builds(
        lambda sid, data, fin, syn: f.encode_data_header(sid, len(data), fin, syn) + data,
        stream_ids, payloads, st.booleans(), st.booleans(),
    ),
    st.builds(lambda sid, n: f.encode_wndinc(sid, n), stream_ids, st.integers(0, 0x7FFFFFFF)),
    st.builds(lambda sid, code: f.encode_rst(sid, code), stream_ids, error_codes),
    st.builds(lambda sid, code, text: f.encode_goaway(sid, code, text), stream_ids, error_codes, st.binary(max_size=20)),
    st.builds(
        lambda word, sid, tail: struct.pack(">II", word, sid) + tail,
        st.integers(0, 0xFFFFFFFF), stream_ids, st.binary(max_size=40),
    ),
    st.binary(min_size=1, max_size=24),
)

actions = fuzz.actions(frames)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bound=st.booleans(), script=st.lists(actions, max_size=10))
def test_ngrok_session_survives_any_frames(bound: bool, script: list[Any]) -> None:
    """Any frames from one SDK session: no failure logged, the bystander served, nothing left behind."""
    with fuzz.logged_failures() as failures:
        mr = MemoryRelay("--ngrok", "tcp:0:interface=127.0.0.1", ports=3, secrets=[b"s"])
        bystander = NgrokPeer(mr)
        bystander.auth("s")
        bystander_port = int(bystander.bind()["URL"].rpartition(":")[2])
        fuzzer = NgrokPeer(mr)
        port = None
        if bound:
            fuzzer.auth("s")
            port = int(fuzzer.bind()["URL"].rpartition(":")[2])
        visitors = []
        for action in script:
            if action[0] == "frames":
                data = b"".join(action[1])
                for i in range(0, len(data), action[2]):
                    if fuzzer.lost:
                        break
                    fuzzer.protocol.dataReceived(data[i : i + action[2]])
                fuzzer.transport.clear()
                if fuzzer.transport.disconnecting:
                    fuzzer.lose()
            elif action[0] == "visitor":
                fuzz.visitor_action(mr, port, action, visitors)
            elif action[0] == "time":
                # the bystander heartbeats every 10 s, as the SDKs do
                remaining = action[1]
                while True:
                    step = min(remaining, 10.0)
                    mr.clock.advance(step)
                    remaining -= step
                    if remaining <= 0:
                        break
                    bystander.heartbeat()
                fuzzer.transport.clear()
                if fuzzer.transport.disconnecting:
                    fuzzer.lose()
            mr.settle()
            bystander.pump()

        # the bystander still serves its port
        visitor = mr.visitor(bystander_port, first=b"ping")
        assert visitor is not None
        bystander.pump()
        assert any(bytes(d).endswith(b"ping") for sid, d in bystander.data.items() if sid % 2 == 0)
        visitor.leave()

        # the fuzzer leaves: nothing of it may remain
        fuzzer.lose()
        for v in visitors:
            v.leave(clean=False)
        bystander.lose()
        mr.settle()
        mr.advance(60, step=5)
        fuzz.assert_nothing_held(mr, 3, failures)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.lists(frames, max_size=5), max_size=8), steps=st.integers(1, 50))
def test_v2_session_never_raises(chunks: list[list[bytes]], steps: int) -> None:
    """The sans-IO session takes any bytes without raising; its output always decodes; it ends cleanly."""
    server = Session(Role.SERVER)
    reader = f.FrameDecoder()
    seen_end = 0
    now = 0.0
    for chunk in chunks:
        data = b"".join(chunk)
        for i in range(0, len(data), steps):
            for event in server.receive_data(data[i : i + steps]):
                seen_end += isinstance(event, ev.SessionEnded)
                if isinstance(event, ev.StreamOpened):
                    server.accept_stream(event.stream_id)
                    try:
                        server.send_data(event.stream_id, b"reply")
                    except (StreamClosedError, SessionClosedError):
                        pass  # closed later in the same batch: the application is told so
                elif isinstance(event, ev.DataReceived):
                    server.acknowledge(event.stream_id, len(event.data))
        now += 1.0
        server.on_timer(now)
        reader.feed(server.data_to_send())  # raises if the session wrote a bad frame
    server.connection_lost()
    seen_end += sum(isinstance(e, ev.SessionEnded) for e in server.events())
    assert seen_end == 1
    assert server.stream_count == 0 and not server.has_held
