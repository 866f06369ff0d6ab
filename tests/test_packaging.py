"""Packaging: the installed distribution, the twistd plugin, the tap Options."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from twisted.python import usage

from tcprelay import tap

SOURCE_ROOT = Path(__file__).resolve().parents[1]


def test_twistd_lists_plugin(tmp_path: Path) -> None:
    """``twistd --help`` from this environment lists the tcprelay plugin."""
    twistd = Path(sys.executable).parent / "twistd"
    # Run outside the source tree so that only the installed copy can count.
    result = subprocess.run(
        [str(twistd), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")]
    assert "tcprelay" in commands, result.stdout


def test_installed_distribution_ships_every_module() -> None:
    """Every .py file of the source tree's tcprelay package and plugin is in the installed distribution."""
    try:
        files = metadata.files("tcprelay")
    except metadata.PackageNotFoundError:
        pytest.fail("tcprelay is not installed: run ./scripts/test")
    assert files is not None
    installed = {f.as_posix() for f in files}
    expected = {
        p.relative_to(SOURCE_ROOT).as_posix()
        for p in (SOURCE_ROOT / "tcprelay").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected.add("twisted/plugins/tcprelay_plugin.py")
    missing = sorted(expected - installed)
    assert not missing, f"not installed (missing __init__.py, or install is stale): {missing}"


def test_installed_distribution_ships_no_benchmark() -> None:
    """The benchmark stays in the checkout: the installed distribution has no benchmarks/ or tcprelay/bench/."""
    try:
        files = metadata.files("tcprelay")
    except metadata.PackageNotFoundError:
        pytest.fail("tcprelay is not installed: run ./scripts/test")
    assert files is not None
    shipped = sorted(
        f.as_posix() for f in files if f.parts[:1] == ("benchmarks",) or f.parts[:2] == ("tcprelay", "bench")
    )
    assert not shipped, f"benchmark code in the installed distribution: {shipped}"


def test_bare_control_port_is_normalised() -> None:
    """``--control 8080`` becomes the endpoint string ``tcp:8080``."""
    options = tap.Options()
    options.parseOptions(["--control", "8080"])
    assert options["control"] == "tcp:8080"


def test_control_endpoint_string_is_kept() -> None:
    """An endpoint string for ``--control`` passes through unchanged, and the default is ``tcp:8080``."""
    options = tap.Options()
    options.parseOptions([])
    assert options["control"] == "tcp:8080"
    options = tap.Options()
    options.parseOptions(["--control", "tcp6:8443:interface=\\:\\:1"])
    assert options["control"] == "tcp6:8443:interface=\\:\\:1"
    assert options["ports"] == range(8444, 8494)


def test_out_of_range_control_port_is_rejected() -> None:
    """A bare port above 65535 is a usage error, not a late listen failure."""
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--control", "70000"])
