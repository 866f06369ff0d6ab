"""
The lean poll step for the epoll reactor (``tcprelay._reactor``): events go
straight to the reactor's own ``_doReadOrWrite``; after a pass that handled
events it polls without blocking, yielding between polls, for at most the
busy-poll time (and never past the next timed call), then blocks for the
rest; it does not busy-poll when idle, when turned off, or while the
machine has no CPU to spare.  Driven with a scripted poller and clock, no
real waiting.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock

from tcprelay._reactor import (
    MALLOC_MMAP_THRESHOLD,
    MALLOC_TOP_PAD,
    MALLOC_TRIM_THRESHOLD,
    IdleGauge,
    freeze_heap,
    is_glibc,
    tune_malloc,
    tune_reactor,
    usable_cpus,
)

READ = 1


class _Poller:
    """Answers ``poll`` from a script; records every timeout asked for."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        assert maxevents >= 1
        self.timeouts.append(timeout)
        answer = self.script.pop(0) if self.script else []
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[no-any-return]


class _Clock:
    """perf_counter stand-in: each reading is ``step`` later than the last."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class _Gauge(IdleGauge):
    """Always allows the full period (or nothing); records what was spent."""

    def __init__(self, spare: bool = True) -> None:
        super().__init__(path="/nonexistent")
        self.answer = spare
        self.spent_cpu: list[float] = []

    def allowance(self, now: float, most: float) -> float:
        return most if self.answer else 0.0

    def spent(self, cpu_seconds: float) -> None:
        self.spent_cpu.append(cpu_seconds)


def _reactor(
    script: list[Any], busy_poll: float = 100e-6, step: float = 30e-6, spare: bool = True
) -> tuple[Any, _Poller, list[tuple[Any, int, int]], list[None]]:
    """An EPollReactor shell (no fds of its own) tuned over a scripted poller."""
    reactor: Any = EPollReactor.__new__(EPollReactor)
    poller = _Poller(script)
    dispatched: list[tuple[Any, int, int]] = []
    pauses: list[None] = []
    reactor._poller = poller
    reactor._selectables = {5: "five", 6: "six"}
    reactor._doReadOrWrite = lambda s, fd, ev: dispatched.append((s, fd, ev))
    clock = _Clock(step)
    assert tune_reactor(
        reactor,
        busy_poll,
        clock=clock,
        pause=lambda: pauses.append(None),
        gauge=_Gauge(spare),
        cpu_clock=clock,
        cpus=2,
    )
    return reactor, poller, dispatched, pauses


def test_other_reactors_are_left_alone() -> None:
    clock = Clock()
    assert not tune_reactor(clock)
    assert not hasattr(clock, "doIteration")


def test_events_go_straight_to_do_read_or_write_and_unknown_fds_are_skipped() -> None:
    reactor, poller, dispatched, _ = _reactor([[(5, READ), (9, READ), (6, 4)]])
    reactor.doIteration(1.0)
    assert poller.timeouts == [1.0]  # idle before: one blocking poll
    assert dispatched == [("five", 5, READ), ("six", 6, 4)]


def test_no_timeout_blocks_indefinitely() -> None:
    reactor, poller, _, _ = _reactor([[]])
    reactor.doIteration(None)
    assert poller.timeouts == [-1]


def test_after_events_it_polls_without_blocking_then_blocks_for_the_rest() -> None:
    # pass 1 handles an event; pass 2 finds nothing for 100 us of polling
    reactor, poller, dispatched, pauses = _reactor([[(5, READ)]], busy_poll=100e-6, step=30e-6)
    reactor.doIteration(1.0)
    reactor.doIteration(1.0)
    spins = poller.timeouts[1:-1]
    assert spins and all(t == 0 for t in spins)
    assert len(spins) == 1 + len(pauses)  # a yield between two polls
    assert 2 <= len(pauses) <= 4  # bounded by the 100 us (30 us per clock reading)
    assert poller.timeouts[-1] == pytest.approx(1.0 - 120e-6, abs=40e-6)
    assert dispatched == [("five", 5, READ)]
    # pass 3: the last pass found nothing, so no busy polling now
    before = len(poller.timeouts)
    reactor.doIteration(1.0)
    assert poller.timeouts[before:] == [1.0]


def test_polling_stops_as_soon_as_an_event_arrives() -> None:
    reactor, poller, dispatched, pauses = _reactor([[(5, READ)], [], [(6, READ)]], busy_poll=1.0)
    reactor.doIteration(1.0)
    reactor.doIteration(1.0)
    assert poller.timeouts == [1.0, 0, 0]
    assert len(pauses) == 1
    assert dispatched == [("five", 5, READ), ("six", 6, READ)]


def test_polling_never_runs_past_the_next_timed_call() -> None:
    reactor, poller, _, pauses = _reactor([[(5, READ)]], busy_poll=1.0, step=30e-6)
    reactor.doIteration(1.0)
    reactor.doIteration(50e-6)
    assert len(pauses) <= 2
    assert poller.timeouts[-1] == 0  # nothing left of the timeout to block for


def test_zero_timeout_and_zero_busy_poll_do_not_spin() -> None:
    reactor, poller, _, pauses = _reactor([[(5, READ)]])
    reactor.doIteration(1.0)
    reactor.doIteration(0)
    assert poller.timeouts == [1.0, 0] and not pauses
    reactor, poller, _, pauses = _reactor([[(5, READ)]], busy_poll=0)
    reactor.doIteration(1.0)
    reactor.doIteration(1.0)
    assert poller.timeouts == [1.0, 1.0] and not pauses


def test_no_busy_polling_while_the_machine_has_no_cpu_to_spare() -> None:
    reactor, poller, _, pauses = _reactor([[(5, READ)]], spare=False)
    reactor.doIteration(1.0)
    reactor.doIteration(1.0)
    assert poller.timeouts == [1.0, 1.0] and not pauses


def test_an_epoll_error_reaches_the_reactor() -> None:
    """Python retries epoll_wait on EINTR itself (PEP 475); any other error is the reactor's to report."""
    reactor, poller, dispatched, _ = _reactor([OSError(errno.EBADF, "bad fd")])
    with pytest.raises(OSError):
        reactor.doIteration(1.0)
    assert dispatched == []


def _stat(path: Path, total_busy: int, idle: int, iowait: int = 0) -> None:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {total_busy} 0 0 {idle} {iowait} 0 0 0 7 7\ncpu0 1 2 3 4\n")


def test_idle_gauge_allows_polling_only_while_the_machine_has_idle_cpu(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 1000, 1000)
    gauge = IdleGauge(str(stat), interval=0.05, min_share=0.2, ticks_per_second=100)
    most = 1e-3
    assert gauge.allowance(1.0, most) == most  # first reading: nothing to compare yet
    _stat(stat, 1090, 1010)  # 100 ticks, 10 idle: 10%
    assert gauge.allowance(1.01, most) > 0  # not re-read within the interval
    assert gauge.allowance(1.06, most) == 0
    _stat(stat, 1170, 1020, iowait=20)  # 100 ticks, 30 idle (iowait counts): 30%
    assert gauge.allowance(1.2, most) > 0
    _stat(stat, 1265, 1025, iowait=20)  # 100 ticks, 5 idle ...
    gauge.spent(0.2)  # ... plus 20 ticks of our own polling's CPU time: 25%
    assert gauge.allowance(1.3, most) > 0
    assert gauge.polled == 0.0


def test_idle_gauge_budget_is_a_quarter_of_one_cpu(tmp_path: Path) -> None:
    gauge = IdleGauge("/nonexistent/stat", interval=0.05, max_poll_share=0.25)
    most = 1e-3
    assert gauge.allowance(1.0, most) == most  # starts full
    gauge.spent(most)
    assert gauge.allowance(1.0, most) == 0
    assert gauge.allowance(1.002, most) == pytest.approx(0.5e-3)  # 2 ms refill 0.5 ms
    assert gauge.allowance(1.1, most) == most  # never more than one period


def test_busy_polling_over_time_stays_within_the_budget() -> None:
    """Sparse events with a 10 ms busy-poll period: the polling's CPU stays near a quarter of the elapsed time, not the 10 ms after every event."""
    reactor: Any = EPollReactor.__new__(EPollReactor)
    clock = _Clock(20e-6)
    poller = _Poller([])
    reactor._poller = poller
    reactor._selectables = {5: "five"}
    reactor._doReadOrWrite = lambda s, fd, ev: None
    gauge = IdleGauge("/nonexistent/stat")
    spent: list[float] = []
    real_spent = gauge.spent
    gauge.spent = lambda cpu: (spent.append(cpu), real_spent(cpu))  # type: ignore[method-assign]
    assert tune_reactor(reactor, 0.01, clock=clock, pause=None, gauge=gauge, cpu_clock=clock, cpus=2)
    start = clock.now
    for _ in range(200):
        poller.script = [[(5, READ)]]
        reactor.doIteration(0.0)  # an event ...
        reactor.doIteration(0.002)  # ... then 2 ms of nothing (busy-polled, then blocked)
        clock.now += 0.002
    elapsed = clock.now - start
    # the bucket starts with one period; each spin may overrun its deadline
    # by a clock reading or two (20 us each here)
    assert sum(spent) <= 0.25 * elapsed + 0.01 + 200 * 2 * 20e-6
    assert sum(spent) < 0.5 * 200 * 0.002  # unbudgeted it would be 2 ms per event


@pytest.mark.parametrize("content", [None, "", "cpu  x y z\n", "cpu  1 2\n"])
def test_idle_gauge_without_usable_figures_allows_polling(
    tmp_path: Path, content: Optional[str]
) -> None:
    stat = tmp_path / "stat"
    if content is not None:
        stat.write_text(content)
    assert IdleGauge(str(stat)).allowance(1.0, 1e-3) == 1e-3


def test_idle_gauge_reads_the_real_proc_stat() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    gauge = IdleGauge()
    assert gauge._read() is not None


def test_an_exception_in_one_event_is_logged_and_the_others_are_handled() -> None:
    from twisted.logger import globalLogPublisher

    class Selectable:
        def logPrefix(self) -> str:
            return "the-broken-one"

    broken = Selectable()
    reactor, poller, dispatched, _ = _reactor([[(5, READ), (6, READ)]])
    reactor._selectables[5] = broken

    def dispatch(s: Any, fd: int, ev: int) -> None:
        if s is broken:
            raise RuntimeError("a bug in a protocol")
        dispatched.append((s, fd, ev))

    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        # the poll step looked _doReadOrWrite up when installed: re-install
        reactor._doReadOrWrite = dispatch
        assert tune_reactor(reactor, 0, cpus=2)
        reactor.doIteration(1.0)
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert dispatched == [("six", 6, READ)]
    assert any("the-broken-one" in str(e.get("system", e.get("log_system", ""))) for e in logged)


def test_a_pass_for_timed_calls_only_keeps_busy_polling_on() -> None:
    reactor, poller, _, pauses = _reactor([[(5, READ)], []], busy_poll=100e-6)
    reactor.doIteration(1.0)  # an event
    reactor.doIteration(0)  # a due timed call: no events, no waiting
    reactor.doIteration(1.0)  # still counts as right after activity
    assert pauses


def test_no_busy_polling_with_fewer_than_two_cpus_and_a_ceiling_on_the_period() -> None:
    reactor: Any = EPollReactor.__new__(EPollReactor)
    poller = _Poller([[(5, READ)]])
    reactor._poller = poller
    reactor._selectables = {5: "five"}
    reactor._doReadOrWrite = lambda s, fd, ev: None
    assert tune_reactor(reactor, 250e-6, clock=_Clock(30e-6), pause=None, gauge=_Gauge(), cpus=1)
    reactor.doIteration(1.0)
    reactor.doIteration(1.0)
    assert poller.timeouts == [1.0, 1.0]
    # a huge period is cut to MAX_BUSY_POLL (10 ms)
    poller = _Poller([[(5, READ)]])
    reactor._poller = poller
    clock = _Clock(1e-3)
    assert tune_reactor(reactor, 5.0, clock=clock, pause=None, gauge=_Gauge(), cpu_clock=clock, cpus=2)
    reactor.doIteration(10.0)
    reactor.doIteration(10.0)
    assert len(poller.timeouts) - 2 <= 12  # about 10 polls of 1 ms, not 5 s worth


@pytest.mark.parametrize(
    "cpu_max, expected",
    [("50000 100000\n", 0.5), ("150000 100000\n", 1.5), ("max 100000\n", None), (None, None)],
)
def test_usable_cpus_follows_the_cgroup_quota(
    tmp_path: Path, cpu_max: Optional[str], expected: Optional[float]
) -> None:
    """A cgroup v2 quota below the affinity mask lowers the CPUs busy polling counts on."""
    import os

    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    want = affinity if expected is None else min(affinity, expected)
    assert usable_cpus(str(path)) == pytest.approx(want)


def test_freeze_heap_collects_then_freezes() -> None:
    """Start-up garbage is collected, and what is alive is frozen out of later collections."""

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()  # whatever froze before, for a clean count
    garbage = weakref.ref(Cycle())
    kept = Cycle()
    try:
        freeze_heap()
        assert garbage() is None, "start-up garbage was frozen instead of collected"
        assert gc.get_freeze_count() > 0
        assert not gc.is_finalized(kept)
        assert not any(o is kept for o in gc.get_objects())  # out of the collector's reach
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert any(o is kept for o in gc.get_objects())


class _FakeLibc:
    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.answer


def test_tune_malloc_sets_mmap_then_trim_threshold_and_top_pad() -> None:
    """M_MMAP_THRESHOLD (-3), M_TRIM_THRESHOLD (-1) and M_TOP_PAD (-2), in that order."""
    libc = _FakeLibc()
    assert tune_malloc(libc, environ={"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert libc.calls == [
        (-3, MALLOC_MMAP_THRESHOLD),
        (-1, MALLOC_TRIM_THRESHOLD),
        (-2, MALLOC_TOP_PAD),
    ]
    assert MALLOC_MMAP_THRESHOLD >= 1 << 20, "a 256 KiB read buffer must come from the heap"


@pytest.mark.parametrize("environ", [
    {"MALLOC_TOP_PAD_": "0"},
    {"MALLOC_TRIM_THRESHOLD_": "131072"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
])
def test_tune_malloc_leaves_the_operators_settings_alone(environ: dict[str, str]) -> None:
    libc = _FakeLibc()
    assert not tune_malloc(libc, environ=environ)
    assert libc.calls == []


def test_tune_malloc_says_when_glibc_refused() -> None:
    libc = _FakeLibc(answer=0)
    assert not tune_malloc(libc, environ={})
    assert len(libc.calls) == 3


_FAULTS_SCRIPT = """
import os, sys
from tcprelay._reactor import tune_malloc

def minor_faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

tuned = sys.argv[1] == "tune" and tune_malloc(environ={})
for _ in range(3):  # the heap's first growth is not what is measured
    buffers = [bytearray(262144) for _ in range(64)]
    del buffers
before = minor_faults()
for _ in range(20):
    # a burst of 16 MiB of read-sized buffers, all freed: the heap's top
    buffers = [os.urandom(1) * 262144 for _ in range(64)]
    del buffers
print(tuned, minor_faults() - before)
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/stat") or not is_glibc(),
    reason="needs Linux's /proc and glibc's allocator",
)
def test_tune_malloc_stops_the_heap_from_being_given_back_and_faulted_in_again() -> None:
    """Bursts of 256 KiB buffers fault pages in again and again with glibc's
    defaults (the freed top of the heap is trimmed), and not once tuned."""
    found = {}
    for mode in ("tune", "default"):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode],
            capture_output=True, text=True, timeout=60, check=True,
            env={**{k: v for k, v in os.environ.items()
                    if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"},
                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        ).stdout.split()
        found[mode] = (out[0] == "True", int(out[1]))
    pages = 20 * 64 * 262144 // 4096
    assert found["tune"][0], "tune_malloc did not apply on this glibc"
    assert found["tune"][1] < pages // 100, found
    # and the measurement can tell: the defaults do fault the heap in again
    assert found["default"][1] > pages // 20, found
