"""
Log output for operators: plain JSON lines.

Every tcprelay log event is structured (``twisted.logger`` with fields such
as ``session``, ``peer``, ``service_port``).  :func:`json_lines_observer`
writes one JSON object per line, with no record-separator bytes, which is
what journald, Loki, Vector and friends expect::

    {"time": "2026-11-25T14:53:02.123456+00:00", "level": "info",
     "namespace": "tcprelay.relay.doors.muxado_handshake.ExtendedHandshake",
     "message": "service 127.0.0.1:41764 registered at localhost:18081",
     "peer": "127.0.0.1:41764", "service_port": 18081, ...}
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Callable, Optional, Union

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

__all__ = ["event_as_dict", "json_lines_observer", "json_log_stream"]

_SKIP = {"format", "time", "message", "isError", "system", "printed", "why", "failure"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_dict(event: dict[str, Any]) -> dict[str, Any]:
    """The fields of a log event worth shipping, JSON-ready."""
    when = event.get("log_time")
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(
            when if when is not None else 0, datetime.timezone.utc
        ).isoformat(),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        out["failure"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIP or key in out:
            continue
        out[key] = _jsonable(value)
    return out


def json_log_stream(logfile: Optional[str], nodaemon: bool) -> Union[IO[str], Any]:
    """
    Where twistd would have written its text log, for the JSON lines: the
    same rules as twistd's own (``--logfile -`` or ``-n`` without
    ``--logfile``: standard output; otherwise ``--logfile``, by default
    ``twistd.log``, rotated by size like twistd's and on SIGUSR1).

    twistd hands its log file only to the observer it builds itself; the
    JSON observer replaces that one, so it opens the file the same way.
    """
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(logfile or "twistd.log")
    try:
        import signal
    except ImportError:  # pragma: no cover - every POSIX Python has it
        return log_file
    if hasattr(signal, "SIGUSR1") and not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file


def json_lines_observer(stream: IO[str] | None = None) -> Callable[[dict[str, Any]], None]:
    """An observer writing each event as one JSON line to ``stream``."""
    out = stream if stream is not None else sys.stdout

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        try:
            line = json.dumps(event_as_dict(event), separators=(",", ":"))
        except Exception as e:  # noqa: BLE001 - a log line must never crash
            line = json.dumps({"level": "error", "message": f"unloggable event: {e}"})
        out.write(line + "\n")
        out.flush()

    return observe
