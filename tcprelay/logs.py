"""
Log output for operators: plain JSON lines.

Every tcprelay log event is structured (``twisted.logger`` with fields such
as ``session``, ``peer``, ``service_port``).  :func:`json_lines_observer`
writes one JSON object per line, with no record-separator bytes, which is
what journald, Loki, Vector and friends expect::

    {"time": "2026-11-25T14:53:02.123456+00:00", "level": "info",
     "namespace": "tcprelay.relay.server.ExtendedHandshake",
     "message": "service 127.0.0.1:41764 registered at localhost:18081",
     "peer": "127.0.0.1:41764", "service_port": 18081, ...}
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, formatEvent
from zope.interface import provider

__all__ = ["json_lines_observer", "event_as_dict"]

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
