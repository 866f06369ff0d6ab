"""
The counters operators read (:class:`RelayStats`), shown by
:mod:`tcprelay.relay.metrics` at ``/metrics`` and ``/status``.

Nothing here is updated per chunk of data: bytes are added up when a
visitor's connection ends, and read from the open ones when scraped.
"""

from __future__ import annotations

from tcprelay.mux.frames import ErrorCode

from tcprelay.relay.limits import SESSION_REASONS, VISITOR_REASONS

__all__ = ["HANDSHAKE_BUCKETS", "OTHER_CODE", "TIMEOUT_REASONS", "RelayStats", "error_label"]

OTHER_CODE = -1
"""Where protocol errors with a code muxado does not define are counted:
a peer chooses the code of its GOAWAY, and every label value of the
metrics must come from a fixed set."""

_KNOWN_CODES = frozenset(int(code) for code in ErrorCode)

TIMEOUT_REASONS = ("unanswered", "half_closed")
"""Why a visitor's stream was ended by the watchdog
(:mod:`tcprelay.relay.watchdog`): the service never answered it, or stayed
silent after the visitor left."""


def error_label(code: int) -> str:
    """The metric label of a counted error code: an ErrorCode name, or OTHER."""
    return ErrorCode(code).name if code in _KNOWN_CODES else "OTHER"

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, float("inf"))
"""Upper bounds (seconds) of the handshake-duration histogram."""


class RelayStats:
    """Monotonic counters and the handshake-duration histogram of one relay."""

    def __init__(self) -> None:
        self.visitors_accepted = 0
        self.visitors_refused = 0
        self.visitors_unrouted = 0
        """Visitors of a shared entrance asking for a name no route serves."""
        self.services_refused = 0
        self.heartbeat_timeouts = 0
        self.auth_failures = 0
        self.protocol_errors: dict[int, int] = {}
        """Sessions ended by a protocol error, by muxado error code."""
        self.bytes_to_service = 0
        """Bytes of visitors' connections that have ended, to services."""
        self.bytes_to_visitor = 0
        self.visitors_timed_out: dict[str, int] = {reason: 0 for reason in TIMEOUT_REASONS}
        """Visitor streams ended because the service left them waiting, by reason."""
        self.visitors_limited = dict.fromkeys(VISITOR_REASONS, 0)
        """Visitors refused by a limit, by reason (also in :attr:`visitors_refused`)."""
        self.sessions_limited = dict.fromkeys(SESSION_REASONS, 0)
        """Control connections refused by a limit, by reason."""
        self.visitors_idle_closed = 0
        """Visitor connections closed by the idle timeout."""
        self.handshake_buckets = [0] * len(HANDSHAKE_BUCKETS)
        self.handshake_sum = 0.0

    def record_handshake(self, seconds: float) -> None:
        """Count one handshake's duration into the histogram."""
        self.handshake_sum += seconds
        for index, bound in enumerate(HANDSHAKE_BUCKETS):
            if seconds <= bound:
                self.handshake_buckets[index] += 1
                break

    def visitor_timed_out(self, reason: str) -> None:
        """Count a visitor stream ended for ``reason`` (one of :data:`TIMEOUT_REASONS`)."""
        self.visitors_timed_out[reason] += 1

    def protocol_error(self, code: int) -> None:
        """Count a session ended by a protocol error ``code`` (unknown codes as OTHER)."""
        if code not in _KNOWN_CODES:
            code = OTHER_CODE
        self.protocol_errors[code] = self.protocol_errors.get(code, 0) + 1
