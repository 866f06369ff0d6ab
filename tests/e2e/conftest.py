"""
Fixtures for the end-to-end tests: the real ``twistd -n tcprelay`` and the Go
interop services as subprocesses, and plain-socket visitors.

Every subprocess is started through :class:`Processes` (the ``processes``
fixture), whose finalizer kills and reaps whatever is still running.  Output
is read by one thread per process into a list of lines, and tests wait on
lines (real events) with bounded deadlines.  Everything listens on and
connects to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import attrs
import pytest

from tests.interop import gobuild

TWISTD = Path(sys.executable).with_name("twistd")
"""The twistd of the environment running the tests (tcprelay is installed there)."""

HOST = "127.0.0.1"

STARTUP_TIMEOUT = 15.0
"""Seconds a relay or a service may take to come up."""


class Process:
    """
    One subprocess with stdout and stderr merged, read line by line by a
    daemon thread.  Tests wait for lines with :meth:`wait_for`.
    """

    def __init__(self, argv: Sequence[str], name: str, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )
        self.pid = self.popen.pid
        self._lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.popen.stdout
        assert stdout is not None
        for raw in iter(stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def lines(self) -> list[str]:
        """Every line read so far."""
        with self._cond:
            return list(self._lines)

    @property
    def output(self) -> str:
        """Everything read so far, for assertion messages."""
        return "\n".join(self.lines)

    def matching(self, pattern: str) -> list[str]:
        """Lines read so far that match the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    def wait_for(self, pattern: str, timeout: float, count: int = 1) -> re.Match[str]:
        """
        Wait until ``count`` lines match ``pattern``; return the match of the
        last of them.  Fails at the deadline or if the output ends first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in map(regex.search, self._lines) if m]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    why = "exited" if self._eof else f"gave nothing within {timeout}s"
                    pytest.fail(
                        f"{self.name} {why} while waiting for {count} x {pattern!r}; "
                        f"output:\n{chr(10).join(self._lines)}"
                    )
                self._cond.wait(remaining)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit (and its output to end); return its exit status."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s; output:\n{self.output}")
        self._reader.join(5)
        return code

    @property
    def running(self) -> bool:
        """True until the process has exited."""
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to this process (only)."""
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL this process and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self._reader.join(5)


class Processes:
    """Starts subprocesses for one test and stops every one of them at the end."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self._all: list[Process] = []

    def start(self, argv: Sequence[str], name: str) -> Process:
        """Start ``argv`` (in the test's temporary directory)."""
        proc = Process(argv, name, self.cwd)
        self._all.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill and reap every process still running."""
        for proc in reversed(self._all):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """The test's subprocesses, all killed and reaped when it ends."""
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(count: int) -> int:
    """
    The first of ``count`` consecutive ports that all bind on 127.0.0.1 now.
    Chosen below the ephemeral range when possible, so that no client
    socket of the test can take one of them later.
    """
    top = _ephemeral_low() - count
    if top <= 20000 + count:
        top = 60000 - count
    for _ in range(200):
        base = random.randrange(20000, top)
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
    raise RuntimeError(f"no block of {count} free ports found")


@attrs.define
class Relay:
    """A running relay: its process, control port and public ports."""

    proc: Process
    control: int
    ports: range

    @property
    def control_address(self) -> str:
        """``HOST:PORT`` of the control port, for the Go services' -relay."""
        return f"{HOST}:{self.control}"

    @property
    def log(self) -> list[str]:
        """The relay's log lines so far."""
        return self.proc.lines


class RelayFactory:
    """Starts ``twistd -n --pidfile= tcprelay`` on free loopback ports."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes

    def start(self, pool_size: int = 3, *extra: str) -> Relay:
        """
        Start a relay whose public range is the ``pool_size`` ports after
        its control port; wait until the control port listens.
        """
        control = free_port_block(pool_size + 1)
        ports = range(control + 1, control + 1 + pool_size)
        argv = [
            str(TWISTD),
            "-n",
            "--pidfile=",
            "tcprelay",
            "--control",
            f"tcp:{control}:interface={HOST}",
            "--ports",
            f"{ports[0]}-{ports[-1]}",
            "--public-interface",
            HOST,
            *extra,
        ]
        proc = self.processes.start(argv, "relay")
        # Twisted logs "<Factory> starting on <port>" once the socket listens.
        proc.wait_for(rf"starting on {control}\b", STARTUP_TIMEOUT)
        return Relay(proc, control, ports)


@pytest.fixture
def relays(processes: Processes) -> RelayFactory:
    """Starts relays for the test (stopped with the test's other processes)."""
    if not TWISTD.exists():
        pytest.fail(f"no twistd next to {sys.executable}: install tcprelay there (pip install .)")
    return RelayFactory(processes)


@attrs.define
class Service:
    """A running Go service behind a relay."""

    proc: Process

    def address(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """Wait for the service to print the address the relay gave it."""
        return self.proc.wait_for(r"^ADDRESS (.*)$", timeout).group(1)

    def port(self, timeout: float = STARTUP_TIMEOUT) -> int:
        """The public port of :meth:`address`."""
        return int(self.address(timeout).rpartition(":")[2])


class ServiceFactory:
    """Starts the Go interop services (``legacyecho``, ``echosvc``)."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self._binaries: dict[str, Path] = {}

    def start(self, name: str, relay: Relay) -> Service:
        """Start service ``name`` against ``relay``; it dials at once."""
        binary = self._binaries.get(name)
        if binary is None:
            binary = self._binaries[name] = gobuild.build(name)
        argv = [str(binary), "-relay", relay.control_address, "-timeout", "0"]
        return Service(self.processes.start(argv, name))


@pytest.fixture
def services(processes: Processes) -> ServiceFactory:
    """Starts Go services for the test; skips without Go (fails in CI)."""
    gobuild.require_go()
    return ServiceFactory(processes)


# -- visitors ---------------------------------------------------------------


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
    """Read until the peer's FIN."""
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


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
        if time.monotonic() >= deadline:
            pytest.fail(f"port {port} still accepts connections after {timeout}s")
        time.sleep(0.02)


def exit_status_name(code: Optional[int]) -> str:
    """A readable exit status (``signal SIGTERM`` for negative codes)."""
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit {code}"
