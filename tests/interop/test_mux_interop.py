"""
Interop between tcprelay's muxado v1 (``MuxProtocol``) and Go programs built
on Debian's muxado v1, in both directions.

- Go dials us: ``muxpeer dial`` runs its scenarios against a
  ``MuxProtocol(Role.SERVER)`` whose acceptor implements the stream-type
  conventions of ``tests/interop/muxpeer/main.go`` (0 echo, 7 close early,
  8 reset after the first byte, 9 close the session with GOAWAY NO_ERROR).
- We dial Go: a ``MuxProtocol(Role.CLIENT)`` drives ``muxpeer serve``, which
  implements the same conventions on the Go side.

Every Go process runs under a bounded wait and is killed and reaped in
teardown; every Python listener and connection is closed there too.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import error, interfaces
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay.mux import events as ev
from tcprelay.mux.frames import ErrorCode
from tcprelay.mux.session import Role
from tcprelay.protocol import MuxProtocol, MuxStream, StreamResetError
from tests.interop import gobuild

TYPE_ECHO = 0
TYPE_CLOSE_EARLY = 7
TYPE_RESET = 8
TYPE_GOAWAY = 9

IDLE = 16.0
"""Longer than muxado's heartbeat interval + tolerance (3 s + 10 s)."""

ECHO_STREAMS = 50
ECHO_BYTES = 420_000
"""Per stream: 50 x 420,000 bytes is 21 MB echoed each way."""

WAIT = 10.0
"""Bound for waits that should take well under a second."""


# ---------------------------------------------------------------------------
# bounded waits


class WaitTimeout(AssertionError):
    """A bounded wait ran out."""


def bounded(
    d: Deferred[Any],
    seconds: float,
    what: str,
    clock: interfaces.IReactorTime,
    detail: Callable[[], str] = lambda: "",
) -> Deferred[Any]:
    """``d``, failing with :class:`WaitTimeout` after ``seconds``."""

    def timed_out(result: object, timeout: float) -> None:
        extra = detail()
        raise WaitTimeout(f"{what}: still waiting after {timeout:g}s" + (f"\n{extra}" if extra else ""))

    return d.addTimeout(seconds, clock, onTimeoutCancel=timed_out)


def observe(d: Deferred[Any]) -> Deferred[Any]:
    """A new Deferred with ``d``'s result, which may be cancelled alone."""
    out: Deferred[Any] = Deferred()

    def fire(result: object) -> object:
        if not out.called:
            out.callback(result)
        return result

    d.addBoth(fire)
    return out


# ---------------------------------------------------------------------------
# the Go process


class PeerProcess(ProcessProtocol):
    """Runs one muxpeer; collects its stdout lines and lets a test wait for them."""

    def __init__(self, clock: interfaces.IReactorTime, argv: list[str]) -> None:
        self.clock = clock
        self.argv = argv
        self.lines: list[str] = []
        self.stderr = bytearray()
        self.exit_code: Optional[int] = None
        self.exited: Deferred[Optional[int]] = Deferred()
        self._partial = b""
        self._waiters: list[tuple[re.Pattern[str], Deferred[re.Match[str]]]] = []

    def describe(self) -> str:
        """The command, its stdout and stderr, for assertion messages."""
        err = self.stderr.decode("utf-8", "replace")
        return (
            f"$ {' '.join(self.argv)}\n(exit {self.exit_code})\n--- stdout\n"
            + "\n".join(self.lines)
            + f"\n--- stderr\n{err}"
        )

    def outReceived(self, data: bytes) -> None:
        """Split stdout into lines and wake the waiters they match."""
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._line(raw.decode("utf-8", "replace").rstrip("\r"))

    def errReceived(self, data: bytes) -> None:
        """Keep stderr for failure messages."""
        self.stderr += data

    def _line(self, line: str) -> None:
        self.lines.append(line)
        for entry in list(self._waiters):
            pattern, d = entry
            m = pattern.search(line)
            if m is not None:
                self._waiters.remove(entry)
                d.callback(m)

    def processEnded(self, reason: Failure) -> None:
        """Record the exit status; waiters for lines that never came fail."""
        if self._partial:
            self._line(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        self.exit_code = getattr(reason.value, "exitCode", None)
        waiters, self._waiters = self._waiters, []
        for pattern, d in waiters:
            d.errback(AssertionError(f"muxpeer exited before printing /{pattern.pattern}/\n{self.describe()}"))
        self.exited.callback(self.exit_code)

    @property
    def running(self) -> bool:
        """Whether the process has not been reaped yet."""
        return not self.exited.called

    def find(self, pattern: str) -> Optional[re.Match[str]]:
        """The first stdout line so far matching ``pattern``."""
        rx = re.compile(pattern)
        for line in self.lines:
            m = rx.search(line)
            if m is not None:
                return m
        return None

    def wait_for_line(self, pattern: str, timeout: float = WAIT) -> Deferred[re.Match[str]]:
        """Fire with the first stdout line matching ``pattern`` (already printed or not)."""
        m = self.find(pattern)
        if m is not None:
            return succeed(m)
        d: Deferred[re.Match[str]] = Deferred()
        if not self.running:
            d.errback(AssertionError(f"muxpeer exited before printing /{pattern}/\n{self.describe()}"))
            return d
        entry = (re.compile(pattern), d)
        self._waiters.append(entry)

        def forget(result: object) -> object:
            if entry in self._waiters:
                self._waiters.remove(entry)
            return result

        d.addBoth(forget)
        return bounded(d, timeout, f"waiting for /{pattern}/", self.clock, self.describe)

    def wait_exit(self, timeout: float) -> Deferred[Optional[int]]:
        """Fire with the exit code once the process has been reaped."""
        return bounded(observe(self.exited), timeout, "waiting for muxpeer to exit", self.clock, self.describe)

    async def stop(self) -> None:
        """Kill the process if it still runs, and reap it (bounded)."""
        if not self.running:
            return
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass
        await self.wait_exit(WAIT)


# ---------------------------------------------------------------------------
# Python side: sessions, and the stream-type conventions as protocols


class TrackedMux(MuxProtocol):
    """A MuxProtocol that records heartbeat round trips and GOAWAYs received."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_rtts: list[float] = []
        self.goaways: list[ev.GoAwayReceived] = []

    def heartbeat_acknowledged(self, rtt: float) -> None:
        """Count our heartbeats the peer echoed."""
        self.heartbeat_rtts.append(rtt)

    def goaway_received(self, event: ev.GoAwayReceived) -> None:
        """Keep the peer's GOAWAY."""
        self.goaways.append(event)


@implementer(interfaces.IHalfCloseableProtocol)
class Echo(Protocol):
    """Type 0: echo every byte; FIN after the peer's FIN."""

    def connectionMade(self) -> None:
        """Stop reading whenever our echo waits for send window (backpressure)."""
        self.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        """Send it back."""
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """The peer finished: finish too, after the queued echo."""
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        """Not used."""


class CloseEarly(Protocol):
    """Type 7: close after the first chunk while the peer still writes."""

    def dataReceived(self, data: bytes) -> None:
        """Close (FIN, then forget the stream)."""
        self.transport.loseConnection()  # type: ignore[union-attr]


class ResetAfterFirstByte(Protocol):
    """Type 8: reset the stream once anything arrives."""

    def dataReceived(self, data: bytes) -> None:
        """RST the stream."""
        self.transport.abortConnection()  # type: ignore[union-attr]


class GoAwayOnOpen(Protocol):
    """Type 9: close the whole session with GOAWAY NO_ERROR."""

    def connectionMade(self) -> None:
        """End the session this stream belongs to."""
        stream: MuxStream = self.transport  # type: ignore[assignment]
        stream.mux.close(ErrorCode.NO_ERROR, "asked to go away")


CONVENTIONS: dict[int, type[Protocol]] = {
    TYPE_ECHO: Echo,
    TYPE_CLOSE_EARLY: CloseEarly,
    TYPE_RESET: ResetAfterFirstByte,
    TYPE_GOAWAY: GoAwayOnOpen,
}


def conventions_acceptor(stream: MuxStream) -> Optional[Protocol]:
    """Pick the protocol for a peer-opened stream by its stream type."""
    cls = CONVENTIONS.get(stream.stream_type)
    return cls() if cls is not None else None


class MuxServerFactory(Factory):
    """Builds server-role sessions and remembers them."""

    noisy = False

    def __init__(self, clock: interfaces.IReactorTime) -> None:
        self.clock = clock
        self.sessions: list[TrackedMux] = []
        self.port = 0

    def buildProtocol(self, addr: interfaces.IAddress) -> TrackedMux:
        """One MuxProtocol per accepted connection."""
        mux = TrackedMux(Role.SERVER, self.clock, acceptor=conventions_acceptor)
        self.sessions.append(mux)
        return mux


@implementer(interfaces.IPushProducer)
class ChunkWriter:
    """
    Writes ``payload`` into a stream in chunks, as a push producer the stream
    pauses when its send window is used up; calls ``on_done`` at the end.
    """

    def __init__(
        self,
        transport: MuxStream,
        payload: bytes,
        on_done: Callable[[], None] = lambda: None,
        chunk: int = 32768,
    ) -> None:
        self.transport = transport
        self.payload = payload
        self.on_done = on_done
        self.chunk = chunk
        self.sent = 0
        self.stopped = False
        self._paused = False
        self._running = False

    def start(self) -> None:
        """Register on the stream and start writing."""
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        """The stream cannot send now."""
        self._paused = True

    def stopProducing(self) -> None:
        """The stream is gone."""
        self.stopped = True

    def resumeProducing(self) -> None:
        """Write until paused, stopped or done."""
        self._paused = False
        if self._running:
            return
        self._running = True
        try:
            while not self._paused and not self.stopped:
                if self.sent >= len(self.payload):
                    self.stopped = True
                    self.transport.unregisterProducer()
                    self.on_done()
                    break
                data = self.payload[self.sent : self.sent + self.chunk]
                self.sent += len(data)
                self.transport.write(data)
        finally:
            self._running = False


@implementer(interfaces.IHalfCloseableProtocol)
class StreamClient(Protocol):
    """
    Our end of one stream: sends ``payload`` through a :class:`ChunkWriter`,
    half-closes after it, and collects what comes back.  ``closed`` fires
    with the exception connectionLost was given (as a result, not an errback).
    """

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.received = bytearray()
        self.fin_received = False
        self.first_data: Deferred[None] = Deferred()
        self.closed: Deferred[BaseException] = Deferred()
        self.writer: Optional[ChunkWriter] = None

    def connectionMade(self) -> None:
        """Start sending, if there is anything to send."""
        stream: MuxStream = self.transport  # type: ignore[assignment]
        if self.payload:
            self.writer = ChunkWriter(stream, self.payload, stream.loseWriteConnection)
            self.writer.start()

    def dataReceived(self, data: bytes) -> None:
        """Collect."""
        self.received += data
        if not self.first_data.called:
            self.first_data.callback(None)

    def readConnectionLost(self) -> None:
        """The peer's FIN: go on writing, if we still are."""
        self.fin_received = True

    def writeConnectionLost(self) -> None:
        """Not used."""

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        """Report how the stream ended."""
        self.closed.callback(reason.value)


class Trickler(StreamClient):
    """
    Writes 1 KiB every 10 ms until the stream ends, the peer's FIN
    notwithstanding.

    Spread out on purpose: muxado v1's Close() silently drops whatever its
    buffer holds, and only DATA arriving *after* the Go stream is forgotten
    gets RST(STREAM_CLOSED).  A burst that fits the window could all land
    just before the Go side forgets the stream, leaving us with no window
    and no reset, forever.
    """

    def __init__(self, clock: interfaces.IReactorTime) -> None:
        super().__init__()
        self.loop = LoopingCall(self._tick)
        self.loop.clock = clock
        self.sent = 0

    def connectionMade(self) -> None:
        """Start trickling."""
        self.loop.start(0.01)

    def _tick(self) -> None:
        self.sent += 1024
        self.transport.write(b"t" * 1024)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        """Stop trickling, then report."""
        if self.loop.running:
            self.loop.stop()
        super().connectionLost(reason)


def compare(received: bytes | bytearray, sent: bytes, what: str) -> Optional[str]:
    """None if equal, else a short description of the first difference."""
    if received == sent:
        return None
    n = min(len(received), len(sent))
    off = next((i for i in range(n) if received[i] != sent[i]), n)
    return f"{what}: got {len(received)} bytes, sent {len(sent)}; first difference at offset {off}"


# ---------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def muxpeer() -> pathlib.Path:
    """The Go interop peer, built once per test session."""
    gobuild.require_go()
    return gobuild.build("muxpeer")


class Harness:
    """Starts Go processes and Python sessions for one test; stops them all."""

    def __init__(self, reactor: Any, muxpeer: pathlib.Path) -> None:
        self.reactor = reactor
        self.muxpeer = muxpeer
        self.processes: list[PeerProcess] = []
        self.ports: list[interfaces.IListeningPort] = []
        self.sessions: list[TrackedMux] = []

    def spawn(self, *args: str) -> PeerProcess:
        """Run ``muxpeer ARGS`` (stdout/stderr collected)."""
        argv = [str(self.muxpeer), *args]
        proc = PeerProcess(self.reactor, argv)
        self.processes.append(proc)
        self.reactor.spawnProcess(proc, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
        return proc

    async def serve_python(self) -> MuxServerFactory:
        """Listen on 127.0.0.1:0 with a server-role MuxProtocol per connection."""
        factory = MuxServerFactory(self.reactor)
        port = await TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(factory)
        self.ports.append(port)
        factory.port = port.getHost().port
        return factory

    async def serve_go(self) -> tuple[PeerProcess, int]:
        """Start ``muxpeer serve`` for one session; return it and its port."""
        proc = self.spawn("serve", "-listen", "127.0.0.1:0", "-sessions", "1", "-timeout", "50s")
        m = await proc.wait_for_line(r"^LISTEN 127\.0\.0\.1:(\d+)$")
        return proc, int(m.group(1))

    async def dial_python(self, port: int) -> TrackedMux:
        """Connect a client-role MuxProtocol to 127.0.0.1:``port``."""
        mux = TrackedMux(Role.CLIENT, self.reactor)
        self.sessions.append(mux)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=WAIT)
        await bounded(connectProtocol(endpoint, mux), WAIT, "connecting", self.reactor)
        return mux

    async def cleanup(self) -> None:
        """
        Kill and reap processes, abort live connections, stop listening:
        every step runs even if one before it failed; the first failure is
        raised at the end.
        """
        failures: list[BaseException] = []
        for proc in self.processes:
            try:
                await proc.stop()
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(e)
        try:
            muxes = list(self.sessions)
            for port in self.ports:
                factory = getattr(port, "factory", None)
                muxes.extend(getattr(factory, "sessions", []))
            waits = []
            for mux in muxes:
                if mux.transport is not None and not mux.ended.called:
                    mux.transport.abortConnection()  # type: ignore[attr-defined]
                    waits.append(
                        bounded(observe(mux.ended), WAIT, "session teardown", self.reactor)
                    )
            if waits:
                await DeferredList(waits, consumeErrors=True)
        finally:
            for port in self.ports:
                await port.stopListening()
        if failures:
            raise failures[0]


@pytest_twisted.async_yield_fixture
async def harness(reactor: Any, muxpeer: pathlib.Path) -> Any:
    """A Harness whose processes, listeners and connections end with the test."""
    h = Harness(reactor, muxpeer)
    try:
        yield h
    finally:
        await h.cleanup()


# ---------------------------------------------------------------------------
# helpers for the Python-client tests


async def echo_stream(mux: MuxProtocol, payload: bytes, clock: Any, timeout: float = WAIT) -> StreamClient:
    """Open an echo stream, send ``payload``, half-close, await a clean end."""
    client = StreamClient(payload)
    stream = mux.open_stream(client, TYPE_ECHO)
    reason = await bounded(client.closed, timeout, f"echo on stream {stream.stream_id}", clock)
    assert isinstance(reason, error.ConnectionDone), f"stream {stream.stream_id} ended with {reason!r}"
    assert client.fin_received, f"stream {stream.stream_id}: no FIN from the echo"
    mismatch = compare(client.received, payload, f"stream {stream.stream_id}")
    assert mismatch is None, mismatch
    return client


async def close_session(mux: TrackedMux, proc: PeerProcess, clock: Any) -> None:
    """End the session with GOAWAY NO_ERROR; the Go server must see it and exit 0."""
    mux.close(ErrorCode.NO_ERROR, "test done")
    end = await bounded(observe(mux.ended), WAIT, "our session to end", clock)
    assert end.error_code == ErrorCode.NO_ERROR and not end.remote, end
    await proc.wait_for_line(r"^GOAWAY_RECEIVED last=\d+ code=0 ")
    await proc.wait_for_line(r"^SESSION_END ")
    code = await proc.wait_exit(WAIT)
    assert code == 0, proc.describe()


def payload_for(seed: int, size: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------------------
# Go dials us


@pytest_twisted.ensureDeferred
async def test_go_client_scenarios_against_python_server(harness: Harness, reactor: Any) -> None:
    """A Go muxado client passes echo, half-close, reset, close-early and wait-goaway against our server role."""
    server = await harness.serve_python()
    scenarios = ["echo", "halfclose", "reset", "close-early", "wait-goaway"]
    proc = harness.spawn(
        "dial", "-addr", f"127.0.0.1:{server.port}", "-scenario", ",".join(scenarios),
        "-streams", str(ECHO_STREAMS), "-timeout", "40s",
    )
    code = await proc.wait_exit(45)
    assert code == 0, proc.describe()
    for name in scenarios:
        assert f"OK {name}" in proc.lines, proc.describe()
    assert proc.find(r"^RESET \d+ code=7 "), proc.describe()
    assert len(server.sessions) == 1
    end = await bounded(observe(server.sessions[0].ended), WAIT, "our session to end", reactor)
    assert end.error_code == ErrorCode.NO_ERROR and not end.remote, end


@pytest_twisted.ensureDeferred
async def test_go_client_idle_then_goaway(harness: Harness, reactor: Any) -> None:
    """A session dialled by Go survives 16 s idle on heartbeats both ways, then ends cleanly with Go's GOAWAY."""
    server = await harness.serve_python()
    proc = harness.spawn(
        "dial", "-addr", f"127.0.0.1:{server.port}", "-scenario", "idle,goaway",
        "-idle", f"{IDLE:g}s", "-timeout", "40s",
    )
    code = await proc.wait_exit(IDLE + 20)
    assert code == 0, proc.describe()
    assert "OK idle" in proc.lines and "OK goaway" in proc.lines, proc.describe()
    mux = server.sessions[0]
    end = await bounded(observe(mux.ended), WAIT, "our session to end", reactor)
    assert end.error_code == ErrorCode.NO_ERROR and end.remote, end
    assert [g.error_code for g in mux.goaways] == [ErrorCode.NO_ERROR]
    # Go echoed our heartbeats all along (one every 3 s).
    assert len(mux.heartbeat_rtts) >= int(IDLE // 3) - 1, mux.heartbeat_rtts


# ---------------------------------------------------------------------------
# we dial Go


@pytest_twisted.ensureDeferred
async def test_python_client_concurrent_echo(harness: Harness, reactor: Any) -> None:
    """Fifty concurrent streams echo 21 MB through a Go server byte for byte."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    payloads = [payload_for(i, ECHO_BYTES) for i in range(ECHO_STREAMS)]
    clients = [StreamClient(p) for p in payloads]
    streams = [mux.open_stream(c, TYPE_ECHO) for c in clients]
    await bounded(
        DeferredList([c.closed for c in clients]),
        30, "50 echo streams", reactor, proc.describe,
    )
    for stream, client, payload in zip(streams, clients, payloads):
        reason = client.closed.result
        assert isinstance(reason, error.ConnectionDone), f"stream {stream.stream_id}: {reason!r}"
        mismatch = compare(client.received, payload, f"stream {stream.stream_id}")
        assert mismatch is None, mismatch
    assert mux.session.stream_count == 0
    await close_session(mux, proc, reactor)


@pytest_twisted.ensureDeferred
async def test_python_client_half_close(harness: Harness, reactor: Any) -> None:
    """After our FIN the Go echo still sends the whole reply, then its FIN closes the stream cleanly."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    payload = payload_for(1000, 300_000)
    client = StreamClient(payload)
    stream = mux.open_stream(client, TYPE_ECHO)
    reason = await bounded(client.closed, WAIT, "half-closed echo", reactor, proc.describe)
    assert isinstance(reason, error.ConnectionDone), reason
    assert client.fin_received
    mismatch = compare(client.received, payload, f"stream {stream.stream_id}")
    assert mismatch is None, mismatch
    await close_session(mux, proc, reactor)


@pytest_twisted.ensureDeferred
async def test_python_client_resets_stream(harness: Harness, reactor: Any) -> None:
    """Our abortConnection on a stream reaches the Go reader as a reset, and the session carries on."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    client = StreamClient(b"")
    stream = mux.open_stream(client, TYPE_RESET)
    await bounded(client.first_data, WAIT, "the Go side's first byte", reactor, proc.describe)
    assert bytes(client.received) == b"R"
    stream.abortConnection()
    reason = await bounded(client.closed, WAIT, "our stream to close", reactor)
    assert isinstance(reason, StreamResetError) and reason.code == ErrorCode.CANCEL, reason
    await proc.wait_for_line(rf"^STREAM_ERROR {stream.stream_id} .*reset by peer with error 7")
    await echo_stream(mux, payload_for(5, 50_000), reactor)
    await close_session(mux, proc, reactor)


@pytest_twisted.ensureDeferred
async def test_python_client_stream_reset_by_go(harness: Harness, reactor: Any) -> None:
    """A Go Close() while we keep writing resets our stream with STREAM_CLOSED, and the session survives."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    client = Trickler(reactor)
    stream = mux.open_stream(client, TYPE_CLOSE_EARLY)
    reason = await bounded(client.closed, WAIT, "Go to reset our stream", reactor, proc.describe)
    assert isinstance(reason, StreamResetError), reason
    assert reason.code == ErrorCode.STREAM_CLOSED and reason.remote, reason
    assert client.fin_received, "Go's Close() sends FIN before it forgets the stream"
    assert not client.loop.running and client.sent > 0
    assert stream.stream_id not in mux.streams
    assert not mux.ended.called
    await echo_stream(mux, payload_for(6, 50_000), reactor)
    await close_session(mux, proc, reactor)


@pytest_twisted.ensureDeferred
async def test_python_client_idle(harness: Harness, reactor: Any) -> None:
    """A session we dialled survives 16 s idle on heartbeats both ways, then still echoes."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    await deferLater(reactor, IDLE, lambda: None)
    assert not mux.ended.called, mux.end_event
    assert proc.find(r"^SESSION_END") is None, proc.describe()
    assert len(mux.heartbeat_rtts) >= int(IDLE // 3) - 1, mux.heartbeat_rtts
    await echo_stream(mux, payload_for(7, 100_000), reactor)
    await close_session(mux, proc, reactor)


@pytest_twisted.ensureDeferred
async def test_python_client_goaway(harness: Harness, reactor: Any) -> None:
    """Our close() sends GOAWAY NO_ERROR: Go reports code 0, ends its session and exits 0."""
    proc, port = await harness.serve_go()
    mux = await harness.dial_python(port)
    await echo_stream(mux, payload_for(8, 10_000), reactor)
    mux.close(ErrorCode.NO_ERROR, "bye")
    end = await bounded(observe(mux.ended), WAIT, "our session to end", reactor)
    assert end == ev.SessionEnded(ErrorCode.NO_ERROR, "bye", False)
    m = await proc.wait_for_line(r"^GOAWAY_RECEIVED last=(\d+) code=(\d+) ")
    # The highest id Go opened is its heartbeat stream, 2.
    assert (m.group(1), m.group(2)) == ("2", "0"), proc.describe()
    await proc.wait_for_line(r"^SESSION_END ")
    assert await proc.wait_exit(WAIT) == 0, proc.describe()
