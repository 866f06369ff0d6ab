"""
Subprocesses of a benchmark run, and what /proc says about them.

Every process is started through :class:`Processes`, whose :meth:`stop_all`
(called from a ``finally`` block) stops whatever is still running: SIGTERM
(or EOF on stdin), then SIGKILL.  On Linux each child also asks to be sent
SIGTERM if the benchmark dies without cleaning up (``PR_SET_PDEATHSIG``).
Output goes to files in the run's log directory, never to pipes, so a
process that logs a lot cannot block; readiness is found by polling those
files for a line.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import IO, Callable, Iterator, Optional, Sequence

__all__ = [
    "BenchError",
    "Process",
    "Processes",
    "cpu_seconds",
    "children_cpu_seconds",
    "fd_count",
    "free_port_block",
    "machine_cpu_seconds",
    "open_files_limit",
    "raise_open_files_limit",
    "rss_bytes",
    "runqueue_wait",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(RuntimeError):
    """A benchmark step could not be carried out (the message says why)."""


def _deathsig_preexec(nofile: Optional[tuple[int, int]]) -> Callable[[], None]:
    """A ``preexec_fn``: die with the parent; optionally set RLIMIT_NOFILE."""

    def preexec() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - not Linux
            pass
        if nofile is not None:
            try:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
            except Exception:  # pragma: no cover
                pass

    return preexec


class Process:
    """One subprocess; stdout and stderr go to ``<logdir>/<name>.out/.err``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[object],
        logdir: Path,
        *,
        stdin_pipe: bool = False,
        env: Optional[dict[str, str]] = None,
        nofile: Optional[tuple[int, int]] = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            try:
                self.popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=logdir,
                    env=env,
                    preexec_fn=_deathsig_preexec(nofile),
                )
            except OSError as e:
                raise BenchError(f"cannot start {name} ({self.argv[0]}): {e}") from e
        self.pid = self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def output(self, which: str = "out") -> str:
        path = self.out_path if which == "out" else self.err_path
        try:
            return path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def tail(self, lines: int = 15) -> str:
        """The last lines of stdout and stderr, for error messages."""
        parts = []
        for which in ("out", "err"):
            text = self.output(which).rstrip().splitlines()[-lines:]
            if text:
                parts.append(f"--- {self.name} std{which} (last {len(text)} lines):")
                parts.extend(text)
        return "\n".join(parts) if parts else f"--- {self.name}: no output"

    def wait_line(self, pattern: str, timeout: float, which: str = "out") -> re.Match[str]:
        """Wait until a line of stdout (or stderr) matches; BenchError if not."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            found = regex.search(self.output(which))
            if found:
                return found
            if not self.running():
                # one last look: the line may have come with the exit
                found = regex.search(self.output(which))
                if found:
                    return found
                raise BenchError(
                    f"{self.name} exited with status {self.popen.returncode} before "
                    f"printing /{pattern}/\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise BenchError(
                    f"{self.name} did not print /{pattern}/ within {timeout:.0f}s\n{self.tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def close_stdin(self) -> None:
        stdin: Optional[IO[bytes]] = self.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass

    def stop(self, grace: float = 3.0) -> None:
        """Close stdin, SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reap."""
        self.close_stdin()
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            pass


def _interrupt(signum: int, frame: Optional[FrameType]) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Processes:
    """Every subprocess of a run; :meth:`stop_all` stops them, newest first."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[Process] = []

    def start(self, name: str, argv: Sequence[object], **kwargs: object) -> Process:
        proc = Process(name, argv, self.logdir, **kwargs)  # type: ignore[arg-type]
        self._procs.append(proc)
        return proc

    def running(self) -> list[Process]:
        """The processes started and not yet stopped, oldest first."""
        return list(self._procs)

    def stop(self, proc: Process, grace: float = 3.0) -> None:
        try:
            proc.stop(grace)
        finally:
            if proc in self._procs:
                self._procs.remove(proc)

    @contextlib.contextmanager
    def stopping(self) -> Iterator["Processes"]:
        """For a run's body: SIGTERM and SIGHUP (terminal closed) stop it as
        Ctrl-C does (KeyboardInterrupt); on the way out, however it ends, every
        process is stopped and the signal handlers are restored."""
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield self
        finally:
            try:
                self.stop_all()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def stop_all(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            try:
                proc.stop()
            except BaseException:  # keep stopping the others, even on Ctrl-C
                try:
                    proc.popen.kill()
                except OSError:
                    pass


# ----------------------------------------------------------------- ports


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(
    count: int, host: str = "127.0.0.1", attempts: int = 300, lowest: Optional[int] = None
) -> int:
    """
    The first of ``count`` consecutive ports that all bind on ``host`` just
    now, chosen below the kernel's ephemeral range so that client sockets
    cannot take one of them meanwhile (a relay's control port and its
    ``--ports`` range).  With ``lowest``: anywhere from there up to 65535
    instead (a block too large to fit below the ephemeral range).
    BenchError when none is found.

    The benchmark's own copy, so that it imports nothing of tcprelay and
    drives every version through its command line alone.
    """
    if lowest is not None:
        bottom, top = lowest, 65535 - count
    else:
        bottom, top = 20000, _ephemeral_low() - count
        if top <= 20000 + count:
            top = 60000 - count
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(bottom, top)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise BenchError(f"no block of {count} free ports on {host}")


# ------------------------------------------------------------------ /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # the command name (field 2) may hold spaces and parentheses
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def children_cpu_seconds() -> float:
    """utime + stime of this process's finished (waited-for) children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu_seconds() -> Optional[tuple[float, float, float]]:
    """(busy, idle, softirq) CPU seconds of the whole machine since boot,
    summed over its CPUs (from /proc/stat; None where there is none).

    Busy counts user, nice, system, irq, softirq and steal time; idle counts
    idle and iowait.  The kernel's packet processing on loopback shows up
    partly as softirq, which no process is charged for.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / _CLK_TCK, (idle + iowait) / _CLK_TCK, softirq / _CLK_TCK


def runqueue_wait(pid: int) -> Optional[float]:
    """Seconds the threads of a process have spent runnable but waiting for
    a CPU (schedstat; None where the kernel does not keep it).

    A large share of waiting during a measurement means the CPUs were busy
    with other work, the benchmark's own processes included.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of a process."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_files_limit(pid: int) -> Optional[tuple[int, int]]:
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    big = 1 << 62
                    return (
                        big if soft == "unlimited" else int(soft),
                        big if hard == "unlimited" else int(hard),
                    )
    except OSError:
        pass
    return None


def raise_open_files_limit() -> tuple[int, int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit.

    Returns (soft before, soft now, hard).
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    return soft, max(soft, target), hard
