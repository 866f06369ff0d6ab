"""
The ngrok door end to end: the installed ``twistd tcprelay --ngrok`` and
the real ngrok Python SDK (PyPI ``ngrok``) as the agent, in a subprocess
(``tests/e2e/ngrok_sdk_agent.py``), with a CA and a ``localhost``
certificate made at test time; a local echo service behind it and
plain-socket visitors.  Every process is started through ``procs`` (killed
and reaped when the test ends).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from tcprelay.testing import free_port_block
from tests.absent import import_or_absent, tool_absent
from tests.e2e.agent_fixtures import Pki, make_pki
from tests.e2e.support import (
    HOST,
    STARTUP,
    EchoServer,
    Proc,
    Procs,
    RelayProc,
    recv_exactly,
    start_relay,
    stop_relay,
    visit,
)

import_or_absent("ngrok", "the ngrok SDK (PyPI ngrok, in the test extras)")

AGENT = Path(__file__).with_name("ngrok_sdk_agent.py")
SECRET = "ngrok-e2e-secret-0123456789"
URL_LINE = r"^URL tcp://([^:\s]+):(\d+)$"
DOMAIN = "example.test"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and a ``localhost`` certificate it signed."""
    return make_pki(tmp_path)


def start_ngrok_relay(
    procs: Procs, pki: Pki, ngrok_port: int, control: int | None = None, name: str = "relay",
    extra: tuple[object, ...] = (),
) -> RelayProc:
    """The relay with the ngrok door on ``ngrok_port`` (TLS) and one secret."""
    secrets = procs.cwd / "secrets"
    secrets.write_text(SECRET + "\n")
    relay = start_relay(
        procs,
        "--ngrok", f"ssl:{ngrok_port}:interface={HOST}:privateKey={pki.key}:certKey={pki.cert}",
        "--secrets-file", secrets,
        *extra,
        pool=4,
        control=control,
        name=name,
    )
    relay.proc.wait_line(rf"NgrokFactory \(TLS\) starting on {ngrok_port}\b", STARTUP)
    return relay


def start_sdk(
    procs: Procs, pki: Pki, ngrok_port: int, forward: int, token: str = SECRET, name: str = "sdk",
    count: int = 1, http: str | None = None,
) -> Proc:
    """The ngrok SDK agent forwarding ``count`` TCP endpoints (or an HTTP one) to local port ``forward``."""
    return procs.start(
        [sys.executable, AGENT, f"localhost:{ngrok_port}", pki.ca, token, f"{HOST}:{forward}",
         "--count", count, *(("--http", http) if http else ())],
        name,
        env={"NGROK_SDK_LOG": os.environ.get("NGROK_SDK_LOG", "")},
    )


def sdk_port(sdk: Proc, count: int = 1) -> int:
    """The public port of the ``count``-th endpoint the SDK printed."""
    return int(sdk.wait_line(URL_LINE, STARTUP, stream="out", count=count).group(2))


def relay_and_sdk(procs: Procs, pki: Pki, forward: int) -> tuple[int, RelayProc, Proc, int]:
    """A relay with the ngrok door and an SDK agent bound to one of its ports,
    forwarding to ``forward``: (the door's port, the relay, the SDK, the public port)."""
    ngrok_port = free_port_block(1)
    relay = start_ngrok_relay(procs, pki, ngrok_port)
    sdk = start_sdk(procs, pki, ngrok_port, forward)
    port = sdk_port(sdk)
    assert port in relay.ports
    return ngrok_port, relay, sdk, port


def echo_hash(port: int, size: int) -> None:
    """Send ``size`` bytes to ``port`` and check the echo, hashed."""
    data = os.urandom(size)
    with visit(port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        echoed = recv_exactly(sock, size)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(data).hexdigest()


def test_sdk_binds_a_tcp_endpoint_and_echo_is_intact(
    procs: Procs, pki: Pki, echo_server: EchoServer
) -> None:
    """The SDK authenticates with a secret, gets a port of the range, and 3 MB echo back intact."""
    _, relay, sdk, port = relay_and_sdk(procs, pki, echo_server.port)
    sdk.wait_line("^READY$", STARTUP, stream="out")
    echo_hash(port, 3 * 1024 * 1024)
    echo_hash(port, 1)
    relay.proc.wait_line(r"ngrok agent \S+ serves .*:%d" % port)


def test_wrong_authtoken_is_refused_by_the_sdk(procs: Procs, pki: Pki, echo_server: EchoServer) -> None:
    """A token that is not one of the secrets: the SDK's connect() raises the relay's error."""
    ngrok_port = free_port_block(1)
    relay = start_ngrok_relay(procs, pki, ngrok_port)
    sdk = start_sdk(procs, pki, ngrok_port, echo_server.port, token="not-the-secret")
    line = sdk.wait_line(r"^ERROR (.*)$", STARTUP, stream="out").group(1)
    assert "authtoken is not one of this relay's secrets" in line
    assert sdk.wait_exit() == 3
    relay.proc.wait_line(r"ngrok agent \S+: authtoken refused")


def test_second_sdk_session_alongside(procs: Procs, pki: Pki, echo_server: EchoServer) -> None:
    """Two SDK sessions (one with two endpoints) get three different ports, each echoing."""
    ngrok_port = free_port_block(1)
    start_ngrok_relay(procs, pki, ngrok_port)
    first = start_sdk(procs, pki, ngrok_port, echo_server.port, name="sdk1", count=2)
    second = start_sdk(procs, pki, ngrok_port, echo_server.port, name="sdk2")
    ports = {sdk_port(first, 1), sdk_port(first, 2), sdk_port(second)}
    assert len(ports) == 3
    for port in ports:
        echo_hash(port, 100_000)


def test_relay_restarted_sdk_comes_back_on_the_same_port(
    procs: Procs, pki: Pki, echo_server: EchoServer
) -> None:
    """After the relay restarts on the same ports, the SDK reconnects by itself and binds its old port."""
    ngrok_port, relay, _, port = relay_and_sdk(procs, pki, echo_server.port)
    echo_hash(port, 10_000)
    # The SDK retries about 0, 0.05 and 2.5 s after the loss, then after two
    # minutes: the new relay is started at once.
    assert stop_relay(relay) == 0
    again = start_ngrok_relay(procs, pki, ngrok_port, control=relay.control, name="relay2")
    again.proc.wait_line(rf"ngrok agent \S+ serves \S+:{port} ", 30)
    echo_hash(port, 10_000)


def test_sdk_http_endpoint_gets_a_name(procs: Procs, pki: Pki, echo_server: EchoServer) -> None:
    """An HTTP endpoint with a domain claims that name on the shared HTTP entrance; a request reaches the service."""
    ngrok_port = free_port_block(2)
    http_port = ngrok_port + 1
    start_ngrok_relay(
        procs, pki, ngrok_port,
        extra=("--http", f"tcp:{http_port}:interface={HOST}", "--domain", DOMAIN),
    )
    sdk = start_sdk(procs, pki, ngrok_port, echo_server.port, http="app")
    url = sdk.wait_line(r"^URL (\S+)$", STARTUP, stream="out").group(1)
    assert url == f"http://app.{DOMAIN}:{http_port}"
    request = f"GET / HTTP/1.1\r\nHost: app.{DOMAIN}\r\nConnection: close\r\n\r\n".encode()
    with visit(http_port) as sock:
        sock.sendall(request)
        assert recv_exactly(sock, len(request)) == request  # the echo service answers with the request


NODE = shutil.which("node") or ("/usr/bin/node" if Path("/usr/bin/node").exists() else None)
NPM_DIR = Path(__file__).resolve().parents[2] / ".cache" / "npm"
"""Where scripts/test installs @ngrok/ngrok (git-ignored)."""


def test_javascript_sdk_binds_and_echoes(procs: Procs, pki: Pki, echo_server: EchoServer) -> None:
    """The npm @ngrok/ngrok SDK binds a TCP endpoint through the relay; echo intact."""
    if NODE is None:
        tool_absent("node is not installed (the @ngrok/ngrok test needs it)")
    if not (NPM_DIR / "node_modules" / "@ngrok" / "ngrok").is_dir():
        pytest.fail(f"@ngrok/ngrok is not installed in {NPM_DIR}: run scripts/test (it installs it)")
    ngrok_port = free_port_block(1)
    relay = start_ngrok_relay(procs, pki, ngrok_port)
    sdk = procs.start(
        [NODE, Path(__file__).with_name("ngrok_js_agent.js"), f"localhost:{ngrok_port}", pki.ca, SECRET,
         f"{HOST}:{echo_server.port}"],
        "js-sdk",
        env={"NODE_PATH": str(NPM_DIR / "node_modules")},
    )
    port = sdk_port(sdk)
    assert port in relay.ports
    sdk.wait_line("^READY$", STARTUP, stream="out")
    echo_hash(port, 1024 * 1024)
