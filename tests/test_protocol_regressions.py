"""
Adapter regressions found by the Go interop tests, replayed on
StringTransport and Clock.
"""

from __future__ import annotations

from twisted.internet import interfaces
from twisted.internet.task import Clock
from zope.interface import implementer

from tcprelay.mux.frames import ErrorCode, encode_rst, encode_wndinc
from tcprelay.mux.session import INITIAL_WINDOW, Role
from tcprelay.protocol import MuxStream, StreamResetError

from tests.adapter_helpers import Recorder, connect, take_frames


@implementer(interfaces.IPushProducer)
class LoopingProducer:
    """Writes chunks in a loop until paused or stopped (capped, so a bug cannot hang the test)."""

    CAP = 1000

    def __init__(self, stream: MuxStream) -> None:
        self.stream = stream
        self.paused = False
        self.stopped = False
        self.writes = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.writes < self.CAP:
            self.writes += 1
            self.stream.write(b"x" * 16384)


def test_looping_producer_does_not_spin_when_wndinc_and_rst_arrive_together() -> None:
    """A producer resumed by a WNDINC whose stream the same read also reset is paused by the refused write, then stopped."""
    mux, tr = connect(Role.CLIENT, Clock())
    proto = Recorder()
    stream = mux.open_stream(proto)
    producer = LoopingProducer(stream)
    stream.registerProducer(producer, True)
    producer.resumeProducing()
    assert producer.paused
    take_frames(tr)

    # Go grants window and, in the same read, resets the stream (it was gone
    # when our next DATA arrived): the session handles both frames before
    # the adapter dispatches SendWindowOpened and StreamClosed.
    mux.dataReceived(
        encode_wndinc(stream.stream_id, INITIAL_WINDOW)
        + encode_rst(stream.stream_id, ErrorCode.STREAM_CLOSED)
    )

    assert producer.writes < LoopingProducer.CAP
    assert producer.stopped
    assert proto.lost_reason is not None
    assert isinstance(proto.lost_reason.value, StreamResetError)
    assert proto.lost_reason.value.code == ErrorCode.STREAM_CLOSED
    assert mux.streams == {}
