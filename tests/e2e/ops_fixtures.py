"""
Helpers for the operations end-to-end tests (test_operations.py) that only
they use: a listening socket held as systemd holds a socket unit's (for
``start_relay(..., inherit=...)``), a stand-in ``NOTIFY_SOCKET``, the
original echo service's handshake done by hand, and HTTP scrapes of
``/metrics`` and ``/status``.  The processes, ports, visitors, echo service
and relay/agent/Go-service starters are in :mod:`tests.e2e.support`.

conftest.py provides the fixtures; import the helpers explicitly.  Nothing
here is autouse.  Sockets are closed by their fixtures.  Waits are on real
events (datagrams, socket reads) with bounded deadlines.  Everything is on
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.support import HOST


# -- sockets ------------------------------------------------------------------------


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
