"""
``python -m benchmarks.capacity``: its arithmetic on synthetic figures (no
processes), and one tiny bounded run of every test (marked ``bench``) so
that the benchmark cannot rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.capacity import passed, plateau, summary
from tests.interop import gobuild

REPO = Path(__file__).resolve().parents[1]


def test_plateau_compares_the_second_half_with_the_first_after_the_warm_up() -> None:
    mib = 1 << 20
    samples = [(0.0, 10 * mib), (5.0, 50 * mib),  # warm-up: left out
               (10.0, 60 * mib), (20.0, 62 * mib), (30.0, 63 * mib), (40.0, 66 * mib)]
    flat = plateau(samples, warmup=10)
    assert flat["first_max"] == 62 * mib  # 10 s and 20 s: up to the middle (25 s)
    assert flat["second_max"] == 66 * mib
    assert flat["growth"] == pytest.approx(66 / 62)
    assert flat["final"] == 66 * mib


def test_plateau_of_too_few_samples_is_unknown() -> None:
    assert plateau([(0.0, 1), (1.0, 2)], warmup=5)["growth"] is None


def _idle(per_visitor: float, errors: int = 0) -> dict:
    return {"held": 1000, "errors": errors, "seconds": 1.0,
            "relay_bytes_per_visitor": per_visitor, "service_bytes_per_visitor": 100.0,
            "latency_while_held": {"p50_us": 500.0, "p99_us": 2000.0, "max_us": 9000.0},
            "relay_fds_held": 1010, "fds_back": True}


def test_summary_gives_tcprelay_over_the_go_relay() -> None:
    lines = summary("idle", {"go-relay": _idle(30 * 1024), "tcprelay": _idle(3 * 1024)})
    [row] = [line for line in lines if "relay KiB/visitor" in line]
    assert row.split()[-3:] == ["30.00", "3.00", "0.10x"]


def test_idle_passes_only_without_errors_and_with_descriptors_back() -> None:
    assert passed("idle", {"tcprelay": _idle(3000)})
    assert not passed("idle", {"tcprelay": _idle(3000, errors=1)})


@pytest.mark.bench
def test_capacity_runs_every_test_small(tmp_path: Path) -> None:
    """idle, sessions and soak, tiny and bounded: every figure is there, nothing failed."""
    gobuild.require_go()  # its load programs are Go: skip without Go, fail under CI
    out = tmp_path / "capacity.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.capacity", "idle", "sessions", "soak",
         "--relays", "go-relay,tcprelay,tcprelay-http", "--visitors", "300",
         "--probe-rate", "100", "--probe-seconds", "1", "--sessions", "40", "--hold", "4",
         "--duration", "6", "--sample", "0.5", "--visitor-rate", "100",
         "--session-conns", "4", "--json", str(out), "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    for name in ("go-relay", "tcprelay"):
        idle = results["idle"][name]
        assert idle["held"] == 300 and idle["errors"] == 0 and idle["fds_back"]
        assert results["soak"][name]["fds_back"]
    assert results["idle"]["tcprelay"]["relay_bytes_per_visitor"] > 0
    for name in ("go-relay", "tcprelay", "tcprelay-http"):
        sessions = results["sessions"][name]
        assert sessions["opened"] == 40 and sessions["lost"] == 0
        assert sessions["hb_timeouts"] == 0 and sessions["heartbeats"] > 0
    assert results["sessions"]["tcprelay"]["relay_heartbeat_timeouts"] == 0
    assert "tcp/Go" in proc.stdout
