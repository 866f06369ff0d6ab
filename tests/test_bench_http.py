"""
The benchmark's ``expose-http`` stack without running it: the options
that choose it, goload's ``-host`` arguments built for each stack, the
``--http NAME`` split of ``benchmarks/named_agent.py``, the ratio column
against the port route; and goload's own ``-host`` parsing (a usage
error, no connection made).  Deterministic, no timing.
"""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.cli import _settings, parser
from benchmarks.named_agent import split_http
from benchmarks.report import ratios, table
from benchmarks.run import DEFAULT_SCENARIOS, Stack, choose_scenarios, latency_host_args
from tests.interop import gobuild


def test_expose_http_is_chosen_only_when_named() -> None:
    assert "expose-http" not in DEFAULT_SCENARIOS
    assert choose_scenarios(("expose-http", "expose"), False) == ("expose", "expose-http")
    # a baseline install has no counterpart of it
    assert choose_scenarios(("expose", "expose-http"), True) == (
        "expose", "expose-http", "expose-baseline",
    )


def test_head_all_option() -> None:
    assert _settings(parser().parse_args([]), (1024, 4096)).head_all is False
    args = parser().parse_args(["--scenarios", "expose,expose-http", "--head-all"])
    assert _settings(args, (1024, 4096)).head_all is True


def test_goload_host_arguments_per_stack() -> None:
    port = Stack("expose", "127.0.0.1:1")
    named = Stack("expose-http", "127.0.0.1:2", host="echo.bench.test")
    assert port.host_args() == []
    assert named.host_args() == ["-host", "echo.bench.test"]
    assert latency_host_args([port]) == []
    # one entry per address, in order, empty where there is no head
    assert latency_host_args([port, named]) == ["-host", ",echo.bench.test"]
    assert latency_host_args([named, port]) == ["-host", "echo.bench.test,"]


@pytest.mark.parametrize(
    "argv, name, rest",
    [
        (["--http", "echo", "1234", "--relay", "h:1"], "echo", ["1234", "--relay", "h:1"]),
        (["1234", "--relay", "h:1", "--http=echo"], "echo", ["1234", "--relay", "h:1"]),
    ],
)
def test_named_agent_takes_its_name_out_of_the_expose_arguments(
    argv: list[str], name: str, rest: list[str]
) -> None:
    assert split_http(argv) == (name, rest)


@pytest.mark.parametrize(
    "argv", [[], ["--http"], ["--http", ""], ["--http", "a", "--http", "b"], ["1234"]]
)
def test_named_agent_wants_exactly_one_name(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        split_http(argv)


def test_http_route_ratio_is_against_the_port_route() -> None:
    def result(p50: float) -> dict[str, object]:
        return {"errors": 0, "latency": {"p50_us": p50, "p99_us": 2 * p50}}

    results = {"expose": result(500.0), "expose-http": result(600.0)}
    found = ratios(results, (1,), 100)
    assert found["expose-http/expose"]["connect_p50_ms"] == pytest.approx(1.2)
    assert "http/exp" in table(results, (1,), 100)


@pytest.mark.parametrize("hosts", ["a", "a,b,c", "a b,c"])
def test_goload_latency_refuses_a_host_list_not_matching_the_addresses(hosts: str) -> None:
    """Checked before any connection: exit 2 with a usage message."""
    gobuild.require_go()
    goload = gobuild.build("goload")
    proc = subprocess.run(
        [str(goload), "latency", "-addr", "127.0.0.1:9,127.0.0.1:9", "-host", hosts, "-n", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc
    assert "-host" in proc.stderr
