"""
``python -m benchmarks.churn``: does visitor churn on one service slow down
the others?

For this checkout's tcprelay (and with ``--baseline-venv PATH`` an older
one, side by side in the same run) it starts a relay (``twistd -n
tcprelay``) and two Go muxado v1 echo services behind it, A and B
(``legacyecho``, the original echo service).  Then, in ``--rounds`` rounds,
the installs taking turns (the order alternating), it measures B's latency:

quiet
    ``goload latency`` against B for ``--seconds``: one connection after
    another, each connect + write 1 byte + read it back + close (a fresh
    connection per sample, so a starved accept loop shows as well as a
    starved stream);
churn
    the same while ``goload churn -rst`` runs against A: ``--churn-conns``
    clients that connect, write 1 byte and close with a RST (``SO_LINGER``
    0), at ``--rate`` connections per second in all.  The churn starts
    ``RAMP`` seconds before B's samples and ends after them.

It reports the churn rate achieved, B's p50/p99/max in both phases (per
round, and over the rounds: the median of the rounds' p50 and p99, the
largest max), the relay's CPU (share of one core) in each phase, and the
ratio current / baseline of B's p99 under churn.  Every process is stopped
at the end (:class:`benchmarks.procs.Processes`); each goload run is
bounded by a timeout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import attrs

from benchmarks import gotools
from benchmarks.cli import _positive
from benchmarks.install import Install, baseline_install, current_install
from benchmarks.procs import (
    BenchError,
    Process,
    Processes,
    cpu_seconds,
    machine_cpu_seconds,
    runqueue_wait,
)
from benchmarks.profile import Profiler, find_py_spy
from benchmarks.report import machine_info
from benchmarks.run import HOST, STARTUP_TIMEOUT, Runner, Settings, _port_of

__all__ = ["PROG", "main", "parse_goload", "summarise_rounds"]

PROG = "python -m benchmarks.churn"
RAMP = 0.5
"""Seconds of churn before B's samples start (and after they end)."""
PROGRAMS = ("goload", "legacyecho")


def parse_goload(stdout: str) -> dict[str, Any]:
    """The last JSON line of a goload run's stdout; BenchError if none."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no JSON line in goload's output: {stdout.strip()[:200]!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def summarise_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One phase's figures over its rounds: median p50 and p99, largest max,
    samples and errors added up (goload gives percentiles, not samples)."""
    if not rounds:
        return {}
    return {
        "rounds": len(rounds),
        "n": sum(r["n"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "p50_us": statistics.median(r["p50_us"] for r in rounds),
        "p99_us": statistics.median(r["p99_us"] for r in rounds),
        "max_us": max(r["max_us"] for r in rounds),
        "round_p99_us": [r["p99_us"] for r in rounds],
    }


@attrs.define
class ChurnStack:
    label: str
    install: Install
    relay: Process
    a: str
    b: str


def _goload(binary: Path, args: list[str], timeout: float) -> dict[str, Any]:
    import subprocess

    try:
        proc = subprocess.run(
            [str(binary), *args], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"goload {args[0]} took more than {timeout:.0f}s") from e
    if proc.returncode != 0:
        raise BenchError(f"goload {' '.join(args)} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()}")
    return parse_goload(proc.stdout)


class ChurnRun:
    def __init__(self, args: argparse.Namespace, binaries: dict[str, Path],
                 processes: Processes, log: Any) -> None:
        self.args = args
        self.bin = binaries
        self.processes = processes
        self.log = log
        self.runner = Runner(Settings(), binaries, processes, log)

    def start(self, label: str, install: Install) -> ChurnStack:
        relay, control = self.runner.start_tcprelay(label, install)
        addresses = []
        for name in ("A", "B"):
            service = self.processes.start(
                f"{label}-echo{name}",
                [self.bin["legacyecho"], "-relay", f"{HOST}:{control}", "-timeout", "0"],
            )
            found = service.wait_line(r"^ADDRESS (\S+)$", STARTUP_TIMEOUT).group(1)
            addresses.append(f"{HOST}:{_port_of(found)}")
        return ChurnStack(label, install, relay, addresses[0], addresses[1])

    def latency(self, stack: ChurnStack, seconds: float) -> dict[str, Any]:
        return _goload(
            self.bin["goload"],
            ["latency", "-addr", stack.b, "-n", "1000000", "-seconds", f"{seconds:g}",
             "-timeout", "5s"],
            seconds + 60,
        )

    def churn_args(self, stack: ChurnStack, seconds: float) -> list[str]:
        a = self.args
        return ["churn", "-addr", stack.a, "-conns", str(a.churn_conns), "-rate", f"{a.rate:g}",
                "-seconds", f"{seconds:g}", "-rst"]

    def phase(self, stack: ChurnStack, churn: bool, tag: str) -> dict[str, Any]:
        """B's latency for --seconds, with churn against A or without; the
        relay's CPU over B's samples."""
        seconds = self.args.seconds
        churner: Optional[Process] = None
        profiler: Optional[Profiler] = None
        if churn:
            churner = self.processes.start(
                f"{stack.label}-churn-{tag}",
                [self.bin["goload"], *self.churn_args(stack, seconds + 2 * RAMP)],
            )
            time.sleep(RAMP)
        if churn and self.args.profile is not None:
            profiler = Profiler(self.args.py_spy, stack.relay.pid,
                                self.args.profile / f"{stack.label}-relay-churn-{tag}.txt")
        try:
            pid = stack.relay.pid
            w0, cpu0, m0 = runqueue_wait(pid), cpu_seconds(pid), machine_cpu_seconds()
            t0 = time.monotonic()
            result = self.latency(stack, seconds)
            t1 = time.monotonic()
            w1, cpu1, m1 = runqueue_wait(pid), cpu_seconds(pid), machine_cpu_seconds()
        finally:
            if profiler is not None:
                profiler.stop()
        result["relay_cpu"] = (cpu1 - cpu0) / (t1 - t0)
        if w0 is not None and w1 is not None:
            # runnable but waiting for a CPU: the machine's other work
            result["relay_runqueue_wait"] = (w1 - w0) / (t1 - t0)
        if m0 is not None and m1 is not None:
            busy, idle = m1[0] - m0[0], m1[1] - m0[1]
            result["machine_busy"] = busy / (busy + idle) if busy + idle else 0.0
        if churner is not None:
            try:
                line = churner.wait_line(r"^\{.*\}$", seconds + 30).group(0)
                result["churn"] = parse_goload(line)
            finally:
                self.processes.stop(churner)
        return result

    def warm_up(self, stack: ChurnStack) -> None:
        _goload(self.bin["goload"], ["latency", "-addr", stack.b, "-n", "50"], 60)
        _goload(self.bin["goload"], self.churn_args(stack, 0.5), 60)

    def measure(self, stacks: list[ChurnStack]) -> dict[str, dict[str, Any]]:
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
            s.label: {"quiet": [], "churn": []} for s in stacks
        }
        for r in range(self.args.rounds):
            order = stacks if r % 2 == 0 else stacks[::-1]
            for stack in order:
                for phase in ("quiet", "churn"):
                    result = self.phase(stack, phase == "churn", f"r{r}")
                    rounds[stack.label][phase].append(result)
                    rate = f", churn {result['churn']['cps']:.0f}/s" if "churn" in result else ""
                    self.log(
                        f"round {r + 1} {stack.label} {phase}: B p50/p99/max "
                        f"{result['p50_us'] / 1e3:.2f}/{result['p99_us'] / 1e3:.2f}/"
                        f"{result['max_us'] / 1e3:.1f} ms (n {result['n']}){rate}, "
                        f"relay CPU {100 * result['relay_cpu']:.0f}%, waiting for a CPU "
                        f"{100 * result.get('relay_runqueue_wait', 0):.0f}%"
                    )
        out: dict[str, dict[str, Any]] = {}
        for stack in stacks:
            found = rounds[stack.label]
            churns = [r["churn"] for r in found["churn"]]
            out[stack.label] = {
                "install": stack.install.describe(),
                "quiet": summarise_rounds(found["quiet"]),
                "churn": summarise_rounds(found["churn"]),
                "churn_cps": statistics.median(c["cps"] for c in churns),
                "churn_errors": sum(c["errors"] for c in churns),
                "relay_cpu_quiet": statistics.median(r["relay_cpu"] for r in found["quiet"]),
                "relay_cpu_churn": statistics.median(r["relay_cpu"] for r in found["churn"]),
                "relay_wait_quiet": statistics.median(
                    r.get("relay_runqueue_wait", 0.0) for r in found["quiet"]),
                "relay_wait_churn": statistics.median(
                    r.get("relay_runqueue_wait", 0.0) for r in found["churn"]),
                "rounds": found,
            }
        return out


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("", *results)]

    def row(name: str, fmt: Any) -> None:
        rows.append((name, *(fmt(r) for r in results.values())))

    def ms(phase: str, key: str) -> Any:
        return lambda r: f"{r[phase][key] / 1e3:.2f}"

    row("commit", lambda r: r["install"]["commit"] or "?")
    row("churn on A, conns/s", lambda r: f"{r['churn_cps']:.0f}")
    for phase in ("quiet", "churn"):
        for key in ("p50_us", "p99_us", "max_us"):
            row(f"B {key[:-3]} ms, {phase}", ms(phase, key))
    row("relay CPU, quiet", lambda r: f"{100 * r['relay_cpu_quiet']:.0f}%")
    row("relay CPU, churn", lambda r: f"{100 * r['relay_cpu_churn']:.0f}%")
    row("relay waiting for CPU, quiet", lambda r: f"{100 * r['relay_wait_quiet']:.0f}%")
    row("relay waiting for CPU, churn", lambda r: f"{100 * r['relay_wait_churn']:.0f}%")
    row("errors (B; churn)", lambda r: f"{r['quiet']['errors'] + r['churn']['errors']}; "
                                       f"{r['churn_errors']}")
    widths = [max(len(str(cells[i])) for cells in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(cells, widths))) for cells in rows]
    if "current" in results and "baseline" in results:
        cur, base = results["current"]["churn"]["p99_us"], results["baseline"]["churn"]["p99_us"]
        lines.append(f"B p99 under churn, current / baseline: {cur / base:.3f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Churn fairness: B's connect + 1-byte echo latency through tcprelay, "
            "alone and while visitors of another service A connect, send 1 byte "
            "and reset at --rate per second (see benchmarks/churn.py)."
        ),
    )
    p.add_argument("--baseline-venv", metavar="PATH",
                   help="also measure the tcprelay installed in this virtualenv, "
                        "the two taking turns")
    p.add_argument("--baseline-commit", metavar="REV",
                   help="the baseline's commit, recorded when its venv does not tell "
                        "(a venv not installed from a git checkout)")
    p.add_argument("--rounds", type=_positive, default=3, help="rounds (default: 3)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="seconds of B's samples per phase and round (default: 3)")
    p.add_argument("--rate", type=float, default=6000.0,
                   help="churn connections per second against A (default: 6000)")
    p.add_argument("--churn-conns", type=_positive, default=64,
                   help="churn clients (connections in flight at most; default: 64)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    p.add_argument("--go-src", metavar="DIR", help="directory holding goload/ and legacyecho/")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy profiles of the relays during the churn phases into DIR")
    p.add_argument("--log-dir", metavar="DIR", help="keep the processes' output here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    started = time.monotonic()

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    try:
        if args.profile is not None:
            args.py_spy = find_py_spy()
            args.profile = Path(args.profile).resolve()
            args.profile.mkdir(parents=True, exist_ok=True)
        installs = [("current", current_install())]
        if args.baseline_venv:
            baseline = baseline_install(Path(args.baseline_venv))
            if baseline.commit is None and args.baseline_commit:
                baseline.commit = args.baseline_commit
            installs.append(("baseline", baseline))
    except BenchError as e:
        print(f"benchmarks.churn: {e}", file=sys.stderr)
        return 2
    logdir = Path(args.log_dir or tempfile.mkdtemp(prefix="tcprelay-churn-")).resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        # built into the run's own directory: the shared binaries of
        # ``python -m benchmarks`` may be an older goload, without churn
        binaries, go_version = gotools.build_programs(args.go_src, PROGRAMS, logdir / "bin")
    except BenchError as e:
        print(f"benchmarks.churn: {e}", file=sys.stderr)
        if not args.log_dir:
            shutil.rmtree(logdir, ignore_errors=True)
        return 2
    processes = Processes(logdir)
    run = ChurnRun(args, binaries, processes, log)
    try:
        with processes.stopping():
            stacks = [run.start(label, install) for label, install in installs]
            for stack in stacks:
                run.warm_up(stack)
            results = run.measure(stacks)
    except BenchError as e:
        print(f"benchmarks.churn: {e}\nprocess output kept in {logdir}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmarks.churn: interrupted; every process it started is stopped",
              file=sys.stderr)
        return 130
    print(table(results))
    if args.json:
        document = {
            "command": [*PROG.split(), *(argv if argv is not None else sys.argv[1:])],
            "machine": machine_info(go_version),
            "settings": {"rounds": args.rounds, "seconds": args.seconds, "rate": args.rate,
                         "churn_conns": args.churn_conns, "ramp": RAMP},
            "seconds": time.monotonic() - started,
            "results": results,
        }
        if "current" in results and "baseline" in results:
            document["ratio_churn_p99_current_baseline"] = (
                results["current"]["churn"]["p99_us"] / results["baseline"]["churn"]["p99_us"]
            )
        Path(args.json).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    if not args.log_dir:
        shutil.rmtree(logdir, ignore_errors=True)
    errors = any(r["quiet"]["errors"] or r["churn"]["errors"] for r in results.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
