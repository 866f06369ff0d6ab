"""Shared pytest fixtures."""

import pytest


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
