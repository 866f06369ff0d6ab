"""Shared pytest fixtures."""

import pytest


@pytest.fixture
def reactor():
    """The global reactor that pytest-twisted runs (it defines no such fixture)."""
    from twisted.internet import reactor

    return reactor
