"""
The end-to-end tests' fixtures, made available here to every test of this
directory.  The shared ones live in :mod:`tests.e2e.support` (with the
helpers the tests import from there): ``procs`` (the test's subprocesses,
killed and reaped when it ends), ``echo_servers`` and ``echo_server`` (local
echo services, stopped when it ends).  The operations tests' own ones live
in :mod:`tests.e2e.ops_fixtures`: ``held_socket``, ``notify_socket`` and
``unix_dir``.

Every test of this directory is marked ``e2e``, so that ``pytest -m "not
e2e"`` leaves them out.
"""

from pathlib import Path

import pytest

from tests.e2e.ops_fixtures import held_socket, notify_socket, unix_dir
from tests.e2e.support import echo_server, echo_servers, procs

__all__ = ["echo_server", "echo_servers", "held_socket", "notify_socket", "procs", "unix_dir"]

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the items collected from this directory (new files included) ``e2e``."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
