"""
End-to-end tests of running the relay for real: the installed ``twistd -n
--pidfile= tcprelay`` started as systemd starts it (socket activation,
``NOTIFY_SOCKET``, ``WATCHDOG_USEC``), restarted under a stream of
connection attempts, scraped over HTTP, logging JSON lines, and reloading
its secrets on SIGHUP; and the shipped systemd units checked by
``systemd-analyze verify``.

Helpers are in support.py and, for what only these tests use,
ops_fixtures.py; conftest.py provides the fixtures of both.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.muxpeer import ScriptedPeer, legacy_handshake
from tests.e2e.ops_fixtures import (
    NotifySocket,
    metric,
    scrape,
    scrape_until,
    status,
)
from tests.e2e.support import (
    HOST,
    STARTUP,
    TWISTD,
    Procs,
    echo_round_trip,
    free_port_block,
    recv_exactly,
    recv_to_eof,
    start_agent,
    start_go_service,
    start_relay,
    stop_relay,
    visit,
)

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "contrib" / "systemd"


# -- systemd units ------------------------------------------------------------------


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts tcprelay.service and tcprelay.socket without a single warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    service = (UNITS / "tcprelay.service").read_text()
    socket_unit = (UNITS / "tcprelay.socket").read_text()
    assert "/opt/tcprelay/bin/twistd" in service
    # verify checks that ExecStart's program exists: point it at this
    # environment's twistd, as an installation into another venv would.
    (tmp_path / "tcprelay.service").write_text(
        service.replace("/opt/tcprelay/bin/twistd", str(TWISTD))
    )
    (tmp_path / "tcprelay.socket").write_text(socket_unit)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "tcprelay.service"), str(tmp_path / "tcprelay.socket")],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and ("Failed to" in output and "bus" in output.lower()):
        pytest.skip(f"systemd-analyze does not work here: {output}")
    assert result.returncode == 0, output
    assert output == "", output


def test_systemd_units_say_what_the_relay_needs() -> None:
    """The shipped units use notify, the named control socket, hardening and a stop timeout beyond the drain."""

    def settings(path: Path) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        logical = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("#") or not line:
                continue
            logical += line
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            if "=" in logical and not logical.startswith("["):
                key, _, value = logical.partition("=")
                found.setdefault(key.strip(), []).append(value.strip())
            logical = ""
        return found

    service = settings(UNITS / "tcprelay.service")
    sock = settings(UNITS / "tcprelay.socket")
    assert service["Type"] == ["notify"]
    exec_start = service["ExecStart"][0].split()
    assert exec_start[1:4] == ["-n", "--pidfile=", "tcprelay"]
    assert exec_start[exec_start.index("--control") + 1] == "systemd:domain=INET6:name=control"
    assert "--ports" in exec_start
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "1048576",
        "Restart": "on-failure",
        "WatchdogSec": "30",
        "KillSignal": "SIGTERM",
        "ExecReload": "/bin/kill -HUP $MAINPID",
    }.items():
        assert service.get(key) == [value], key
    assert set(service["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert int(service["TimeoutStopSec"][0]) > 30  # the default --drain-timeout
    assert service["LoadCredential"] == ["secrets:/etc/tcprelay/secrets"]
    assert "%d/secrets" in exec_start
    assert sock["ListenStream"] == ["8080"]
    assert sock["FileDescriptorName"] == ["control"]
    assert sock["Service"] == ["tcprelay.service"]
    assert sock["BindIPv6Only"] == ["both"]


# -- socket activation and notify -------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["systemd:domain=INET:name=control", "systemd:domain=INET:index=0"]
)
def test_socket_activated_relay_serves_a_go_service_and_a_visitor(
    procs: Procs, held_socket: socket.socket, spec: str
) -> None:
    """A relay given an inherited listening socket (LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES) registers a Go legacy service on it and relays a visitor's echo."""
    relay = start_relay(procs, inherit=held_socket, control_spec=spec, public_host=HOST)
    service = start_go_service(procs, "legacyecho", relay)
    port = service.port()
    assert port in relay.ports
    with visit(port) as sock:
        sock.sendall(b"hello over an inherited socket")
        echoed = recv_exactly(sock, 256)
    assert echoed == b"hello over an inherited socket".ljust(256, b"\0")
    assert stop_relay(relay) == 0, relay.proc.describe()


def test_notify_socket_gets_ready_watchdog_then_stopping(
    procs: Procs, notify_socket: NotifySocket
) -> None:
    """NOTIFY_SOCKET receives READY=1 once the control port listens, WATCHDOG=1 repeatedly with WATCHDOG_USEC set, and STOPPING=1 last after SIGTERM."""
    relay = start_relay(
        procs,
        env={"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"},
        wait=False,
        public_host=HOST,
    )
    notify_socket.wait_for("READY=1", STARTUP)
    # READY=1 means listening: a connection is accepted at once.
    with socket.create_connection((HOST, relay.control), timeout=5):
        pass
    notify_socket.wait_for("WATCHDOG=1", 10, count=4)
    relay.proc.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", 10)
    assert relay.proc.wait_exit() == 0, relay.proc.describe()
    messages = notify_socket.drain()
    assert messages[0] == "READY=1", messages
    assert messages[-1] == "STOPPING=1", messages
    assert set(messages[1:-1]) == {"WATCHDOG=1"}, messages
    assert messages.count("READY=1") == 1 and messages.count("STOPPING=1") == 1, messages


def test_notify_without_watchdog_usec_sends_no_watchdog(procs: Procs, unix_dir: Path) -> None:
    """Without WATCHDOG_USEC the relay tells NOTIFY_SOCKET only READY=1 and then STOPPING=1."""
    path = unix_dir / "n.sock"
    notify = NotifySocket(str(path), str(path))
    try:
        relay = start_relay(procs, env={"NOTIFY_SOCKET": str(path)}, public_host=HOST)
        notify.wait_for("READY=1", STARTUP)
        assert stop_relay(relay) == 0, relay.proc.describe()
        assert notify.drain() == ["READY=1", "STOPPING=1"]
    finally:
        notify.close()


def test_sigterm_right_after_ready_is_a_clean_stop(procs: Procs, unix_dir: Path) -> None:
    """READY=1 goes out only once the relay handles signals: a SIGTERM sent the moment it arrives drains the relay and exits 0, every time."""
    path = unix_dir / "r.sock"
    for attempt in range(3):
        notify = NotifySocket(str(path), str(path))
        try:
            relay = start_relay(
                procs,
                env={"NOTIFY_SOCKET": str(path)},
                wait=False,
                name=f"relay-{attempt}",
                public_host=HOST,
            )
            notify.wait_for("READY=1", STARTUP)
            assert stop_relay(relay) == 0, relay.proc.describe()
            assert notify.drain() == ["READY=1", "STOPPING=1"]
        finally:
            notify.close()
            path.unlink(missing_ok=True)


def test_restart_with_socket_activation_refuses_no_connection(
    procs: Procs, held_socket: socket.socket
) -> None:
    """Restarting a socket-activated relay under a stream of control connections refuses none: attempts made while no relay runs wait in the backlog and the new process serves them."""
    control = held_socket.getsockname()[1]
    clients = 4
    first = start_relay(procs, inherit=held_socket, pool=8, name="relay-1", public_host=HOST)
    in_flight: set[int] = set()
    outcomes: dict[int, tuple[str, str]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + 40
    ids = iter(range(1 << 30))

    def client() -> None:
        for _ in range(400):
            if stop.is_set() or time.monotonic() > deadline:
                return
            with lock:
                attempt = next(ids)
                in_flight.add(attempt)
            try:
                outcome = legacy_handshake(control, timeout=10)
            except (OSError, AssertionError) as e:
                with lock:
                    in_flight.discard(attempt)
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                in_flight.discard(attempt)
                outcomes[attempt] = outcome

    def served_by(relay_ports: range) -> set[int]:
        with lock:
            return {
                attempt
                for attempt, (kind, text) in outcomes.items()
                if kind == "address" and int(text.rpartition(":")[2]) in relay_ports
            }

    def wait_until(condition, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
        limit = time.monotonic() + timeout
        while not condition():
            if failures or time.monotonic() > limit or not any(t.is_alive() for t in threads):
                pytest.fail(f"{what} not reached within {timeout}s; failures: {failures[:5]}")
            time.sleep(0.01)

    threads = [threading.Thread(target=client, daemon=True, name=f"client-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(served_by(first.ports)) >= 20, "20 handshakes served by relay 1", 15)
        first.proc.signal(signal.SIGTERM)
        assert first.proc.wait_exit() == 0, first.proc.describe()
        with lock:
            before_exit = set(outcomes)

        def waiting() -> int:
            with lock:
                return len(in_flight)

        # No relay runs now: every client's attempt waits in the backlog.
        wait_until(lambda: waiting() == clients, "every client waiting in the backlog", 10)
        with lock:
            backlog = set(in_flight)
        second = start_relay(
            procs, inherit=held_socket, pool=8, name="relay-2", public_host=HOST
        )
        wait_until(lambda: len(served_by(second.ports)) >= 20, "20 handshakes served by relay 2", 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert not failures, f"{len(failures)} failed attempts, e.g. {failures[:5]}"
    # The attempts made while no relay ran were all served by the new one.
    assert backlog <= served_by(second.ports), {a: outcomes.get(a) for a in backlog}
    # A session the old relay accepted just before SIGTERM may be told
    # GOAWAY(NO_ERROR) as it drains (one in flight per client at most);
    # every other attempt got its address.
    goaways = {attempt for attempt, (kind, _) in outcomes.items() if kind == "goaway"}
    assert len(goaways) <= clients and goaways <= before_exit, goaways
    assert len(served_by(first.ports) | served_by(second.ports) | goaways) == len(outcomes)
    assert stop_relay(second) == 0, second.proc.describe()


# -- metrics and status ----------------------------------------------------------------


def test_metrics_and_status_follow_a_service_and_its_visitors(procs: Procs) -> None:
    """/metrics and /status report the session, the registered Go service, its visitors and bytes each way as traffic flows, and a garbage session as a PROTOCOL_ERROR."""
    mport = free_port_block(1)
    relay = start_relay(
        procs, "--metrics", f"tcp:{mport}:interface={HOST}", pool=3, public_host=HOST
    )
    before = scrape(mport)
    assert metric(before, "tcprelay_sessions") == 0
    assert metric(before, "tcprelay_services_registered") == 0
    assert metric(before, "tcprelay_port_pool_size") == 3
    assert metric(before, "tcprelay_port_pool_used") == 0
    assert metric(before, "tcprelay_visitors_accepted_total") == 0

    service = start_go_service(procs, "echosvc", relay)
    port = service.port()
    registered = scrape(mport)
    assert metric(registered, "tcprelay_sessions") == 1
    assert metric(registered, "tcprelay_services_registered") == 1
    assert metric(registered, "tcprelay_port_pool_used") == 1
    assert metric(registered, "tcprelay_port_pool_free") == 2
    assert metric(registered, "tcprelay_services_queued") == 0
    assert metric(registered, "tcprelay_handshake_duration_seconds_count") == 1
    doc = status(mport)
    assert doc["sessions"] == 1
    (entry,) = doc["services"]  # type: ignore[misc]
    assert entry["address"] == f"{HOST}:{port}"
    assert entry["port"] == port
    peer_host, _, peer_port = entry["peer"].rpartition(":")
    assert peer_host == HOST and int(peer_port) > 0 and int(peer_port) != relay.control
    assert entry["dialect"] == "legacy"
    since = datetime.datetime.fromisoformat(entry["connected_since"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - since).total_seconds()) < 60

    # One visitor pushes 100 kB and stays connected while we look.
    first = b"a" * 100_000
    with visit(port) as v1:
        v1.sendall(first)
        assert recv_exactly(v1, len(first)) == first
        during = scrape(mport)
        assert metric(during, "tcprelay_visitors_accepted_total") == 1
        assert metric(during, "tcprelay_visitors_connected") == 1
        assert metric(during, "tcprelay_streams_open") >= 1
        assert metric(during, "tcprelay_bytes_relayed_total", direction="to_service") >= len(first)
        assert metric(during, "tcprelay_bytes_relayed_total", direction="to_visitor") >= len(first)
        (entry,) = status(mport)["services"]  # type: ignore[misc]
        assert entry["visitors"] == 1 and entry["open_streams"] >= 1
        assert entry["bytes_to_service"] >= len(first) and entry["bytes_to_visitor"] >= len(first)

        second = b"b" * 50_000
        assert echo_round_trip(port, second) == second
        v1.shutdown(socket.SHUT_WR)
        assert v1.recv(1) == b""

    after = scrape_until(
        mport,
        lambda s: metric(s, "tcprelay_visitors_connected") == 0,
        what="visitors_connected back to 0",
    )
    total = len(first) + len(second)
    assert metric(after, "tcprelay_visitors_accepted_total") == 2
    assert metric(after, "tcprelay_visitors_refused_total") == 0
    for direction in ("to_service", "to_visitor"):
        moved = metric(after, "tcprelay_bytes_relayed_total", direction=direction)
        assert moved >= total, (direction, moved)
        assert moved > metric(during, "tcprelay_bytes_relayed_total", direction=direction)
    doc = status(mport)
    assert doc["visitors"] == {"connected": 0, "accepted": 2, "refused": 0, "unrouted": 0}  # type: ignore[comparison-overlap]
    assert doc["bytes_relayed"]["to_service"] >= total  # type: ignore[index]

    # A session that sends garbage is ended with PROTOCOL_ERROR and counted.
    with socket.create_connection((HOST, relay.control), timeout=10) as garbage:
        garbage.sendall(b"\xff" * 64)
        recv_to_eof(garbage, 10)
    errors = scrape_until(
        mport,
        lambda s: metric(s, "tcprelay_sessions") == 1,
        what="the garbage session gone",
    )
    assert metric(errors, "tcprelay_protocol_errors_total", code="PROTOCOL_ERROR") == 1
    assert metric(errors, "tcprelay_services_registered") == 1
    assert status(mport)["protocol_errors"] == {"PROTOCOL_ERROR": 1}

    # The service leaves: its port goes back to the pool.
    service.proc.signal(signal.SIGTERM)
    assert service.proc.wait_exit() == 0
    gone = scrape_until(
        mport,
        lambda s: metric(s, "tcprelay_services_registered") == 0,
        what="the service deregistered",
    )
    assert metric(gone, "tcprelay_sessions") == 0
    assert metric(gone, "tcprelay_port_pool_used") == 0
    assert status(mport)["services"] == []
    assert stop_relay(relay) == 0, relay.proc.describe()


def test_metrics_count_auth_failures(procs: Procs, tmp_path: Path, echo_server) -> None:  # type: ignore[no-untyped-def]
    """An agent with a wrong secret is refused (exit 3) and counted in auth_failures and services_refused; the right one registers."""
    good = tmp_path / "secrets"
    good.write_text("# relay secrets\nright-secret\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-secret\n")
    mport = free_port_block(1)
    relay = start_relay(
        procs,
        "--secrets-file", good,
        "--metrics", f"tcp:{mport}:interface={HOST}",
        public_host=HOST,
    )
    refused = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", wrong, name="wrong-agent"
    )
    assert refused.proc.wait_exit(STARTUP) == 3, refused.proc.describe()
    samples = scrape(mport)
    assert metric(samples, "tcprelay_auth_failures_total") == 1
    assert metric(samples, "tcprelay_services_refused_total") == 1
    assert metric(samples, "tcprelay_services_registered") == 0

    agent = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", good, name="good-agent"
    )
    port = agent.port()
    assert echo_round_trip(port, b"authenticated") == b"authenticated"
    samples = scrape(mport)
    assert metric(samples, "tcprelay_services_registered") == 1
    assert metric(samples, "tcprelay_auth_failures_total") == 1
    (entry,) = status(mport)["services"]  # type: ignore[misc]
    assert entry["dialect"] == "extended" and entry["port"] == port
    assert stop_relay(relay) == 0, relay.proc.describe()


def test_metrics_count_heartbeat_timeouts(procs: Procs) -> None:
    """A legacy service that stops answering heartbeats is closed, counted in heartbeat_timeouts, and its port returns to the pool."""
    mport = free_port_block(1)
    relay = start_relay(
        procs,
        "--metrics", f"tcp:{mport}:interface={HOST}",
        "--heartbeat-interval", "0.2",
        "--heartbeat-tolerance", "1",
        public_host=HOST,
    )
    peer = ScriptedPeer.dial(relay.control)
    with peer.wire.sock as mute:  # type: ignore[attr-defined]
        peer.open_stream(0)
        # Read (so the relay is never blocked) but never answer anything.
        snapshots = []

        def scrape_once_registered(received: bytearray) -> None:
            if not snapshots and f"{HOST}:{relay.ports[0]}".encode() in received:
                snapshots.append(scrape(mport))

        received = recv_to_eof(mute, 10, scrape_once_registered)
    assert snapshots, received
    registered = snapshots[0]
    assert metric(registered, "tcprelay_services_registered") == 1
    assert metric(registered, "tcprelay_heartbeat_timeouts_total") == 0
    samples = scrape_until(
        mport,
        lambda s: metric(s, "tcprelay_sessions") == 0,
        what="the mute session gone",
    )
    assert metric(samples, "tcprelay_heartbeat_timeouts_total") == 1
    assert metric(samples, "tcprelay_services_registered") == 0
    assert metric(samples, "tcprelay_port_pool_used") == 0
    assert status(mport)["heartbeat_timeouts"] == 1
    assert stop_relay(relay) == 0, relay.proc.describe()


# -- JSON logs ----------------------------------------------------------------------


def test_json_log_format_writes_only_json_lines(procs: Procs) -> None:
    """With --log-format json every line the relay writes through a whole run is one JSON object, and registration lines carry service_port, peer and session."""
    relay = start_relay(procs, "--log-format", "json", public_host=HOST)
    service = start_go_service(procs, "echosvc", relay)
    port = service.port()
    assert echo_round_trip(port, b"log me") == b"log me"
    service.proc.signal(signal.SIGTERM)
    assert service.proc.wait_exit() == 0
    relay.proc.wait_line(r"left", STARTUP, stream="out")
    assert stop_relay(relay) == 0, relay.proc.describe()

    raw = b"".join(relay.proc.raw_stdout)
    assert b"\x1e" not in raw
    assert raw.endswith(b"\n")
    records = []
    for line in raw.split(b"\n")[:-1]:
        record = json.loads(line)
        assert isinstance(record, dict), line
        for key in ("time", "level", "namespace", "message"):
            assert key in record, (key, line)
        datetime.datetime.fromisoformat(record["time"])
        records.append(record)
    assert relay.proc.lines("err") == []
    registered = [r for r in records if "registered at" in r["message"]]
    assert len(registered) == 1, records
    (reg,) = registered
    assert reg["service_port"] == port
    assert reg["level"] == "info"
    assert reg["namespace"].startswith("tcprelay.")
    assert reg["session"] and reg["peer"].startswith(f"{HOST}:")
    assert reg["message"].endswith(f"{HOST}:{port}")
    left = [r for r in records if r.get("service_port") == port and "left" in r["message"]]
    assert len(left) == 1 and left[0]["session"] == reg["session"], records
    assert any("starting on" in r["message"] for r in records)
    assert any("Server Shut Down" in r["message"] for r in records)


def test_json_logs_follow_twistd_logfile_and_rotate_on_sigusr1(procs: Procs, tmp_path: Path) -> None:
    """twistd --logfile F --log-format json: every line in F is JSON, nothing on stdout, and SIGUSR1 rotates F to F.1 with later lines in a new F."""
    log = tmp_path / "relay.log"
    relay = start_relay(
        procs, "--log-format", "json", public_host=HOST, wait=False,
        twistd_args=("--logfile", log),
    )

    def records(path: Path, whole: bool = True) -> list[dict[str, object]]:
        """The JSON lines of ``path``; while the relay runs (``whole=False``)
        a line it is still writing is left for the next look."""
        if not path.exists():
            return []
        lines = path.read_bytes().split(b"\n")
        if whole:
            assert lines[-1] == b"", lines[-1]  # whole lines only
        return [json.loads(line) for line in lines[:-1]]

    def wait_record(path: Path, text: str) -> None:
        deadline = time.monotonic() + STARTUP
        while not any(text in str(r["message"]) for r in records(path, whole=False)):
            assert time.monotonic() < deadline, (text, records(path), relay.proc.describe())
            time.sleep(0.05)

    wait_record(log, f"starting on {relay.control}")
    relay.proc.signal(signal.SIGUSR1)
    rotated = tmp_path / "relay.log.1"
    deadline = time.monotonic() + STARTUP
    while not rotated.exists():
        assert time.monotonic() < deadline, relay.proc.describe()
        time.sleep(0.05)
    service = start_go_service(procs, "echosvc", relay)
    port = service.port()
    assert echo_round_trip(port, b"log me") == b"log me"
    wait_record(log, "registered at")
    assert stop_relay(relay) == 0, relay.proc.describe()

    assert b"".join(relay.proc.raw_stdout) == b""
    before, after = records(rotated), records(log)
    assert any("starting on" in str(r["message"]) for r in before)
    assert not any("registered at" in str(r["message"]) for r in before)
    registered = [r for r in after if "registered at" in str(r["message"])]
    assert len(registered) == 1 and registered[0]["service_port"] == port, after
    assert any("Server Shut Down" in str(r["message"]) for r in after)


# -- SIGHUP ----------------------------------------------------------------------------


def _replace(path: Path, text: str) -> None:
    """Rewrite ``path`` atomically, as a careful operator (or a config manager) does."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_sighup_reloads_secrets_without_dropping_sessions(
    procs: Procs, tmp_path: Path, echo_server
) -> None:  # type: ignore[no-untyped-def]
    """SIGHUP swaps secret A for B without dropping A's live session; an empty or missing file is refused with a log line and B stays."""
    secrets = tmp_path / "secrets"
    secrets.write_text("secret-A\n")
    file_a = tmp_path / "a"
    file_a.write_text("secret-A\n")
    file_b = tmp_path / "b"
    file_b.write_text("secret-B\n")
    relay = start_relay(procs, "--secrets-file", secrets, pool=4, public_host=HOST)

    agent_a = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", file_a, name="agent-a"
    )
    port_a = agent_a.port()
    assert echo_round_trip(port_a, b"before") == b"before"

    _replace(secrets, "# rotated\nsecret-B\n")
    relay.proc.signal(signal.SIGHUP)
    relay.proc.wait_line(r"SIGHUP: reloaded 1 secrets", STARTUP)
    assert echo_round_trip(port_a, b"still here") == b"still here"

    agent_b = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", file_b, name="agent-b"
    )
    port_b = agent_b.port()
    assert echo_round_trip(port_b, b"with B") == b"with B"
    late_a = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", file_a, name="late-agent-a"
    )
    assert late_a.proc.wait_exit(STARTUP) == 3, late_a.proc.describe()

    _replace(secrets, "# nothing here yet\n\n")
    relay.proc.signal(signal.SIGHUP)
    relay.proc.wait_line(r"SIGHUP: secrets file \S+ refused .*keeping 1 old secrets", STARTUP)
    secrets.unlink()
    relay.proc.signal(signal.SIGHUP)
    relay.proc.wait_line(r"SIGHUP: secrets file \S+ refused", STARTUP, count=2)

    agent_b2 = start_agent(
        procs, echo_server.port, relay.address, "--secret-file", file_b, name="agent-b2"
    )
    port_b2 = agent_b2.port()
    assert echo_round_trip(port_b2, b"B survives") == b"B survives"
    assert echo_round_trip(port_a, b"A's session too") == b"A's session too"
    assert len({port_a, port_b, port_b2}) == 3
    assert relay.proc.running and agent_a.proc.running
    assert not agent_a.proc.matching(r"connection lost"), agent_a.proc.describe()
    assert not relay.proc.matching(r"\bleft\b"), relay.proc.describe()
    assert stop_relay(relay) == 0, relay.proc.describe()
