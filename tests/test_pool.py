"""
Unit tests for the public port pool (tcprelay.relay.pool): FIFO hand-out and
release, the FIFO queue of waiting services with positions, timeouts and
cancellation, the bind quarantine, shutdown, and port range parsing.

Everything runs on a Clock: no reactor, no sockets.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tcprelay.relay.pool import PoolTimeout, PortPool, parse_port_range


class Outcome:
    """Records what a Deferred fired with: a value or a Failure (consumed)."""

    def __init__(self, d: Deferred[Any]) -> None:
        self.results: list[Any] = []
        d.addBoth(self.results.append)

    @property
    def called(self) -> bool:
        return bool(self.results)

    @property
    def value(self) -> Any:
        assert len(self.results) == 1, self.results
        assert not isinstance(self.results[0], Failure), self.results[0]
        return self.results[0]

    def failure(self, kind: type[BaseException]) -> Failure:
        assert len(self.results) == 1, self.results
        result = self.results[0]
        assert isinstance(result, Failure), result
        assert result.check(kind), result
        return result


class Positions:
    """An ``on_position`` callback that keeps every position it was told."""

    def __init__(self) -> None:
        self.told: list[int] = []

    def __call__(self, position: int) -> None:
        self.told.append(position)

    @property
    def last(self) -> int:
        return self.told[-1]


def make_pool(ports: range = range(1000, 1003), retry_delay: float = 5.0) -> tuple[PortPool, Clock]:
    clock = Clock()
    return PortPool(ports, clock, retry_delay), clock


def take_all(pool: PortPool) -> list[int]:
    """Acquire every free port (each fires at once)."""
    return [Outcome(pool.acquire(None)).value for _ in range(pool.free)]


def test_hands_out_ports_in_range_order() -> None:
    """Free ports are handed out first-in first-out, starting at the low end."""
    pool, _ = make_pool()
    assert take_all(pool) == [1000, 1001, 1002]
    assert (pool.free, pool.in_use, pool.size) == (0, 3, 3)


def test_released_port_goes_to_the_back() -> None:
    """A released port is handed out only after the ports that were already free."""
    pool, _ = make_pool(range(1000, 1004))
    first = Outcome(pool.acquire(None)).value
    second = Outcome(pool.acquire(None)).value
    assert (first, second) == (1000, 1001)
    pool.release(second)
    pool.release(first)
    assert take_all(pool) == [1002, 1003, 1001, 1000]


def test_waiters_served_in_arrival_order() -> None:
    """When the pool is empty, waiters get released ports in the order they queued."""
    pool, _ = make_pool(range(1000, 1002))
    take_all(pool)
    waiters = [Outcome(pool.acquire(None)) for _ in range(3)]
    assert pool.queued == 3
    assert not any(w.called for w in waiters)
    pool.release(1001)
    assert [w.called for w in waiters] == [True, False, False]
    assert waiters[0].value == 1001
    pool.release(1000)
    assert waiters[1].value == 1000
    assert not waiters[2].called
    assert pool.queued == 1
    pool.release(1001)
    assert waiters[2].value == 1001
    assert (pool.queued, pool.free) == (0, 0)


def test_free_port_does_not_jump_the_queue() -> None:
    """A newcomer queues behind existing waiters even at the instant a port is free."""
    pool, _ = make_pool(range(1000, 1001))
    take_all(pool)
    early = Outcome(pool.acquire(None))
    pool.release(1000)
    late = Outcome(pool.acquire(None))
    assert early.value == 1000
    assert not late.called
    assert pool.queued == 1


def test_positions_reported_and_updated() -> None:
    """Each waiter is told its 1-based position on queueing and again as the queue moves."""
    pool, _ = make_pool(range(1000, 1002))
    take_all(pool)
    told = [Positions() for _ in range(3)]
    waiters = [Outcome(pool.acquire(None, on_position=p)) for p in told]
    assert [p.told for p in told] == [[1], [2], [3]]
    pool.release(1000)
    assert waiters[0].value == 1000
    assert told[1].last == 1
    assert told[2].last == 2
    assert told[0].told == [1], "a served waiter is told nothing more"
    pool.release(1001)
    assert waiters[1].value == 1001
    assert told[2].last == 1


def test_timeout_fails_waiter_and_leaves_queue() -> None:
    """A waiter not served within its timeout fails with PoolTimeout and leaves the queue."""
    pool, clock = make_pool(range(1000, 1001))
    take_all(pool)
    patient_pos = Positions()
    hasty = Outcome(pool.acquire(2.0))
    patient = Outcome(pool.acquire(10.0, on_position=patient_pos))
    assert patient_pos.told == [2]
    clock.advance(1.9)
    assert not hasty.called
    clock.advance(0.1)
    hasty.failure(PoolTimeout)
    assert pool.queued == 1
    assert patient_pos.last == 1
    pool.release(1000)
    assert patient.value == 1000
    assert clock.getDelayedCalls() == [], "served waiter's timer must be cancelled"


def test_served_waiter_does_not_time_out_later() -> None:
    """Once served, a waiter's timeout no longer fires."""
    pool, clock = make_pool(range(1000, 1001))
    take_all(pool)
    waiter = Outcome(pool.acquire(1.0))
    pool.release(1000)
    clock.advance(5)
    assert waiter.value == 1000
    assert pool.in_use == 1


def test_cancel_removes_waiter_and_others_move_up() -> None:
    """Cancelling a waiting Deferred removes it from the queue; later waiters move up."""
    pool, clock = make_pool(range(1000, 1001))
    take_all(pool)
    told = [Positions() for _ in range(3)]
    deferreds = [pool.acquire(30.0, on_position=p) for p in told]
    outcomes = [Outcome(d) for d in deferreds]
    deferreds[0].cancel()
    outcomes[0].failure(CancelledError)
    assert pool.queued == 2
    assert (told[1].last, told[2].last) == (1, 2)
    assert len(clock.getDelayedCalls()) == 2, "the cancelled waiter's timer is gone"
    pool.release(1000)
    assert outcomes[1].value == 1000
    assert not outcomes[2].called
    assert told[2].last == 1


def test_cancel_after_served_is_harmless() -> None:
    """Cancelling a Deferred that already has its port changes nothing in the pool."""
    pool, _ = make_pool(range(1000, 1002))
    d = pool.acquire(None)
    got = Outcome(d)
    d.cancel()
    assert got.value == 1000
    assert (pool.free, pool.in_use, pool.queued) == (1, 1, 0)


def test_quarantine_returns_port_after_retry_delay_to_first_waiter() -> None:
    """A quarantined port is set aside, then after retry_delay goes to the first waiter."""
    pool, clock = make_pool(range(1000, 1002), retry_delay=5.0)
    bad = Outcome(pool.acquire(None)).value
    other = Outcome(pool.acquire(None)).value
    pool.quarantine(bad)
    assert (pool.quarantined, pool.in_use, pool.free) == (1, 1, 0)
    first = Outcome(pool.acquire(None))
    second = Outcome(pool.acquire(None))
    pool.release(bad)  # released while quarantined: ignored
    assert pool.free == 0
    clock.advance(4.9)
    assert not first.called
    clock.advance(0.1)
    assert first.value == bad
    assert not second.called
    assert (pool.quarantined, pool.queued) == (0, 1)
    pool.release(other)
    assert second.value == other


def test_quarantined_port_returns_to_free_list_without_waiters() -> None:
    """With no one waiting, a quarantined port rejoins the back of the free list."""
    pool, clock = make_pool(range(1000, 1003), retry_delay=1.0)
    bad = Outcome(pool.acquire(None)).value
    pool.quarantine(bad)
    pool.quarantine(bad)  # twice: still one timer
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert pool.quarantined == 0
    assert take_all(pool) == [1001, 1002, bad]


def test_release_of_unknown_or_free_port_ignored() -> None:
    """Releasing a port outside the range, or one already free, changes nothing."""
    pool, _ = make_pool(range(1000, 1003))
    port = Outcome(pool.acquire(None)).value
    pool.release(9999)
    pool.release(1002)  # never handed out
    assert (pool.free, pool.in_use) == (2, 1)
    pool.release(port)
    pool.release(port)  # duplicate
    assert (pool.free, pool.in_use) == (3, 0)
    assert take_all(pool) == [1001, 1002, 1000]


def test_stop_service_cancels_timers_and_fails_waiters() -> None:
    """stopService cancels every quarantine and timeout timer and fails every waiter."""
    pool, clock = make_pool(range(1000, 1002))
    pool.startService()
    bad, _ = take_all(pool)
    pool.quarantine(bad)
    waiters = [Outcome(pool.acquire(5.0)), Outcome(pool.acquire(None))]
    assert clock.getDelayedCalls()
    pool.stopService()
    assert clock.getDelayedCalls() == []
    for w in waiters:
        w.failure(CancelledError)
    assert (pool.queued, pool.quarantined) == (0, 0)
    assert not pool.running


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10-20", range(10, 21)),
        ("80", range(80, 81)),
        ("5-5", range(5, 6)),
        ("1-65535", range(1, 65536)),
    ],
)
def test_parse_port_range_good(text: str, expected: range) -> None:
    """LOW-HIGH (inclusive) and a single port parse into the matching range."""
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    "text", ["9-3", "abc", "", "-", "5-", "-5", "0-10", "1-65536", "70000", "1-2-3", "a-b"]
)
def test_parse_port_range_bad(text: str) -> None:
    """Malformed, reversed, or out-of-range port ranges raise ValueError naming the input."""
    with pytest.raises(ValueError) as info:
        parse_port_range(text)
    assert repr(text) in str(info.value)
