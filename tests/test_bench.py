"""
Regression guard for the data path: ``python -m benchmarks`` in a narrow
quick slice (1-connection echo throughput through the Go relay and through
tcprelay, both with the Go echo service behind them, in the same run, in two
rounds in which they take turns); and the latency run in which the stacks
take turns within one load client.

It fails only on a gross slowdown: the ratio tcprelay / Go relay falling
below a third of the ratio in docs/benchmarks.rst's results table.  The ratio is
compared, never absolute MB/s, because other work on the machine moves both
stacks alike; and a run below the threshold is repeated once before the
test fails, so one unlucky burst of noise cannot fail it.

The baseline option (``--baseline-venv``) is run end to end with this
test environment's own virtualenv as the baseline: its installed tcprelay
is measured as the ``tcprelay-baseline`` stack next to the checkout's.

Skipped only when Go (or Debian's muxado v1 sources) is missing, and then
only outside CI (``require_go`` fails in CI instead).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.install import baseline_install
from benchmarks.procs import BenchError
from tests.interop import gobuild

REPO_ROOT = Path(__file__).resolve().parents[1]

RECORDED_RATIO_1_CONN = 1.73
"""tcprelay / Go relay echo throughput with 1 connection: the median of the
results table in docs/benchmarks.rst (row "echo MB/s, 1 conn"; runs 31-42
of benchmarks/results/history.json).  Update both together."""

SLOWDOWN_FACTOR = 3.0
"""Fail only below RECORDED_RATIO_1_CONN / SLOWDOWN_FACTOR."""

RUN_TIMEOUT = 120.0


def _run_slice(tmp_path: Path, attempt: int, *args: str) -> dict[str, Any]:
    out = tmp_path / f"bench-{attempt}.json"
    argv = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        *(args or ("--scenarios", "go-relay,tcprelay", "--tests", "throughput", "--conns", "1",
                   "--rounds", "2")),
        "--go-src",
        str(REPO_ROOT / "tests" / "interop"),
        "--json",
        str(out),
    ]
    # Run from the checkout so that the code under test is the one measured.
    proc = subprocess.run(
        argv,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"benchmark failed (exit {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def test_tcprelay_throughput_is_not_grossly_slower_than_go_relay(tmp_path: Path) -> None:
    """1-connection throughput ratio tcprelay / Go relay stays above a third of the recorded one."""
    gobuild.require_go()
    threshold = RECORDED_RATIO_1_CONN / SLOWDOWN_FACTOR
    seen = []
    for attempt in range(2):
        document = _run_slice(tmp_path, attempt)
        results = document["results"]
        go = results["go-relay"]["throughput"]["1"]
        ours = results["tcprelay"]["throughput"]["1"]
        assert go["errors"] == 0 and ours["errors"] == 0, (go, ours)
        assert go["bytes"] > 0 and ours["bytes"] > 0, (go, ours)
        for run in (go, ours):
            # two rounds each, the stacks taking turns
            assert run["rounds"] == 2 and len(run["round_mbps"]) == 2, run
            # every process of the stack is accounted for, and the machine
            cpu = run["cpu_seconds"]
            assert cpu["relay"] > 0 and cpu["service"] > 0 and cpu["load"] > 0, run
            assert run["machine_cpu_seconds"]["busy"] >= cpu["relay"], run
        ratio = ours["mbps"] / go["mbps"]
        seen.append(f"{ours['mbps']:.0f} / {go['mbps']:.0f} MB/s = {ratio:.2f}")
        if ratio >= threshold:
            return
    pytest.fail(
        f"tcprelay / Go relay 1-connection echo throughput fell below {threshold:.2f} "
        f"(a third of the recorded {RECORDED_RATIO_1_CONN}, docs/benchmarks.rst) "
        f"twice: {'; '.join(seen)}"
    )


def test_latency_stacks_take_turns_in_one_load_client(tmp_path: Path) -> None:
    """Each stack gets its own latency figures from the alternating run."""
    gobuild.require_go()
    document = _run_slice(
        tmp_path, 0,
        "--scenarios", "direct,go-relay,tcprelay", "--tests", "latency",
        "--latency-n", "30", "--latency-block", "7", "--no-warmup",
    )
    assert document["settings"]["latency_block"] == 7
    results = document["results"]
    assert set(results) == {"direct", "go-relay", "tcprelay"}
    addresses = {result["address"] for result in results.values()}
    assert len(addresses) == 3, addresses
    for name, result in results.items():
        latency = result["latency"]
        assert latency["n"] == 30 and latency["errors"] == 0, (name, latency)
        assert 0 < latency["min_us"] <= latency["p50_us"] <= latency["p99_us"] <= latency["max_us"]


def _venv() -> Path:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtualenv (./scripts/test makes .venv)")
    return Path(sys.prefix)


def test_baseline_install_is_the_venvs_own_tcprelay() -> None:
    """A baseline venv runs its own twistd and tcprelay commands, with nothing of the checkout on PYTHONPATH."""
    from importlib import metadata

    venv = _venv()
    install = baseline_install(venv)
    assert install.twistd == (str(venv / "bin" / "twistd"),)
    assert install.tcprelay == (str(venv / "bin" / "tcprelay"),)
    assert "PYTHONPATH" not in install.env
    assert install.version == metadata.version("tcprelay")
    assert Path(install.module_file).is_relative_to(venv), install.module_file


def test_baseline_venv_without_python_is_refused(tmp_path: Path) -> None:
    """A directory that is not a virtualenv is refused with the recipe for making one."""
    with pytest.raises(BenchError, match="git worktree add"):
        baseline_install(tmp_path)


def test_baseline_stack_is_measured_side_by_side(tmp_path: Path) -> None:
    """With ``--baseline-venv`` one run measures the baseline install and reports its ratio to the Go relay."""
    gobuild.require_go()
    venv = _venv()
    document = _run_slice(
        tmp_path, 0,
        "--scenarios", "go-relay,tcprelay", "--tests", "throughput", "--conns", "1",
        "--rounds", "1", "--no-warmup", "--baseline-venv", str(venv),
    )
    results = document["results"]
    assert list(results) == ["go-relay", "tcprelay", "tcprelay-baseline"]
    for name, result in results.items():
        run = result["throughput"]["1"]
        assert run["errors"] == 0 and run["bytes"] > 0, (name, run)
    assert document["ratios"]["tcprelay-baseline/go-relay"]["throughput_1_mbps"] > 0
    installs = document["tcprelay"]
    assert Path(installs["baseline"]["module_file"]).is_relative_to(venv)
    assert Path(installs["current"]["module_file"]) == REPO_ROOT / "tcprelay" / "__init__.py"
    assert document["settings"]["baseline_venv"] == str(venv)


def test_goload_churn_connects_writes_and_resets(tmp_path: Path) -> None:
    """``goload churn -rst`` against a listener that never accepts (the
    kernel completes the connections into its backlog): a bounded number of
    connections, each counted, one JSON line."""
    import socket

    gobuild.require_go()
    goload = gobuild.build("goload")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        host, port = listener.getsockname()
        proc = subprocess.run(
            [str(goload), "churn", "-addr", f"{host}:{port}", "-conns", "4", "-rate", "100",
             "-seconds", "0.2", "-rst"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == 0, result
    assert result["rst"] is True and result["conns"] == 4 and result["rate"] == 100
    # the schedule starts at most rate * seconds (+1 for the slot at t=0)
    assert 1 <= result["completed"] <= 21
