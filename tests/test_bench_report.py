"""
The benchmark's arithmetic on synthetic results (no processes): the CPU
bound of a throughput run, the notes and rows built from it, how the
rounds in which the stacks take turns are ordered and merged, and which
stacks the options choose (``--scenarios``, ``--baseline-venv``).
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.cli import _settings, parser
from benchmarks.procs import BenchError
from benchmarks.report import cpu_bound, cpu_notes, figures, ratios, table
from benchmarks.run import DEFAULT_SCENARIOS, _merge_rounds, _rotated, choose_scenarios


def _run(mbps: float, busy: float, idle: float, **cpu: float) -> dict[str, Any]:
    return {
        "mbps": mbps,
        "bytes": int(mbps * 1e6 * 3),
        "errors": 0,
        "cpu_seconds": cpu,
        "machine_cpu_seconds": {"busy": busy, "idle": idle, "softirq": 0.5},
    }


def _results() -> dict[str, dict[str, Any]]:
    return {
        "go-relay": {
            "errors": 0,
            "throughput": {"8": _run(200.0, busy=5.8, idle=0.2, relay=2.9, service=1.9, load=0.5)},
        },
        "tcprelay": {
            "errors": 0,
            "throughput": {
                "8": _run(300.0, busy=6.0, idle=0.0, relay=2.0, service=2.4, load=0.9),
                "1": _run(250.0, busy=3.0, idle=3.0, relay=1.0, service=1.0, load=0.3),
            },
        },
    }


def test_cpu_bound_scales_throughput_by_the_cpu_left_without_the_relay() -> None:
    """A CPU-bound run's relay-free bound is its MB/s scaled by the busy CPU time left without the relay."""
    bound = cpu_bound(_results()["tcprelay"], 8)
    assert bound is not None
    assert bound["busy"] == pytest.approx(1.0)
    assert bound["relay_share"] == pytest.approx(2.0 / 6.0)
    # 6 CPU seconds bought 300 MB/s; without the relay's 2, 4 would buy it
    assert bound["no_relay_mbps"] == pytest.approx(450.0)


def test_cpu_bound_counts_the_agent_as_part_of_the_relay_path() -> None:
    """The agent's CPU time counts as the relay path's, like the relay's own."""
    result = {"throughput": {"8": _run(100.0, busy=4.0, idle=0.0, relay=1.0, agent=1.0)}}
    bound = cpu_bound(result, 8)
    assert bound is not None
    assert bound["no_relay_mbps"] == pytest.approx(200.0)


@pytest.mark.parametrize(
    "result",
    [
        {},
        {"throughput": {"8": {"mbps": 100.0, "cpu_seconds": {"relay": 1.0}}}},
        {"throughput": {"8": _run(100.0, busy=2.0, idle=0.0, service=2.0)}},
        {"throughput": {"8": _run(100.0, busy=1.0, idle=1.0, relay=1.0)}},
    ],
    ids=["not-run", "no-machine-figures", "no-relay", "relay-was-everything"],
)
def test_cpu_bound_is_none_without_the_figures_it_needs(result: dict[str, Any]) -> None:
    """No bound is claimed where the run, the machine figures or the relay's share is missing."""
    assert cpu_bound(result, 8) is None


def test_cpu_notes_only_for_cpu_bound_runs_and_against_the_go_relay() -> None:
    """Only CPU-bound runs get a ``cpu:`` line, compared with the Go relay's measured MB/s."""
    notes = cpu_notes(_results(), (1, 8))
    # the 1-connection run was 50% busy: latency-bound, no note
    assert len(notes) == 2
    go, ours = notes
    assert go.startswith("cpu: go-relay, 8 conns: CPUs 97% busy, the relay used 50%")
    assert ours.startswith("cpu: tcprelay, 8 conns: CPUs 100% busy, the relay used 33%")
    assert ours.endswith("at most 450 MB/s = 2.25x the Go relay's 200")


def test_busy_rows_are_shown_but_not_divided() -> None:
    """The CPUs-busy rows appear in the table but get no ratio."""
    results = _results()
    figs = figures(results, (1, 8), 10000)
    assert figs["tcprelay"]["throughput_1_busy_pct"] == pytest.approx(50.0)
    assert figs["tcprelay"]["service_cpu_s_per_gb"] is None  # only set by a real run
    rats = ratios(results, (1, 8), 10000)
    assert "throughput_8_busy_pct" not in rats["tcprelay/go-relay"]
    assert rats["tcprelay/go-relay"]["throughput_8_mbps"] == pytest.approx(1.5)
    text = table(results, (1, 8), 10000)
    busy_line = next(line for line in text.splitlines() if line.startswith("CPUs busy %, 8 conns"))
    assert busy_line.split()[-3:] == ["97", "100", "-"]


def test_rounds_are_merged_into_one_figure_over_their_total_time() -> None:
    """Throughput from rounds is all bytes over all seconds (not a mean of
    rates), CPU times add up, errors count and the first message is kept."""
    rounds = [
        {"mbps": 100.0, "bytes": 100_000_000, "seconds": 1.0, "conns": 8, "errors": 0,
         "cpu_seconds": {"relay": 0.5, "load": 0.25},
         "machine_cpu_seconds": {"busy": 1.5, "idle": 0.5, "softirq": 0.25},
         "runqueue_wait_seconds": {"relay": 0.125}},
        {"mbps": 300.0, "bytes": 600_000_000, "seconds": 2.0, "conns": 8, "errors": 2,
         "error": "read: reset",
         "cpu_seconds": {"relay": 1.0, "load": 0.5},
         "machine_cpu_seconds": {"busy": 3.0, "idle": 1.0, "softirq": 0.5},
         "runqueue_wait_seconds": {"relay": 0.25}},
    ]
    merged = _merge_rounds(rounds)
    assert merged["bytes"] == 700_000_000
    assert merged["seconds"] == 3.0
    assert merged["mbps"] == pytest.approx(700 / 3)
    assert merged["round_mbps"] == [100.0, 300.0]
    assert merged["rounds"] == 2 and merged["conns"] == 8
    assert merged["errors"] == 2 and merged["error"] == "read: reset"
    assert merged["cpu_seconds"] == {"relay": 1.5, "load": 0.75}
    assert merged["machine_cpu_seconds"] == {"busy": 4.5, "idle": 1.5, "softirq": 0.75}
    assert merged["runqueue_wait_seconds"] == {"relay": 0.375}


def test_cps_rounds_are_merged_into_connections_over_total_time() -> None:
    """Connections per second from rounds is all connections over all seconds."""
    merged = _merge_rounds([
        {"cps": 1000.0, "completed": 1000, "seconds": 1.0, "errors": 0},
        {"cps": 3000.0, "completed": 6000, "seconds": 2.0, "errors": 0},
    ])
    assert merged["completed"] == 7000
    assert merged["cps"] == pytest.approx(7000 / 3)
    assert merged["round_cps"] == [1000.0, 3000.0]
    assert "error" not in merged and "cpu_seconds" not in merged


def test_stacks_take_turns_in_a_rotating_order() -> None:
    """Each round starts one stack later than the previous one, wrapping round."""
    stacks = ["direct", "go-relay", "tcprelay"]
    orders = [_rotated(stacks, r) for r in range(4)]
    assert orders == [
        ["direct", "go-relay", "tcprelay"],
        ["go-relay", "tcprelay", "direct"],
        ["tcprelay", "direct", "go-relay"],
        ["direct", "go-relay", "tcprelay"],
    ]
    assert _rotated([], 3) == []


def _with_baseline() -> dict[str, dict[str, Any]]:
    results = _results()
    results["tcprelay-baseline"] = {
        "errors": 0,
        "throughput": {
            "8": _run(250.0, busy=6.0, idle=0.0, relay=2.2, service=2.3, load=0.9),
            "1": _run(240.0, busy=3.0, idle=3.0, relay=1.0, service=1.0, load=0.3),
        },
    }
    return results


def test_baseline_ratio_against_the_go_relay_stands_next_to_the_current_one() -> None:
    """The table has a baseline column and its ratio to the Go relay right after tcprelay's."""
    results = _with_baseline()
    rats = ratios(results, (1, 8), 10000)
    assert rats["tcprelay-baseline/go-relay"]["throughput_8_mbps"] == pytest.approx(1.25)
    assert rats["tcprelay/go-relay"]["throughput_8_mbps"] == pytest.approx(1.5)
    text = table(results, (1, 8), 10000)
    header = text.splitlines()[0].split()
    assert header == ["Go", "relay", "tcprelay", "baseline", "tcp/Go", "base/Go"]
    row = next(line for line in text.splitlines() if line.startswith("echo MB/s, 8 conns"))
    assert row.split()[-5:] == ["200", "300", "250", "1.50x", "1.25x"]


def test_cpu_notes_cover_the_baseline_relay() -> None:
    """A CPU-bound run of the baseline stack gets its own ``cpu:`` line against the Go relay."""
    notes = cpu_notes(_with_baseline(), (8,))
    assert [n.split(",")[0] for n in notes] == [
        "cpu: go-relay", "cpu: tcprelay", "cpu: tcprelay-baseline"
    ]


@pytest.mark.parametrize(
    ("requested", "baseline", "chosen"),
    [
        (None, False, DEFAULT_SCENARIOS),
        (None, True, (*DEFAULT_SCENARIOS, "tcprelay-baseline", "expose-baseline")),
        (("tcprelay", "go-relay"), True, ("go-relay", "tcprelay", "tcprelay-baseline")),
        (("direct", "go-relay"), True, ("direct", "go-relay")),
        (("tcprelay-baseline", "go-relay", "expose"), True,
         ("go-relay", "expose", "tcprelay-baseline")),
    ],
    ids=["default", "baseline-default", "baseline-counterpart", "no-tcprelay", "named-literally"],
)
def test_scenarios_with_and_without_a_baseline(
    requested: tuple[str, ...] | None, baseline: bool, chosen: tuple[str, ...]
) -> None:
    """A baseline adds the counterparts of the chosen tcprelay stacks unless a baseline stack is named."""
    assert choose_scenarios(requested, baseline) == chosen


def test_baseline_stack_without_a_baseline_venv_is_refused() -> None:
    """Naming a baseline stack without ``--baseline-venv`` is an error, not an empty column."""
    with pytest.raises(BenchError, match="needs --baseline-venv"):
        choose_scenarios(("go-relay", "expose-baseline"), False)


def test_baseline_venv_option_adds_the_baseline_stacks() -> None:
    """``--baseline-venv PATH`` is parsed, and the run's stacks include the baseline counterparts."""
    args = parser().parse_args(
        ["--baseline-venv", "/tmp/base/.venv", "--scenarios", "go-relay,tcprelay"]
    )
    assert args.baseline_venv == "/tmp/base/.venv"
    settings = _settings(args, (1024, 4096))
    assert settings.scenarios == ("go-relay", "tcprelay", "tcprelay-baseline")
    assert settings.baseline is None  # the venv is only inspected when the run starts
    assert _settings(parser().parse_args([]), (1024, 4096)).scenarios == DEFAULT_SCENARIOS
