"""
What the in-process fuzz tests of the relay's doors share (tests/test_relay_fuzz.py,
tests/test_ngrok_fuzz.py): the script of actions a fuzzing peer takes, the
visitors it brings, the log observer that catches a failure, and the check
that nothing of the peer remains once it is gone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

__all__ = ["Failures", "actions", "assert_nothing_held", "logged_failures", "visitor_action"]


def actions(frames: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[Any, ...]]:
    """One step of a script: ``frames`` (sent split into pieces of 1 to 64 bytes),
    a visitor (its first bytes; whether it then leaves) or time passing."""
    return st.one_of(
        st.tuples(st.just("frames"), st.lists(frames, max_size=6), st.integers(1, 64)),
        st.tuples(st.just("visitor"), st.binary(max_size=64), st.booleans()),
        st.tuples(st.just("time"), st.sampled_from([0.0, 0.001, 0.5, 3.0, 14.0])),
    )


class Failures:
    """Log events carrying a failure (a traceback in the relay's log)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.events.append(event)


@contextlib.contextmanager
def logged_failures() -> Iterator[Failures]:
    """A :class:`Failures` observing the global log publisher while the block runs."""
    failures = Failures()
    globalLogPublisher.addObserver(failures)
    try:
        yield failures
    finally:
        globalLogPublisher.removeObserver(failures)


def visitor_action(relay: Any, port: Optional[int], action: tuple[Any, ...], visitors: list[Any]) -> None:
    """A ``visitor`` action on the MemoryRelay ``relay``: one visits ``port`` (if the
    peer has one), sends the action's bytes and perhaps leaves; kept in ``visitors``."""
    if port is None:
        return
    visitor = relay.visitor(port)
    if visitor is None:
        return
    visitors.append(visitor)
    if action[1]:
        visitor.send(action[1])
    if action[2]:
        visitor.leave(clean=True)


def assert_nothing_held(relay: Any, ports: int, failures: Failures) -> None:
    """The MemoryRelay ``relay`` holds no session, tunnel, visitor, port, lease or
    live timer once every peer is gone, and logged no failure."""
    core = relay.relay
    assert not core.sessions
    assert not core.tunnels()
    assert core.visitor_count == 0
    assert core.pool.free == ports
    assert core.registry.lease_count() == 0
    assert all(not c.active() for c in relay.clock.getDelayedCalls())
    assert not failures.events, failures.events[0]
