"""
What the end-to-end tests share: the real relay (``twistd -n --pidfile=
tcprelay``), the real agent (``tcprelay expose``) and the Go interop
programs as subprocesses; free loopback ports; plain-socket visitors; a
threaded local echo service that keeps what it received; and a raw muxado
client.

Every process is started through :class:`Procs` (fixture ``procs``), whose
finalizer kills and reaps it; every echo service through fixture
``echo_servers`` (or ``echo_server``), whose finalizer stops it.  Each
process's stdout and stderr are read line by line by two daemon threads, and
tests wait on lines, exits and socket reads (real events) with bounded
deadlines.  Everything listens on and connects to 127.0.0.1 only.

conftest.py makes the fixtures available to every test of this directory;
import the helpers explicitly.  Nothing here is autouse.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import attrs
import pytest

from tcprelay.testing import free_port_block
from tests.interop import gobuild

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
TCPRELAY = BIN / "tcprelay"
"""The console scripts of the environment running the tests (tcprelay installed there)."""

STARTUP = 15.0
"""Seconds a relay, an agent or a Go service may take to come up."""

STOP = 15.0
"""Seconds a process may take to exit (a relay: to drain and exit after SIGTERM)."""

ADDRESS_LINE = r"^(\S+):(\d+)$"
"""What the agent prints on stdout: the public address, alone on its line."""

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


class Proc:
    """
    One subprocess whose stdout and stderr are read line by line by two
    daemon threads (stdout's raw bytes are kept too, for byte-exact checks);
    tests wait for lines with :meth:`wait_line`.
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

    def _pool(self, stream: str) -> list[str]:
        """The lines of ``stream`` (``out``, ``err`` or ``all``: stdout first); hold ``_cond``."""
        if stream == "all":
            return self._lines["out"] + self._lines["err"]
        return list(self._lines[stream])

    def lines(self, stream: str = "all") -> list[str]:
        """Lines read so far from ``out``, ``err`` or ``all`` (stdout first)."""
        with self._cond:
            return self._pool(stream)

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
                found = [m for m in map(regex.search, self._pool(stream)) if m]
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

    def no_line_for(self, pattern: str, seconds: float, stream: str = "all") -> None:
        """Fail if a line matching ``pattern`` shows up within ``seconds`` (used only where absence is the point)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + seconds
        with self._cond:
            while True:
                hit = [line for line in self._pool(stream) if regex.search(line)]
                if hit:
                    pytest.fail(f"{self.name} printed {hit[0]!r}, which it must not\n" + self.describe())
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open == 0:
                    return
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


class Procs:
    """The subprocesses of one test; :meth:`stop_all` kills and reaps them."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_ENV}
        self.env.update(
            PYTHONUNBUFFERED="1",
            XDG_STATE_HOME=str(cwd / "state"),  # never touch the real ~/.local/state
        )
        self.started: list[Proc] = []

    def start(
        self,
        argv: Sequence[object],
        name: str,
        env: Optional[dict[str, str]] = None,
        pass_fds: Sequence[int] = (),
    ) -> Proc:
        """Start ``argv`` in the test's temporary directory, with ``env`` added."""
        proc = Proc(argv, name, self.cwd, {**self.env, **(env or {})}, pass_fds)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill and reap every process (in reverse start order)."""
        for proc in reversed(self.started):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """The test's subprocesses, all killed and reaped when it ends."""
    if not TWISTD.exists() or not TCPRELAY.exists():
        pytest.fail(f"no twistd/tcprelay next to {sys.executable}: pip install tcprelay there")
    group = Procs(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def exit_status_name(code: Optional[int]) -> str:
    """A readable exit status (``signal SIGTERM`` for negative codes)."""
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit {code}"


# -- ports -----------------------------------------------------------------------


# -- relays ----------------------------------------------------------------------


@attrs.define
class RelayProc:
    """A running relay: its process, control port and public ports."""

    proc: Proc
    control: int
    ports: range

    @property
    def address(self) -> str:
        """``127.0.0.1:CONTROL``: the Go services' ``-relay`` and the agents' ``--relay``."""
        return f"{HOST}:{self.control}"


def start_relay(
    procs: Procs,
    *extra: object,
    pool: int = 3,
    control: Optional[int] = None,
    control_spec: Optional[str] = None,
    inherit: Optional[socket.socket] = None,
    public_host: Optional[str] = None,
    env: Optional[dict[str, str]] = None,
    wait: bool = True,
    name: str = "relay",
    twistd_args: tuple[object, ...] = (),
) -> RelayProc:
    """
    Start ``twistd -n --pidfile= TWISTD_ARGS tcprelay ... EXTRA`` with
    ``pool`` public ports on 127.0.0.1 (and ``--public-host public_host`` if
    given).

    By default the relay listens on ``tcp:CONTROL`` itself, its public ports
    right after the control port; ``control`` reuses a port block (a
    restart), ``control_spec`` is another endpoint string on it (TLS).

    With ``inherit``, the relay gets that listening socket the way systemd
    passes it (fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID``,
    ``LISTEN_FDNAMES=control``) and ``--control control_spec`` (by default
    ``systemd:domain=INET:name=control``).

    With ``wait``, returns once the control port listens (or is adopted).
    """
    env = dict(env or {})
    pass_fds: tuple[int, ...] = ()
    if inherit is not None:
        control = inherit.getsockname()[1]
        first = free_port_block(pool)
        ports = range(first, first + pool)
        spec = control_spec or "systemd:domain=INET:name=control"
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES="control")
        pass_fds = (inherit.fileno(),)
    else:
        if control is None:
            control = free_port_block(pool + 1)
        ports = range(control + 1, control + 1 + pool)
        spec = control_spec or f"tcp:{control}:interface={HOST}"
    argv: list[object] = [
        TWISTD, "-n", "--pidfile=", *twistd_args, "tcprelay",
        "--control", spec,
        "--ports", f"{ports[0]}-{ports[-1]}",
        "--public-interface", HOST,
    ]
    if public_host is not None:
        argv += ["--public-host", public_host]
    argv += extra
    if inherit is not None:
        argv = [sys.executable, "-c", _INHERIT, inherit.fileno(), *argv]
    proc = procs.start(argv, name, env=env, pass_fds=pass_fds)
    if wait:
        # Twisted logs "<Factory> starting on <port>" once the port listens.
        proc.wait_line(rf"ControlFactory( \(TLS\))? starting on {control}\b", STARTUP)
    return RelayProc(proc, control, ports)


def stop_relay(relay: RelayProc) -> int:
    """SIGTERM the relay and wait for it to drain and exit; its exit status."""
    relay.proc.signal(signal.SIGTERM)
    return relay.proc.wait_exit(STOP)


def start_legacy_relay(procs: Procs, pool: int = 3) -> RelayProc:
    """The Go ``legacyrelay`` (the original relay's wire behaviour); skips without Go."""
    gobuild.require_go()
    binary = gobuild.build("legacyrelay")
    control = free_port_block(pool + 1)
    proc = procs.start(
        [binary, "-listen", f"{HOST}:{control}", "-max", pool, "-timeout", "0"], "legacyrelay"
    )
    proc.wait_line(rf"^LISTEN \S+:{control}$", STARTUP, stream="out")
    return RelayProc(proc, control, range(control + 1, control + 1 + pool))


# -- services behind a relay: the Go programs and the agent ----------------------


@attrs.define
class ServiceProc:
    """A running Go interop service (``legacyecho``, ``echosvc``)."""

    proc: Proc

    def address(self, timeout: float = STARTUP) -> str:
        """Wait for the ``ADDRESS`` line; the address the relay gave the service."""
        return self.proc.wait_line(r"^ADDRESS (.*)$", timeout, stream="out").group(1)

    def port(self, timeout: float = STARTUP) -> int:
        """The public port of :meth:`address`."""
        return int(self.address(timeout).rpartition(":")[2])


def start_go_service(procs: Procs, name: str, relay: RelayProc) -> ServiceProc:
    """Start the Go interop service ``name`` against ``relay`` (it dials at once); skips without Go."""
    gobuild.require_go()
    binary = gobuild.build(name)
    return ServiceProc(procs.start([binary, "-relay", relay.address, "-timeout", "0"], name))


@attrs.define
class AgentProc:
    """A running ``tcprelay expose``."""

    proc: Proc

    def address(self, timeout: float = STARTUP, count: int = 1) -> tuple[str, int]:
        """Wait for the ``count``-th address line on stdout; (host, port)."""
        match = self.proc.wait_line(ADDRESS_LINE, timeout, stream="out", count=count)
        return match.group(1), int(match.group(2))

    def port(self, timeout: float = STARTUP) -> int:
        """The public port the agent printed."""
        return self.address(timeout)[1]


def start_agent(
    procs: Procs,
    local: object,
    relay: str,
    *extra: object,
    name: str = "agent",
    lease_file: Optional[Path] = None,
) -> AgentProc:
    """Start ``tcprelay expose LOCAL --relay RELAY ... EXTRA`` with a lease file in the test's directory."""
    if lease_file is None:
        lease_file = procs.cwd / f"lease-{name}-{len(procs.started)}.json"
    argv = [TCPRELAY, "expose", local, "--relay", relay, "--lease-file", lease_file, *extra]
    return AgentProc(procs.start(argv, name))


# -- local echo service ------------------------------------------------------------


class EchoServer:
    """
    A threaded echo service on 127.0.0.1 that also keeps every byte each
    connection sent (``received[i]`` for the i-th connection).  On the
    client's FIN it answers with its own FIN (half-close friendly).
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.ended: list[bool] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._conns: list[socket.socket] = []
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
            with self._cond:
                index = len(self.received)
                self.received.append(bytearray())
                self.ended.append(False)
                self._conns.append(conn)
                self._cond.notify_all()
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self._cond:
                    self.received[index] += data
                    self._cond.notify_all()
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._cond:
                self.ended[index] = True
                self._cond.notify_all()

    def wait_received(self, index: int, predicate: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
        """Wait until connection ``index`` has sent bytes satisfying ``predicate``; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if index < len(self.received) and predicate(bytes(self.received[index])):
                    return bytes(self.received[index])
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = bytes(self.received[index]) if index < len(self.received) else None
                    pytest.fail(f"local service connection {index}: condition not met in {timeout}s; got {got!r}")
                self._cond.wait(remaining)

    def wait_ended(self, index: int, timeout: float = 10.0) -> None:
        """Wait until connection ``index`` has ended (the service saw its FIN and sent its own)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (index < len(self.ended) and self.ended[index]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"local service connection {index}: not ended within {timeout}s")
                self._cond.wait(remaining)

    def stop(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        self._stopping = True
        self._acceptor.join(5)
        self._sock.close()
        with self._cond:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo_servers() -> Iterator[Callable[[], EchoServer]]:
    """Starts local echo services for the test; each is stopped when it ends."""
    started: list[EchoServer] = []

    def make() -> EchoServer:
        server = EchoServer()
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def echo_server(echo_servers: Callable[[], EchoServer]) -> EchoServer:
    """One local echo service, stopped when the test ends."""
    return echo_servers()


# -- visitors ----------------------------------------------------------------------


# -- local HTTP service ------------------------------------------------------------


class HttpService:
    """A one-line HTTP service on loopback answering ``service <name>`` and keeping
    the head of every request it saw (``heads``); :meth:`close` stops it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock = socket.create_server((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = b""
                try:
                    while b"\r\n\r\n" not in head:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        head += chunk
                    self.heads.append(head)
                    body = f"service {self.name}\n".encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                        % len(body)
                        + body
                    )
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


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


def recv_to_eof(
    sock: socket.socket,
    timeout: float = 30.0,
    on_data: Optional[Callable[[bytearray], None]] = None,
) -> bytes:
    """
    Read until the peer's FIN, calling ``on_data`` with everything read so
    far after each read.  The socket's timeout bounds each read and
    ``timeout`` the whole (a relay sending heartbeats never lets a single
    read time out); past it the test fails.
    """
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no EOF after {timeout}s ({len(buf)} bytes read)")
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if on_data is not None:
            on_data(buf)


def echo_round_trip(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """
    Send ``data`` as a visitor (from a thread, while reading, so a large
    echo cannot deadlock on full buffers), half-close, and return everything
    echoed back until FIN.
    """
    with visit(port, timeout) as sock:
        failure: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)

        sender = threading.Thread(target=send, daemon=True, name="visitor-send")
        sender.start()
        try:
            return recv_to_eof(sock)
        finally:
            sender.join(timeout)
            assert not failure, f"visitor could not send: {failure[0]!r}"


def wait_refused(port: int, timeout: float) -> float:
    """
    Poll connects to ``port`` until one is refused; return the seconds it
    took.  Fails if connections are still accepted at the deadline.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                pass
        except ConnectionRefusedError:
            return time.monotonic() - start
        except ConnectionResetError:
            pass  # queued just as the listener closed: poll again
        if time.monotonic() >= deadline:
            pytest.fail(f"port {port} still accepts connections after {timeout}s")
        time.sleep(0.02)
