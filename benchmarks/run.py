"""
The benchmark itself: start every stack, measure them with ``goload`` in
turns, stop them.

Every stack runs from the start to the end of the run, and each measurement
is made for all of them before the next one: the stacks are compared seconds
apart instead of a minute (on a shared VM the machine's speed drifts by tens
of percent within minutes).  Order: a short warm-up of each stack; the
idle-connection hold of each (first, so a relay's RSS baseline is that of a
fresh process); throughput with 1, 8 and 64 connections, each split into
rounds in which the stacks take turns, the order rotating (the CPU time of
every process of the stack and of the machine is read around each run);
sequential connect latency, by one ``goload`` that alternates blocks of
connections between the stacks; connections per second, in rounds like
throughput.  A stack waiting for its turn is idle.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import attrs

from benchmarks.install import Install, current_install
from benchmarks.procs import (
    BenchError,
    Process,
    Processes,
    children_cpu_seconds,
    cpu_seconds,
    fd_count,
    free_port_block,
    machine_cpu_seconds,
    open_files_limit,
    rss_bytes,
    runqueue_wait,
)
from benchmarks.profile import Profiler

__all__ = [
    "BASELINE_OF",
    "DEFAULT_SCENARIOS",
    "PYTHON_STACKS",
    "SCENARIOS",
    "TESTS",
    "Settings",
    "choose_scenarios",
    "run_benchmark",
]

HOST = "127.0.0.1"
DEFAULT_SCENARIOS = ("direct", "go-relay", "tcprelay", "expose")
"""The stacks of a run without ``--baseline-venv``."""
BASELINE_OF = {"tcprelay": "tcprelay-baseline", "expose": "expose-baseline"}
"""The baseline install's counterpart of each tcprelay stack."""
EXTRA_SCENARIOS = ("expose-http", "cluster-local", "cluster-fwd")
"""Stacks run only when named: ``expose-http`` is the ``expose`` stack's
agent on a named HTTP route (the relay's ``--http`` entrance), its visitors
sending a request head with ``Host: echo.bench.test`` first.
``cluster-local`` and ``cluster-fwd`` share a two-node relay cluster (one
``redis-server``) with ``tcprelay expose`` registered at node 1: visitors
of ``cluster-local`` connect to node 1's port, those of ``cluster-fwd`` to
the same port on node 2 (on 127.0.0.2), which forwards them to node 1."""
SCENARIOS = DEFAULT_SCENARIOS + EXTRA_SCENARIOS + tuple(BASELINE_OF.values())
"""Every stack, in the order the stacks start and take turns."""
PYTHON_STACKS = (
    frozenset(BASELINE_OF) | frozenset(BASELINE_OF.values()) | frozenset(EXTRA_SCENARIOS)
)
"""The stacks whose relay (and agent) are tcprelay's Python processes."""
TESTS = ("throughput", "latency", "cps", "hold")
STARTUP_TIMEOUT = 20.0
HTTP_DOMAIN = "bench.test"
"""The relay's ``--domain`` in the ``expose-http`` stack."""
HTTP_NAME = "echo"
"""The name the ``expose-http`` agent claims: visitors ask for Host echo.bench.test."""
NAMED_AGENT = Path(__file__).resolve().with_name("named_agent.py")


def choose_scenarios(requested: Optional[tuple[str, ...]], baseline: bool) -> tuple[str, ...]:
    """
    The stacks of a run, in :data:`SCENARIOS` order: those ``requested``
    (None: :data:`DEFAULT_SCENARIOS`); with a baseline install and no
    baseline stack named, each tcprelay stack's baseline counterpart is
    added.  BenchError for a baseline stack without a baseline install.
    """
    chosen = set(requested or DEFAULT_SCENARIOS)
    named = chosen & set(BASELINE_OF.values())
    if named and not baseline:
        raise BenchError(f"{', '.join(sorted(named))} needs --baseline-venv")
    if baseline and not named:
        chosen |= {BASELINE_OF[name] for name in chosen if name in BASELINE_OF}
    return tuple(name for name in SCENARIOS if name in chosen)


@attrs.define
class Settings:
    """What one run measures, and how much of it."""

    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    tests: tuple[str, ...] = TESTS
    conns: tuple[int, ...] = (1, 8, 64)
    throughput_seconds: float = 3.0
    latency_n: int = 1000
    cps_conns: int = 8
    cps_seconds: float = 3.0
    hold_n: int = 10000
    warmup: bool = True
    #: throughput and connections-per-second runs are split into this many
    #: rounds, in which the stacks take turns
    rounds: int = 3
    #: latency: connections to one stack before the next takes its turn
    latency_block: int = 50
    #: the open-files soft limit tcprelay's relay starts with (it must raise
    #: its own); None: inherit the benchmark's raised limit
    relay_nofile: Optional[tuple[int, int]] = None
    #: every stack's visitors send the request head of ``expose-http``'s
    #: visitors first (port routes pass it on to the echo service like any
    #: bytes): the same round trips everywhere, so that a ratio against
    #: ``expose-http`` is the routing's cost alone
    head_all: bool = False
    #: record py-spy profiles of tcprelay's processes here (None: do not)
    profile_dir: Optional[Path] = None
    py_spy: str = "py-spy"
    #: the tcprelay measured by the ``tcprelay`` and ``expose`` stacks (None:
    #: this checkout's, run by this Python)
    current: Optional[Install] = None
    #: the older tcprelay of the ``*-baseline`` stacks (``--baseline-venv``)
    baseline: Optional[Install] = None


Log = Callable[[str], None]


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@attrs.define
class Stack:
    """A running scenario: where visitors connect and which pids to watch."""

    name: str
    address: str
    relay: Optional[Process] = None
    agent: Optional[Process] = None
    #: the echo service behind the relay (or the echo server itself)
    service: Optional[Process] = None
    procs: list[Process] = attrs.Factory(list)
    #: the Host every visitor names in a request head first (named HTTP
    #: routes; None: visitors send their bytes straight away)
    host: Optional[str] = None

    def host_args(self) -> list[str]:
        """goload's ``-host`` option for this stack (none without a host)."""
        return ["-host", self.host] if self.host else []

    def watched(self) -> dict[str, Process]:
        """The relay path's processes (relay, agent): RSS, fds, profiles."""
        found = {}
        if self.relay is not None:
            found["relay"] = self.relay
        if self.agent is not None:
            found["agent"] = self.agent
        return found

    def cpu_watched(self) -> dict[str, Process]:
        """Every long-running process of the stack whose CPU time counts."""
        found = self.watched()
        if self.service is not None:
            found["service"] = self.service
        return found


class Runner:
    """Starts the stacks of a run and measures them with ``goload``.

    Used by :func:`run_benchmark`; the direct echo server is shared by the
    ``direct`` and ``expose`` stacks.
    """

    def __init__(
        self,
        settings: Settings,
        binaries: dict[str, Path],
        processes: Processes,
        log: Log,
    ) -> None:
        self.settings = settings
        self.bin = binaries
        self.processes = processes
        self.log = log
        self.echo: Optional[Process] = None
        self.echo_address = ""
        self.cluster: Optional[dict[str, Any]] = None

    # ---------------------------------------------------------- processes

    def install_of(self, name: str) -> Install:
        """The tcprelay install a stack runs: the baseline's or the current one."""
        if name in BASELINE_OF.values():
            if self.settings.baseline is None:
                raise BenchError(f"{name} needs --baseline-venv")
            return self.settings.baseline
        if self.settings.current is None:
            self.settings.current = current_install()
        return self.settings.current

    def start_echo(self) -> str:
        if self.echo is None or not self.echo.running():
            self.echo = self.processes.start(
                "echo", [self.bin["goload"], "echo", "-listen", f"{HOST}:0"]
            )
            self.echo_address = self.echo.wait_line(r"^LISTEN (\S+)$", STARTUP_TIMEOUT).group(1)
        return self.echo_address

    def start_tcprelay(
        self, tag: str, install: Install, http: bool = False
    ) -> tuple[Process, int]:
        """``twistd -n tcprelay`` of ``install`` on a fresh control port;
        with ``http`` also a shared HTTP entrance on the control port + 5
        (domain :data:`HTTP_DOMAIN`)."""
        control = free_port_block(6 if http else 5)
        argv = [
            *install.twistd,
            "-n",
            "--pidfile=",
            "tcprelay",
            "--control",
            f"tcp:{control}:interface={HOST}",
            "--ports",
            f"{control + 1}-{control + 4}",
            "--public-interface",
            HOST,
            "--drain-timeout",
            "1",
        ]
        if http:
            argv += ["--http", f"tcp:{control + 5}:interface={HOST}", "--domain", HTTP_DOMAIN]
        proc = self.processes.start(
            f"{tag}-relay", argv, env=install.env, nofile=self.settings.relay_nofile
        )
        proc.wait_line(rf"starting on {control}\b", STARTUP_TIMEOUT)
        return proc, control

    def start_stack(self, name: str) -> Stack:
        if name == "direct":
            return Stack(name, self.start_echo(), service=self.echo)
        if name == "go-relay":
            control = free_port_block(5)
            relay = self.processes.start(
                "go-relay-relay",
                [self.bin["legacyrelay"], "-listen", f"{HOST}:{control}", "-max", "4",
                 "-bind-host", HOST, "-timeout", "0"],
            )
            relay.wait_line(r"^LISTEN ", STARTUP_TIMEOUT)
            return self._behind_relay(name, relay, control)
        if name in ("tcprelay", "tcprelay-baseline"):
            relay, control = self.start_tcprelay(name, self.install_of(name))
            return self._behind_relay(name, relay, control)
        if name in ("expose", "expose-baseline"):
            install = self.install_of(name)
            echo = self.start_echo()
            relay, control = self.start_tcprelay(name, install)
            agent = self.processes.start(
                f"{name}-agent",
                [*install.tcprelay, "expose", echo,
                 "--relay", f"{HOST}:{control}",
                 "--lease-file", str(self.processes.logdir / f"{name}-lease.json")],
                env=install.env,
            )
            address = agent.wait_line(r"^(\S+:\d+)$", STARTUP_TIMEOUT).group(1)
            return Stack(
                name, f"{HOST}:{_port_of(address)}", relay=relay, agent=agent,
                service=self.echo, procs=[agent, relay],
            )
        if name == "expose-http":
            install = self.install_of(name)
            echo = self.start_echo()
            relay, control = self.start_tcprelay(name, install, http=True)
            agent = self.processes.start(
                f"{name}-agent",
                [*self.http_agent(install), echo,
                 "--relay", f"{HOST}:{control}", "--http", HTTP_NAME,
                 "--lease-file", str(self.processes.logdir / f"{name}-lease.json")],
                env=install.env,
            )
            agent.wait_line(r"^http://\S+$", STARTUP_TIMEOUT)
            return Stack(
                name, f"{HOST}:{control + 5}", relay=relay, agent=agent,
                service=self.echo, procs=[agent, relay],
                host=f"{HTTP_NAME}.{HTTP_DOMAIN}",
            )
        if name in ("cluster-local", "cluster-fwd"):
            cluster = self.start_cluster(self.install_of(name))
            port = cluster["port"]
            if name == "cluster-local":
                return Stack(
                    name, f"{HOST}:{port}", relay=cluster["node1"], agent=cluster["agent"],
                    service=self.echo, procs=cluster["procs"],
                )
            return Stack(name, f"127.0.0.2:{port}", relay=cluster["node2"], service=self.echo)
        raise ValueError(f"unknown scenario {name!r}")

    def start_cluster(self, install: Install) -> dict[str, Any]:
        """
        Once per run: ``redis-server`` on a free port, two ``twistd tcprelay
        --cluster`` nodes sharing one public port range (node 1 on
        127.0.0.1, node 2 on 127.0.0.2) and ``tcprelay expose`` of the echo
        server at node 1.  Node 2 forwards that port's visitors to node 1.
        """
        if self.cluster is not None:
            return self.cluster
        redis = shutil.which("redis-server")
        if redis is None:
            raise BenchError("the cluster stacks need redis-server (apt-get install redis-server)")
        echo = self.start_echo()
        base = free_port_block(11)
        redis_port, ports = base, f"{base + 1}-{base + 4}"
        logdir = self.processes.logdir
        secret = logdir / "cluster-secret"
        secret.write_text("benchmark cluster secret\n")
        redis_proc = self.processes.start(
            "cluster-redis",
            [redis, "--port", str(redis_port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(logdir)],
        )
        redis_proc.wait_line(r"Ready to accept connections", STARTUP_TIMEOUT)
        nodes = []
        for index in (1, 2):
            control = base + 3 + 2 * index
            link = control + 1
            argv = [
                *install.twistd, "-n", "--pidfile=", "tcprelay",
                "--control", f"tcp:{control}:interface={HOST}",
                "--ports", ports,
                "--public-interface", f"127.0.0.{index}",
                "--drain-timeout", "1",
                "--cluster", f"redis://{HOST}:{redis_port}/0",
                "--node-name", f"node{index}",
                "--node-address", f"{HOST}:{link}",
                "--cluster-secret", str(secret),
            ]
            node = self.processes.start(
                f"cluster-node{index}", argv, env=install.env, nofile=self.settings.relay_nofile
            )
            nodes.append((node, control))
        for node, control in nodes:
            node.wait_line(rf"starting on {control}\b", STARTUP_TIMEOUT)
            node.wait_line(r"cluster: node \S+ connected to Redis", STARTUP_TIMEOUT)
        (node1, control1), (node2, _) = nodes
        agent = self.processes.start(
            "cluster-agent",
            [*install.tcprelay, "expose", echo,
             "--relay", f"{HOST}:{control1}",
             "--lease-file", str(logdir / "cluster-lease.json")],
            env=install.env,
        )
        address = agent.wait_line(r"^(\S+:\d+)$", STARTUP_TIMEOUT).group(1)
        port = _port_of(address)
        # node 2 listens on the port once node 1's claim is announced
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.2", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"node 2 does not forward port {port}") from None
                time.sleep(0.05)
        self.cluster = {
            "node1": node1, "node2": node2, "agent": agent, "port": port,
            "procs": [agent, node2, node1, redis_proc],
        }
        return self.cluster

    def http_agent(self, install: Install) -> list[str]:
        """
        The argv prefix of ``tcprelay expose`` with ``--http NAME``: the
        install's own command when its ``expose --help`` lists ``--http``,
        else ``benchmarks/named_agent.py`` (the same ``tcprelay expose``
        code, its agent asking for a name) run by the install's Python.
        """
        try:
            helped = subprocess.run(
                [*install.tcprelay, "expose", "--help"], env=install.env,
                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=60, check=False,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            helped = ""
        if "--http" in helped:
            return [*install.tcprelay, "expose"]
        return [install.python, str(NAMED_AGENT)]

    def _behind_relay(self, name: str, relay: Process, control: int) -> Stack:
        """The Go echo service registered with ``relay``; the stack visitors use."""
        service = self.processes.start(
            f"{name}-echosvc",
            [self.bin["echosvc"], "-relay", f"{HOST}:{control}", "-timeout", "0"],
        )
        address = service.wait_line(r"^ADDRESS (\S+)$", STARTUP_TIMEOUT).group(1)
        return Stack(
            name, f"{HOST}:{_port_of(address)}", relay=relay, service=service,
            procs=[service, relay],
        )

    def stop_stack(self, stack: Stack) -> None:
        for proc in stack.procs:
            self.processes.stop(proc)

    # ------------------------------------------------------------- goload

    def goload(self, args: list[str], timeout: float) -> dict[str, Any]:
        argv = [str(self.bin["goload"]), *args]
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"goload {args[0]} took more than {timeout:.0f}s") from e
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise BenchError(
                f"goload {' '.join(args)} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    # --------------------------------------------------------- measuring

    @contextmanager
    def profiled(self, stacks: list[Stack], phase: str) -> Iterator[None]:
        """py-spy on tcprelay's processes for the duration of a phase (a
        stack waiting for its turn is idle and adds no samples)."""
        s = self.settings
        if s.profile_dir is None:
            yield
            return
        profilers = [
            (f"{stack.name} {role}",
             Profiler(s.py_spy, proc.pid, s.profile_dir / f"{stack.name}-{role}-{phase}.txt"))
            for stack in stacks
            if stack.name in PYTHON_STACKS
            for role, proc in stack.watched().items()
        ]
        try:
            yield
        finally:
            for who, profiler in profilers:
                summary = profiler.stop()
                if summary is None:
                    self.log(f"  profile of {who} ({phase}): none, see {profiler.log}")
                else:
                    self.log(f"  profile of {who} ({phase}): {profiler.out}")

    def describe(self, stack: Stack) -> dict[str, Any]:
        """A stack's result record, before any measurement."""
        out: dict[str, Any] = {
            "address": stack.address,
            "errors": 0,
            "error_messages": [],
            "loadavg_start": os.getloadavg()[0],
        }
        if stack.host:
            out["host"] = stack.host
        for role, proc in stack.watched().items():
            out[f"{role}_pid"] = proc.pid
            limit = open_files_limit(proc.pid)
            if limit is not None:
                out[f"{role}_nofile"] = limit[0]
        return out

    def warm_up(self, stack: Stack) -> None:
        self.goload(["latency", "-addr", stack.address, *stack.host_args(), "-n", "50"], 60)
        if "throughput" in self.settings.tests:
            self.goload(
                ["throughput", "-addr", stack.address, *stack.host_args(),
                 "-conns", "1", "-seconds", "0.2"], 60
            )

    def throughput_round(self, stack: Stack, seconds: float, n: int) -> dict[str, Any]:
        """
        One echo throughput run with ``n`` connections, with the CPU time of
        every process of the stack (relay, agent, service, load client) and
        of the whole machine during it.
        """
        watched = stack.cpu_watched()
        roles = [*watched, "load"]
        before = {role: cpu_seconds(p.pid) for role, p in watched.items()}
        before["load"] = children_cpu_seconds()
        machine_before = machine_cpu_seconds()
        waited = {role: runqueue_wait(p.pid) for role, p in stack.watched().items()}
        result = self.goload(
            ["throughput", "-addr", stack.address, *stack.host_args(), "-conns", str(n),
             "-seconds", f"{seconds:g}", "-timeout", f"{seconds + 60:g}s"],
            seconds + 120,
        )
        machine_after = machine_cpu_seconds()
        after = {role: cpu_seconds(p.pid) for role, p in watched.items()}
        after["load"] = children_cpu_seconds()
        result["cpu_seconds"] = {role: after[role] - before[role] for role in roles}
        if machine_before is not None and machine_after is not None:
            busy, idle, softirq = (a - b for a, b in zip(machine_after, machine_before))
            result["machine_cpu_seconds"] = {"busy": busy, "idle": idle, "softirq": softirq}
        result["runqueue_wait_seconds"] = {}
        for role, proc in stack.watched().items():
            now, then = runqueue_wait(proc.pid), waited[role]
            if now is not None and then is not None:
                result["runqueue_wait_seconds"][role] = now - then
        return result

    def cps_round(self, stack: Stack, seconds: float) -> dict[str, Any]:
        s = self.settings
        return self.goload(
            ["cps", "-addr", stack.address, *stack.host_args(),
             "-conns", str(s.cps_conns), "-seconds", f"{seconds:g}"],
            seconds + 60,
        )

    def latency(self, stacks: list[Stack]) -> list[dict[str, Any]]:
        """
        Sequential connect + 1-byte echo + close, ``latency_n`` times per
        stack, by one ``goload`` that has the stacks take turns in blocks of
        ``latency_block`` connections (the order rotating every round); one
        result per stack, in order.
        """
        s = self.settings
        result = self.goload(
            ["latency", "-addr", ",".join(stack.address for stack in stacks),
             *latency_host_args(stacks),
             "-n", str(s.latency_n), "-block", str(s.latency_block)],
            60 + len(stacks) * s.latency_n * 0.05,
        )
        if len(stacks) == 1:
            return [result]
        found: list[dict[str, Any]] = result["results"]
        if len(found) != len(stacks):
            raise BenchError(f"goload latency gave {len(found)} results for {len(stacks)} stacks")
        return found

    def hold(self, stack: Stack) -> dict[str, Any]:
        s = self.settings
        watched = stack.watched()
        base_rss = {role: rss_bytes(p.pid) for role, p in watched.items()}
        base_fds = {role: fd_count(p.pid) for role, p in watched.items()}
        holder = self.processes.start(
            f"{stack.name}-hold",
            [self.bin["goload"], "hold", "-addr", stack.address, *stack.host_args(),
             "-n", str(s.hold_n),
             "-timeout", f"{60 + s.hold_n / 100:g}s"],
            stdin_pipe=True,
        )
        try:
            line = holder.wait_line(r"^\{.*\}$", 90 + s.hold_n / 100).group(0)
            result: dict[str, Any] = json.loads(line)
            time.sleep(0.5)  # let the last streams settle in the relay
            for role, proc in watched.items():
                rss = rss_bytes(proc.pid)
                result[f"{role}_rss_base"] = base_rss[role]
                result[f"{role}_rss_held"] = rss
                result[f"{role}_fds_held"] = fd_count(proc.pid)
                if result["held"]:
                    result[f"{role}_bytes_per_conn"] = (rss - base_rss[role]) / result["held"]
        finally:
            self.processes.stop(holder, grace=10)
        self.log(
            f"  hold: {result['held']} held, {result['errors']} errors in {result['seconds']:.1f}s"
            + "".join(
                f", {role} {result[f'{role}_bytes_per_conn'] / 1024:.1f} KiB/conn"
                for role in watched
                if f"{role}_bytes_per_conn" in result
            )
        )
        # wait (bounded) until the relay has let go of the connections
        deadline = time.monotonic() + 30
        for role, proc in watched.items():
            while time.monotonic() < deadline and fd_count(proc.pid) > base_fds[role] + 16:
                time.sleep(0.1)
        result["settled"] = all(
            fd_count(p.pid) <= base_fds[role] + 16 for role, p in watched.items()
        )
        return result


def latency_host_args(stacks: list[Stack]) -> list[str]:
    """goload latency's ``-host`` list for ``stacks`` (one entry per
    address, empty where a stack has no host); none if no stack has one."""
    if not any(stack.host for stack in stacks):
        return []
    return ["-host", ",".join(stack.host or "" for stack in stacks)]


def _rotated(items: list[Any], by: int) -> list[Any]:
    """``items`` starting at index ``by`` (modulo its length), wrapping round."""
    if not items:
        return []
    by %= len(items)
    return items[by:] + items[:by]


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One throughput or cps figure from the rounds of a stack: bytes (or
    connections) and seconds added up, CPU times added up, errors counted."""
    merged: dict[str, Any] = {
        "seconds": sum(r["seconds"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "rounds": len(rounds),
    }
    errors = [r["error"] for r in rounds if r.get("error")]
    if errors:
        merged["error"] = errors[0]
    if "bytes" in rounds[0]:
        merged["bytes"] = sum(r["bytes"] for r in rounds)
        merged["conns"] = rounds[0]["conns"]
        merged["mbps"] = merged["bytes"] / merged["seconds"] / 1e6 if merged["seconds"] else 0.0
        merged["round_mbps"] = [r["mbps"] for r in rounds]
    else:
        merged["completed"] = sum(r["completed"] for r in rounds)
        merged["cps"] = merged["completed"] / merged["seconds"] if merged["seconds"] else 0.0
        merged["round_cps"] = [r["cps"] for r in rounds]
    for key in ("cpu_seconds", "machine_cpu_seconds", "runqueue_wait_seconds"):
        if all(key in r for r in rounds):
            total: dict[str, float] = {}
            for r in rounds:
                for role, value in r[key].items():
                    total[role] = total.get(role, 0.0) + value
            merged[key] = total
    return merged


class _Run:
    """
    One benchmark run: every stack started at once, then each measurement
    made for every stack in turn, so that the stacks are measured seconds
    apart rather than minutes (this shared VM's speed drifts by tens of
    percent within minutes).  Throughput and connections per second are
    split into rounds in which the stacks take turns (the order rotating);
    latency is one ``goload`` alternating blocks of connections.  A stack
    whose start or measurement fails is stopped and reported as failed; the
    others go on.
    """

    def __init__(self, runner: Runner, log: Log) -> None:
        self.runner = runner
        self.settings = runner.settings
        self.log = log
        self.stacks: dict[str, Stack] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def live(self) -> list[Stack]:
        return list(self.stacks.values())

    def fail(self, name: str, e: BenchError) -> None:
        self.log(f"  {name}: FAILED: {e}")
        result = self.results.setdefault(name, {})
        result["failed"] = str(e)
        result["errors"] = result.get("errors", 0) + 1
        stack = self.stacks.pop(name, None)
        if stack is not None:
            self.runner.stop_stack(stack)

    def note_errors(self, name: str, what: str, result: dict[str, Any]) -> None:
        if result.get("errors"):
            out = self.results[name]
            out["errors"] += result["errors"]
            out["error_messages"].append(
                f"{what}: {result['errors']} errors, first: {result.get('error')}"
            )

    def each(self, step: Callable[[Stack], None]) -> None:
        """``step`` for every live stack; a stack whose step fails is dropped."""
        for stack in self.live():
            try:
                step(stack)
            except BenchError as e:
                self.fail(stack.name, e)

    def start(self, processes: Processes) -> None:
        for name in self.settings.scenarios:
            self.log(f"[{name}] starting")
            before = processes.running()
            try:
                stack = self.runner.start_stack(name)
            except BenchError as e:
                self.results[name] = {}
                self.fail(name, e)
                # whatever the failed start left behind (the shared echo server stays)
                for proc in processes.running():
                    if proc not in before and proc is not self.runner.echo:
                        processes.stop(proc)
                continue
            if self.settings.head_all and stack.host is None:
                stack.host = f"{HTTP_NAME}.{HTTP_DOMAIN}"
            self.stacks[name] = stack
            self.results[name] = self.runner.describe(stack)

    def rounds(
        self, what: str, measure: Callable[[Stack, float], dict[str, Any]], seconds: float
    ) -> dict[str, dict[str, Any]]:
        """``measure`` every live stack in turns; name -> merged result."""
        count = max(1, self.settings.rounds)
        found: dict[str, list[dict[str, Any]]] = {}
        for r in range(count):
            for stack in _rotated(self.live(), r):
                try:
                    found.setdefault(stack.name, []).append(measure(stack, seconds / count))
                except BenchError as e:
                    found.pop(stack.name, None)
                    self.fail(stack.name, e)
        merged = {}
        for name, results in found.items():
            if name in self.stacks:
                merged[name] = _merge_rounds(results)
                self.note_errors(name, what, merged[name])
        return merged

    def measure(self) -> None:
        s = self.settings
        runner = self.runner
        if s.warmup:
            self.log("warming up")
            self.each(runner.warm_up)

        if "hold" in s.tests:
            def hold(stack: Stack) -> None:
                if stack.name == "direct":
                    return
                self.log(f"[{stack.name}] hold")
                result = runner.hold(stack)
                self.results[stack.name]["hold"] = result
                self.note_errors(stack.name, "hold", result)

            self.each(hold)

        if "throughput" in s.tests:
            with runner.profiled(self.live(), "throughput"):
                for n in s.conns:
                    merged = self.rounds(
                        f"throughput x{n}",
                        functools.partial(runner.throughput_round, n=n),
                        s.throughput_seconds,
                    )
                    for name, result in merged.items():
                        self.results[name].setdefault("throughput", {})[str(n)] = result
                    self.log(f"throughput x{n}: " + ", ".join(
                        f"{name} {result['mbps']:.1f}" for name, result in merged.items()
                    ) + " MB/s")
            for name in self.stacks:
                self._cpu_per_gb(self.results[name])

        if "latency" in s.tests and self.stacks:
            stacks = self.live()
            try:
                found = runner.latency(stacks)
            except BenchError as e:
                for stack in stacks:
                    self.note_errors(stack.name, "latency", {"errors": 1, "error": str(e)})
            else:
                for stack, result in zip(stacks, found):
                    self.results[stack.name]["latency"] = result
                    self.note_errors(stack.name, "latency", result)
                self.log("latency p50/p99: " + ", ".join(
                    f"{stack.name} {result['p50_us']:.0f}/{result['p99_us']:.0f} us"
                    for stack, result in zip(stacks, found)
                ))

        if "cps" in s.tests:
            with runner.profiled(self.live(), "cps"):
                merged = self.rounds("cps", runner.cps_round, s.cps_seconds)
            for name, result in merged.items():
                self.results[name]["cps"] = result
            self.log(f"connections/s ({s.cps_conns} clients): " + ", ".join(
                f"{name} {result['cps']:.0f}" for name, result in merged.items()
            ))
        for name in self.stacks:
            self.results[name]["loadavg_end"] = os.getloadavg()[0]

    @staticmethod
    def _cpu_per_gb(out: dict[str, Any]) -> None:
        """CPU seconds per GB relayed for each role, over every throughput run."""
        runs = out.get("throughput", {}).values()
        total_bytes = sum(run["bytes"] for run in runs)
        out["throughput_bytes"] = total_bytes
        if not total_bytes:
            return
        totals: dict[str, float] = {}
        for run in runs:
            for role, seconds in run.get("cpu_seconds", {}).items():
                totals[role] = totals.get(role, 0.0) + seconds
        # bytes cross the relay twice: visitor -> service and back
        relayed_gb = 2 * total_bytes / 1e9
        for role, seconds in totals.items():
            out[f"{role}_cpu_s_per_gb"] = seconds / relayed_gb

    def stop(self) -> None:
        for name in list(self.stacks):
            self.runner.stop_stack(self.stacks.pop(name))


def run_benchmark(
    settings: Settings, binaries: dict[str, Path], processes: Processes, log: Log
) -> dict[str, dict[str, Any]]:
    """Run every scenario of ``settings``; scenario name -> results."""
    run = _Run(Runner(settings, binaries, processes, log), log)
    try:
        run.start(processes)
        run.measure()
    finally:
        run.stop()
    return {name: run.results[name] for name in settings.scenarios if name in run.results}
