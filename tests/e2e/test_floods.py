"""
Floods against a relay process on loopback: what a peer that misbehaves on
purpose makes the relay spend (memory, descriptors), and that the relay
gives it back.  Every flood is bounded in bytes and in time; the relay's
memory and descriptors are read from /proc.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable

import pytest

from tcprelay.mux.frames import (
    HEARTBEAT_STREAM_TYPE,
    encode_data_header,
    encode_syn,
    encode_wndinc,
)
from tcprelay.handshake import CONTROL_STREAM_TYPE
from tests.e2e.support import HOST, Procs, RelayProc, start_relay
from tests.muxpeer import ScriptedPeer

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")

MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident memory of process ``pid``, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    """Open descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` (every 50 ms) until it holds; seconds taken; fails at the deadline."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def _settled_rss(pid: int) -> int:
    """The relay's RSS once it has stopped moving (start-up allocations done)."""
    last = rss(pid)
    for _ in range(40):
        time.sleep(0.05)
        now = rss(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def _flood_peer(procs: Procs) -> tuple[RelayProc, int, int, socket.socket]:
    """A relay, and a peer connected to its control port that barely reads (4 KiB
    receive buffer): (the relay, its pid, its settled RSS, the peer's socket)."""
    relay = start_relay(procs, pool=1)
    pid = relay.proc.pid
    base = _settled_rss(pid)
    sock = socket.create_connection((HOST, relay.control), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return relay, pid, base, sock


def test_heartbeat_echo_flood_before_any_handshake_is_cut(procs: Procs) -> None:
    """An unauthenticated peer that opens a heartbeat stream, grants itself a 1 GiB window and never reads: the relay cuts it, holding at most 256 KiB + 1 MiB meanwhile, and gives the memory back."""
    relay, pid, base, sock = _flood_peer(procs)
    peak = base
    sent = 0
    cut = False
    # Two frames at a time, paced so as to stay within the window the relay
    # grants as it reads (the peer reads none of its grants).
    chunk = (encode_data_header(3, 16000) + b"h" * 16000) * 2
    try:
        sock.sendall(encode_syn(3, 0, HEARTBEAT_STREAM_TYPE) + encode_wndinc(3, 1 << 30))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 20
        while sent < 200_000_000 and time.monotonic() < deadline:
            try:
                sent += sock.send(chunk)
            except socket.timeout:
                pass  # the relay stopped reading: it has ended the session
            except OSError:
                cut = True
                break
            time.sleep(0.001)
            if sent % (64 * len(chunk)) < len(chunk):
                peak = max(peak, rss(pid))
        if not cut:
            # The relay stops reading a session it ended; the socket is reset
            # (not closed with a queued GOAWAY) as soon as it is cut.
            sock.settimeout(5)
            try:
                while sock.recv(1 << 20):
                    pass
            except OSError:
                pass
            cut = True
    finally:
        sock.close()
    print(f"sent {sent / MIB:.1f} MiB; relay grew by {(peak - base) / MIB:.2f} MiB at most")
    assert cut
    assert sent < 200_000_000, "the relay took everything"
    # the log line may come a moment after the cut on a busy machine
    relay.proc.wait_line(r"faster than it reads the echo|does not read", 10)
    assert peak - base <= 256 * 1024 + MIB, f"relay grew by {(peak - base) / MIB:.1f} MiB"
    until(lambda: rss(pid) - base <= MIB, 10, "the relay's memory back to baseline")
    assert procs  # the relay still runs
    assert relay.proc.running


def _silent_service(control: int) -> tuple[ScriptedPeer, int]:
    """A legacy service that registers and then never reads or answers again."""
    peer = ScriptedPeer.dial(control)
    kind, address = peer.legacy_handshake()
    assert kind == "address"
    return peer, int(address.rpartition(":")[2])


def test_departed_visitors_of_a_silent_service_are_let_go(procs: Procs) -> None:
    """1,000 visitors that send 3 bytes and close, to a service that never answers: the relay's descriptors are back to baseline within the half-close limit."""
    relay = start_relay(procs, "--half-close-timeout", "2", "--open-timeout", "0", pool=1)
    pid = relay.proc.pid
    peer, port = _silent_service(relay.control)
    try:
        base = fds(pid)
        for _ in range(1000):
            with socket.create_connection((HOST, port), timeout=5) as visitor:
                visitor.sendall(b"hi\n")
        peak = fds(pid)
        held = until(lambda: fds(pid) <= base + 5, 2 * 1.25 + 5, "the visitors' descriptors closed")
        print(f"relay descriptors: {base} before, {peak} after 1,000 visitors left, back in {held:.1f}s")
        assert held >= 1.0, "closed before the limit: the test did not see the defect"
    finally:
        peer.close()


def test_stream_a_service_never_answers_is_closed(procs: Procs) -> None:
    """A visitor that sent a request to a service that never answers its stream is closed after --open-timeout."""
    relay = start_relay(procs, "--open-timeout", "1", pool=1)
    peer, port = _silent_service(relay.control)
    try:
        with socket.create_connection((HOST, port), timeout=10) as visitor:
            visitor.sendall(b"GET / HTTP/1.0\r\n\r\n")
            start = time.monotonic()
            try:
                assert visitor.recv(100) == b""
            except ConnectionResetError:
                pass
            waited = time.monotonic() - start
        assert 0.9 <= waited <= 1.25 + 3
    finally:
        peer.close()


def test_frame_that_never_completes_ends_the_session(procs: Procs) -> None:
    """A peer that starts a frame and sends no more of it is closed after --frame-timeout."""
    relay = start_relay(procs, "--frame-timeout", "1", pool=1)
    peer, _ = _silent_service(relay.control)
    sock = peer.wire.sock  # type: ignore[attr-defined]
    try:
        sock.sendall(encode_data_header(3, 1000)[:5])
        sock.settimeout(10)
        start = time.monotonic()
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
        assert 0.9 <= time.monotonic() - start <= 5
        assert b"unfinished" in data  # the GOAWAY's text
    finally:
        peer.close()


def test_refused_stream_flood_from_a_peer_that_never_reads_is_cut(procs: Procs) -> None:
    """An unregistered peer that opens stream after stream (each refused with an RST) and never reads: the relay cuts it, at most 256 KiB + 1 MiB larger meanwhile."""
    relay, pid, base, sock = _flood_peer(procs)
    peak, sent, sid = base, 0, 5
    try:
        # an extended handshake's stream that never registers: the session
        # stays unauthenticated while every later stream is refused
        sock.sendall(encode_syn(3, 0, CONTROL_STREAM_TYPE))
        sock.settimeout(0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            burst = b"".join(encode_syn(sid + 2 * i, 0, 0) for i in range(500))
            sid += 1000
            try:
                sock.sendall(burst)
                sent += len(burst)
            except (socket.timeout, OSError):
                break
            time.sleep(0.001)
            peak = max(peak, rss(pid))
    finally:
        sock.close()
    print(f"sent {sent / MIB:.1f} MiB of SYNs; relay grew by {(peak - base) / MIB:.2f} MiB at most")
    relay.proc.wait_line(r"flood|does not read", 10)  # (may come a moment after the cut)
    assert peak - base <= 256 * 1024 + MIB
    until(lambda: rss(pid) - base <= MIB, 10, "the relay's memory back to baseline")
    assert relay.proc.running
