"""
Shutdown signals: the first SIGTERM/SIGINT stops the reactor; repeats while
it is stopping are ignored (Twisted would log a ReactorNotRunning traceback
for each).
"""

from __future__ import annotations

import signal
from typing import Any, Callable

__all__ = ["calm_repeated_signals"]


def calm_repeated_signals(reactor: Any, stopping: Callable[[], bool] = lambda: False) -> None:
    """
    Wrap the reactor's SIGTERM/SIGINT handlers (call once it runs, after
    Twisted installed them) so that a signal arriving while the reactor is
    already stopping, or while ``stopping()`` says so, is ignored.
    """
    forwarded = [False]
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(number: int, frame: Any, previous: Any = previous) -> None:
            if forwarded[0] or getattr(reactor, "_stopped", False) or stopping():
                return
            forwarded[0] = True
            previous(number, frame)

        signal.signal(signum, handler)
