"""
The SSH door end to end: the installed ``twistd tcprelay --ssh`` and the
real OpenSSH client (``ssh -R``) as the agent, keys made with
``ssh-keygen`` in the test's directory, a local echo service behind it and
plain-socket visitors.  Every ``ssh`` is started through ``procs`` (killed
and reaped when the test ends).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import attrs

from tests.absent import tool_absent
from tests.e2e.support import (
    HOST,
    EchoServer,
    Proc,
    Procs,
    RelayProc,
    echo_round_trip,
    free_port_block,
    recv_to_eof,
    start_relay,
    visit,
)

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
DOMAIN = "example.test"

if not (os.access(SSH, os.X_OK) and os.access(SSH_KEYGEN, os.X_OK)):
    tool_absent("needs OpenSSH's ssh and ssh-keygen (Debian: openssh-client)")


def _keygen(path: Path) -> Path:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


def _fingerprint(path: Path) -> str:
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return out.split()[1]


@attrs.define
class SshRelay:
    relay: RelayProc
    ssh_port: int
    host_key: Path
    agent_key: Path


def _start(procs: Procs, tmp_path: Path, *extra: object, pool: int = 3) -> SshRelay:
    agent_key = _keygen(tmp_path / "agent_key")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("# the agents\n" + (tmp_path / "agent_key.pub").read_text())
    host_key = tmp_path / "host_key"
    ssh_port = free_port_block(1)
    relay = start_relay(
        procs,
        "--ssh", f"tcp:{ssh_port}:interface={HOST}",
        "--ssh-host-key", host_key,
        "--ssh-authorized-keys", authorized,
        *extra,
        pool=pool,
    )
    relay.proc.wait_line(rf"SshFactory starting on {ssh_port}\b")
    return SshRelay(relay, ssh_port, host_key, agent_key)


def _ssh(
    procs: Procs, r: SshRelay, *args: object, key: Path | None = None, name: str = "ssh"
) -> Proc:
    argv = [
        SSH,
        "-o", "BatchMode=yes",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "IdentitiesOnly=yes",
        "-F", "/dev/null",
        "-i", key or r.agent_key,
        "-p", r.ssh_port,
        *args,
    ]
    return procs.start(argv, name)


def _allocated(proc: Proc, count: int = 1) -> int:
    return int(proc.wait_line(r"Allocated port (\d+) for remote forward", count=count).group(1))


def test_ssh_remote_forward_echoes_a_megabyte(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    r = _start(procs, tmp_path)
    # the host key was created, private to the relay, and its fingerprint logged
    assert stat.S_IMODE(r.host_key.stat().st_mode) == 0o600
    r.relay.proc.wait_line(
        rf"SSH host key \S+ \(created\): Ed25519 {re.escape(_fingerprint(r.host_key))}$"
    )
    agent = _ssh(procs, r, "-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}")
    port = _allocated(agent)
    assert port in r.relay.ports
    r.relay.proc.wait_line(
        rf"logged in with key {re.escape(_fingerprint(r.agent_key))}"
    )
    data = os.urandom(1 << 20)
    assert echo_round_trip(port, data, timeout=30) == data
    assert bytes(echo_server.received[0]) == data


def test_ssh_visitor_half_close_gets_the_reply_then_eof(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    r = _start(procs, tmp_path)
    agent = _ssh(procs, r, "-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}")
    port = _allocated(agent)
    with visit(port) as sock:
        sock.sendall(b"first half")
        echo_server.wait_received(0, lambda got: got == b"first half")
        sock.shutdown(socket.SHUT_WR)  # FIN: channel EOF, the service sees its end
        assert recv_to_eof(sock) == b"first half"  # the reply still arrives, then EOF
    # the echo service marks its end just after its FIN, which the visitor
    # may read first
    echo_server.wait_ended(0, timeout=5)


def test_ssh_unknown_key_is_refused(procs: Procs, tmp_path: Path, echo_server: EchoServer) -> None:
    r = _start(procs, tmp_path)
    stranger = _keygen(tmp_path / "stranger_key")
    agent = _ssh(
        procs, r, "-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}", key=stranger
    )
    assert agent.wait_exit() == 255
    # publickey is the only method offered: no password, no keyboard-interactive
    agent.wait_line(r"Permission denied \(publickey\)\.$", stream="err")
    r.relay.proc.wait_line(r"public key refused \(key not authorized\)")
    assert not r.relay.proc.matching(r"serves ")


def test_ssh_reconnecting_key_gets_its_port_back(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    r = _start(procs, tmp_path)
    forward = ("-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}")
    first = _ssh(procs, r, *forward, name="ssh-1")
    port = _allocated(first)
    first.signal(signal.SIGTERM)
    first.wait_exit()
    r.relay.proc.wait_line(rf"localhost:{port} closed \(connection closed\); held for its lease")
    # The pool hands out freed ports last: without the lease the next
    # claim would get another port of the range.
    again = _ssh(procs, r, *forward, name="ssh-2")
    assert _allocated(again) == port
    assert echo_round_trip(port, b"back again") == b"back again"


def test_ssh_cancelled_forward_frees_its_port(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    r = _start(procs, tmp_path)
    forward = ("-N", "-R", f"{r.relay.ports[0]}:{HOST}:{echo_server.port}", f"user@{HOST}")
    agent = _ssh(procs, r, *forward)
    r.relay.proc.wait_line(rf"serves localhost:{r.relay.ports[0]} ")
    assert echo_round_trip(r.relay.ports[0], b"asked for") == b"asked for"
    outside = _ssh(
        procs, r, "-N", "-R", f"1:{HOST}:{echo_server.port}", f"user@{HOST}", name="ssh-outside"
    )
    assert outside.wait_exit() == 255  # ExitOnForwardFailure
    outside.wait_line(r"remote port forwarding failed for listen port 1\b", stream="err")
    r.relay.proc.wait_line(r"remote forward localhost:1 refused: port 1 is outside the relay's range")
    assert agent.running


def test_ssh_session_prints_the_public_address(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    r = _start(procs, tmp_path)
    agent = _ssh(procs, r, "-T", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}")
    port = _allocated(agent)
    agent.wait_line(rf"^localhost:{port}$", stream="out")
    assert agent.running  # the session stays open: no command ran and ended it
    assert echo_round_trip(port, b"through the session") == b"through the session"


def test_ssh_label_on_port_80_claims_an_http_name(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    http_port = free_port_block(1)
    r = _start(procs, tmp_path, "--http", f"tcp:{http_port}:interface={HOST}", "--domain", DOMAIN)
    agent = _ssh(procs, r, "-T", "-R", f"app:80:{HOST}:{echo_server.port}", f"user@{HOST}")
    agent.wait_line(rf"^http://app\.{DOMAIN}:{http_port}/$", stream="out")
    request = f"GET / HTTP/1.1\r\nHost: app.{DOMAIN}\r\n\r\n".encode()
    assert echo_round_trip(http_port, request) == request  # the echo service got the request


def test_ssh_permitlisten_bounds_what_a_key_may_claim(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    """A key with permitlisten="PORT" gets that port for -R 0 and is refused any other."""
    r = _start(procs, tmp_path)
    allowed = r.relay.ports[-1]
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f'permitlisten="{allowed}" ' + (tmp_path / "agent_key.pub").read_text())
    ok = _ssh(procs, r, "-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}", name="ssh-ok")
    assert _allocated(ok) == allowed
    assert echo_round_trip(allowed, b"allowed") == b"allowed"
    other = r.relay.ports[0]
    refused = _ssh(procs, r, "-N", "-R", f"{other}:{HOST}:{echo_server.port}", f"user@{HOST}", name="ssh-no")
    assert refused.wait_exit() == 255
    refused.wait_line(r"remote port forwarding failed", stream="err")
    r.relay.proc.wait_line(rf"port {other} is not allowed for credential ssh:")


def test_ssh_new_connection_of_a_key_replaces_a_dead_one_at_once(
    procs: Procs, tmp_path: Path, echo_server: EchoServer
) -> None:
    """A frozen ssh (its connection still open) is replaced by a new connection of the same key: same port, at once."""
    r = _start(procs, tmp_path)
    forward = ("-N", "-R", f"0:{HOST}:{echo_server.port}", f"user@{HOST}")
    first = _ssh(procs, r, *forward, name="ssh-1")
    port = _allocated(first)
    first.signal(signal.SIGSTOP)  # alive for TCP, dead for SSH
    try:
        again = _ssh(procs, r, *forward, name="ssh-2")
        assert _allocated(again) == port
        r.relay.proc.wait_line(r"replaced by a new connection of its key")
        assert echo_round_trip(port, b"the new one") == b"the new one"
    finally:
        first.signal(signal.SIGCONT)


def test_ssh_visitor_that_never_reads_holds_back_the_service(procs: Procs, tmp_path: Path) -> None:
    """A local service writing 64 MB to a visitor that never reads: the relay withholds the channel's window, so the service is stopped and the relay grows by a few MiB at most."""
    import threading
    import time

    sent = [0]
    listener = socket.create_server((HOST, 0))

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        chunk = b"x" * 65536
        conn.settimeout(15)
        try:
            while sent[0] < 64 << 20:
                conn.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    visitor = socket.socket()
    try:
        r = _start(procs, tmp_path)
        pid = r.relay.proc.pid

        def rss() -> int:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

        agent = _ssh(procs, r, "-N", "-R", f"0:{HOST}:{listener.getsockname()[1]}", f"user@{HOST}")
        port = _allocated(agent)
        base = rss()
        visitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        visitor.connect((HOST, port))
        visitor.sendall(b"go")
        # wait until the service is stopped: its count no longer moves
        last, still = -1, 0
        deadline = time.monotonic() + 20
        while still < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
            still = still + 1 if sent[0] == last else 0
            last = sent[0]
        assert still >= 10, "the service was never held back"
        assert sent[0] < 32 << 20, f"the service wrote {sent[0] >> 20} MiB to a visitor that reads nothing"
        assert rss() - base < 8 << 20, f"relay grew by {(rss() - base) >> 20} MiB"
    finally:
        visitor.close()
        listener.close()
        thread.join(5)
