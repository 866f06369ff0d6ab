"""
Optional sampling profiles of tcprelay's processes during a run (``--profile DIR``).

Each measured phase (throughput, cps) of the ``tcprelay`` and ``expose``
stacks is recorded with py-spy (``pip install py-spy``) as collapsed stacks
(``DIR/<scenario>-<role>-<phase>.txt``, one ``frame;frame;... count`` line
per stack: feed it to flamegraph.pl or speedscope), and a short summary of
where the samples fell is written next to it (``.summary.txt``).  Profiling
costs the profiled process a little: do not compare profiled figures with
unprofiled ones.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Optional

from benchmarks.procs import BenchError

__all__ = ["Profiler", "find_py_spy", "summarise"]


def find_py_spy() -> str:
    import sys

    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if not found:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    return found


class Profiler:
    """py-spy recording one process while it runs."""

    def __init__(self, py_spy: str, pid: int, out: Path, rate: int = 200) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                 "--nonblocking", "--output", str(out)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> Optional[str]:
        """Stop recording (SIGINT makes py-spy write its file); the summary text."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if not self.out.exists():
            return None
        text = summarise(self.out)
        self.out.with_suffix(".summary.txt").write_text(text)
        return text


def _frame_name(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


def summarise(path: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function of a collapsed-stack file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return f"{path.name}: no samples\n"
    lines = [f"{path.name}: {total} samples", "", "self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
