"""
``python -m benchmarks.capacity``: how far one relay node goes (issue 19,
"one node's capacity"), this checkout's tcprelay and the Go relay
(``legacyrelay``) one after the other in the same run.

``idle``
    ``--visitors`` (100,000) concurrent idle visitor connections to one
    service.  The far side is ``echosvc``, a Go muxado v1 service that
    accepts every stream and holds it with no TCP connection of its own, so
    the relay's own cost per visitor is what is measured: one visitor
    socket and one muxado stream.  ``goload hold -src 127.0.0.0/8`` binds
    each visitor socket to the next loopback address before it connects
    (ephemeral ports would run out at about 28,000 otherwise), echoes one
    byte on each (the whole path is up) and holds them.  Figures: visitors
    held, errors, relay RSS growth per visitor (target <= 4 KiB), the
    service's, a short connect + echo latency probe while they are held,
    and whether the relay's descriptors go back to their baseline when the
    visitors leave.
``sessions``
    ``--sessions`` (10,000) concurrent agent sessions (``goload sessions hold``):
    each one a muxado v1 session with heartbeats both ways (the relay's
    every 3 s echoed by the agent, the agent's every 3 s echoed by the
    relay; 13 s without an echo ends a session), registered with a public
    port, held for ``--hold`` seconds.  Figures: sessions opened, lost
    while held, heartbeat timeouts (the agents' view and, for tcprelay,
    the relay's ``/status``), heartbeat round trip p50/p99/max as the
    agents saw it while the sessions were held (and p50/p99 while they were
    being opened), relay RSS growth per session, relay CPU while held.
``soak``
    ``--duration`` seconds (1800) of churn against both relays at once:
    ``goload churn`` visitors (``--visitor-rate`` per second) on a steady
    echo service and ``goload sessions churn`` agent sessions coming and going
    (``--session-conns`` at a time, each living 0.2-3 s).  The relays' RSS
    and descriptors are sampled every ``--sample`` seconds.  Figures: RSS
    growth over the second half against the first half after a warm-up
    (target: within 10%), descriptors after the load stopped against
    before it started (target: back to baseline).

Every relay gets ``--ports`` and limits wide enough for the load (the
command lines are in the JSON), and a hard RLIMIT_NOFILE of
:data:`NOFILE`; tcprelay's daemon raises its own soft limit to it
(:mod:`tcprelay.process`), the Go programs do the same themselves (Go 1.19
and later).  Every load process is bounded in count and time; every
process is stopped on the way out.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import attrs

from benchmarks import gotools
from benchmarks.cli import _positive
from benchmarks.install import Install, baseline_install, current_install
from benchmarks.procs import (
    BenchError,
    Process,
    Processes,
    cpu_seconds,
    fd_count,
    free_port_block,
    open_files_limit,
    rss_bytes,
)
from benchmarks.report import machine_info

__all__ = ["PROG", "main", "plateau"]

PROG = "python -m benchmarks.capacity"
HOST = "127.0.0.1"
SOURCES = "127.0.0.0/8"
PROGRAMS = ("goload", "legacyrelay", "echosvc")
NOFILE = 1 << 20
"""Hard open-files limit the benchmark gives itself and every process
(fs.nr_open's default; raising a hard limit needs root or CAP_SYS_RESOURCE)."""
STARTUP = 30.0
RELAYS = ("go-relay", "tcprelay", "tcprelay-http", "tcprelay-baseline")
"""tcprelay-http: the sessions test only, each session claiming a named HTTP
route in the extended dialect (no public port, so no listening socket).
tcprelay-baseline: the tcprelay installed in ``--baseline-venv`` (an older
commit), measured like tcprelay."""
HTTP_DOMAIN = "bench.test"


def plateau(samples: list[tuple[float, int]], warmup: float) -> dict[str, Any]:
    """
    RSS growth over a soak: ``samples`` are (seconds since the load
    started, RSS bytes).  After ``warmup`` seconds, the rest is split in
    two halves; ``growth`` is the largest RSS of the second half over the
    largest of the first (1.0: flat; the target is at most 1.10).
    """
    after = [(t, r) for t, r in samples if t >= warmup]
    if len(after) < 2:
        return {"growth": None, "first_max": None, "second_max": None}
    mid = (after[0][0] + after[-1][0]) / 2
    first = [r for t, r in after if t <= mid]
    second = [r for t, r in after if t > mid] or first[-1:]
    return {
        "growth": max(second) / max(first),
        "first_max": max(first),
        "second_max": max(second),
        "final": after[-1][1],
    }


def port_block(count: int, host: str = HOST, attempts: int = 300) -> int:
    """
    The first of ``count`` consecutive ports free on ``host``:
    :func:`benchmarks.procs.free_port_block` (below the ephemeral range)
    when it finds one, else anywhere from 10000 up.  A block of 10,000
    rarely fits below the ephemeral range of a busy machine; inside it, the
    load clients cannot take the relay's ports from it, as they bind their
    sockets to other loopback addresses (``-src``) than the relay's
    127.0.0.1.
    """
    try:
        return free_port_block(count, host, attempts=20)
    except BenchError:
        return free_port_block(count, host, attempts, lowest=10000)


def thin(samples: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``samples``, evenly spaced, the last one kept
    (the JSON of a 30-minute soak stays small)."""
    if len(samples) <= most:
        return samples
    step = len(samples) / (most - 1)
    return [samples[int(i * step)] for i in range(most - 1)] + [samples[-1]]


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@attrs.define
class Relay:
    name: str
    proc: Process
    control: int
    metrics: Optional[int] = None
    service: Optional[Process] = None
    address: Optional[str] = None  # the service's public host:port

    def status(self) -> Optional[dict[str, Any]]:
        """tcprelay's /status (None for the Go relay, or when it fails)."""
        if self.metrics is None:
            return None
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics}/status", timeout=10) as r:
                result: dict[str, Any] = json.load(r)
                return result
        except (OSError, ValueError):
            return None


class Capacity:
    def __init__(self, args: argparse.Namespace, bins: dict[str, Path],
                 processes: Processes, log: Callable[[str], None]) -> None:
        self.args = args
        self.bin = bins
        self.processes = processes
        self.log = log
        self.install: Install = current_install()
        self.baseline: Optional[Install] = (
            baseline_install(Path(args.baseline_venv)) if args.baseline_venv else None
        )
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # what one process can hold under the hard limit (raising it needs
        # CAP_SYS_RESOURCE): a visitor is one descriptor in the relay (and
        # in the load client), a legacy session two (its socket and its
        # public port's listening socket)
        self.limit = (self.hard, self.hard)
        self.max_visitors = self.hard - 500
        self.port_sessions = (self.hard - 500) // 2

    def visitors(self) -> int:
        n = int(self.args.visitors)
        if n > self.max_visitors:
            self.log(f"  {n} visitors need {n} descriptors in the relay, above the hard "
                     f"open-files limit {self.hard} (raising it needs CAP_SYS_RESOURCE): "
                     f"measuring {self.max_visitors}")
            n = self.max_visitors
        return n

    # ------------------------------------------------------------ relays

    def start_relay(self, name: str, ports: int, tag: str = "") -> Relay:
        """A relay with room for ``ports`` services, no service yet."""
        label = f"{name}{tag}"
        control = port_block(ports + 3)
        if name == "go-relay":
            proc = self.processes.start(
                f"{label}-relay",
                [self.bin["legacyrelay"], "-listen", f"{HOST}:{control}", "-max", str(ports),
                 "-bind-host", HOST, "-timeout", "0"],
                nofile=self.limit,
            )
            proc.wait_line(r"^LISTEN ", STARTUP)
            return Relay(label, proc, control)
        metrics = control + ports + 1
        install = self.baseline if name == "tcprelay-baseline" else self.install
        assert install is not None
        argv = [
            *install.twistd, "-n", "--pidfile=", "tcprelay",
            "--control", f"tcp:{control}:interface={HOST}",
            "--ports", f"{control + 1}-{control + ports}",
            "--public-interface", HOST,
            "--metrics", f"tcp:{metrics}:interface={HOST}",
            "--drain-timeout", "1",
            # limits wide enough for the load: one service takes every
            # visitor, every session comes from 127.0.0.0/8
            "--max-visitors", "0", "--max-visitors-per-ip", "0",
            "--max-visitors-per-service", "0", "--visitor-rate", "0",
            "--max-sessions-per-ip", "0", "--max-pending-sessions", "0",
        ]
        if name == "tcprelay-http":
            argv += ["--http", f"tcp:{control + ports + 2}:interface={HOST}",
                     "--domain", HTTP_DOMAIN]
        # the soft limit stays the benchmark's original one: the daemon
        # raises its own (tcprelay.process.raise_open_files_limit)
        proc = self.processes.start(f"{label}-relay", argv, env=install.env,
                                    nofile=(self.soft, self.hard))
        proc.wait_line(rf"starting on {control}\b", STARTUP)
        return Relay(label, proc, control, metrics=metrics)

    def add_service(self, relay: Relay) -> None:
        service = self.processes.start(
            f"{relay.name}-echosvc",
            [self.bin["echosvc"], "-relay", f"{HOST}:{relay.control}", "-timeout", "0"],
            nofile=self.limit,
        )
        address = service.wait_line(r"^ADDRESS (\S+)$", STARTUP).group(1)
        relay.service = service
        relay.address = f"{HOST}:{address.rsplit(':', 1)[1]}"

    def stop_relay(self, relay: Relay) -> None:
        if relay.service is not None:
            self.processes.stop(relay.service)
        self.processes.stop(relay.proc, grace=10)

    def run(self, argv: list[object], timeout: float) -> list[dict[str, Any]]:
        """A bounded load process; its JSON lines."""
        try:
            proc = subprocess.run(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=timeout, check=False,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, self.limit),
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{Path(str(argv[0])).name} {argv[1]} took more than "
                             f"{timeout:.0f}s") from e
        lines = parse_json_lines(proc.stdout)
        if proc.returncode != 0 or not lines:
            raise BenchError(f"{' '.join(map(str, argv))} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip()[-500:]}")
        return lines

    def latency(self, relay: Relay, n: int, rate: float = 0, seconds: float = 0) -> dict[str, Any]:
        """``goload latency``: closed loop, or with ``rate`` open loop
        (connections started on a schedule, each timed from its due time)."""
        assert relay.address is not None
        argv: list[object] = [self.bin["goload"], "latency", "-addr", relay.address, "-n", n,
                              "-timeout", "10s"]
        if rate:
            argv += ["-rate", f"{rate:g}", "-seconds", f"{seconds:g}"]
        return self.run(argv, timeout=60 + n / 50 + seconds)[-1]

    @staticmethod
    def wait_fds(pid: int, target: int, timeout: float) -> tuple[int, float]:
        """Wait (bounded) until ``pid`` has at most ``target`` descriptors."""
        start = time.monotonic()
        while time.monotonic() - start < timeout and fd_count(pid) > target:
            time.sleep(0.2)
        return fd_count(pid), time.monotonic() - start

    # -------------------------------------------------------------- idle

    def idle(self, name: str) -> dict[str, Any]:
        n = self.visitors()
        relay = self.start_relay(name, 4)
        try:
            self.add_service(relay)
            assert relay.service is not None and relay.address is not None
            self.latency(relay, 50)  # warm-up
            time.sleep(0.5)
            pids = {"relay": relay.proc.pid, "service": relay.service.pid}
            base_rss = {k: rss_bytes(p) for k, p in pids.items()}
            base_fds = fd_count(relay.proc.pid)
            limit = open_files_limit(relay.proc.pid)
            open_timeout = 120 + n / 200
            holder = self.processes.start(
                f"{name}-hold",
                [self.bin["goload"], "hold", "-addr", relay.address, "-n", n,
                 "-parallel", self.args.parallel, "-src", SOURCES,
                 "-timeout", f"{open_timeout:g}s"],
                stdin_pipe=True, nofile=self.limit,
            )
            try:
                line = holder.wait_line(r"^\{.*\}$", open_timeout + 30).group(0)
                result: dict[str, Any] = json.loads(line)
                time.sleep(2)  # let the last streams settle
                result["relay_fds_held"] = fd_count(relay.proc.pid)
                for k, p in pids.items():
                    rss = rss_bytes(p)
                    result[f"{k}_rss_base"] = base_rss[k]
                    result[f"{k}_rss_held"] = rss
                    if result["held"]:
                        result[f"{k}_bytes_per_visitor"] = (rss - base_rss[k]) / result["held"]
                status = relay.status()
                if status is not None:
                    result["relay_visitors_connected"] = status["visitors"]["connected"]
                    result["relay_limits"] = status["limits"]
                # new visitors arriving on a schedule, with every visitor
                # held: long enough for the relay's periodic work (the
                # visitors' watchdog checks every 7.5 s) to be met
                a = self.args
                result["latency_while_held"] = self.latency(
                    relay, int(a.probe_rate * a.probe_seconds) + 1, a.probe_rate, a.probe_seconds)
                self.log(
                    f"  {name}: {result['held']} held, {result['errors']} errors in "
                    f"{result['seconds']:.1f}s; relay "
                    f"{result.get('relay_bytes_per_visitor', 0) / 1024:.2f} KiB/visitor, "
                    f"service {result.get('service_bytes_per_visitor', 0) / 1024:.2f}; "
                    f"p99 while held {result['latency_while_held']['p99_us']:.0f} us"
                )
            finally:
                self.processes.stop(holder, grace=30)
            fds, took = self.wait_fds(relay.proc.pid, base_fds + 2, 60)
            result.update(relay_fds_base=base_fds, relay_fds_after=fds,
                          settle_seconds=took, relay_nofile=limit,
                          fds_back=fds <= base_fds + 2)
            return result
        finally:
            self.stop_relay(relay)

    # ---------------------------------------------------------- sessions

    def sessions(self, name: str) -> dict[str, Any]:
        n = self.args.sessions
        http = name == "tcprelay-http"
        if not http and n > self.port_sessions:
            self.log(f"  {name}: {n} sessions with a public port each would need "
                     f"{2 * n} descriptors in the relay, above the hard open-files limit "
                     f"{self.hard}: measuring {self.port_sessions}")
            n = self.port_sessions
        relay = self.start_relay(name, 4 if http else n + 8)
        try:
            time.sleep(0.5)
            base_rss = rss_bytes(relay.proc.pid)
            base_cpu = cpu_seconds(relay.proc.pid)
            open_timeout = 60 + n / 50
            holder = self.processes.start(
                f"{name}-sessions",
                [self.bin["goload"], "sessions", "hold", "-relay", f"{HOST}:{relay.control}",
                 "-n", n, "-parallel", self.args.parallel, "-src", SOURCES,
                 "-hold", f"{self.args.hold:g}s", "-timeout", f"{open_timeout:g}s",
                 *(["-http", "s"] if http else [])],
                stdin_pipe=True, nofile=self.limit,
            )
            try:
                opened = json.loads(holder.wait_line(r"^\{.*\}$", open_timeout + 30).group(0))
                t0 = time.monotonic()
                cpu0 = cpu_seconds(relay.proc.pid)
                rss_samples = []
                deadline = t0 + self.args.hold + 60
                while holder.running() and time.monotonic() < deadline:
                    rss_samples.append(rss_bytes(relay.proc.pid))
                    time.sleep(1)
                held_cpu = cpu_seconds(relay.proc.pid) - cpu0
                held_seconds = time.monotonic() - t0
                lines = parse_json_lines(holder.output())
                if len(lines) < 2:
                    raise BenchError(f"{name}: goload sessions hold ended without its figures: "
                                     f"{holder.tail()}")
                result: dict[str, Any] = dict(lines[1])
                result["hold_seconds"] = result.pop("seconds")
                result.update(opened)
            finally:
                self.processes.stop(holder, grace=30)
            result["relay_rss_base"] = base_rss
            result["relay_rss_held"] = max(rss_samples) if rss_samples else None
            if result["opened"] and rss_samples:
                result["relay_bytes_per_session"] = (max(rss_samples) - base_rss) / result["opened"]
            result["relay_cpu_share_held"] = held_cpu / held_seconds if held_seconds else None
            result["relay_cpu_open"] = cpu0 - base_cpu
            status = relay.status()
            if status is not None:
                result["relay_heartbeat_timeouts"] = status["heartbeat_timeouts"]
                result["relay_limits"] = status["limits"]
            self.log(
                f"  {name}: {result['opened']} opened ({result['errors']} errors) in "
                f"{result['seconds']:.1f}s, {result['lost']} lost, "
                f"{result['hb_timeouts']} agent-side heartbeat timeouts"
                + (f", relay {result['relay_heartbeat_timeouts']}"
                   if "relay_heartbeat_timeouts" in result else "")
                + f"; heartbeat rtt p99 {result['rtt_p99_ms']:.1f} ms, max "
                f"{result['rtt_max_ms']:.1f}; relay "
                f"{result.get('relay_bytes_per_session', 0) / 1024:.1f} KiB/session, "
                f"{100 * (result['relay_cpu_share_held'] or 0):.0f}% CPU while held"
            )
            return result
        finally:
            self.stop_relay(relay)

    # -------------------------------------------------------------- soak

    def soak(self, names: Sequence[str]) -> dict[str, Any]:
        a = self.args
        duration = a.duration
        relays = [self.start_relay(name, a.soak_ports) for name in names]
        loads: list[Process] = []
        try:
            for relay in relays:
                self.add_service(relay)
                self.latency(relay, 50)
            time.sleep(1)
            base_fds = {r.name: fd_count(r.proc.pid) for r in relays}
            base_rss = {r.name: rss_bytes(r.proc.pid) for r in relays}
            for relay in relays:
                assert relay.address is not None
                loads.append(self.processes.start(
                    f"{relay.name}-visitors",
                    [self.bin["goload"], "churn", "-addr", relay.address, "-conns", 16,
                     "-rate", f"{a.visitor_rate:g}", "-seconds", f"{duration:g}",
                     "-timeout", "5s"],
                    nofile=self.limit))
                loads.append(self.processes.start(
                    f"{relay.name}-agents",
                    [self.bin["goload"], "sessions", "churn", "-relay", f"{HOST}:{relay.control}",
                     "-conns", a.session_conns, "-seconds", f"{duration:g}",
                     "-life-min", "200ms", "-life-max", "3s", "-src", SOURCES,
                     "-timeout", "10s"],
                    stdin_pipe=True, nofile=self.limit))
            start = time.monotonic()
            samples: dict[str, list[tuple[float, int, int]]] = {r.name: [] for r in relays}
            next_log = start
            while time.monotonic() - start < duration + 30 and any(p.running() for p in loads):
                t = time.monotonic() - start
                for r in relays:
                    samples[r.name].append((round(t, 1), rss_bytes(r.proc.pid),
                                            fd_count(r.proc.pid)))
                if time.monotonic() >= next_log:
                    self.log(f"  soak {t:.0f}s: " + ", ".join(
                        f"{r.name} {samples[r.name][-1][1] / 2**20:.1f} MiB "
                        f"{samples[r.name][-1][2]} fds" for r in relays))
                    next_log += max(60.0, a.sample)
                time.sleep(a.sample)
            loads_out = {p.name: parse_json_lines(p.output()) for p in loads}
            for p in loads:
                self.processes.stop(p, grace=15)
            results: dict[str, Any] = {}
            for r in relays:
                fds, took = self.wait_fds(r.proc.pid, base_fds[r.name], 60)
                rs = [(t, rss) for t, rss, _ in samples[r.name]]
                flat = plateau(rs, min(a.warmup, duration / 5))
                visitors = (loads_out.get(f"{r.name}-visitors") or [{}])[-1]
                agents = (loads_out.get(f"{r.name}-agents") or [{}])[-1]
                status = r.status()
                results[r.name] = {
                    "rss_base": base_rss[r.name], "fds_base": base_fds[r.name],
                    "fds_after": fds, "fds_settle_seconds": took,
                    "fds_back": fds <= base_fds[r.name],
                    "fds_max": max(f for _, _, f in samples[r.name]),
                    "plateau": flat, "visitors": visitors, "agents": agents,
                    "samples": thin(samples[r.name], 120),
                    "heartbeat_timeouts": status["heartbeat_timeouts"] if status else None,
                }
                self.log(
                    f"  {r.name}: RSS growth {flat['growth'] or 0:.3f}x (second half max "
                    f"{(flat['second_max'] or 0) / 2**20:.1f} MiB / first "
                    f"{(flat['first_max'] or 0) / 2**20:.1f} MiB); fds {base_fds[r.name]} -> "
                    f"max {results[r.name]['fds_max']} -> {fds}; visitors "
                    f"{visitors.get('completed')} ({visitors.get('errors')} errors), sessions "
                    f"{agents.get('sessions')} ({agents.get('errors')} errors)"
                )
            return results
        finally:
            for p in loads:
                self.processes.stop(p)
            for r in relays:
                self.stop_relay(r)


def _ratio(results: dict[str, Any], key: Callable[[dict[str, Any]], Optional[float]],
           against: str = "go-relay") -> Optional[float]:
    """tcprelay's figure over ``against``'s (the Go relay's)."""
    try:
        t, g = key(results["tcprelay"]), key(results[against])
    except (KeyError, TypeError):
        return None
    if t is None or not g:
        return None
    return t / g


def summary(test: str, results: dict[str, Any]) -> list[str]:
    """The printed table of one test, tcprelay beside the Go relay."""
    rows: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = []
    if test == "idle":
        rows = [
            ("visitors held", lambda r: r["held"], "{:.0f}"),
            ("errors", lambda r: r["errors"], "{:.0f}"),
            ("seconds to open", lambda r: r["seconds"], "{:.1f}"),
            ("relay KiB/visitor", lambda r: r.get("relay_bytes_per_visitor", 0) / 1024, "{:.2f}"),
            ("service KiB/visitor", lambda r: r.get("service_bytes_per_visitor", 0) / 1024, "{:.2f}"),
            ("new conn p50 us, held", lambda r: r["latency_while_held"]["p50_us"], "{:.0f}"),
            ("new conn p99 us, held", lambda r: r["latency_while_held"]["p99_us"], "{:.0f}"),
            ("new conn max us, held", lambda r: r["latency_while_held"]["max_us"], "{:.0f}"),
            ("relay fds held", lambda r: r["relay_fds_held"], "{:.0f}"),
            ("fds back to base", lambda r: float(r["fds_back"]), "{:.0f}"),
        ]
    elif test == "sessions":
        rows = [
            ("sessions opened", lambda r: r["opened"], "{:.0f}"),
            ("open errors", lambda r: r["errors"], "{:.0f}"),
            ("seconds to open", lambda r: r["seconds"], "{:.1f}"),
            ("lost while held", lambda r: r["lost"], "{:.0f}"),
            ("hb timeouts (agents)", lambda r: r["hb_timeouts"], "{:.0f}"),
            ("hb rtt p50 ms, opening", lambda r: r.get("open_rtt_p50_ms"), "{:.2f}"),
            ("hb rtt p99 ms, opening", lambda r: r.get("open_rtt_p99_ms"), "{:.2f}"),
            ("hb rtt p50 ms", lambda r: r["rtt_p50_ms"], "{:.2f}"),
            ("hb rtt p99 ms", lambda r: r["rtt_p99_ms"], "{:.2f}"),
            ("hb rtt max ms", lambda r: r["rtt_max_ms"], "{:.1f}"),
            ("relay KiB/session", lambda r: r.get("relay_bytes_per_session", 0) / 1024, "{:.1f}"),
            ("relay CPU % held", lambda r: 100 * (r["relay_cpu_share_held"] or 0), "{:.1f}"),
        ]
    elif test == "soak":
        rows = [
            ("RSS growth (2nd/1st)", lambda r: r["plateau"]["growth"], "{:.3f}"),
            ("RSS MiB, final", lambda r: r["plateau"]["final"] / 2**20, "{:.1f}"),
            ("fds base", lambda r: r["fds_base"], "{:.0f}"),
            ("fds max", lambda r: r["fds_max"], "{:.0f}"),
            ("fds after", lambda r: r["fds_after"], "{:.0f}"),
            ("visitors churned", lambda r: r["visitors"].get("completed"), "{:.0f}"),
            ("visitor errors", lambda r: r["visitors"].get("errors"), "{:.0f}"),
            ("sessions churned", lambda r: r["agents"].get("sessions"), "{:.0f}"),
            ("session errors", lambda r: r["agents"].get("errors"), "{:.0f}"),
        ]
    names = [n for n in RELAYS if n in results]
    out = [f"{test}: " + "  ".join(f"{n:>12}" for n in ["figure".ljust(22), *names, "tcp/Go"])
           + ("  " + f"{'tcp/base':>12}" if "tcprelay-baseline" in results else "")]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            try:
                v = key(results[n])
                cells.append(fmt.format(v) if v is not None else "-")
            except (KeyError, TypeError):
                cells.append("-")
        ratio = _ratio(results, key)
        cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        if "tcprelay-baseline" in results:
            ratio = _ratio(results, key, "tcprelay-baseline")
            cells.append(f"{ratio:.2f}x" if ratio is not None else "-")
        out.append("      " + label.ljust(22) + "  " + "  ".join(f"{c:>12}" for c in cells))
    return out


def passed(test: str, results: dict[str, Any]) -> bool:
    t = results.get("tcprelay")
    if t is None:
        return True
    if test == "idle":
        return bool(t["errors"] == 0 and t["fds_back"])
    if test == "sessions":
        return bool(t["errors"] == 0 and t["lost"] == 0 and t["hb_timeouts"] == 0
                    and not t.get("relay_heartbeat_timeouts"))
    return bool(t["fds_back"] and (t["plateau"]["growth"] or 0) <= 1.10)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="One relay node's capacity, tcprelay beside the Go relay.")
    p.add_argument("tests", nargs="+", choices=("idle", "sessions", "soak"),
                   help="what to measure, in this order")
    p.add_argument("--relays", default=None,
                   help="relays to measure, of " + ",".join(RELAYS) + " (default: go-relay, "
                        "tcprelay, tcprelay-http for sessions, tcprelay-baseline with "
                        "--baseline-venv)")
    p.add_argument("--visitors", type=_positive, default=100_000,
                   help="idle: visitor connections held (default: 100000)")
    p.add_argument("--probe-rate", type=float, default=200.0,
                   help="idle: new connections per second (connect + 1-byte echo, open "
                        "loop) while the visitors are held (default: 200)")
    p.add_argument("--probe-seconds", type=float, default=70.0,
                   help="idle: seconds of those (default: 70, so that they meet the "
                        "daemon's collection of the old generation, once a minute)")
    p.add_argument("--baseline-venv", metavar="PATH",
                   help="also measure the tcprelay installed there (tcprelay-baseline)")
    p.add_argument("--sessions", type=_positive, default=10_000,
                   help="sessions: agent sessions held (default: 10000)")
    p.add_argument("--hold", type=float, default=60.0,
                   help="sessions: seconds they are held (default: 60)")
    p.add_argument("--parallel", type=_positive, default=64,
                   help="connections or sessions being opened at once (default: 64)")
    p.add_argument("--duration", type=float, default=1800.0,
                   help="soak: seconds of churn (default: 1800)")
    p.add_argument("--warmup", type=float, default=120.0,
                   help="soak: seconds left out of the plateau (at most a fifth of "
                        "--duration; default: 120)")
    p.add_argument("--sample", type=float, default=5.0,
                   help="soak: seconds between RSS samples (default: 5)")
    p.add_argument("--visitor-rate", type=float, default=300.0,
                   help="soak: visitor connections per second per relay (default: 300)")
    p.add_argument("--session-conns", type=_positive, default=16,
                   help="soak: agent sessions coming and going at once per relay (default: 16)")
    p.add_argument("--soak-ports", type=_positive, default=200,
                   help="soak: public ports per relay (default: 200)")
    p.add_argument("--json", metavar="PATH", help="write every figure as JSON to PATH")
    p.add_argument("--go-src", metavar="DIR", help="directory holding the Go programs")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' output here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def raise_own_limit() -> tuple[int, int]:
    """Give this process a hard (and soft) open-files limit of NOFILE if it
    may (root); the children's limits derive from it.  The original limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (NOFILE, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            break
        except (ValueError, OSError):
            continue
    return soft, hard


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.relays is None:
        args.relays = "go-relay,tcprelay,tcprelay-http" + (
            ",tcprelay-baseline" if args.baseline_venv else "")
    names = [n for n in args.relays.split(",") if n]
    if "tcprelay-baseline" in names and not args.baseline_venv:
        print(f"{PROG}: tcprelay-baseline needs --baseline-venv", file=sys.stderr)
        return 2
    if not names or any(n not in RELAYS for n in names):
        print(f"{PROG}: --relays: of {','.join(RELAYS)}", file=sys.stderr)
        return 2
    started = time.monotonic()

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    original = raise_own_limit()
    logdir = Path(args.log_dir or tempfile.mkdtemp(prefix="tcprelay-capacity-")).resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        bins, go_version = gotools.build_programs(args.go_src, PROGRAMS, logdir / "bin")
    except BenchError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        if not args.log_dir:
            shutil.rmtree(logdir, ignore_errors=True)
        return 2
    processes = Processes(logdir)
    results: dict[str, Any] = {}
    ok = True
    try:
        with processes.stopping():
            cap = Capacity(args, bins, processes, log)
            cap.soft = original[0]
            if "idle" in args.tests or "sessions" in args.tests:
                log(f"open-files limit: soft {original[0]}, hard {cap.hard}")
            for test in args.tests:
                log(f"{test}:")
                these = [n for n in names if test == "sessions" or n != "tcprelay-http"]
                if test == "soak":
                    results[test] = cap.soak(these)
                else:
                    results[test] = {n: getattr(cap, test)(n) for n in these}
                for line in summary(test, results[test]):
                    print(line, flush=True)
                ok = ok and passed(test, results[test])
    except BenchError as e:
        print(f"{PROG}: {e}\nprocess output kept in {logdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.json and results:
            document = {
                "command": [*PROG.split(), *(argv if argv is not None else sys.argv[1:])],
                "machine": machine_info(go_version),
                "tcprelay": cap.install.describe(),
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "log_dir")},
                "seconds": time.monotonic() - started,
                "results": results,
            }
            Path(args.json).write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    if not args.log_dir:
        shutil.rmtree(logdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
