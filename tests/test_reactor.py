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
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock

from tcprelay._reactor import IdleGauge, tune_reactor

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
    def __init__(self, spare: bool = True) -> None:
        super().__init__(path="/nonexistent")
        self.answer = spare

    def has_spare_cpu(self, now: float) -> bool:
        return self.answer


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
    assert tune_reactor(
        reactor,
        busy_poll,
        clock=_Clock(step),
        pause=lambda: pauses.append(None),
        gauge=_Gauge(spare),
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


def test_an_interrupted_poll_dispatches_nothing() -> None:
    reactor, poller, dispatched, _ = _reactor([OSError(errno.EINTR, "interrupted")])
    reactor.doIteration(1.0)
    assert dispatched == []
    reactor, poller, _, _ = _reactor([OSError(errno.EBADF, "bad fd")])
    with pytest.raises(OSError):
        reactor.doIteration(1.0)


def _stat(path: Path, total_busy: int, idle: int, iowait: int = 0) -> None:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {total_busy} 0 0 {idle} {iowait} 0 0 0 7 7\ncpu0 1 2 3 4\n")


def test_idle_gauge_reads_the_machine_at_most_every_interval(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 1000, 1000)
    gauge = IdleGauge(str(stat), interval=0.05, min_share=0.2, ticks_per_second=100)
    assert gauge.has_spare_cpu(1.0)  # first reading: nothing to compare yet
    _stat(stat, 1090, 1010)  # 100 ticks, 10 idle: 10%
    assert gauge.has_spare_cpu(1.01)  # not re-read within the interval
    assert not gauge.has_spare_cpu(1.06)
    _stat(stat, 1170, 1020, iowait=20)  # 100 ticks, 30 idle (iowait counts): 30%
    assert gauge.has_spare_cpu(1.2)
    _stat(stat, 1265, 1025, iowait=20)  # 100 ticks, 5 idle ...
    gauge.polled = 0.2  # ... plus 20 ticks of our own busy polling: 25%
    assert gauge.has_spare_cpu(1.3)
    assert gauge.polled == 0.0


@pytest.mark.parametrize("content", [None, "", "cpu  x y z\n", "cpu  1 2\n"])
def test_idle_gauge_without_usable_figures_allows_polling(
    tmp_path: Path, content: Optional[str]
) -> None:
    stat = tmp_path / "stat"
    if content is not None:
        stat.write_text(content)
    assert IdleGauge(str(stat)).has_spare_cpu(1.0)


def test_idle_gauge_reads_the_real_proc_stat() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat here")
    gauge = IdleGauge()
    assert gauge._read() is not None


def test_idle_gauge_keeps_busy_polling_within_its_share_of_one_cpu(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 1000, 1000)
    gauge = IdleGauge(str(stat), interval=0.05, max_poll_share=0.25, ticks_per_second=100)
    assert gauge.has_spare_cpu(1.0)
    gauge.polled = 0.001  # 1 ms of polling ...
    assert not gauge.has_spare_cpu(1.002)  # ... in 2 ms: over a quarter of a CPU
    assert gauge.has_spare_cpu(1.004)  # 1 ms in 4 ms: within it again
    gauge.polled = 0.03
    assert not gauge.has_spare_cpu(1.04)
    _stat(stat, 1010, 1090)  # next reading: a fresh budget
    assert gauge.has_spare_cpu(1.06) and gauge.polled == 0.0


def test_idle_gauge_budget_holds_without_proc_stat() -> None:
    gauge = IdleGauge("/nonexistent/stat", interval=0.05)
    assert gauge.has_spare_cpu(1.0)
    gauge.polled = 0.01
    assert not gauge.has_spare_cpu(1.01)
    assert gauge.has_spare_cpu(1.06) and gauge.polled == 0.0
