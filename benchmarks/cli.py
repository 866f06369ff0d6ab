"""Command line of ``python -m benchmarks``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from benchmarks import gotools
from benchmarks.install import baseline_install, current_install
from benchmarks.procs import BenchError, Processes, raise_open_files_limit
from benchmarks.profile import find_py_spy
from benchmarks.report import contention_notes, cpu_notes, machine_info, ratios, table
from benchmarks.run import (
    BASELINE_OF,
    DEFAULT_SCENARIOS,
    PYTHON_STACKS,
    SCENARIOS,
    TESTS,
    Settings,
    choose_scenarios,
    run_benchmark,
)

__all__ = ["PROG", "main", "parser"]

PROG = "python -m benchmarks"
"""How the benchmark is run, from the root of a source checkout."""

EXIT_ERRORS = 1
"""A scenario failed, or a measurement counted errors (the table is still printed)."""
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _csv(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"choose from {', '.join(allowed)} (comma-separated), not {text!r}"
            )
        return items

    return parse


def _conns(text: str) -> tuple[int, ...]:
    try:
        items = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        items = ()
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive counts, not {text!r}")
    return items


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive whole number, not {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Benchmark tcprelay side by side with the original Go relay and a "
            "direct echo, on loopback: echo throughput, connect latency, "
            "connections per second, RSS per idle connection and CPU per GB. "
            "Run it from the root of a source checkout: it needs Go and "
            "Debian's muxado v1 sources (the load client and reference "
            "programs are built from tests/interop/)."
        ),
    )
    p.add_argument("--quick", action="store_true",
                   help="shorter runs and fewer connections (under a minute; for CI)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    p.add_argument("--go-src", metavar="DIR",
                   help="directory holding goload/, legacyrelay/ and echosvc/ "
                        "(default: tests/interop of the source checkout)")
    p.add_argument("--scenarios", type=_csv(SCENARIOS), default=None,
                   help=f"stacks to run, of {','.join(SCENARIOS)} (default: "
                        f"{','.join(DEFAULT_SCENARIOS)}, and with --baseline-venv "
                        "the baseline counterparts of the tcprelay stacks)")
    p.add_argument("--baseline-venv", metavar="PATH",
                   help="also measure the tcprelay installed in the virtualenv PATH "
                        "(an older commit), side by side in the same run, as the "
                        f"stacks {','.join(BASELINE_OF.values())}")
    p.add_argument("--tests", type=_csv(TESTS), default=TESTS,
                   help=f"measurements to make (default: {','.join(TESTS)})")
    p.add_argument("--conns", type=_conns, default=None,
                   help="throughput connection counts (default: 1,8,64)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds of sending per throughput run (default: 3; quick: 1)")
    p.add_argument("--latency-n", type=int, default=None,
                   help="sequential connections for latency (default: 1000; quick: 300)")
    p.add_argument("--cps-seconds", type=float, default=None,
                   help="seconds of the connections-per-second run (default: 3; quick: 1)")
    p.add_argument("--rounds", type=_positive, default=None,
                   help="split each throughput and connections-per-second run into this "
                        "many rounds, in which the stacks take turns (default: 3; quick: 1)")
    p.add_argument("--latency-block", type=_positive, default=50, metavar="N",
                   help="latency: connections to one stack before the next takes its "
                        "turn (default: 50)")
    p.add_argument("--hold", type=int, default=None, metavar="N",
                   help="idle visitor connections to hold (default: 10000; quick: 2000)")
    p.add_argument("--head-all", action="store_true",
                   help="every stack's visitors first send the HTTP request head the "
                        "expose-http stack's visitors send (and read its echo), so that "
                        "all stacks make the same round trips")
    p.add_argument("--no-warmup", action="store_true", help="skip the short warm-up runs")
    p.add_argument("--inherit-nofile", action="store_true",
                   help="start tcprelay's relay with this process's raised open-files "
                        "limit instead of the original one it must raise itself")
    p.add_argument("--log-dir", metavar="DIR",
                   help="keep the processes' output here (default: a temporary "
                        "directory, removed unless something failed)")
    p.add_argument("--profile", metavar="DIR",
                   help="record py-spy profiles (collapsed stacks and a summary) of "
                        "tcprelay's relay and agent during the throughput and cps "
                        "phases into DIR (needs py-spy; skews those figures a little)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _settings(args: argparse.Namespace, original_nofile: tuple[int, int]) -> Settings:
    """The run's settings from the parsed options (no baseline install yet);
    BenchError for a baseline stack without ``--baseline-venv``."""
    quick = args.quick
    return Settings(
        scenarios=choose_scenarios(args.scenarios, args.baseline_venv is not None),
        tests=args.tests,
        conns=args.conns or (1, 8, 64),
        throughput_seconds=args.seconds if args.seconds else (1.0 if quick else 3.0),
        latency_n=args.latency_n or (300 if quick else 1000),
        cps_seconds=args.cps_seconds or (1.0 if quick else 3.0),
        hold_n=args.hold or (2000 if quick else 10000),
        rounds=args.rounds or (1 if quick else 3),
        latency_block=args.latency_block,
        warmup=not args.no_warmup,
        head_all=args.head_all,
        relay_nofile=None if args.inherit_nofile else original_nofile,
        profile_dir=Path(args.profile).resolve() if args.profile else None,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    started = time.monotonic()

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    soft, raised, hard = raise_open_files_limit()
    try:
        settings = _settings(args, (soft, hard))
    except BenchError as e:
        parser().error(str(e))
    programs: tuple[str, ...] = ("goload",)
    if "go-relay" in settings.scenarios:
        programs += ("legacyrelay",)
    if {"go-relay", "tcprelay", "tcprelay-baseline"} & set(settings.scenarios):
        programs += ("echosvc",)
    if "hold" in settings.tests and raised < settings.hold_n + 256:
        log(
            f"warning: open-files limit {raised} (hard {hard}) is low for holding "
            f"{settings.hold_n} connections; expect errors"
        )
    try:
        if settings.profile_dir is not None:
            settings.py_spy = find_py_spy()
            settings.profile_dir.mkdir(parents=True, exist_ok=True)
        if PYTHON_STACKS & set(settings.scenarios):
            settings.current = current_install()
        if args.baseline_venv is not None:
            settings.baseline = baseline_install(Path(args.baseline_venv))
            log(
                f"baseline: tcprelay {settings.baseline.version} from {settings.baseline.python}"
                f" (commit {settings.baseline.commit or 'unknown'})"
            )
        log(f"building {', '.join(programs)}")
        binaries, go_version = gotools.build_programs(args.go_src, programs)
    except BenchError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("benchmarks: interrupted while building", file=sys.stderr)
        return EXIT_INTERRUPTED

    if args.log_dir:
        logdir = Path(args.log_dir).resolve()
        logdir.mkdir(parents=True, exist_ok=True)
    else:
        logdir = Path(tempfile.mkdtemp(prefix="tcprelay-bench-"))
    processes = Processes(logdir)
    results: dict[str, dict[str, Any]] = {}
    interrupted = False
    try:
        with processes.stopping():
            results = run_benchmark(settings, binaries, processes, log)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        print("benchmarks: interrupted; every process it started is stopped", file=sys.stderr)
        if not args.log_dir:
            shutil.rmtree(logdir, ignore_errors=True)
        return EXIT_INTERRUPTED

    failed = any(r.get("failed") or r.get("errors") for r in results.values())
    print(table(results, settings.conns, settings.hold_n))
    for name, result in results.items():
        for message in result.get("error_messages", []):
            print(f"{name}: {message}")
        if result.get("failed"):
            print(f"{name}: FAILED: {result['failed']}")
    for name, result in results.items():
        limit = result.get("relay_nofile")
        if name not in PYTHON_STACKS or limit is None:
            continue
        start = settings.relay_nofile[0] if settings.relay_nofile else raised
        if "hold" in settings.tests and limit < settings.hold_n + 256:
            print(f"note: {name}: the relay ran with an open-files soft limit of {limit}")
        elif limit > start:
            print(f"note: {name}: the relay raised its open-files soft limit {start} -> {limit}")
    for line in cpu_notes(results, settings.conns):
        print(line)
    for line in contention_notes(results):
        print(line)
    for install in (settings.current, settings.baseline):
        if install is not None:
            print(
                f"{install.label}: tcprelay {install.version}, commit "
                f"{install.commit or 'unknown'}, from {install.module_file}"
            )
    elapsed = time.monotonic() - started
    log(f"done in {elapsed:.0f}s")
    if args.json:
        document = {
            "command": [*PROG.split(), *(argv if argv is not None else sys.argv[1:])],
            "machine": machine_info(go_version),
            "tcprelay": {
                install.label: install.describe()
                for install in (settings.current, settings.baseline)
                if install is not None
            },
            "settings": {
                "quick": args.quick,
                "scenarios": list(settings.scenarios),
                "tests": list(settings.tests),
                "conns": list(settings.conns),
                "throughput_seconds": settings.throughput_seconds,
                "latency_n": settings.latency_n,
                "cps_conns": settings.cps_conns,
                "cps_seconds": settings.cps_seconds,
                "rounds": settings.rounds,
                "latency_block": settings.latency_block,
                "head_all": settings.head_all,
                "hold_n": settings.hold_n,
                "baseline_venv": args.baseline_venv,
                "open_files": {"original_soft": soft, "raised_soft": raised, "hard": hard},
            },
            "seconds": elapsed,
            "results": results,
            "ratios": ratios(results, settings.conns, settings.hold_n),
        }
        Path(args.json).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    if failed:
        print(f"process output kept in {logdir}", file=sys.stderr)
    elif not args.log_dir:
        shutil.rmtree(logdir, ignore_errors=True)
    return EXIT_ERRORS if failed else 0
