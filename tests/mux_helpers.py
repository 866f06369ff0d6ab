"""
Helpers shared by the sans-IO muxado tests: decode what a session wrote, and
wire two sessions back to back.  Pure Python, no Twisted, no sockets.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from tcprelay.mux import frames as f
from tcprelay.mux.events import Event
from tcprelay.mux.session import Role, Session, SessionConfig

NO_HEARTBEAT = SessionConfig(heartbeat=False)


def decode_all(data: bytes) -> list[f.Frame]:
    """Decode bytes a session wrote; they must be whole, well-formed frames."""
    decoder = f.FrameDecoder()
    frames = decoder.feed(data)
    assert decoder.buffered == 0 or decoder.finished, "session wrote a partial frame"
    return frames


def sent_frames(session: Session) -> list[f.Frame]:
    """Take and decode everything the session has to send."""
    return decode_all(session.data_to_send())


def data_payload(frames: Iterable[f.Frame], stream_id: Optional[int] = None) -> bytes:
    """Concatenated DATA payload (of one stream, or of all)."""
    return b"".join(
        fr.data
        for fr in frames
        if isinstance(fr, f.Data) and (stream_id is None or fr.stream_id == stream_id)
    )


def of_type(frames: Iterable[object], kind: type) -> list:
    """The items of one class, in order."""
    return [x for x in frames if isinstance(x, kind)]


def new_session(
    role: Role, config: SessionConfig = NO_HEARTBEAT, now: float = 0.0
) -> Session:
    """A session whose creation output (heartbeat SYN) has been drained."""
    session = Session(role, config, now)
    session.data_to_send()
    session.events()
    return session


def feed(session: Session, *frames: f.Frame) -> list[Event]:
    """Encode frames and feed them to a session in one read."""
    return session.receive_data(b"".join(f.encode(fr) for fr in frames))


def pump(
    a: Session,
    b: Session,
    on_a: Optional[Callable[[Event], None]] = None,
    on_b: Optional[Callable[[Event], None]] = None,
    max_rounds: int = 10_000,
) -> tuple[list[Event], list[Event]]:
    """
    Move bytes between two sessions until both are quiet; return each side's
    events.  ``on_a``/``on_b`` see every event as it happens (e.g. to
    acknowledge data, which may produce more bytes to move).
    """
    events_a: list[Event] = []
    events_b: list[Event] = []

    def collect(session: Session, sink: list[Event], hook: Optional[Callable[[Event], None]], new: list[Event]) -> None:
        while new:
            sink.extend(new)
            if hook is not None:
                for ev in new:
                    hook(ev)
            new = session.events()

    collect(a, events_a, on_a, a.events())
    collect(b, events_b, on_b, b.events())
    for _ in range(max_rounds):
        out_a = a.data_to_send()
        out_b = b.data_to_send()
        if not out_a and not out_b:
            return events_a, events_b
        if out_a:
            collect(b, events_b, on_b, b.receive_data(out_a))
        if out_b:
            collect(a, events_a, on_a, a.receive_data(out_b))
    raise AssertionError("sessions never went quiet")
