"""
Fixtures and helpers for the operations end-to-end tests
(test_operations.py): the real ``twistd -n --pidfile= tcprelay`` started
the way systemd starts it (an inherited listening socket with
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, a ``NOTIFY_SOCKET``), the
Go services, a threaded local echo service for ``tcprelay expose``, a raw
muxado client for the legacy handshake, and HTTP scrapes of ``/metrics``
and ``/status``.

Import what you use explicitly; nothing here is autouse.  Every process is
started through :class:`OpProcs` (fixture ``ops``), whose finalizer kills
and reaps it; sockets and echo services are closed by their fixtures.
Waits are on real events (output lines, datagrams, exits, socket reads)
with bounded deadlines.  Everything is on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional, Sequence

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role, Session, SessionConfig
from tests.interop import gobuild

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
TWISTD = Path(sys.executable).with_name("twistd")
TCPRELAY = Path(sys.executable).with_name("tcprelay")
"""The console scripts of the environment running the tests (tcprelay installed there)."""

STARTUP = 15.0
"""Seconds a relay, an agent or a Go service may take to come up."""

STOP = 15.0
"""Seconds a relay may take to drain and exit after SIGTERM."""

_SYSTEMD_ENV = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
"""Variables a test run under systemd may itself have: never passed on by accident."""

_INHERIT = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""
What systemd does between fork and exec for a socket-activated service: put
the listening socket at fd 3 (SD_LISTEN_FDS_START) and set ``LISTEN_PID``
to the pid that will run the service (exec keeps the pid).
"""


# -- processes ------------------------------------------------------------------


class OpProc:
    """
    One subprocess whose stdout and stderr are read line by line by two
    daemon threads (stdout's raw bytes are kept too, for the JSON-lines
    check); tests wait for lines with :meth:`wait_line`.
    """

    def __init__(
        self,
        argv: Sequence[object],
        name: str,
        cwd: Path,
        env: dict[str, str],
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            pass_fds=tuple(pass_fds),
        )
        self.pid = self.popen.pid
        self.raw_stdout: list[bytes] = []
        self._lines: dict[str, list[str]] = {"out": [], "err": []}
        self._open = 2
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._read, args=(kind, pipe), daemon=True, name=f"{name}-{kind}")
            for kind, pipe in (("out", self.popen.stdout), ("err", self.popen.stderr))
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, kind: str, pipe: object) -> None:
        for raw in iter(pipe.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                if kind == "out":
                    self.raw_stdout.append(raw)
                self._lines[kind].append(line)
                self._cond.notify_all()
        with self._cond:
            self._open -= 1
            self._cond.notify_all()

    def lines(self, stream: str = "all") -> list[str]:
        """Lines read so far from ``out``, ``err`` or ``all`` (stdout first)."""
        with self._cond:
            if stream == "all":
                return self._lines["out"] + self._lines["err"]
            return list(self._lines[stream])

    def matching(self, pattern: str, stream: str = "all") -> list[str]:
        """Lines so far that match the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return [line for line in self.lines(stream) if regex.search(line)]

    def describe(self) -> str:
        """Everything read so far, for failure messages."""
        with self._cond:
            out, err = self._lines["out"], self._lines["err"]
            return (
                f"--- {self.name} {self.argv}\n--- stdout:\n" + "\n".join(out)
                + "\n--- stderr:\n" + "\n".join(err)
            )

    def wait_line(
        self, pattern: str, timeout: float = STARTUP, stream: str = "all", count: int = 1
    ) -> re.Match[str]:
        """
        Wait until ``count`` lines of ``stream`` match ``pattern``; return the
        last match.  Fails at the deadline, or once the output has ended.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                pool = (
                    self._lines["out"] + self._lines["err"] if stream == "all" else self._lines[stream]
                )
                found = [m for m in map(regex.search, pool) if m]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if self._open == 0 or remaining <= 0:
                    why = "ended its output" if self._open == 0 else f"gave nothing within {timeout}s"
                    pytest.fail(
                        f"{self.name} {why} while waiting for {count} x {pattern!r} on {stream}\n"
                        + self.describe()
                    )
                self._cond.wait(remaining)

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this process only."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait_exit(self, timeout: float = STOP) -> int:
        """Wait for the exit (and the end of its output); return the status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s\n" + self.describe())
        for thread in self._threads:
            thread.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL this process (if it still runs) and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        for thread in self._threads:
            thread.join(5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


class OpProcs:
    """The subprocesses of one test; :meth:`stop_all` kills and reaps them."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        self.env.update(
            PYTHONUNBUFFERED="1",
            XDG_STATE_HOME=str(cwd / "state"),  # never touch the real ~/.local/state
        )
        self._all: list[OpProc] = []

    def start(
        self,
        argv: Sequence[object],
        name: str,
        env: Optional[dict[str, str]] = None,
        pass_fds: Sequence[int] = (),
    ) -> OpProc:
        """Start ``argv`` in the test's temporary directory, with ``env`` added."""
        proc = OpProc(argv, name, self.cwd, {**self.env, **(env or {})}, pass_fds)
        self._all.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill and reap every process (in reverse start order)."""
        for proc in reversed(self._all):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass


@pytest.fixture
def ops(tmp_path: Path) -> Iterator[OpProcs]:
    """The test's subprocesses, all killed and reaped when it ends."""
    if not TWISTD.exists() or not TCPRELAY.exists():
        pytest.fail(f"no twistd/tcprelay next to {sys.executable}: pip install tcprelay there")
    group = OpProcs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


# -- ports and sockets -------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_block(count: int) -> int:
    """
    The first of ``count`` consecutive ports that all bind on 127.0.0.1 now,
    chosen below the ephemeral range so no client socket takes one later.
    """
    top = _ephemeral_low() - count
    if top <= 22000 + count:
        top = 60000 - count
    for _ in range(300):
        base = random.randrange(22000, top)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports")


@pytest.fixture
def held_socket() -> Iterator[socket.socket]:
    """
    A listening TCP socket on 127.0.0.1, held by the test as systemd holds
    a socket unit's; closed when the test ends.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        sock.listen(1024)
        yield sock
    finally:
        sock.close()


def _short_dir(tmp_path: Path) -> tuple[Path, Optional[tempfile.TemporaryDirectory[str]]]:
    """``tmp_path``, or a short temporary directory when a socket path would not fit."""
    if len(str(tmp_path / "notify.sock")) < 100:
        return tmp_path, None
    holder = tempfile.TemporaryDirectory(prefix="tcprelay-ntf-")
    return Path(holder.name), holder


class NotifySocket:
    """
    A datagram socket standing in for systemd's ``NOTIFY_SOCKET``: keeps
    every message (datagram) in arrival order.
    """

    def __init__(self, address: str, env_value: str) -> None:
        self.env_value = env_value
        """What to put in ``NOTIFY_SOCKET``."""
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[str] = []

    def _receive(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return False
        self.messages.append(self.sock.recv(4096).decode("utf-8", "replace"))
        return True

    def wait_for(self, message: str, timeout: float, count: int = 1) -> None:
        """Wait until ``message`` has arrived ``count`` times; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while self.messages.count(message) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"{count} x {message!r} not received within {timeout}s; got {self.messages}"
                )
            self._receive(remaining)

    def drain(self) -> list[str]:
        """Take whatever is queued already (the sender has exited); all messages."""
        while self._receive(0):
            pass
        return list(self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def unix_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory for unix sockets: ``tmp_path``, or a shorter one if paths there would not fit."""
    directory, holder = _short_dir(tmp_path)
    try:
        yield directory
    finally:
        if holder is not None:
            holder.cleanup()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    """A stand-in NOTIFY_SOCKET: a file in the test's directory, or an abstract (``@``) name."""
    holder = None
    if request.param == "path":
        directory, holder = _short_dir(tmp_path)
        path = str(directory / "notify.sock")
        sock = NotifySocket(path, path)
    else:
        name = f"tcprelay-test-{os.getpid()}-{random.randrange(1 << 30)}"
        sock = NotifySocket("\0" + name, "@" + name)
    try:
        yield sock
    finally:
        sock.close()
        if holder is not None:
            holder.cleanup()


# -- the relay --------------------------------------------------------------------


@attrs.define
class RelayProc:
    """A running ``twistd tcprelay``."""

    proc: OpProc
    control: int
    ports: range

    @property
    def address(self) -> str:
        """``127.0.0.1:CONTROL``: the services' ``-relay`` and the agents' ``--relay``."""
        return f"{HOST}:{self.control}"


def start_relay(
    ops: OpProcs,
    *extra: object,
    pool: int = 3,
    inherit: Optional[socket.socket] = None,
    control_spec: str = "systemd:domain=INET:name=control",
    env: Optional[dict[str, str]] = None,
    wait: bool = True,
    name: str = "relay",
) -> RelayProc:
    """
    Start ``twistd -n --pidfile= tcprelay`` with ``pool`` public ports on
    127.0.0.1.  With ``inherit``, the relay gets that listening socket the
    way systemd passes it (fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID``,
    ``LISTEN_FDNAMES=control``) and ``--control control_spec``; otherwise
    it listens on ``tcp:PORT`` itself.  With ``wait``, returns once the
    control port is adopted or listening.
    """
    block = free_block(pool + 1)
    env = dict(env or {})
    pass_fds: tuple[int, ...] = ()
    if inherit is not None:
        control = inherit.getsockname()[1]
        ports = range(block, block + pool)
        spec = control_spec
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES="control")
        pass_fds = (inherit.fileno(),)
    else:
        control = block
        ports = range(block + 1, block + 1 + pool)
        spec = f"tcp:{control}:interface={HOST}"
    argv: list[object] = [
        TWISTD, "-n", "--pidfile=", "tcprelay",
        "--control", spec,
        "--ports", f"{ports[0]}-{ports[-1]}",
        "--public-interface", HOST,
        "--public-host", HOST,
        *extra,
    ]
    if inherit is not None:
        argv = [sys.executable, "-c", _INHERIT, inherit.fileno(), *argv]
    proc = ops.start(argv, name, env=env, pass_fds=pass_fds)
    if wait:
        # Twisted logs "<Factory> starting on <port>" once the port listens.
        proc.wait_line(rf"ControlFactory starting on {control}\b", STARTUP)
    return RelayProc(proc, control, ports)


def stop_relay(relay: RelayProc) -> int:
    """SIGTERM the relay and wait for it to drain and exit; its exit status."""
    relay.proc.signal(15)
    return relay.proc.wait_exit(STOP)


# -- Go services and agents ----------------------------------------------------------


_binaries: dict[str, Path] = {}


def start_go_service(ops: OpProcs, name: str, relay: RelayProc) -> OpProc:
    """Start the Go interop service ``name`` against ``relay``; skips without Go."""
    gobuild.require_go()
    binary = _binaries.get(name)
    if binary is None:
        binary = _binaries[name] = gobuild.build(name)
    return ops.start([binary, "-relay", relay.address, "-timeout", "0"], name)


def service_port(service: OpProc) -> int:
    """Wait for a Go service's ``ADDRESS host:port`` line; the public port."""
    return int(service.wait_line(r"^ADDRESS \S+:(\d+)$", STARTUP, stream="out").group(1))


def start_agent(
    ops: OpProcs, local: int, relay: RelayProc, secret_file: Path, name: str = "agent"
) -> OpProc:
    """``tcprelay expose LOCAL --relay RELAY --secret-file FILE`` with its own lease file."""
    lease = ops.cwd / f"lease-{name}.json"
    argv = [
        TCPRELAY, "expose", local, "--relay", relay.address,
        "--secret-file", secret_file, "--lease-file", lease,
    ]
    return ops.start(argv, name)


def agent_port(agent: OpProc) -> int:
    """Wait for the agent's public address on stdout; the port."""
    return int(agent.wait_line(r"^\S+:(\d+)$", STARTUP, stream="out").group(1))


# -- local echo service for agents ------------------------------------------------------


class EchoServer:
    """A threaded echo service on 127.0.0.1 (FIN answered with FIN)."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stopping = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="echo-accept")
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopping:
            ready, _, _ = select.select([self._sock], [], [], 0.1)
            if not ready or self._stopping:
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        self._stopping = True
        self._acceptor.join(5)
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    """A local echo service, stopped when the test ends."""
    server = EchoServer()
    try:
        yield server
    finally:
        server.stop()


# -- visitors --------------------------------------------------------------------


def visit(port: int, timeout: float = 10.0) -> socket.socket:
    """A visitor: a plain TCP connection to a public port, with a timeout."""
    return socket.create_connection((HOST, port), timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes; fail on an early EOF."""
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(65536, size - len(buf)))
        if not chunk:
            pytest.fail(f"EOF after {len(buf)} of {size} bytes")
        buf += chunk
    return bytes(buf)


def recv_to_eof(sock: socket.socket) -> bytes:
    """Read until the peer's FIN (the socket's timeout bounds each read)."""
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


def echo_round_trip(port: int, data: bytes) -> bytes:
    """Send ``data`` as a visitor, half-close, and return everything echoed until FIN."""
    with visit(port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_to_eof(sock)


# -- raw muxado client -------------------------------------------------------------


def legacy_handshake(port: int, timeout: float = 10.0) -> tuple[str, str]:
    """
    Dial the control port as the original echo service does: open the first
    plain stream and read it to its FIN.  Returns ``("address", "HOST:PORT")``
    when a relay served the handshake, or ``("goaway", reason)`` when a
    draining relay sent GOAWAY(NO_ERROR) first.  Anything else (refused,
    reset, timeout, a silent close, an error code) raises OSError or
    AssertionError with what happened.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(Role.CLIENT, SessionConfig(heartbeat=False), time.monotonic())
        sid = session.open_stream(0)
        sock.sendall(session.data_to_send())
        data = bytearray()
        goaway: Optional[ev.GoAwayReceived] = None
        frames = False
        events = session.events()
        while True:
            for event in events:
                if isinstance(event, ev.DataReceived) and event.stream_id == sid:
                    data += event.data
                    session.acknowledge(sid, len(event.data))
                elif isinstance(event, ev.StreamEnded) and event.stream_id == sid:
                    return ("address", data.decode("ascii", "replace"))
                elif isinstance(event, ev.GoAwayReceived):
                    goaway = event
                elif isinstance(event, ev.SessionEnded):
                    if goaway is not None and goaway.error_code == ErrorCode.NO_ERROR:
                        return ("goaway", event.reason)
                    raise AssertionError(
                        f"session ended before the address ({event.reason}; "
                        f"frames seen: {frames}, goaway: {goaway})"
                    )
            out = session.data_to_send()
            if out:
                sock.sendall(out)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no address within {timeout}s")
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                session.connection_lost("eof")
                events = session.events()
            else:
                frames = True
                events = session.receive_data(chunk) + session.events()


# -- metrics and status --------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[str, bytes]:
    """GET ``http://127.0.0.1:PORT/PATH``; (content type, body).  Fails on a non-200."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
        assert response.status == 200, f"{path}: HTTP {response.status}"
        return response.headers.get("content-type", ""), response.read()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` parsed: {(sample name, labels): value}."""
    kind, body = http_get(port, "/metrics")
    assert kind.startswith("text/plain"), kind
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """One sample's value (0 when the labelled sample is absent, as Prometheus reads it)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def status(port: int) -> dict[str, object]:
    """``/status`` parsed."""
    kind, body = http_get(port, "/status")
    assert kind.startswith("application/json"), kind
    document = json.loads(body)
    assert isinstance(document, dict)
    return document


def scrape_until(port: int, predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """
    Scrape ``/metrics`` until ``predicate(samples)`` holds (the relay sees a
    remote close a moment after the test does); the samples.  Fails at the
    deadline with the last scrape.
    """
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples):
            return samples
        if time.monotonic() >= deadline:
            pytest.fail(f"metrics: {what} not reached within {timeout}s; last scrape: {samples}")
        time.sleep(0.05)
