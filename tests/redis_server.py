"""
A real ``redis-server`` for the cluster tests: started on a free loopback
port with no persistence, stopped (and reaped) by the test, and a tiny
blocking client to look at its keys.

Without ``redis-server`` the tests that need it are skipped, unless the
environment variable ``CI`` is set: then they fail (CI installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import pytest

from tcprelay.testing import free_port_block
from tests.absent import tool_absent

HOST = "127.0.0.1"


def require_redis() -> str:
    """The path of ``redis-server``; skips (fails under CI) without it."""
    path = shutil.which("redis-server")
    if path is None:
        tool_absent("redis-server is not installed (apt-get install redis-server)")
    return path


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``."""

    def __init__(self, directory: Path, port: Optional[int] = None) -> None:
        self.binary = require_redis()
        self.directory = directory
        self.port = port if port is not None else free_port_block(1)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", HOST,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                pytest.fail(f"redis-server exited with {code}")
            if time.monotonic() > deadline:
                self.stop()  # not left running behind a failed test
                pytest.fail(f"redis-server on port {self.port} not up within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGKILL: nothing to save) and reap it."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    def command(self, *args: str, timeout: float = 5.0) -> Any:
        """Run one command; its reply (str, int, list or None)."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            payload = b"*%d\r\n" % len(args) + b"".join(
                b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
            )
            sock.sendall(payload)
            reader = sock.makefile("rb")
            return _reply(reader)

    def keys(self, pattern: str = "tcprelay:*") -> list[str]:
        return sorted(self.command("KEYS", pattern))


def _reply(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_reply(reader) for _ in range(count)]
    raise OSError(f"bad reply {line!r}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    """A running redis-server, stopped when the test ends."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
