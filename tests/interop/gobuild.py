"""Build the Go interop programs under ``tests/interop/<name>/`` for pytest.

The programs use Debian's muxado v1 (``golang-github-inconshreveable-muxado-dev``)
from ``/usr/share/gocode`` and are compiled in GOPATH mode, exactly like::

    cd tests/interop && GO111MODULE=off GOPATH=/usr/share/gocode go build -o OUT ./NAME

The build itself is :func:`benchmarks.gotools.build_all`, the one the
benchmark builds the same programs with. Each program is built at most
once per process; the binaries go to ``build/interop/`` under the repository
root (gitignored), or to a temporary directory if that is not writable. Set
``TCPRELAY_INTEROP_BUILD_DIR`` to choose another output directory.

Typical use in a fixture::

    from tests.interop import gobuild

    @pytest.fixture(scope="session")
    def muxpeer() -> pathlib.Path:
        gobuild.require_go()
        return gobuild.build("muxpeer")
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
import threading

from benchmarks import gotools
from benchmarks.procs import BenchError

__all__ = [
    "GOPATH",
    "GoBuildError",
    "INTEROP_DIR",
    "MUXADO_SRC",
    "REPO_ROOT",
    "build",
    "go_available",
    "go_binary",
    "missing_reason",
    "require_go",
]

#: ``tests/interop/`` (this file's directory): one Go program per subdirectory.
INTEROP_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent
#: The repository root (the binaries go to ``build/interop/`` under it).
REPO_ROOT: pathlib.Path = INTEROP_DIR.parent.parent
#: GOPATH holding Debian's Go sources.
GOPATH: str = gotools.DEFAULT_GOPATH
#: muxado v1 sources the programs import.
MUXADO_SRC: pathlib.Path = pathlib.Path(GOPATH, "src/github.com/inconshreveable/muxado")

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_lock = threading.Lock()
_built: dict[str, pathlib.Path] = {}
_out_dir: pathlib.Path | None = None


class GoBuildError(RuntimeError):
    """``go build`` failed (or could not be run); the message carries go's stderr."""


def go_binary() -> str | None:
    """Return the path of the ``go`` command, or ``None`` if it is not installed.

    Looks on ``PATH`` first, then at Debian's default location.
    """
    try:
        return gotools.find_go()
    except BenchError:
        return None


def missing_reason() -> str | None:
    """Explain what is missing for the interop tests, or ``None`` if nothing is."""
    if go_binary() is None:
        return "the go toolchain is not installed (apt-get install golang-go)"
    if not (MUXADO_SRC / "interface.go").is_file():
        return (
            f"muxado v1 sources not found at {MUXADO_SRC} "
            "(apt-get install golang-github-inconshreveable-muxado-dev)"
        )
    return None


def go_available() -> bool:
    """Return True if ``go`` and the muxado v1 sources are both installed."""
    return missing_reason() is None


def require_go() -> None:
    """Skip the calling test unless ``go`` and muxado v1 are available.

    When the ``CI`` environment variable is set (non-empty) the test fails
    instead: interop tests must never be skipped silently in CI.
    """
    reason = missing_reason()
    if reason is None:
        return
    from tests.absent import tool_absent

    tool_absent(f"Go interop tests need Go + muxado v1: {reason}")


def _output_dir() -> pathlib.Path:
    """The directory the binaries are written to (created on first use)."""
    global _out_dir
    if _out_dir is not None:
        return _out_dir
    configured = os.environ.get("TCPRELAY_INTEROP_BUILD_DIR")
    candidates = [pathlib.Path(configured)] if configured else []
    candidates.append(REPO_ROOT / "build" / "interop")
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            _out_dir = candidate
            return candidate
    _out_dir = pathlib.Path(tempfile.mkdtemp(prefix="tcprelay-interop-"))
    return _out_dir


def build(name: str) -> pathlib.Path:
    """Compile ``tests/interop/<name>`` and return the path of the executable.

    The result is cached for the lifetime of the process, so each program is
    compiled once per test run. The binary is written under a temporary name
    and renamed into place, so concurrent test processes (pytest-xdist) do
    not see half-written files.

    Raises:
        GoBuildError: the name is not a program directory, ``go`` is missing,
            or ``go build`` failed (the message includes go's output).
    """
    if not _NAME_RE.match(name):
        raise GoBuildError(f"invalid interop program name {name!r}")
    src = INTEROP_DIR / name
    if not (src / "main.go").is_file():
        raise GoBuildError(f"no Go program at {src} (expected {src / 'main.go'})")
    with _lock:
        cached = _built.get(name)
        if cached is not None and cached.exists():
            return cached
        go = go_binary()
        if go is None:
            raise GoBuildError(f"cannot build {name}: {missing_reason()}")
        try:
            target = gotools.build_all(go, INTEROP_DIR, (name,), _output_dir())[name]
        except BenchError as exc:
            raise GoBuildError(str(exc)) from exc
        _built[name] = target
        return target
