"""Shared pytest fixtures."""

import pytest


def pytest_configure(config):
    """
    Begin Twisted logging as the daemons do, to an observer that drops every
    event.  Until logging begins, Twisted keeps the last 65,536 events, and
    every object they name (sessions, transports), for whoever begins it
    later; nobody does in a test run, and the tests that check what reference
    counting frees would see those objects kept.  Tests that read the log
    add their own observer to the global publisher, as before.
    """
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs (it defines no such fixture)."""
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def no_cyclic_gc():
    """The cyclic garbage collector off for the test: what is freed is freed by reference counting."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_MARKED_ELSEWHERE = {
    "test_bench.py": ("bench", None),
    "test_packaging.py": ("e2e", "test_twistd_lists_plugin"),
    "test_testing_kit.py": ("e2e", "test_trial_example_passes"),
    "test_reactor.py": (
        "e2e",
        "test_tune_malloc_stops_the_heap_from_being_given_back_and_faulted_in_again",
    ),
}
"""Tests in this directory that run real subprocesses (twistd, trial, Go
programs, a fresh interpreter), by module: the marker, and the one test
(None: the whole module).  tests/e2e and tests/interop mark themselves."""


def pytest_collection_modifyitems(config, items):
    """Mark the subprocess tests of :data:`_MARKED_ELSEWHERE`; a name there that no longer exists is a usage error, not a silently unmarked test."""
    from pathlib import Path

    here = Path(__file__).parent
    for item in items:
        if item.path.parent != here or item.path.name not in _MARKED_ELSEWHERE:
            continue
        marker, name = _MARKED_ELSEWHERE[item.path.name]
        if name is not None and not hasattr(item.module, name):
            raise pytest.UsageError(
                f"tests/conftest.py marks {item.path.name}::{name}, which no longer exists"
            )
        if name is None or item.originalname == name:
            item.add_marker(getattr(pytest.mark, marker))
