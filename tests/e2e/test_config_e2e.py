"""
The real daemon with ``--config FILE``: options come from the TOML file,
SIGHUP re-reads its limits (here a visitor deny list) without dropping a
session, and a bad file on reload keeps the old settings with one log line.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from tests.e2e.support import HOST, STARTUP, Procs, echo_round_trip, start_agent, start_relay


def _replace(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _refused_at_once(port: int) -> bool:
    """A visitor the relay accepts and closes at once (EOF or reset, nothing echoed)."""
    with socket.create_connection((HOST, port), timeout=5.0) as sock:
        try:
            sock.sendall(b"anyone?")
            return sock.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_config_file_and_sighup_reload(procs: Procs, tmp_path: Path, echo_server) -> None:  # type: ignore[no-untyped-def]
    """Options from --config apply; SIGHUP swaps in a deny list for new visitors; a bad file is refused and the deny list stays."""
    config = tmp_path / "relay.toml"
    config.write_text(f'public-host = "{HOST}"\nmax-visitors-per-ip = 100\n')
    relay = start_relay(procs, "--config", config, pool=2)
    agent = start_agent(procs, echo_server.port, relay.address)
    port = agent.port()
    assert echo_round_trip(port, b"before") == b"before"
    with socket.create_connection((HOST, port), timeout=5.0) as kept:
        kept.sendall(b"kept")
        assert kept.recv(4) == b"kept"

        _replace(config, f'public-host = "{HOST}"\ndeny = ["127.0.0.0/8"]\n')
        relay.proc.signal(signal.SIGHUP)
        relay.proc.wait_line(r"SIGHUP: reloaded \S+relay.toml \(0 secrets\)", STARTUP)
        assert _refused_at_once(port)
        relay.proc.wait_line(r"visitor 127\.0\.0\.1 refused at .*: address not allowed", STARTUP)

        _replace(config, "max-visitors = -5\n")
        relay.proc.signal(signal.SIGHUP)
        relay.proc.wait_line(
            r"SIGHUP: \S+relay.toml refused \(.*--max-visitors must be 0 or more.*\); "
            r"keeping the old settings",
            STARTUP,
        )
        assert _refused_at_once(port)
        # the open visitor and the agent's session were left alone
        kept.sendall(b"still")
        assert kept.recv(5) == b"still"
