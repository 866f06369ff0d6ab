"""The results table, the ratios between stacks, and the machine description."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from typing import Any, Optional

from benchmarks.run import PYTHON_STACKS

__all__ = [
    "RATIOS",
    "contention_notes",
    "cpu_bound",
    "cpu_notes",
    "machine_info",
    "ratios",
    "rows",
    "table",
]

Results = dict[str, dict[str, Any]]

COLUMNS = (
    ("direct", "direct"),
    ("go-relay", "Go relay"),
    ("tcprelay", "tcprelay"),
    ("expose", "+expose"),
    ("expose-http", "+exp http"),
    ("cluster-local", "clu local"),
    ("cluster-fwd", "clu fwd"),
    ("tcprelay-baseline", "baseline"),
    ("expose-baseline", "+exp base"),
)
"""Scenario name and column heading, in table order."""

RATIOS = (
    ("tcprelay", "go-relay", "tcp/Go"),
    ("tcprelay-baseline", "go-relay", "base/Go"),
    ("tcprelay", "direct", "tcp/dir"),
    ("expose", "go-relay", "exp/Go"),
    ("expose-baseline", "go-relay", "bexp/Go"),
    ("expose", "tcprelay", "exp/tcp"),
    ("expose-http", "expose", "http/exp"),
    ("cluster-fwd", "cluster-local", "fwd/loc"),
)
"""(numerator, denominator, heading) of each ratio column; a baseline
install's ratio against the Go relay stands next to the current one's."""


def _get(result: dict[str, Any], *path: str) -> Optional[float]:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


Row = tuple[str, str, Callable[[dict[str, Any]], Optional[float]], str]


def rows(conns: tuple[int, ...], hold_n: int) -> list[Row]:
    """(key, label, extractor, format) for every figure of the table."""
    found: list[Row] = []

    def mbps(n: int) -> Callable[[dict[str, Any]], Optional[float]]:
        return lambda r: _get(r, "throughput", str(n), "mbps")

    for n in conns:
        label = f"echo MB/s, {n} conn{'s' if n > 1 else ''}"
        found.append((f"throughput_{n}_mbps", label, mbps(n), "{:.0f}"))

    def busy(n: int) -> Callable[[dict[str, Any]], Optional[float]]:
        def get(r: dict[str, Any]) -> Optional[float]:
            machine = _get(r, "throughput", str(n), "machine_cpu_seconds", "busy")
            idle = _get(r, "throughput", str(n), "machine_cpu_seconds", "idle")
            if machine is None or idle is None or machine + idle <= 0:
                return None
            return 100 * machine / (machine + idle)

        return get

    def ms(key: str) -> Callable[[dict[str, Any]], Optional[float]]:
        def get(r: dict[str, Any]) -> Optional[float]:
            us = _get(r, "latency", key)
            return None if us is None else us / 1000

        return get

    def kib(role: str) -> Callable[[dict[str, Any]], Optional[float]]:
        def get(r: dict[str, Any]) -> Optional[float]:
            b = _get(r, "hold", f"{role}_bytes_per_conn")
            return None if b is None else b / 1024

        return get

    def top(key: str) -> Callable[[dict[str, Any]], Optional[float]]:
        return lambda r: _get(r, key)

    found += [
        ("connect_p50_ms", "connect+echo p50 ms", ms("p50_us"), "{:.2f}"),
        ("connect_p99_ms", "connect+echo p99 ms", ms("p99_us"), "{:.2f}"),
        ("cps", "conn/s, 8 clients", lambda r: _get(r, "cps", "cps"), "{:.0f}"),
        ("idle_held", f"idle conns held of {hold_n}", lambda r: _get(r, "hold", "held"), "{:.0f}"),
        ("relay_kib_per_conn", "relay RSS KiB/idle conn", kib("relay"), "{:.1f}"),
        ("agent_kib_per_conn", "agent RSS KiB/idle conn", kib("agent"), "{:.1f}"),
        ("relay_cpu_s_per_gb", "relay CPU s/GB relayed", top("relay_cpu_s_per_gb"), "{:.2f}"),
        ("agent_cpu_s_per_gb", "agent CPU s/GB relayed", top("agent_cpu_s_per_gb"), "{:.2f}"),
        ("service_cpu_s_per_gb", "service CPU s/GB relayed", top("service_cpu_s_per_gb"), "{:.2f}"),
        ("load_cpu_s_per_gb", "load client CPU s/GB", top("load_cpu_s_per_gb"), "{:.2f}"),
    ]
    for n in conns:
        label = f"CPUs busy %, {n} conn{'s' if n > 1 else ''}"
        found.append((f"throughput_{n}_busy_pct", label, busy(n), "{:.0f}"))
    found.append(("errors", "errors", lambda r: _get(r, "errors"), "{:.0f}"))
    return found


NOT_RATIOS = ("errors", "idle_held")
"""Rows whose ratio between stacks means nothing."""


Figures = dict[str, dict[str, Optional[float]]]


def figures(results: Results, conns: tuple[int, ...], hold_n: int) -> Figures:
    """scenario -> key -> figure (None where not measured)."""
    return {
        name: {key: get(result) for key, _, get, _ in rows(conns, hold_n)}
        for name, result in results.items()
    }


def ratios(results: Results, conns: tuple[int, ...], hold_n: int) -> Figures:
    """'tcprelay/go-relay' -> key -> ratio of the two figures."""
    figs = figures(results, conns, hold_n)
    found: Figures = {}
    for num, den, _ in RATIOS:
        if num not in figs or den not in figs:
            continue
        found[f"{num}/{den}"] = {
            key: (
                figs[num][key] / figs[den][key]  # type: ignore[operator]
                if figs[num].get(key) is not None and figs[den].get(key)
                else None
            )
            for key, *_ in rows(conns, hold_n)
            if key not in NOT_RATIOS and not key.endswith("_busy_pct")
        }
    return found


def table(results: Results, conns: tuple[int, ...], hold_n: int) -> str:
    """The one table of a run: a column per stack, then the ratio columns."""
    figs = figures(results, conns, hold_n)
    rats = ratios(results, conns, hold_n)
    columns = [(name, head) for name, head in COLUMNS if name in results]
    ratio_cols = [(f"{n}/{d}", head) for n, d, head in RATIOS if f"{n}/{d}" in rats]
    label_width = max(len(label) for _, label, _, _ in rows(conns, hold_n))
    header = f"{'':<{label_width}}" + "".join(f"{head:>10}" for _, head in columns)
    header += "  " + "".join(f"{head:>8}" for _, head in ratio_cols)
    lines = [header, "-" * len(header)]
    for key, label, _, fmt in rows(conns, hold_n):
        cells = []
        for name, _ in columns:
            if "failed" in results[name]:
                cells.append("FAILED")
                continue
            value = figs[name].get(key)
            cells.append("-" if value is None else fmt.format(value))
        if all(c == "-" for c in cells):
            continue
        line = f"{label:<{label_width}}" + "".join(f"{c:>10}" for c in cells) + "  "
        for ratio_key, _ in ratio_cols:
            value = rats[ratio_key].get(key)
            line += f"{'-' if value is None else f'{value:.2f}x':>8}"
        lines.append(line.rstrip())
    lines.append("")
    lines.append(
        "MB = 10^6 bytes, echoed (one direction) and verified; GB relayed counts "
        "both directions. Ratios divide the figures: above 1 is better for MB/s "
        "and conn/s, below 1 is better for latency, RSS and CPU."
    )
    return "\n".join(lines)


def contention_notes(results: Results, threshold: float = 0.2) -> list[str]:
    """Warnings for throughput runs during which tcprelay's processes often
    waited for a CPU, and the load average range of the run."""
    notes = []
    for name, result in results.items():
        if name not in PYTHON_STACKS:
            # Go's many threads add their waits up: only the (single-threaded)
            # Python processes give a meaningful share
            continue
        shares: dict[str, list[float]] = {}
        for run in result.get("throughput", {}).values():
            for role, wait in run.get("runqueue_wait_seconds", {}).items():
                if run.get("seconds"):
                    shares.setdefault(role, []).append(wait / run["seconds"])
        for role, found in shares.items():
            if max(found) > threshold:
                notes.append(
                    f"note: {name}: the {role} waited for a CPU {100 * min(found):.0f}-"
                    f"{100 * max(found):.0f}% of each throughput run (busy CPUs: trust "
                    "ratios more than absolute figures)"
                )
    loads = [r[k] for r in results.values() for k in ("loadavg_start", "loadavg_end") if k in r]
    if loads:
        notes.append(
            f"load average during the run: {min(loads):.1f} to {max(loads):.1f} "
            f"on {os.cpu_count()} CPUs"
        )
    return notes


CPU_BOUND_SHARE = 0.9
"""A throughput run counts as CPU-bound when the machine was this busy."""


def cpu_bound(result: dict[str, Any], n: int) -> Optional[dict[str, float]]:
    """
    What the CPU time of the ``n``-connection throughput run of a relay stack
    says about its limits, or None where it was not measured.

    ``relay_share``: the relay path's (relay + agent) share of the CPU time
    the whole machine spent.  ``busy``: the machine's busy share.
    ``no_relay_mbps``: the throughput the same stack would reach if the relay
    path cost no CPU at all and everything else cost what it did per byte
    (measured MB/s x busy / (busy - relay path)); meaningful only when the
    run was CPU-bound (busy >= 90%), when throughput is the CPU the machine
    has divided by the CPU each byte costs.
    """
    run = result.get("throughput", {}).get(str(n))
    if not run or "machine_cpu_seconds" not in run or not run.get("mbps"):
        return None
    machine = run["machine_cpu_seconds"]
    cpu = run.get("cpu_seconds", {})
    busy, idle = machine["busy"], machine["idle"]
    relay_path = cpu.get("relay", 0.0) + cpu.get("agent", 0.0)
    if busy <= 0 or relay_path <= 0 or busy - relay_path <= 0:
        return None
    return {
        "busy": busy / (busy + idle),
        "relay_share": relay_path / busy,
        "no_relay_mbps": run["mbps"] * busy / (busy - relay_path),
    }


def cpu_notes(results: Results, conns: tuple[int, ...]) -> list[str]:
    """
    For each CPU-bound throughput run: how much of the machine the relay
    used, and the most a relay costing nothing could have reached, against
    the Go relay's measured figure.
    """
    notes = []
    go = results.get("go-relay", {})
    for n in conns:
        go_mbps = _get(go, "throughput", str(n), "mbps")
        for name in ("go-relay", "tcprelay", "tcprelay-baseline"):
            if name not in results:
                continue
            bound = cpu_bound(results[name], n)
            if bound is None or bound["busy"] < CPU_BOUND_SHARE:
                continue
            line = (
                f"cpu: {name}, {n} conn{'s' if n > 1 else ''}: CPUs {100 * bound['busy']:.0f}% "
                f"busy, the relay used {100 * bound['relay_share']:.0f}% of that; "
                f"with a relay costing no CPU this stack would reach at most "
                f"{bound['no_relay_mbps']:.0f} MB/s"
            )
            if go_mbps:
                line += f" = {bound['no_relay_mbps'] / go_mbps:.2f}x the Go relay's {go_mbps:.0f}"
            notes.append(line)
    return notes


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(go_version: str) -> dict[str, Any]:
    """The machine and toolchain of a run (the tcprelay installs are
    described apart, see :class:`benchmarks.install.Install`)."""
    import twisted

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "twisted": twisted.__version__,
        "go": go_version,
        "executable": sys.executable,
    }
