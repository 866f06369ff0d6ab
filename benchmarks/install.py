"""
The tcprelay installs a run measures: this checkout's, and optionally an
older commit's from another virtualenv (``--baseline-venv``).

The benchmark imports nothing of tcprelay: it runs each install's relay
with ``twistd -n tcprelay ...`` and its agent with ``tcprelay expose ...``,
so that it works across refactors of the package and against any commit
whose command line takes the options it passes (``--control``,
``--ports``, ``--public-interface``, ``--drain-timeout``; ``expose
--relay --lease-file``).

A baseline venv is made from a second worktree, for example::

    git worktree add /tmp/base <commit>
    python3 -m venv /tmp/base/.venv
    /tmp/base/.venv/bin/pip install /tmp/base
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import attrs

from benchmarks.procs import BenchError

__all__ = ["Install", "REPO_ROOT", "baseline_install", "current_install"]

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout holding ``benchmarks/``, ``tcprelay/`` and ``tests/interop/``."""

PROBE_TIMEOUT = 60.0

_TWISTD = "from twisted.scripts.twistd import run; run()"

_PROBE = """\
import json, tcprelay
from importlib import metadata
try:
    url = json.loads(metadata.distribution("tcprelay").read_text("direct_url.json") or "{}")
except Exception:
    url = {}
print(json.dumps({"version": getattr(tcprelay, "__version__", "unknown"),
                  "file": tcprelay.__file__, "url": url.get("url")}))
"""

MAKE_BASELINE = (
    "git worktree add /tmp/base COMMIT && python3 -m venv /tmp/base/.venv && "
    "/tmp/base/.venv/bin/pip install /tmp/base"
)
"""How to make a baseline venv, for error messages."""


@attrs.define
class Install:
    """One tcprelay to measure: how to run its relay and agent, and what it is."""

    #: ``current`` (this checkout) or ``baseline``
    label: str
    python: str
    #: argv prefix of ``twistd``
    twistd: tuple[str, ...]
    #: argv prefix of the ``tcprelay`` command
    tcprelay: tuple[str, ...]
    #: the environment its processes run in
    env: dict[str, str]
    version: str = "unknown"
    #: where its ``tcprelay`` package was imported from
    module_file: str = ""
    #: the source tree it was installed from, if known
    source: Optional[str] = None
    #: ``git rev-parse --short HEAD`` of that tree (``+dirty`` when it has
    #: uncommitted changes), if it is a git checkout
    commit: Optional[str] = None

    def describe(self) -> dict[str, Any]:
        """What the JSON output records of it."""
        return {
            "python": self.python,
            "version": self.version,
            "module_file": self.module_file,
            "source": self.source,
            "commit": self.commit,
        }


def git_commit(tree: Path) -> Optional[str]:
    """The short commit of the git checkout ``tree`` (``+dirty`` if it has
    uncommitted changes to tracked files), or None if it is not one."""
    try:
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+dirty" if status.stdout.strip() else "")


def _probe(install: Install, where: str) -> None:
    """Fill in the version and origin of ``install`` by importing tcprelay
    in its Python (outside any source tree); BenchError if that fails."""
    import json

    try:
        proc = subprocess.run(
            [install.python, "-c", _PROBE],
            cwd="/", env=install.env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError(f"{where}: cannot run {install.python}: {e}") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{where}: tcprelay is not importable by {install.python} ({last})")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    install.version = str(found["version"])
    install.module_file = str(found["file"])
    url = found.get("url") or ""
    if install.source is None and url.startswith("file://"):
        install.source = url[len("file://"):]
    if install.source is not None:
        install.commit = git_commit(Path(install.source))


def _console_script(setup_cfg: Path) -> tuple[str, str]:
    """(module, function) of the ``tcprelay`` console script in setup.cfg."""
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg)
        for line in parser.get("options.entry_points", "console_scripts").splitlines():
            name, _, target = line.partition("=")
            if name.strip() == "tcprelay" and ":" in target:
                module, _, function = target.strip().partition(":")
                return module.strip(), function.strip()
    except configparser.Error:
        pass
    return "tcprelay.cli", "main"


def current_install(repo_root: Path = REPO_ROOT) -> Install:
    """This checkout's tcprelay, run by this Python with the checkout first
    on ``PYTHONPATH`` (the code under test, not a possibly stale install)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(repo_root), os.environ.get("PYTHONPATH", "")) if p
    )
    module, function = _console_script(repo_root / "setup.cfg")
    agent = (
        f"import sys; from {module} import {function}; "
        f"sys.argv[0] = 'tcprelay'; sys.exit({function}())"
    )
    install = Install(
        label="current",
        python=sys.executable,
        twistd=(sys.executable, "-c", _TWISTD),
        tcprelay=(sys.executable, "-c", agent),
        env=env,
        source=str(repo_root),
    )
    _probe(install, "this checkout")
    return install


def baseline_install(venv: Path) -> Install:
    """
    The tcprelay installed in the virtualenv ``venv``: its own ``twistd``
    and ``tcprelay`` commands, with no ``PYTHONPATH`` (so that nothing of
    this checkout leaks in).  BenchError if it has no Python or no tcprelay.
    """
    where = f"--baseline-venv {venv}"
    venv = venv.expanduser().absolute()
    bindir = venv / "bin"
    python = bindir / "python"
    if not os.access(python, os.X_OK):
        raise BenchError(f"{where}: no {python}; make a baseline venv with: {MAKE_BASELINE}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    env["VIRTUAL_ENV"] = str(venv)
    twistd = bindir / "twistd"
    agent = bindir / "tcprelay"
    install = Install(
        label="baseline",
        python=str(python),
        twistd=(str(twistd),) if os.access(twistd, os.X_OK) else (str(python), "-c", _TWISTD),
        tcprelay=(str(agent),) if os.access(agent, os.X_OK) else (str(python), "-m", "tcprelay.cli"),
        env=env,
    )
    _probe(install, where)
    if install.commit is None:
        # not installed from a local tree: the venv may sit in the worktree
        # it was made from, as in the recipe above
        install.commit = git_commit(venv)
    return install
