"""
The benchmark itself: start each stack, measure it with ``goload``, stop it.

Order within a stack: a short warm-up, then the idle-connection hold (first,
so the relay's RSS baseline is that of a fresh process), then throughput
with 1, 8 and 64 connections (the CPU time of every process of the stack and
of the machine is read around each run), then sequential connect latency,
then connections per second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import attrs

from tcprelay.bench.profile import Profiler
from tcprelay.testing import free_port_block

from tcprelay.bench.procs import (
    BenchError,
    Process,
    Processes,
    children_cpu_seconds,
    cpu_seconds,
    fd_count,
    machine_cpu_seconds,
    open_files_limit,
    rss_bytes,
    runqueue_wait,
)

__all__ = ["SCENARIOS", "TESTS", "Settings", "run_benchmark"]

HOST = "127.0.0.1"
SCENARIOS = ("direct", "go-relay", "tcprelay", "expose")
TESTS = ("throughput", "latency", "cps", "hold")
STARTUP_TIMEOUT = 20.0


@attrs.define
class Settings:
    """What one run measures, and how much of it."""

    scenarios: tuple[str, ...] = SCENARIOS
    tests: tuple[str, ...] = TESTS
    conns: tuple[int, ...] = (1, 8, 64)
    throughput_seconds: float = 3.0
    latency_n: int = 1000
    cps_conns: int = 8
    cps_seconds: float = 3.0
    hold_n: int = 10000
    warmup: bool = True
    #: the open-files soft limit tcprelay's relay starts with (it must raise
    #: its own); None: inherit the benchmark's raised limit
    relay_nofile: Optional[tuple[int, int]] = None
    #: record py-spy profiles of tcprelay's processes here (None: do not)
    profile_dir: Optional[Path] = None
    py_spy: str = "py-spy"


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

    Used by :func:`run_benchmark`, one stack at a time; the direct echo
    server is shared by the ``direct`` and ``expose`` stacks.
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

    # ---------------------------------------------------------- processes

    def _python_env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # children run in the log directory: when tcprelay is imported from a
        # source checkout rather than installed, let them find it too
        package_parent = Path(__file__).resolve().parents[2]
        if not {"site-packages", "dist-packages"} & set(package_parent.parts):
            path = env.get("PYTHONPATH", "")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(package_parent), path) if p)
        return env

    def start_echo(self) -> str:
        if self.echo is None or not self.echo.running():
            self.echo = self.processes.start(
                "echo", [self.bin["goload"], "echo", "-listen", f"{HOST}:0"]
            )
            self.echo_address = self.echo.wait_line(r"^LISTEN (\S+)$", STARTUP_TIMEOUT).group(1)
        return self.echo_address

    def start_tcprelay(self, tag: str) -> tuple[Process, int]:
        control = free_port_block(5)
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
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
        proc = self.processes.start(
            f"{tag}-relay", argv, env=self._python_env(), nofile=self.settings.relay_nofile
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
        if name == "tcprelay":
            relay, control = self.start_tcprelay(name)
            return self._behind_relay(name, relay, control)
        if name == "expose":
            echo = self.start_echo()
            relay, control = self.start_tcprelay(name)
            agent = self.processes.start(
                "expose-agent",
                [sys.executable, "-m", "tcprelay.cli", "expose", echo,
                 "--relay", f"{HOST}:{control}",
                 "--lease-file", str(self.processes.logdir / "expose-lease.json")],
                env=self._python_env(),
            )
            address = agent.wait_line(r"^(\S+:\d+)$", STARTUP_TIMEOUT).group(1)
            return Stack(
                name, f"{HOST}:{_port_of(address)}", relay=relay, agent=agent,
                service=self.echo, procs=[agent, relay],
            )
        raise ValueError(f"unknown scenario {name!r}")

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
    def profiled(self, stack: Stack, phase: str) -> Iterator[None]:
        """py-spy on tcprelay's processes for the duration of a phase."""
        s = self.settings
        if s.profile_dir is None or stack.name not in ("tcprelay", "expose"):
            yield
            return
        profilers = [
            (role, Profiler(s.py_spy, proc.pid, s.profile_dir / f"{stack.name}-{role}-{phase}.txt"))
            for role, proc in stack.watched().items()
        ]
        try:
            yield
        finally:
            for role, profiler in profilers:
                summary = profiler.stop()
                if summary is None:
                    self.log(f"  profile of {role} ({phase}): none, see {profiler.log}")
                else:
                    self.log(f"  profile of {role} ({phase}): {profiler.out}")

    def measure(self, stack: Stack) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "address": stack.address,
            "errors": 0,
            "error_messages": [],
            "loadavg_start": os.getloadavg()[0],
        }
        watched = stack.watched()
        for role, proc in watched.items():
            out[f"{role}_pid"] = proc.pid
            limit = open_files_limit(proc.pid)
            if limit is not None:
                out[f"{role}_nofile"] = limit[0]

        def note_errors(what: str, result: dict[str, Any]) -> None:
            if result.get("errors"):
                out["errors"] += result["errors"]
                out["error_messages"].append(
                    f"{what}: {result['errors']} errors, first: {result.get('error')}"
                )

        if s.warmup:
            self.goload(["latency", "-addr", stack.address, "-n", "50"], 60)
            if "throughput" in s.tests:
                self.goload(
                    ["throughput", "-addr", stack.address, "-conns", "1", "-seconds", "0.2"], 60
                )

        if "hold" in s.tests and stack.name != "direct":
            out["hold"] = self.hold(stack)
            note_errors("hold", out["hold"])

        if "throughput" in s.tests:
            with self.profiled(stack, "throughput"):
                self.throughput(stack, out, note_errors)

        if "latency" in s.tests:
            result = self.goload(
                ["latency", "-addr", stack.address, "-n", str(s.latency_n)],
                60 + s.latency_n * 0.05,
            )
            out["latency"] = result
            note_errors("latency", result)
            self.log(f"  latency: p50 {result['p50_us']:.0f} us, p99 {result['p99_us']:.0f} us")

        if "cps" in s.tests:
            with self.profiled(stack, "cps"):
                result = self.goload(
                    ["cps", "-addr", stack.address, "-conns", str(s.cps_conns),
                     "-seconds", f"{s.cps_seconds:g}"],
                    s.cps_seconds + 60,
                )
            out["cps"] = result
            note_errors("cps", result)
            self.log(f"  connections/s ({s.cps_conns} clients): {result['cps']:.0f}")
        out["loadavg_end"] = os.getloadavg()[0]
        return out

    def throughput(
        self, stack: Stack, out: dict[str, Any], note_errors: Callable[[str, dict[str, Any]], None]
    ) -> None:
        """
        Echo throughput per connection count, with the CPU time of every
        process of the stack (relay, agent, service, load client) and of the
        whole machine during each run, and CPU per GB over all of them.
        """
        s = self.settings
        watched = stack.cpu_watched()
        roles = [*watched, "load"]
        totals = {role: 0.0 for role in roles}
        total_bytes = 0
        out["throughput"] = {}
        for n in s.conns:
            before = {role: cpu_seconds(p.pid) for role, p in watched.items()}
            before["load"] = children_cpu_seconds()
            machine_before = machine_cpu_seconds()
            waited = {role: runqueue_wait(p.pid) for role, p in stack.watched().items()}
            result = self.goload(
                ["throughput", "-addr", stack.address, "-conns", str(n),
                 "-seconds", f"{s.throughput_seconds:g}",
                 "-timeout", f"{s.throughput_seconds + 60:g}s"],
                s.throughput_seconds + 120,
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
            for role in roles:
                totals[role] += after[role] - before[role]
            total_bytes += result["bytes"]
            out["throughput"][str(n)] = result
            note_errors(f"throughput x{n}", result)
            self.log(f"  throughput x{n}: {result['mbps']:.1f} MB/s")
        if total_bytes:
            # bytes cross the relay twice: visitor -> service and back
            relayed_gb = 2 * total_bytes / 1e9
            for role in roles:
                out[f"{role}_cpu_s_per_gb"] = totals[role] / relayed_gb
        out["throughput_bytes"] = total_bytes

    def hold(self, stack: Stack) -> dict[str, Any]:
        s = self.settings
        watched = stack.watched()
        base_rss = {role: rss_bytes(p.pid) for role, p in watched.items()}
        base_fds = {role: fd_count(p.pid) for role, p in watched.items()}
        holder = self.processes.start(
            f"{stack.name}-hold",
            [self.bin["goload"], "hold", "-addr", stack.address, "-n", str(s.hold_n),
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


def run_benchmark(
    settings: Settings, binaries: dict[str, Path], processes: Processes, log: Log
) -> dict[str, dict[str, Any]]:
    """Run every scenario of ``settings``; scenario name -> results."""
    runner = Runner(settings, binaries, processes, log)
    results: dict[str, dict[str, Any]] = {}
    for name in settings.scenarios:
        log(f"[{name}]")
        started = time.monotonic()
        stack: Optional[Stack] = None
        before = processes.running()
        try:
            stack = runner.start_stack(name)
            results[name] = runner.measure(stack)
        except BenchError as e:
            log(f"  FAILED: {e}")
            results[name] = {"failed": str(e), "errors": 1}
        finally:
            if stack is not None:
                runner.stop_stack(stack)
            # whatever a failed start left behind (the shared echo server stays)
            for proc in processes.running():
                if proc not in before and proc is not runner.echo:
                    processes.stop(proc)
        results[name]["wall_seconds"] = time.monotonic() - started
    return results
