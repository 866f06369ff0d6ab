"""
End-to-end: the real ``twistd -n tcprelay`` daemon, real Go muxado v1
services (``tests/interop/legacyecho``, ``tests/interop/echosvc``) and plain
socket visitors, all on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from tests.e2e.support import (
    HOST,
    TWISTD,
    Procs,
    exit_status_name,
    recv_exactly,
    recv_to_eof,
    start_go_service,
    start_relay,
    visit,
    wait_refused,
)

GOAWAY = 6
PROTOCOL_ERROR = 1


def no_tracebacks(lines: list[str]) -> None:
    """Assert that no log line carries a traceback."""
    bad = [line for line in lines if "Traceback" in line]
    assert not bad, "\n".join(lines)


# -- handshake ---------------------------------------------------------------


def test_legacy_handshake_gives_first_port_of_range(procs: Procs) -> None:
    """A Go service written like echoserver.go is told ``localhost:<first port of the range>``."""
    relay = start_relay(procs, pool=3)
    service = start_go_service(procs, "legacyecho", relay)
    assert service.address() == f"localhost:{relay.ports[0]}"


def test_public_host_is_written_into_the_address(procs: Procs) -> None:
    """With ``--public-host relay.example`` the address given to a service names that host."""
    relay = start_relay(procs, "--public-host", "relay.example", pool=3)
    service = start_go_service(procs, "legacyecho", relay)
    assert service.address() == f"relay.example:{relay.ports[0]}"


# -- data path ---------------------------------------------------------------


def test_legacy_echo_is_padded_to_256_byte_blocks(procs: Procs) -> None:
    """Bytes reach the original-style Go echo and its NUL-padded 256-byte blocks come back exactly."""
    relay = start_relay(procs, pool=3)
    port = start_go_service(procs, "legacyecho", relay).port()
    with visit(port) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 256) == b"hello" + b"\0" * 251
        data = os.urandom(300)
        sock.sendall(data)
        assert recv_exactly(sock, 512) == data + b"\0" * 212
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""


def test_fifty_concurrent_visitors_are_echoed_byte_exact(procs: Procs) -> None:
    """Fifty visitors at once, 200 KB each, all get their own bytes back exactly."""
    relay = start_relay(procs, pool=3)
    port = start_go_service(procs, "echosvc", relay).port()
    count, size = 50, 200 * 1024
    payloads = [os.urandom(size) for _ in range(count)]
    results: list[object] = [None] * count

    def sender(sock: socket.socket, data: bytes, errors: list[BaseException]) -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as e:  # noqa: BLE001 - reported by the receiver
            errors.append(e)

    def visitor(index: int) -> None:
        try:
            with visit(port, timeout=20) as sock:
                errors: list[BaseException] = []
                thread = threading.Thread(target=sender, args=(sock, payloads[index], errors))
                thread.start()
                echoed = recv_to_eof(sock)
                thread.join(20)
                results[index] = errors[0] if errors else echoed
        except BaseException as e:  # noqa: BLE001 - reported below
            results[index] = e

    threads = [threading.Thread(target=visitor, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads), "visitors still running after 30s"
    for index, result in enumerate(results):
        assert isinstance(result, bytes), f"visitor {index}: {result!r}"
        assert len(result) == size, f"visitor {index}: {len(result)} bytes"
        assert result == payloads[index], f"visitor {index}: bytes differ"


def test_half_close_still_delivers_the_whole_echo(procs: Procs) -> None:
    """A visitor's SHUT_WR reaches the service as FIN and the full echo still arrives, then EOF."""
    relay = start_relay(procs, pool=3)
    port = start_go_service(procs, "echosvc", relay).port()
    data = os.urandom(300 * 1024)
    with visit(port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, len(data)) == data
        assert sock.recv(1) == b""


# -- lifecycle and pool --------------------------------------------------------


def test_killed_service_frees_its_port_at_once(procs: Procs) -> None:
    """After kill -9 of a service its visitors and public port close within 1 s and the port goes to the next service."""
    relay = start_relay(procs, pool=1)
    port = relay.ports[0]
    first = start_go_service(procs, "legacyecho", relay)
    assert first.port() == port
    with visit(port, timeout=1.0) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 256) == b"x" + b"\0" * 255
        first.proc.kill()
        killed = time.monotonic()
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - killed < 1.0
    assert wait_refused(port, timeout=1.0) < 1.0
    second = start_go_service(procs, "legacyecho", relay)
    assert second.address(timeout=1.0) == f"localhost:{port}"
    with visit(port) as sock:
        sock.sendall(b"again")
        assert recv_exactly(sock, 256) == b"again" + b"\0" * 251


def test_waiting_service_gets_the_port_and_late_one_is_refused(procs: Procs) -> None:
    """With the pool empty a service waits for the next free port, and one that waits past --wait-timeout is closed and logged as refused."""
    relay = start_relay(procs, "--wait-timeout", "2", pool=1)
    port = relay.ports[0]
    queued = r"queued for a public port at position (\d+)"
    a = start_go_service(procs, "legacyecho", relay)
    assert a.port() == port
    b = start_go_service(procs, "legacyecho", relay)
    assert relay.proc.wait_line(queued, 5).group(1) == "1"
    assert not b.proc.matching("^ADDRESS"), b.proc.describe()
    a.proc.kill()
    assert b.address(timeout=2.0) == f"localhost:{port}"

    c = start_go_service(procs, "legacyecho", relay)
    assert relay.proc.wait_line(queued, 5, count=2).group(1) == "1"
    started = time.monotonic()
    # legacyecho is still reading its handshake stream when the relay ends
    # the session, so it reports the closed session there (and exits 1);
    # it can only print SESSION_END after an ADDRESS.
    code = c.proc.wait_exit(6)
    waited = time.monotonic() - started
    assert 1.5 < waited < 4.0, f"refused after {waited:.1f}s"
    assert code == 1, c.proc.describe()
    assert c.proc.matching("^FAIL: read handshake stream: Session closed$"), c.proc.describe()
    assert not c.proc.matching("^ADDRESS"), c.proc.describe()
    refused = relay.proc.matching(r"refused")
    assert len(refused) == 1, relay.proc.describe()
    assert "no free port within 2s" in refused[0]
    # the registered service was not disturbed
    with visit(port) as sock:
        sock.sendall(b"b")
        assert recv_exactly(sock, 256) == b"b" + b"\0" * 255


def test_service_that_leaves_the_queue_is_forgotten(procs: Procs) -> None:
    """A waiting service that disconnects leaves the FIFO queue: the next waiter takes its place and gets the freed port."""
    relay = start_relay(procs, "--wait-timeout", "10", pool=1)
    port = relay.ports[0]
    queued = r"queued for a public port at position (\d+)"
    holder = start_go_service(procs, "legacyecho", relay)
    assert holder.port() == port
    quitter = start_go_service(procs, "legacyecho", relay)
    assert relay.proc.wait_line(queued, 5).group(1) == "1"
    quitter.proc.kill()
    nxt = start_go_service(procs, "legacyecho", relay)
    # Had the quitter stayed in the queue, this one would be second.
    assert relay.proc.wait_line(queued, 5, count=2).group(1) == "1"
    holder.proc.kill()
    assert nxt.address(timeout=2.0) == f"localhost:{port}"
    with visit(port) as sock:
        sock.sendall(b"next")
        assert recv_exactly(sock, 256) == b"next" + b"\0" * 252
    no_tracebacks(relay.proc.lines())


# -- shutdown ------------------------------------------------------------------


def test_sigterm_drains_open_streams_then_exits_zero(procs: Procs) -> None:
    """On SIGTERM the relay stops accepting, lets an open visitor finish its exchange, then exits 0."""
    relay = start_relay(procs, "--drain-timeout", "20", pool=3)
    service = start_go_service(procs, "echosvc", relay)
    port = service.port()
    head, tail = os.urandom(64 * 1024), os.urandom(256 * 1024)
    with visit(port) as sock:
        sock.sendall(head)
        assert recv_exactly(sock, len(head)) == head
        relay.proc.signal(signal.SIGTERM)
        assert wait_refused(relay.control, timeout=2.0) < 2.0
        assert wait_refused(port, timeout=2.0) < 2.0
        sock.sendall(tail)
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, len(tail)) == tail
        assert sock.recv(1) == b""
    code = relay.proc.wait_exit(5)
    assert code == 0, f"{exit_status_name(code)}\n{relay.proc.describe()}"
    service.proc.wait_line("^SESSION_END", 5)
    no_tracebacks(relay.proc.lines())


def test_drain_timeout_bounds_shutdown(procs: Procs) -> None:
    """A visitor that never finishes cannot hold the relay past --drain-timeout: it still exits 0."""
    relay = start_relay(procs, "--drain-timeout", "1", pool=3)
    port = start_go_service(procs, "echosvc", relay).port()
    with visit(port) as sock:
        sock.sendall(b"unfinished")
        assert recv_exactly(sock, 10) == b"unfinished"
        relay.proc.signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = relay.proc.wait_exit(4)
        took = time.monotonic() - signalled
        assert code == 0, f"{exit_status_name(code)}\n{relay.proc.describe()}"
        assert 0.9 < took < 3.5, f"exited {took:.2f}s after SIGTERM"
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    no_tracebacks(relay.proc.lines())


# -- bad input -------------------------------------------------------------------


def read_frames(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    """Read muxado v1 frames until EOF: (type, flags, stream id, payload)."""
    data = recv_to_eof(sock)
    frames = []
    while len(data) >= 8:
        length, flags, ftype, sid = struct.unpack(">HBBI", data[:8])
        length &= 0x3FFF
        frames.append((ftype & 0x1F, flags, sid & 0x7FFFFFFF, data[8 : 8 + length]))
        data = data[8 + length :]
    assert data == b"", f"trailing partial frame {data!r}"
    return frames


def test_garbage_frame_closes_only_that_session(procs: Procs) -> None:
    """An unknown frame type gets that session GOAWAY(PROTOCOL_ERROR) and closed, one log line, and other services keep working."""
    relay = start_relay(procs, pool=3)
    port = start_go_service(procs, "legacyecho", relay).port()
    with visit(port) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 256) == b"before" + b"\0" * 250

    with socket.create_connection((HOST, relay.control), timeout=5) as raw:
        label = f"{HOST}:{raw.getsockname()[1]}"
        raw.sendall(b"\x00\x04\x00\x1f\x00\x00\x00\x03junk")
        frames = read_frames(raw)
    goaways = [f for f in frames if f[0] == GOAWAY]
    assert len(goaways) == 1, frames
    _last_id, code = struct.unpack(">II", goaways[0][3][:8])
    assert code == PROTOCOL_ERROR, frames

    with visit(port) as sock:
        sock.sendall(b"after")
        assert recv_exactly(sock, 256) == b"after" + b"\0" * 251
    about = relay.proc.wait_line(rf"{label}\b", 5)
    assert len(relay.proc.matching(rf"{label}\b")) == 1, relay.proc.describe()
    assert "type 31" in about.string, about.string
    no_tracebacks(relay.proc.lines())


# -- bad options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--ports", "9-3"), ("--wait-timeout", "abc"), ("--public-interface", "192.0.2.1")],
)
def test_bad_option_fails_fast_with_clear_error(tmp_path, option: str, value: str) -> None:
    """A bad option value makes twistd exit non-zero at once with an error line naming the option."""
    result = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "tcprelay",
         # on loopback, should the bad value be accepted after all
         "--control", f"tcp:0:interface={HOST}", "--ports", "40000-40001", option, value],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in output.splitlines() if option in line and value in line]
    assert errors, output
    assert "Traceback" not in output, output


def test_control_port_in_use_is_one_line_and_exit_1(tmp_path) -> None:
    """A control port that is already taken ends the relay at once with one plain line, no traceback."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [str(TWISTD), "-n", "--pidfile=", "tcprelay",
             "--control", f"tcp:{port}:interface={HOST}", "--ports", "40000-40001"],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=20,
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    # plainly on standard error (twistd's log, here stdout, has it too)
    plain = [line for line in result.stderr.splitlines() if line.startswith("tcprelay: cannot listen (")]
    assert len(plain) == 1 and "in use" in plain[0], output


def _kill_pidfile(pidfile) -> None:
    """A daemon the test started by mistake (the port was free after all): stop it."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_control_port_in_use_in_daemon_mode_exits_1(tmp_path) -> None:
    """
    Without -n twistd daemonizes before the relay listens: a taken control port
    still ends ``twistd`` (the parent in the terminal) with exit status 1 and
    the plain line on its standard error, instead of waiting forever, and
    leaves no pid file behind.
    """
    pidfile = tmp_path / "relay.pid"
    logfile = tmp_path / "relay.log"
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            result = subprocess.run(
                [str(TWISTD), f"--pidfile={pidfile}", f"--logfile={logfile}", "tcprelay",
                 "--control", f"tcp:{port}:interface={HOST}", "--ports", "40000-40001"],
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=20,
            )
        finally:
            _kill_pidfile(pidfile)
    assert result.returncode == 1, result
    plain = [line for line in result.stderr.splitlines() if line.startswith("tcprelay: cannot listen (")]
    assert len(plain) == 1 and "in use" in plain[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not pidfile.exists()
    log = logfile.read_text()
    assert "tcprelay: cannot listen (" in log and "Traceback" not in log, log
