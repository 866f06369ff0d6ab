"""
Finding and building the Go programs the benchmark runs.

The sources live in a source checkout under ``tests/interop/``: ``goload``
(load client, direct echo server and, ``goload sessions``, agent sessions),
``legacyrelay`` (the original Go relay's behaviour) and ``echosvc`` (an
efficient Go muxado v1 echo service).  They import Debian's muxado v1
(``golang-github-inconshreveable-muxado-dev``), so everything is built in
GOPATH mode::

    GO111MODULE=off GOPATH=/usr/share/gocode go build -o OUT ./NAME
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from benchmarks.procs import BenchError

__all__ = ["PROGRAMS", "build_all", "build_programs", "find_go", "find_sources", "go_version"]

PROGRAMS = ("goload", "legacyrelay", "echosvc")
"""The Go programs a full run needs (each ``<go-src>/<name>/main.go``)."""

DEFAULT_GOPATH = "/usr/share/gocode"
_MUXADO = Path("src/github.com/inconshreveable/muxado/interface.go")
BUILD_TIMEOUT = 300.0
REPO_ROOT = Path(__file__).resolve().parents[1]
"""The source checkout holding ``benchmarks/`` and ``tests/interop/``."""


def find_go() -> str:
    """The ``go`` command; BenchError with install advice if there is none."""
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BenchError(
        "the Go toolchain is not installed: the benchmark's load client, echo "
        "server and reference relay are Go programs. Install it (Debian/Ubuntu: "
        "apt-get install golang-go golang-github-inconshreveable-muxado-dev)."
    )


def go_version(go: str) -> str:
    try:
        out = subprocess.run(
            [go, "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # "go version go1.19.8 linux/amd64"
    parts = out.split()
    return parts[2] if len(parts) >= 3 else out or "unknown"


def _candidates() -> list[Path]:
    found: list[Path] = []
    env = os.environ.get("TCPRELAY_GO_SRC")
    if env:
        found.append(Path(env))
    cwd = Path.cwd().resolve()
    for parent in (cwd, *cwd.parents):
        found.append(parent / "tests" / "interop")
    # the checkout this benchmark lives in
    found.append(REPO_ROOT / "tests" / "interop")
    return found


def find_sources(go_src: Optional[str], programs: tuple[str, ...] = PROGRAMS) -> Path:
    """The directory holding ``<name>/main.go`` for every program."""

    def complete(directory: Path) -> bool:
        return all((directory / name / "main.go").is_file() for name in programs)

    if go_src:
        directory = Path(go_src).expanduser().resolve()
        if not complete(directory):
            missing = [n for n in programs if not (directory / n / "main.go").is_file()]
            raise BenchError(
                f"--go-src {directory}: no {', '.join(f'{n}/main.go' for n in missing)} there"
            )
        return directory
    for directory in _candidates():
        if complete(directory):
            return directory.resolve()
    raise BenchError(
        "cannot find the Go sources (tests/interop/{goload,legacyrelay,echosvc}/main.go "
        "of a tcprelay source checkout): run from the checkout or pass --go-src DIR"
    )


def _gopath() -> str:
    configured = os.environ.get("GOPATH", "")
    for entry in configured.split(os.pathsep):
        if entry and (Path(entry) / _MUXADO).is_file():
            return configured
    if (Path(DEFAULT_GOPATH) / _MUXADO).is_file():
        return DEFAULT_GOPATH
    raise BenchError(
        f"muxado v1 sources not found (looked for {_MUXADO} in $GOPATH and "
        f"{DEFAULT_GOPATH}): apt-get install golang-github-inconshreveable-muxado-dev"
    )


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    fallback = Path(tempfile.gettempdir()) / f"tcprelay-bench-{os.getuid()}"
    for candidate in (Path(base) / "tcprelay-bench", fallback):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.mkdtemp(prefix="tcprelay-bench-"))


def build_all(
    go: str, src: Path, programs: tuple[str, ...], out_dir: Optional[Path] = None
) -> dict[str, Path]:
    """Build every program (go's build cache makes repeats fast); name -> binary."""
    out_dir = out_dir or _cache_dir() / "bin"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = _cache_dir()
    env = dict(os.environ)
    env["GO111MODULE"] = "off"
    env["GOPATH"] = _gopath()
    env.setdefault("GOCACHE", str(cache / "gocache"))
    env.pop("GOFLAGS", None)
    built: dict[str, Path] = {}
    for name in programs:
        target = out_dir / name
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        cmd = [go, "build", "-o", str(tmp), f"./{name}"]
        try:
            proc = subprocess.run(
                cmd,
                cwd=src,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            tmp.unlink(missing_ok=True)
            raise BenchError(f"go build {name} took more than {BUILD_TIMEOUT:.0f}s") from e
        except OSError as e:
            raise BenchError(f"cannot run {go}: {e}") from e
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BenchError(
                f"go build of {src / name} failed (exit {proc.returncode}):\n"
                f"$ (cd {src} && GO111MODULE=off GOPATH={env['GOPATH']} {' '.join(cmd)})\n"
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        os.replace(tmp, target)
        built[name] = target
    return built


def build_programs(
    go_src: Optional[str], programs: tuple[str, ...], out_dir: Optional[Path] = None
) -> tuple[dict[str, Path], str]:
    """Find go and the sources (``--go-src`` or the checkout), build ``programs``
    into ``out_dir``: (name -> binary, go's version).  BenchError on any failure."""
    go = find_go()
    src = find_sources(go_src, programs)
    return build_all(go, src, programs, out_dir), go_version(go)
