"""
Helpers for the Twisted adapter tests (tests/test_protocol.py).

Everything here runs on StringTransport and Clock: no reactor, no sockets.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import interfaces
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay.mux.frames import Data, Frame, FrameDecoder
from tcprelay.mux.session import Role, SessionConfig
from tcprelay.protocol import MuxProtocol, MuxStream

NO_HEARTBEAT = SessionConfig(heartbeat=False)
"""Most adapter tests keep the wire free of heartbeat frames."""


class Recorder(Protocol):
    """A stream protocol that records everything that happens to it, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.received = bytearray()
        self.made = 0
        self.lost_reason: Optional[Failure] = None

    def connectionMade(self) -> None:
        self.made += 1
        self.log.append(("made", self.transport))

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.log.append(("data", bytes(data)))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost_reason = reason
        self.log.append(("lost", reason))

    @property
    def lost(self) -> int:
        return sum(1 for kind, _ in self.log if kind == "lost")

    @property
    def read_lost(self) -> int:
        return sum(1 for kind, _ in self.log if kind == "read_lost")


@implementer(interfaces.IHalfCloseableProtocol)
class HalfCloseRecorder(Recorder):
    """A Recorder that also takes the peer's FIN as readConnectionLost."""

    def readConnectionLost(self) -> None:
        self.log.append(("read_lost", None))

    def writeConnectionLost(self) -> None:
        self.log.append(("write_lost", None))


class PausingRecorder(HalfCloseRecorder):
    """Pauses its transport (stops reading) as soon as it is connected."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()  # type: ignore[union-attr]


@implementer(interfaces.IHalfCloseableProtocol)
class ReplyOnFin(Recorder):
    """Collects the request; on the peer's FIN writes ``reply(request)`` and closes."""

    def __init__(self, reply: Callable[[bytes], bytes] = lambda b: b"re:" + b) -> None:
        super().__init__()
        self.reply = reply

    def readConnectionLost(self) -> None:
        self.log.append(("read_lost", None))
        self.transport.write(self.reply(bytes(self.received)))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass


@implementer(interfaces.IPushProducer)
class FakePushProducer:
    """Counts pause/resume/stop calls."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.stopped = True


class Acceptor:
    """A stream acceptor that records each stream and protocol it hands out."""

    def __init__(self, *factories: Callable[[], Recorder]) -> None:
        self.factories = list(factories)
        self.streams: list[MuxStream] = []
        self.protocols: list[Recorder] = []

    def __call__(self, stream: MuxStream) -> Recorder:
        self.streams.append(stream)
        factory = self.factories.pop(0) if self.factories else Recorder
        proto = factory()
        self.protocols.append(proto)
        return proto


def connect(
    role: Role,
    clock: Clock,
    config: SessionConfig = NO_HEARTBEAT,
    acceptor: Optional[Callable[[MuxStream], object]] = None,
    transport: Optional[StringTransport] = None,
) -> tuple[MuxProtocol, StringTransport]:
    """A MuxProtocol connected to a (fresh) StringTransport."""
    mux = MuxProtocol(role, clock, config, acceptor)  # type: ignore[arg-type]
    tr = transport if transport is not None else StringTransport()
    if isinstance(tr, StringTransportWithDisconnection):
        tr.protocol = mux
    mux.makeConnection(tr)
    return mux, tr


def take_frames(tr: StringTransport) -> list[Frame]:
    """Decode (and clear) everything written to ``tr`` so far."""
    data = tr.value()
    tr.clear()
    return FrameDecoder().feed(data)


def data_on(frames: list[Frame], stream_id: int) -> bytes:
    """The DATA payload for one stream in ``frames``, joined."""
    return b"".join(
        fr.data for fr in frames if isinstance(fr, Data) and fr.stream_id == stream_id
    )


class Pair:
    """A CLIENT and a SERVER MuxProtocol on StringTransports, pumped by hand."""

    def __init__(
        self,
        clock: Optional[Clock] = None,
        config: SessionConfig = NO_HEARTBEAT,
        client_acceptor: Optional[Callable[[MuxStream], object]] = None,
        server_acceptor: Optional[Callable[[MuxStream], object]] = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.client, self.ct = connect(Role.CLIENT, self.clock, config, client_acceptor)
        self.server, self.st = connect(Role.SERVER, self.clock, config, server_acceptor)

    def pump(self, limit: int = 10000) -> int:
        """Move bytes both ways until neither side has anything to say."""
        moved_total = 0
        for _ in range(limit):
            moved = False
            for src, dst in ((self.ct, self.server), (self.st, self.client)):
                data = src.value()
                if data:
                    src.clear()
                    dst.dataReceived(data)
                    moved = True
                    moved_total += len(data)
            if not moved:
                return moved_total
        raise AssertionError("pump never went quiet")
