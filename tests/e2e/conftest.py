"""
The end-to-end tests' fixtures, made available here to every test of this
directory.  The shared ones live in :mod:`tests.e2e.support` (with the
helpers the tests import from there): ``procs`` (the test's subprocesses,
killed and reaped when it ends), ``echo_servers`` and ``echo_server`` (local
echo services, stopped when it ends).  The operations tests' own ones live
in :mod:`tests.e2e.ops_fixtures`: ``held_socket``, ``notify_socket`` and
``unix_dir``.
"""

from tests.e2e.ops_fixtures import held_socket, notify_socket, unix_dir
from tests.e2e.support import echo_server, echo_servers, procs

__all__ = ["echo_server", "echo_servers", "held_socket", "notify_socket", "procs", "unix_dir"]
