"""
Every test of this directory is marked ``interop`` (it builds and runs Go
programs), so that ``pytest -m "not interop"`` leaves them out.
"""

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the items collected from this directory (new files included) ``interop``."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.interop)
