"""
What a test does when a tool it needs (Go, redis-server, node, ssh, the
ngrok SDK) is not installed: skip, unless the environment variable ``CI``
is set (non-empty), where every tool is installed and a missing one is a
failure, never a silent skip.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

__all__ = ["import_or_absent", "tool_absent"]


def tool_absent(message: str) -> NoReturn:
    """Skip the calling test (or module) with ``message``; fail instead when ``CI`` is set."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def import_or_absent(module: str, what: str) -> ModuleType:
    """:func:`pytest.importorskip` that fails instead of skipping when ``CI`` is set."""
    try:
        return importlib.import_module(module)
    except ImportError:
        tool_absent(f"{what} is not installed (module {module!r})")
