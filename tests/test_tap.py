"""
Tests for the twistd wiring (tcprelay.tap): Options normalisation and
validation, and makeService composing named children without listening.

makeService runs on a MemoryReactorClock: no sockets.
"""

from __future__ import annotations

import gc
import json
import signal
import sys

import pytest
from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python import usage

from tcprelay import process, tap
from tcprelay import _reactor
from tcprelay._reactor import freeze_heap
from tcprelay.relay.pool import PortPool
from tcprelay.relay import daemon
from tcprelay.relay.core import Relay


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_bare_port_becomes_tcp_endpoint() -> None:
    """A bare control port is normalised to a tcp: endpoint string."""
    assert parse("--control", "9000")["control"] == "tcp:9000"


def test_default_control_and_port_range() -> None:
    """Without options the relay controls tcp:8080 and publishes ports 8081..8130."""
    options = parse()
    assert options["control"] == "tcp:8080"
    assert options["ports"] == range(8081, 8131)


def test_default_port_range_follows_control_port() -> None:
    """The default public range is the 50 ports after the control port, whatever its form."""
    assert parse("--control", "9000")["ports"] == range(9001, 9051)
    assert parse("--control", "tcp:port=7000:interface=127.0.0.1")["ports"] == range(7001, 7051)
    assert parse("-c", "tcp:6000")["ports"] == range(6001, 6051)


@pytest.mark.parametrize(
    "value, expected",
    [("20000-20009", range(20000, 20010)), ("30000", range(30000, 30001))],
)
def test_ports_option_parsed(value: str, expected: range) -> None:
    """--ports takes LOW-HIGH or a single port and overrides the default range."""
    assert parse("--control", "9000", "--ports", value)["ports"] == expected


@pytest.mark.parametrize("interface", ["127.0.0.1", "0.0.0.0"])
def test_public_interface_the_machine_has_is_accepted(interface: str) -> None:
    assert parse("--public-interface", interface)["public-interface"] == interface


def test_public_interface_the_machine_lacks_is_refused_with_the_reason() -> None:
    """192.0.2.1 (TEST-NET-1) is no address of this machine: refused at start, saying why."""
    with pytest.raises(usage.UsageError) as info:
        parse("--public-interface", "192.0.2.1")
    assert str(info.value) == (
        "--public-interface '192.0.2.1': cannot listen on it (Cannot assign requested address)"
    )


def test_unix_control_with_ports_is_accepted(tmp_path) -> None:
    """A control endpoint without a TCP port is fine once --ports is given."""
    options = parse("--control", f"unix:{tmp_path}/ctl.sock", "--ports", "20000-20004")
    assert options["ports"] == range(20000, 20005)


def test_numeric_options_converted() -> None:
    """Numeric options are converted to numbers and carried into the RelayConfig."""
    options = parse(
        "--wait-timeout", "2.5",
        "--drain-timeout", "7",
        "--heartbeat-interval", "0.2",
        "--heartbeat-tolerance", "0.6",
        "--receive-window", "131072",
        "--max-streams", "10",
        "--public-interface", "127.0.0.1",
        "--public-host", "relay.example",
    )
    config = options.relay_config()
    assert (config.wait_timeout, config.drain_timeout) == (2.5, 7.0)
    assert (config.public_interface, config.public_host) == ("127.0.0.1", "relay.example")
    assert config.session.receive_window == 131072
    assert config.session.max_streams == 10
    assert (config.session.heartbeat_interval, config.session.heartbeat_tolerance) == (0.2, 0.6)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--ports", "9-3"], "--ports"),
        (["--ports", "abc"], "--ports"),
        (["--ports", "0-10"], "--ports"),
        (["--wait-timeout", "abc"], "--wait-timeout"),
        (["--wait-timeout", "-1"], "--wait-timeout"),
        (["--wait-timeout", "0"], "--wait-timeout"),
        (["--drain-timeout", "x"], "--drain-timeout"),
        (["--bind-retry", "-3"], "--bind-retry"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--heartbeat-tolerance", "never"], "--heartbeat-tolerance"),
        (["--max-streams", "1.5"], "--max-streams"),
        (["--max-streams", "0"], "--max-streams"),
        (["--receive-window", "100"], "--receive-window"),
        (["--receive-window", "4294967296"], "--receive-window"),
        (["--receive-window", "big"], "--receive-window"),
        (["--control", "bogus:1"], "--control"),
        (["--control", "70000"], "port"),
        (["--control", "unix:/tmp/tcprelay-test.sock"], "--ports"),
        (["--control", "65500"], "--ports"),
        (["--metrics", "bogus:1"], "--metrics"),
        (["--busy-poll", "-1"], "--busy-poll"),
        (["--busy-poll", "10001"], "--busy-poll"),
        (["--busy-poll", "soon"], "--busy-poll"),
        (["--public-interface", "192.0.2.1"], "--public-interface"),
        (["--public-interface", "10.0.0.300"], "--public-interface"),
    ],
)
def test_bad_values_raise_usage_error_naming_option(argv: list[str], named: str) -> None:
    """Every bad option value raises UsageError whose message names the option."""
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    assert named in str(info.value)


@pytest.mark.parametrize("argv, seconds", [([], 250e-6), (["--busy-poll", "0"], 0.0),
                                           (["--busy-poll", "75"], 75e-6)])
def test_busy_poll_reaches_the_service_in_seconds(argv: list[str], seconds: float) -> None:
    """--busy-poll is microseconds (default 250, 0 = off) and reaches RelayService."""
    options = parse("--control", "9000", *argv)
    assert options["busy-poll"] == pytest.approx(seconds)
    service = tap.makeService(options, MemoryReactorClock())
    assert service.busy_poll == pytest.approx(seconds)


def test_make_service_children_and_no_listening_until_started() -> None:
    """makeService returns a MultiService with control/pool/public children that listens only once started."""
    reactor = MemoryReactorClock()
    options = parse("--control", "tcp:9000:interface=127.0.0.1", "--ports", "20000-20004")
    service = tap.makeService(options, reactor)
    assert isinstance(service, MultiService)
    assert IServiceCollection.providedBy(service)
    names = {child.name for child in service}
    assert {"control", "pool", "public"} <= names
    assert "metrics" not in names, "no metrics listener unless asked for"
    pool = service.getServiceNamed("pool")
    relay = service.getServiceNamed("public")
    assert isinstance(pool, PortPool)
    assert isinstance(relay, Relay)
    assert relay.pool is pool
    assert pool.ports == list(range(20000, 20005))
    assert reactor.tcpServers == []

    service.startService()
    try:
        # composed (embedded, tests): the process's heap is left alone
        assert not isinstance(service, daemon.RelayDaemon)
        assert (freeze_heap, (), {}) not in reactor.whenRunningHooks
        assert len(reactor.tcpServers) == 1
        port, factory, _backlog, interface = reactor.tcpServers[0]
        assert (port, interface) == (9000, "127.0.0.1")
        assert factory is not None
    finally:
        stopped: list[object] = []
        service.stopService().addBoth(stopped.append)
    assert stopped == [None] or (
        len(stopped) == 1 and isinstance(stopped[0], list) and all(ok for ok, _ in stopped[0])
    ), stopped
    assert not service.running
    assert reactor.getDelayedCalls() == []


def test_make_service_metrics_child_listens_only_when_started() -> None:
    """With --metrics a named ``metrics`` child is added, and it too waits for startService."""
    reactor = MemoryReactorClock()
    options = parse("--control", "9000", "--metrics", "tcp:9100:interface=127.0.0.1")
    service = tap.makeService(options, reactor)
    assert {"control", "pool", "public", "metrics"} <= {child.name for child in service}
    assert reactor.tcpServers == []
    service.startService()
    try:
        assert sorted(entry[0] for entry in reactor.tcpServers) == [9000, 9100]
    finally:
        service.stopService()
    assert not service.running


def test_make_service_accepts_plain_memory_reactor() -> None:
    """Building the service with a bare MemoryReactor composes it without listening."""
    reactor = MemoryReactor()
    service = tap.makeService(parse("--control", "9100"), reactor)
    assert {"control", "pool", "public"} <= {child.name for child in service}
    assert service.getServiceNamed("pool").ports == list(range(9101, 9151))
    assert reactor.tcpServers == []
    assert not service.running


# -- --log-format json and twistd's own log options ---------------------------


def parse_under_twistd(twistd: dict[str, object], *argv: str) -> tap.Options:
    """Parse as twistd does for its subcommand: ``parent`` holds twistd's options."""
    options = tap.Options()
    options.parent = twistd  # type: ignore[attr-defined]
    options.parseOptions(list(argv))
    return options


def _emit(service: object, text: str) -> None:
    observer = service.log_observer  # type: ignore[attr-defined]
    observer(
        {
            "log_format": "{what}",
            "what": text,
            "log_level": LogLevel.info,
            "log_namespace": "test",
            "log_time": 0.0,
        }
    )


@pytest.fixture
def sigusr1_restored():
    """Leave SIGUSR1 as it was (the JSON log file installs a rotate handler)."""
    previous = signal.getsignal(signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_json_logs_go_to_twistds_logfile_with_a_rotate_handler(
    tmp_path, sigusr1_restored, monkeypatch: pytest.MonkeyPatch
) -> None:
    """twistd --logfile F with --log-format json: JSON lines in F (not stdout), and a SIGUSR1 handler like twistd's (the e2e test rotates for real)."""
    from twisted.python.logfile import LogFile

    opened: list[LogFile] = []
    open_log = LogFile.fromFullPath
    monkeypatch.setattr(LogFile, "fromFullPath",
                        lambda path: opened.append(open_log(path)) or opened[-1])
    path = tmp_path / "relay.log"
    options = parse_under_twistd(
        {"nodaemon": True, "logfile": str(path), "syslog": 0}, "--control", "9000",
        "--log-format", "json",
    )
    service = tap.makeService(options, MemoryReactor())
    _emit(service, "first")
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["message"] == "first"
    handler = signal.getsignal(signal.SIGUSR1)
    assert callable(handler)
    for log_file in opened:  # a daemon's stays open until it exits
        log_file.close()


def test_json_logs_go_to_stdout_with_n_and_no_logfile(capsys) -> None:
    """twistd -n without --logfile (and twistd --logfile -): JSON lines on standard output."""
    for twistd in ({"nodaemon": True, "logfile": None, "syslog": 0},
                   {"nodaemon": True, "logfile": "-", "syslog": 0}):
        service = tap.makeService(
            parse_under_twistd(twistd, "--control", "9000", "--log-format", "json"),
            MemoryReactor(),
        )
        _emit(service, "to stdout")
        out = capsys.readouterr().out
        assert json.loads(out)["message"] == "to stdout"


def test_json_logs_without_twistd_go_to_stdout(capsys) -> None:
    """Built without twistd (``twist``, or directly): standard output, no file created."""
    service = tap.makeService(parse("--control", "9000", "--log-format", "json"), MemoryReactor())
    _emit(service, "plain")
    assert json.loads(capsys.readouterr().out)["message"] == "plain"


@pytest.mark.parametrize(
    "twistd, named",
    [
        ({"nodaemon": True, "logfile": None, "syslog": 1}, "syslog"),
        ({"nodaemon": False, "logfile": "-", "syslog": 0}, "stdout"),
    ],
    ids=["syslog", "daemon-to-stdout"],
)
def test_json_logs_refuse_destinations_twistd_would_not_take(
    twistd: dict[str, object], named: str
) -> None:
    """JSON lines cannot go to syslog, and a daemon cannot log to stdout: a usage error, not silence."""
    with pytest.raises(usage.UsageError) as info:
        parse_under_twistd(twistd, "--control", "9000", "--log-format", "json")
    assert named in str(info.value)
    # text logs keep twistd's own handling of these options
    parse_under_twistd(twistd, "--control", "9000")


def test_json_log_file_that_cannot_be_opened_is_one_line_and_exit_1(tmp_path, capsys) -> None:
    """An unwritable --logfile with --log-format json: one line on stderr naming the problem, exit status 1."""
    options = parse_under_twistd(
        {"nodaemon": True, "logfile": str(tmp_path / "missing-dir" / "relay.log"), "syslog": 0},
        "--control", "9000", "--log-format", "json",
    )
    with pytest.raises(SystemExit) as info:
        tap.makeService(options, MemoryReactor())
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("tcprelay: cannot open the log file (") and err.count("\n") == 1


@pytest.mark.parametrize("argv, seconds", [([], 250e-6), (["--busy-poll", "0"], 0.0)])
def test_expose_busy_poll_option(argv: list[str], seconds: float, tmp_path) -> None:
    """``tcprelay expose --busy-poll`` takes the same microseconds as the relay's."""
    from tcprelay.cli import Options as CliOptions

    options = CliOptions()
    options.parseOptions(["expose", "3000", "--relay", "127.0.0.1:9", "--lease-file",
                          str(tmp_path / "lease.json"), *argv])
    assert options.subOptions["busy-poll"] == pytest.approx(seconds)
    with pytest.raises(usage.UsageError, match="--busy-poll"):
        CliOptions().parseOptions(["expose", "3000", "--relay", "127.0.0.1:9",
                                   "--busy-poll", "-5"])


def test_the_daemon_tunes_malloc_and_freezes_its_start_up_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the daemon twistd runs tunes the allocator at start and registers freeze_heap for when the reactor runs; tap.makeService's service does neither."""
    tuned: list[bool] = []
    monkeypatch.setattr(_reactor, "tune_malloc", lambda: tuned.append(True) or True)
    embedded = tap.makeService(parse("--control", "tcp:9000:interface=127.0.0.1"),
                               MemoryReactorClock())
    embedded.startService()
    embedded.stopService()
    assert tuned == [], "an embedded relay leaves the process's allocator alone"
    assert gc.get_threshold()[2] < 1000, "and the garbage collector"
    reactor = MemoryReactorClock()
    service = tap.makeService(parse("--control", "tcp:9000:interface=127.0.0.1"), reactor,
                              service_class=daemon.RelayDaemon)
    previous_hup = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        assert tuned == [True]
        assert (freeze_heap, (), {}) in reactor.whenRunningHooks
        hooks = [hook for hook, _, _ in reactor.whenRunningHooks]
        assert process.collect_old_generation_on_a_clock in hooks
        assert hooks.index(freeze_heap) < hooks.index(process.collect_old_generation_on_a_clock)
        assert signal.getsignal(signal.SIGHUP) is not previous_hup
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) is previous_hup, "the daemon restores SIGHUP on stop"


class _Collector:
    """A stand-in for the ``gc`` module that records what is asked of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.threshold = (700, 10, 10)

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, *threshold: int) -> None:
        self.threshold = threshold  # type: ignore[assignment]

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


def test_the_old_generation_is_collected_on_a_clock() -> None:
    """A daemon's full collections run every OLD_GENERATION_INTERVAL seconds, not on CPython's promotion count (each walked the whole heap every 2-4 s with 10,000 sessions), and freeze what survived, so that the next walks only newer objects; every sweep_every-th unfreezes first and walks everything; the young generations keep their thresholds."""
    collector = _Collector()
    clock = MemoryReactorClock()
    loop = process.collect_old_generation_on_a_clock(clock, 60, 3, collector)
    assert collector.threshold[:2] == (700, 10)
    assert collector.threshold[2] >= 1 << 30
    clock.advance(59)
    assert collector.calls == []
    clock.advance(1)
    assert collector.calls == ["collect", "freeze"]
    clock.advance(60)
    assert collector.calls == ["collect", "freeze"] * 2
    clock.advance(60)
    assert collector.calls == ["collect", "freeze"] * 2 + ["unfreeze", "collect", "freeze"]
    loop.stop()
    clock.advance(600)
    assert len(collector.calls) == 7, "a stopped clock collects no more"


class _Cyclic:
    """An object in a reference cycle with itself."""

    def __init__(self) -> None:
        self.me = self


def test_a_cycle_among_frozen_objects_waits_for_the_full_sweep(no_cyclic_gc: None) -> None:
    """With the real collector: a cycle that dies after a pass froze it outlives the passes that only walk newer objects and is freed by the next full sweep; one made after the pass is freed by the next pass."""
    import weakref

    before = gc.get_threshold()
    clock = MemoryReactorClock()  # only the clock collects: what frees what is known
    try:
        loop = process.collect_old_generation_on_a_clock(clock, 60, 3)
        held = [_Cyclic()]
        old = weakref.ref(held[0])
        clock.advance(60)  # pass 1: ``old`` is alive, and frozen
        held.clear()
        new = _Cyclic()
        young = weakref.ref(new)
        del new
        assert old() is not None and young() is not None
        clock.advance(60)  # pass 2 walks what pass 1 left unfrozen
        assert young() is None
        assert old() is not None, "frozen, the cycle is not walked"
        clock.advance(60)  # pass 3 is a full sweep
        assert old() is None
        loop.stop()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_twistd_plugin_builds_the_daemon() -> None:
    """The twistd plugin's module is the daemon's: its makeService returns a RelayDaemon built from the tap's Options."""
    from twisted.plugins import tcprelay_plugin

    assert tcprelay_plugin.tcprelay_service.module == "tcprelay.relay.daemon"
    assert issubclass(daemon.Options, tap.Options)
    service = daemon.makeService(parse("--control", "tcp:9000:interface=127.0.0.1"))
    assert isinstance(service, daemon.RelayDaemon)


def test_daemon_usage_error_under_twistd_prints_twistds_lines_and_exits_1(monkeypatch, capsys) -> None:
    """Under twistd, a bad option of the daemon's Options prints what twistd prints (its usage, the one-line hint, the error) and exits 1 on every supported Twisted (twistd before 26.10.0 would exit 0)."""
    from twisted.plugins import tcprelay_plugin
    from twisted.scripts.twistd import ServerOptions

    monkeypatch.setattr(sys, "argv", ["twistd", "-n"])
    config = ServerOptions()
    config._getPlugins = lambda interface: [tcprelay_plugin.tcprelay_service]
    with pytest.raises(SystemExit) as info:
        config.parseOptions(["-n", "--pidfile=", "tcprelay", "--ports", "9-3"])
    assert info.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [
        "Run 'twistd tcprelay --help' for every option.",
        "twistd -n: --ports: port range '9-3' must satisfy 1 <= LOW <= HIGH <= 65535",
    ]
    assert out[0].startswith("Usage: ")


def test_daemon_usage_error_without_twistd_is_a_usage_error() -> None:
    """Parsed without twistd (``twist``, a program, a test), the daemon's Options raise UsageError as the tap's do."""
    with pytest.raises(usage.UsageError, match="--ports"):
        daemon.Options().parseOptions(["--ports", "9-3"])
