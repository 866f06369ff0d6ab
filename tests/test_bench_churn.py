"""
``python -m benchmarks.churn``'s arithmetic on synthetic goload output (no
processes); the goload ``churn`` mode itself runs in tests/test_bench.py.
"""

from __future__ import annotations

import pytest

from benchmarks.churn import parse_goload, summarise_rounds, table
from benchmarks.procs import BenchError

CHURN_LINE = (
    '{"cps":5999.8,"completed":24001,"errors":0,"seconds":4.0003,'
    '"rate":6000,"conns":64,"rst":true}'
)


def test_parse_goload_takes_the_last_json_line() -> None:
    found = parse_goload(f"noise\n{{\"cps\": 1}}\n{CHURN_LINE}\n")
    assert found["completed"] == 24001
    assert found["rst"] is True
    assert "error" not in found


def test_parse_goload_without_json_is_an_error() -> None:
    with pytest.raises(BenchError, match="no JSON line"):
        parse_goload("goload: churn: need -addr\n")


def _latency(p50: float, p99: float, top: float, n: int = 100, errors: int = 0) -> dict:
    return {"n": n, "errors": errors, "p50_us": p50, "p99_us": p99, "max_us": top}


def test_rounds_are_summarised_by_median_percentiles_and_largest_max() -> None:
    rounds = [_latency(300, 900, 5000), _latency(310, 20000, 30000, errors=1),
              _latency(290, 1200, 4000)]
    summary = summarise_rounds(rounds)
    assert summary["p50_us"] == 300
    assert summary["p99_us"] == 1200
    assert summary["max_us"] == 30000
    assert summary["n"] == 300
    assert summary["errors"] == 1
    assert summary["round_p99_us"] == [900, 20000, 1200]
    assert summarise_rounds([]) == {}


def test_table_gives_the_ratio_current_over_baseline() -> None:
    def result(p99: float) -> dict:
        return {
            "install": {"commit": "abc1234"},
            "quiet": summarise_rounds([_latency(250, 700, 2000)]),
            "churn": summarise_rounds([_latency(800, p99, 3 * p99)]),
            "churn_cps": 6000.0, "churn_errors": 0,
            "relay_cpu_quiet": 0.5, "relay_cpu_churn": 0.6,
            "relay_wait_quiet": 0.1, "relay_wait_churn": 0.2,
        }

    text = table({"current": result(4000), "baseline": result(8000)})
    assert "B p99 ms, churn" in text
    assert text.splitlines()[-1] == "B p99 under churn, current / baseline: 0.500"
