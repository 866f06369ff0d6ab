"""
In-process tests of the relay over real loopback sockets: the relay built by
``tap.makeService`` on the real reactor, a legacy Python service (a
client-role MuxProtocol that echoes) and plain TCP visitors.

They cover what users rely on (design.md section 2): the legacy handshake,
echo and half-close through the relay, the lifecycle when a service's
session ends, backpressure both ways, no leaks under churn, isolation of a
misbehaving session, and draining on stop.
"""

from __future__ import annotations

import hashlib
import os
import socket
import weakref
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import LoopingCall

from tcprelay.forward import Splice
from tcprelay.mux.frames import ErrorCode
from tests.relay_helpers import (
    SERVICE_CONFIG,
    Cleanup,
    EchoProtocol,
    RelayFixture,
    registered_ports,
    session_for,
    LegacyService,
    Peer,
    bounded,
    connect_visitor,
    echo_once,
    fd_count,
    wait_for,
    wait_stable,
)

MB = 1024 * 1024
SOCKET_BUFFER = 65536
"""Twisted's transport bufferSize: a transport pauses its producer beyond this."""
MAX_FRAME = 0x3FFF
# The relay hands the visitor what one read of the service's socket held
# (consecutive frames of a stream are delivered together), so a socket
# buffer may overshoot by up to one read, not just one frame.
ONE_READ = 65536


@pytest_twisted.async_yield_fixture
async def env(reactor: Any):
    """Everything a test opens, closed afterwards whatever happened."""
    cleanup = Cleanup(reactor)
    yield cleanup
    await cleanup.close()


def only_splice(relay: RelayFixture, port: int) -> Splice:
    """The single visitor splice of the service at ``port``."""
    visitors = relay.tunnel_at(port).visitors
    assert len(visitors) == 1
    return next(iter(visitors))


def transport_buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in its write buffer."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def inbox_size(stream: Any) -> int:
    """Bytes a MuxStream holds for a paused reader."""
    return sum(len(chunk) for chunk in stream._inbox)


class Sampler:
    """Samples a value every few milliseconds and keeps the maximum."""

    def __init__(self, reactor: Any, value: Callable[[], int]) -> None:
        self.value = value
        self.max = value()
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._loop.start(0.002)

    def _sample(self) -> None:
        self.max = max(self.max, self.value())

    def stop(self) -> None:
        self._sample()
        if self._loop.running:
            self._loop.stop()


async def refused(reactor: Any, port: int) -> bool:
    """True if connecting to ``port`` is refused."""
    try:
        visitor = await connect_visitor(reactor, port, 1)
    except ConnectionRefusedError:
        return True
    visitor.transport.abortConnection()  # type: ignore[union-attr]
    await bounded(visitor.lost, reactor)
    return False


# -- handshake, echo, half-close --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_gives_localhost_address(reactor: Any, env: Cleanup) -> None:
    """A legacy service's first plain stream yields ``--public-host:PORT`` with a pool port."""
    relay = await env.relay("--public-host", "localhost")
    free = relay.relay.pool.free
    service = await env.service(relay)
    assert service.address == f"localhost:{service.port}"
    assert service.port == relay.public_ports.start
    assert relay.relay.pool.free == free - 1
    assert registered_ports(relay) == {service.port}
    assert len(relay.relay.sessions) == 1
    await wait_for(
        reactor, lambda: relay.relay.stream_count == 0, 1, "the handshake stream to close"
    )


@pytest_twisted.ensureDeferred
async def test_visitor_echo(reactor: Any, env: Cleanup) -> None:
    """Bytes from a visitor reach the service and the service's reply reaches the visitor."""
    relay = await env.relay()
    service = await env.service(relay)
    visitor = await env.visitor(service.port)
    visitor.send(b"hello relay")
    await bounded(visitor.wait_received(11), reactor)
    assert bytes(visitor.received) == b"hello relay"
    echo = await service.stream(0)
    assert bytes(echo.received) == b"hello relay"
    assert relay.relay.visitor_count == 1
    assert relay.relay.stats.visitors_accepted == 1
    assert relay.relay.stream_count == 1


class ReplyOnFin(EchoProtocol):
    """Says nothing until the visitor's FIN, then replies and sends its own FIN."""

    echo = False

    def __init__(self, reply: Callable[[bytes], bytes] = lambda q: b"reply to " + q) -> None:
        super().__init__()
        self.reply = reply

    def readConnectionLost(self) -> None:
        self.got_eof = True
        if not self.eof.called:
            self.eof.callback(None)
        self.send(self.reply(bytes(self.received)), fin=True)


@pytest_twisted.ensureDeferred
async def test_visitor_half_close_reply_still_arrives(reactor: Any, env: Cleanup) -> None:
    """After the visitor's SHUT_WR the service's reply still arrives, followed by EOF."""
    relay = await env.relay()
    service = await env.service(relay, ReplyOnFin)
    visitor = await env.visitor(service.port)
    visitor.send(b"question", fin=True)
    await bounded(visitor.eof, reactor)
    assert bytes(visitor.received) == b"reply to question"
    await bounded(visitor.lost, reactor)
    await wait_for(reactor, lambda: relay.relay.visitor_count == 0, 1, "splice to finish")
    assert relay.relay.stream_count == 0


@pytest_twisted.ensureDeferred
async def test_service_fin_gives_visitor_eof(reactor: Any, env: Cleanup) -> None:
    """The service's FIN becomes the visitor's EOF while the visitor can still send."""
    relay = await env.relay()
    service, visitor, echo = await env.echoed(relay, b"ping")
    echo.echo = False  # type: ignore[misc]
    echo.half_close()
    await bounded(visitor.eof, reactor)
    assert not visitor.lost.called, "only the service's direction is closed"
    visitor.send(b"after eof")
    await bounded(echo.wait_received(4 + 9), reactor)
    assert bytes(echo.received) == b"pingafter eof"
    visitor.half_close()
    await bounded(visitor.lost, reactor)
    await bounded(echo.lost, reactor)
    await wait_for(reactor, lambda: relay.relay.visitor_count == 0, 1, "splice to finish")


# -- lifecycle ----------------------------------------------------------------


def end_clean(service: LegacyService) -> None:
    service.mux.close()  # type: ignore[union-attr]


def end_reset(service: LegacyService) -> None:
    service.transport.abortConnection()


def end_garbage(service: LegacyService) -> None:
    service.transport.write(b"\xde\xad\xbe\xef" * 4)


def end_silent(service: LegacyService) -> None:
    service.transport.pauseProducing()


HEARTBEAT_ARGS = ("--heartbeat-interval", "0.2", "--heartbeat-tolerance", "0.6")

SESSION_ENDS = [
    pytest.param(end_clean, (), id="clean-close"),
    pytest.param(end_reset, (), id="tcp-reset"),
    pytest.param(end_garbage, (), id="protocol-error"),
    pytest.param(end_silent, HEARTBEAT_ARGS, id="heartbeat-timeout"),
]
"""Every way a session ends, with the relay arguments it needs."""


@pytest.mark.parametrize("end, args", SESSION_ENDS)
@pytest_twisted.ensureDeferred
async def test_session_end_closes_port_and_visitors(
    reactor: Any, env: Cleanup, end: Callable[[LegacyService], None], args: tuple[str, ...]
) -> None:
    """However a session ends, its port refuses, its visitors close and the port is free (timing: test_relay_timing)."""
    relay = await env.relay(*args, ports=1)
    service = await env.service(relay)
    port = service.port
    control = session_for(relay, port)
    visitors = [await env.visitor(port) for _ in range(2)]
    for i, visitor in enumerate(visitors):
        visitor.send(b"v%d" % i)
        await bounded(visitor.wait_received(2), reactor)
    assert relay.relay.visitor_count == 2
    assert relay.relay.pool.free == 0

    end(service)
    # A heartbeat timeout takes up to interval + tolerance to be noticed.
    await wait_for(reactor, lambda: control.session.ended, what="session end")
    await bounded(DeferredList([v.lost for v in visitors]), reactor)
    await wait_for(reactor, lambda: relay.relay.pool.free == 1, what="port back in the pool")
    await wait_for(reactor, lambda: control not in relay.relay.sessions, what="session socket closed")
    assert await refused(reactor, port)
    assert registered_ports(relay) == set()
    assert relay.relay.visitor_count == 0
    assert relay.relay.stream_count == 0

    if end is end_garbage:
        assert relay.relay.stats.protocol_errors == {ErrorCode.PROTOCOL_ERROR: 1}
        await bounded(service.mux.socket_lost, reactor)  # type: ignore[union-attr]
        assert [g.error_code for g in service.mux.goaways] == [ErrorCode.PROTOCOL_ERROR]  # type: ignore[union-attr]
    if end is end_silent:
        assert relay.relay.stats.heartbeat_timeouts == 1

    successor = await env.service(relay)
    assert successor.port == port, "the freed port is handed to the next service"
    assert bytes(await echo_once(reactor, port, b"again")) == b"again"


# -- backpressure -------------------------------------------------------------


@pytest.mark.parametrize("end, args", SESSION_ENDS)
@pytest_twisted.ensureDeferred
async def test_an_ended_session_leaves_no_reference_cycle(
    reactor: Any, env: Cleanup, no_cyclic_gc: None,
    end: Callable[[LegacyService], None], args: tuple[str, ...],
) -> None:
    """However a session ends, reference counting frees its control session, muxado session, tunnel, socket transport and visitors' splices: the daemon freezes long-lived objects out of the cyclic collector's reach between full sweeps (tcprelay.process), so a cycle left by an ended session would stay until the next sweep."""
    relay = await env.relay(*args, ports=1)
    service = await env.service(relay)
    port = service.port
    control = session_for(relay, port)
    tunnel = relay.tunnel_at(port)
    visitor = await env.visitor(port)
    visitor.send(b"v")
    await bounded(visitor.wait_received(1), reactor)
    splice = only_splice(relay, port)
    refs = {name: weakref.ref(o) for name, o in [
        ("control", control), ("session", control.session), ("tunnel", tunnel),
        ("transport", control.transport), ("splice", splice)]}
    del control, tunnel, splice
    end(service)
    await wait_for(reactor, lambda: not relay.relay.sessions, what="session socket closed")
    await bounded(visitor.lost, reactor)
    await wait_for(reactor, lambda: relay.relay.visitor_count == 0, what="splice finished")
    await wait_for(reactor, lambda: relay.relay.pool.free == 1, what="port back in the pool")

    def alive() -> list[str]:
        return [name for name, ref in refs.items() if ref() is not None]

    # a lost connection finishes from a callLater(0): wait for the turn
    await wait_for(reactor, lambda: not alive(), 1, "the ended session's objects to be freed")


@pytest_twisted.ensureDeferred
async def test_service_not_reading_pauses_visitor(reactor: Any, env: Cleanup) -> None:
    """A service that stops reading stops the visitor's upload, the relay buffers one window at most, and resuming delivers every byte."""
    relay = await env.relay()
    window = relay.options["receive-window"]
    service, visitor, echo = await env.echoed(relay)
    splice = only_splice(relay, service.port)
    relay_visitor = splice.visitor.transport
    relay_stream = splice.service.transport
    relay_session = relay_stream.mux.session
    sid = relay_stream.stream_id

    echo.pause_reading()
    data = os.urandom(10 * MB)
    pending = Sampler(reactor, lambda: relay_session.pending(sid))
    service_inbox = Sampler(reactor, lambda: inbox_size(echo.stream))
    try:
        visitor.send(data, fin=True)
        await wait_stable(reactor, lambda: visitor.bytes_sent, quiet=0.3, what="upload")
        assert visitor.bytes_sent < len(data), "the relay must not swallow the whole upload"
        assert visitor.write_blocked
        assert relay_visitor not in reactor.getReaders(), "relay stopped reading the visitor"
        assert 0 < relay_session.pending(sid) <= window + SOCKET_BUFFER
        assert pending.max <= window + SOCKET_BUFFER
        assert inbox_size(echo.stream) <= SERVICE_CONFIG.receive_window

        echo.resume_reading()
        await bounded(visitor.eof, reactor, 20)
    finally:
        pending.stop()
        service_inbox.stop()
    assert pending.max <= window + SOCKET_BUFFER
    assert service_inbox.max <= SERVICE_CONFIG.receive_window
    assert len(visitor.received) == len(data) + 1
    assert hashlib.sha256(visitor.received).digest() == hashlib.sha256(b"x" + data).digest()
    await bounded(visitor.lost, reactor)


@pytest_twisted.ensureDeferred
async def test_visitor_not_reading_pauses_service(reactor: Any, env: Cleanup) -> None:
    """A visitor that stops reading stops the service's download, the relay buffers about one window plus one socket buffer, and the visitor then reads every byte."""
    relay = await env.relay()
    window = relay.options["receive-window"]
    service, visitor, echo = await env.echoed(relay)
    echo.echo = False  # type: ignore[misc]
    splice = only_splice(relay, service.port)
    relay_visitor = splice.visitor.transport
    relay_stream = splice.service.transport

    def relay_buffered() -> int:
        return transport_buffered(relay_visitor) + inbox_size(relay_stream)

    visitor.pause_reading()
    data = os.urandom(10 * MB)
    sampler = Sampler(reactor, relay_buffered)
    try:
        echo.send(data, fin=True)
        await wait_stable(reactor, lambda: echo.bytes_sent, quiet=0.3, what="download")
        assert echo.bytes_sent < len(data), "the relay must not swallow the whole download"
        assert echo.write_blocked
        assert relay_stream._paused, "relay stopped reading the stream"
        assert inbox_size(relay_stream) <= window
        assert transport_buffered(relay_visitor) <= SOCKET_BUFFER + ONE_READ
        assert sampler.max <= window + SOCKET_BUFFER + ONE_READ

        visitor.resume_reading()
        await bounded(visitor.eof, reactor, 20)
    finally:
        sampler.stop()
    assert sampler.max <= window + SOCKET_BUFFER + ONE_READ
    assert len(visitor.received) == len(data) + 1
    assert hashlib.sha256(visitor.received).digest() == hashlib.sha256(b"x" + data).digest()
    visitor.half_close()
    await bounded(visitor.lost, reactor)


@pytest_twisted.ensureDeferred
async def test_service_fin_reaches_visitor_behind_full_buffer(reactor: Any, env: Cleanup) -> None:
    """A service FIN that arrives while the relay has paused the stream for a slow visitor still becomes the visitor's EOF."""
    relay = await env.relay()
    service, visitor, echo = await env.echoed(relay)
    echo.echo = False  # type: ignore[misc]
    splice = only_splice(relay, service.port)
    relay_visitor = splice.visitor.transport
    relay_stream = splice.service.transport
    visitor.pause_reading()
    sent = [1]
    chunks: list[bytes] = [b"x"]

    async def push(size: int) -> None:
        data = os.urandom(size)
        chunks.append(data)
        await bounded(echo.send(data), reactor)
        sent[0] += size
        await wait_for(
            reactor,
            lambda: splice.bytes_to_visitor + inbox_size(relay_stream) == sent[0],
            what="the relay to take the chunk",
        )

    # Fill the kernel buffers towards the visitor with chunks that cannot
    # overflow the relay's transport buffer on their own (4 frames < 64 KiB)...
    for _ in range(1000):
        await push(4 * MAX_FRAME)
        try:
            await wait_for(reactor, lambda: transport_buffered(relay_visitor) == 0, 0.1)
        except AssertionError:
            break
    # ...then one frame at a time until the relay pauses the stream, so that
    # nothing is held back in its inbox when the FIN comes.
    for _ in range(1000):
        if relay_stream._paused:
            break
        await push(MAX_FRAME)
    assert relay_stream._paused and inbox_size(relay_stream) == 0

    echo.half_close()
    await wait_for(reactor, lambda: splice.service.read_done or relay_stream._eof_pending, what="FIN at the relay")
    visitor.resume_reading()
    await bounded(visitor.wait_received(sent[0]), reactor, 10)
    await bounded(visitor.eof, reactor, 2)
    assert bytes(visitor.received) == b"".join(chunks)
    visitor.half_close()
    await bounded(visitor.lost, reactor)
    await wait_for(reactor, lambda: relay.relay.visitor_count == 0, 1, "splice to finish")


# -- churn ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_churn_leaves_no_leaks(reactor: Any, env: Cleanup) -> None:
    """100 service sessions and 1,000 visitors (some reset, some silent) leave counters, pool, descriptors and timers as they were."""
    # The visitors' watchdog stops at its first check after the last visitor
    # has gone: short limits make that check come within the wait below.
    relay = await env.relay("--open-timeout", "2", "--half-close-timeout", "2", ports=8)
    core = relay.relay
    baseline = (len(core.sessions), len(core.tunnels()), core.stream_count, core.visitor_count)
    free = relay.relay.pool.free
    fds = fd_count()
    calls_before = set(reactor.getDelayedCalls())

    async def reset_visitor(port: int) -> None:
        """Echo once, then leave with a TCP reset."""
        visitor = await connect_visitor(reactor, port)
        visitor.send(b"reset me")
        await bounded(visitor.wait_received(8), reactor)
        visitor.transport.abortConnection()  # type: ignore[union-attr]
        await bounded(visitor.lost, reactor)

    async def silent_visitor(port: int) -> None:
        """Connect and close at once without a byte."""
        visitor = await connect_visitor(reactor, port)
        visitor.transport.loseConnection()  # type: ignore[union-attr]
        await bounded(visitor.lost, reactor)

    async def one_service(n: int) -> None:
        service = LegacyService(reactor)
        await service.connect(relay.control_port)
        try:
            payloads = [b"service %d visitor %d " % (n, i) * (i + 1) for i in range(8)]
            replies = await gatherResults(
                [Deferred.fromCoroutine(echo_once(reactor, service.port, p)) for p in payloads]
                + [
                    Deferred.fromCoroutine(reset_visitor(service.port)),
                    Deferred.fromCoroutine(silent_visitor(service.port)),
                ]
            )
            assert replies == payloads + [None, None]
        finally:
            if service.mux is not None and not service.mux.socket_lost.called:
                await service.close()

    async def worker(numbers: list[int]) -> None:
        for n in numbers:
            await one_service(n)

    await gatherResults(
        [Deferred.fromCoroutine(worker(list(range(k, 100, 4)))) for k in range(4)]
    )
    assert core.stats.visitors_accepted == 1000

    await wait_for(reactor, lambda: not core.sessions, 5, "sessions to end")
    assert (len(core.sessions), len(core.tunnels()), core.stream_count, core.visitor_count) == baseline
    await wait_for(reactor, lambda: relay.relay.pool.free == free, 2, "ports to return")
    await wait_for(reactor, lambda: fd_count() <= fds + 2, 5, "descriptors to close")
    await wait_for(
        reactor,
        lambda: not (set(reactor.getDelayedCalls()) - calls_before),
        2,
        "timers to go",
    )


# -- isolation ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_protocol_error_isolated_to_its_session(reactor: Any, env: Cleanup) -> None:
    """A session that sends garbage gets GOAWAY and is closed; another service keeps working."""
    relay = await env.relay()
    good = await env.service(relay)
    visitor = await env.visitor(good.port)
    visitor.send(b"before")
    await bounded(visitor.wait_received(6), reactor)

    bad = await env.service(relay)
    bad.transport.write(b"\xff" * 32)
    await bounded(bad.mux.socket_lost, reactor)  # type: ignore[union-attr]
    assert [g.error_code for g in bad.mux.goaways] == [ErrorCode.PROTOCOL_ERROR]  # type: ignore[union-attr]
    await wait_for(reactor, lambda: bad.port not in registered_ports(relay), 1, "bad service gone")
    assert relay.relay.stats.protocol_errors == {ErrorCode.PROTOCOL_ERROR: 1}

    visitor.send(b" after")
    await bounded(visitor.wait_received(12), reactor)
    assert bytes(visitor.received) == b"before after"
    assert await echo_once(reactor, good.port, b"new visitor") == b"new visitor"
    assert good.is_open
    assert registered_ports(relay) == {good.port}


# -- drain on stop ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_drains_open_exchange(reactor: Any, env: Cleanup) -> None:
    """Stopping the relay refuses new visitors and sessions, lets an open exchange finish, then fires."""
    relay = await env.relay()
    service = await env.service(relay)
    port = service.port
    visitor = await env.visitor(port)
    visitor.send(b"one")
    await bounded(visitor.wait_received(3), reactor)
    free = relay.relay.pool.free

    stopping = relay.service.stopService()
    await wait_for(reactor, lambda: relay.relay.pool.free == free + 1, 1, "public port closed")
    await wait_for(reactor, lambda: not relay.control_listener.connected, 1, "control port closed")
    assert await refused(reactor, port)
    assert await refused(reactor, relay.control_port)
    await wait_for(reactor, lambda: service.mux.goaways, 1, "GOAWAY to the service")  # type: ignore[union-attr]
    assert not stopping.called

    visitor.send(b" two")
    await bounded(visitor.wait_received(7), reactor)
    assert bytes(visitor.received) == b"one two"
    assert not stopping.called, "an open exchange holds the stop"
    visitor.half_close()
    await bounded(visitor.eof, reactor)
    await bounded(visitor.lost, reactor)
    await bounded(stopping, reactor, 2)
    assert not relay.relay.sessions
    await bounded(service.mux.socket_lost, reactor)  # type: ignore[union-attr]
    assert [g.error_code for g in service.mux.goaways] == [ErrorCode.NO_ERROR]  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_large_reply_after_visitor_fin_to_slow_visitor(reactor: Any, env: Cleanup) -> None:
    """A large reply to a visitor that already sent FIN and reads slowly arrives whole, then EOF and close."""
    relay = await env.relay()
    data = os.urandom(4 * MB)
    service = await env.service(relay, lambda: ReplyOnFin(lambda _: data))
    visitor = await env.visitor(service.port)
    visitor.pause_reading()
    reply = await service.stream(0)
    visitor.send(b"q", fin=True)
    await bounded(reply.eof, reactor)
    await wait_stable(reactor, lambda: reply.bytes_sent, quiet=0.3, what="reply")
    visitor.resume_reading()
    await bounded(visitor.eof, reactor, 20)
    assert len(visitor.received) == len(data)
    assert hashlib.sha256(visitor.received).digest() == hashlib.sha256(data).digest()
    await bounded(visitor.lost, reactor, 1)
    await wait_for(reactor, lambda: relay.relay.visitor_count == 0, 1, "splice to finish")


# -- waiting for a port, bind failures -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_service_waits_for_the_port_its_holder_frees(reactor: Any, env: Cleanup) -> None:
    """With every port taken a service waits and gets the port its holder frees; one that waits too long is refused (timing: test_relay_timing)."""
    relay = await env.relay("--wait-timeout", "0.5", ports=1)
    first = await env.service(relay)
    waiting = LegacyService(reactor)
    env.services.append(waiting)
    handshake = Deferred.fromCoroutine(waiting.connect(relay.control_port))
    await wait_for(reactor, lambda: relay.relay.pool.queued == 1, 1, "second service queued")
    assert not handshake.called
    await first.close()
    await bounded(handshake, reactor, 1)
    assert waiting.port == first.port
    assert bytes(await echo_once(reactor, waiting.port, b"hi")) == b"hi"

    refused_service = LegacyService(reactor)
    env.services.append(refused_service)
    with pytest.raises(Exception):
        await refused_service.connect(relay.control_port, timeout=2)
    await bounded(refused_service.mux.socket_lost, reactor, 1)  # type: ignore[union-attr]
    assert [g.error_code for g in refused_service.mux.goaways] == [ErrorCode.REFUSED_STREAM]  # type: ignore[union-attr]
    assert relay.relay.stats.services_refused == 1
    assert relay.relay.pool.queued == 0
    assert waiting.is_open


@pytest_twisted.ensureDeferred
async def test_port_that_cannot_bind_is_skipped_and_quarantined(reactor: Any, env: Cleanup) -> None:
    """A public port held by someone else is quarantined and the service gets the next port."""
    relay = await env.relay("--bind-retry", "0.3", ports=2)
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind(("127.0.0.1", relay.public_ports.start))
        squatter.listen(1)
        service = await env.service(relay)
        assert service.port == relay.public_ports.start + 1
        assert relay.relay.pool.quarantined == 1
    finally:
        squatter.close()
    await wait_for(reactor, lambda: relay.relay.pool.quarantined == 0, 1, "quarantine to end")
    assert relay.relay.pool.free == 1
    second = await env.service(relay)
    assert second.port == relay.public_ports.start
    assert bytes(await echo_once(reactor, second.port, b"ok")) == b"ok"


@pytest_twisted.ensureDeferred
async def test_service_goaway_closes_public_port_and_lets_visitors_finish(
    reactor: Any, env: Cleanup
) -> None:
    """A service's GOAWAY closes its public port at once, frees the port, and the session ends when its visitors are done."""
    relay = await env.relay(ports=1)
    service = await env.service(relay)
    port = service.port
    control = session_for(relay, port)
    visitor = await env.visitor(port)
    visitor.send(b"before")
    await bounded(visitor.wait_received(6), reactor)

    service.mux.go_away()  # type: ignore[union-attr]
    await wait_for(reactor, lambda: relay.relay.pool.free == 1, 1.0, "port back in the pool")
    assert await refused(reactor, port)
    assert registered_ports(relay) == set()
    assert not control.session.ended, "the open visitor keeps the session up"

    visitor.send(b" after")
    await bounded(visitor.wait_received(12), reactor)
    assert bytes(visitor.received) == b"before after"
    visitor.half_close()
    await bounded(visitor.lost, reactor)
    await wait_for(reactor, lambda: control.session.ended, 1.0, "session closed once quiet")


class Greeter(EchoProtocol):
    """A service that speaks first (like SMTP or SSH): greets every visitor."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"220 hello\r\n")  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_silent_visitor_still_gets_a_stream(reactor: Any, env: Cleanup) -> None:
    """A visitor that sends nothing still gets its stream at once, so a service that speaks first is heard."""
    relay = await env.relay()
    service = await env.service(relay, Greeter)
    visitor = await env.visitor(service.port)
    await bounded(visitor.wait_received(11), reactor, 1.0)
    assert bytes(visitor.received) == b"220 hello\r\n"
    visitor.send(b"QUIT\r\n")
    await bounded(visitor.wait_received(17), reactor, 1.0)
    assert bytes(visitor.received) == b"220 hello\r\nQUIT\r\n"


@pytest_twisted.ensureDeferred
async def test_visitor_that_writes_at_once_gets_syn_and_data_together(
    reactor: Any, env: Cleanup
) -> None:
    """Bytes a visitor sent before the relay accepted it reach the service intact, right behind the stream's SYN."""
    relay = await env.relay()
    service = await env.service(relay)
    sock = socket.create_connection(("127.0.0.1", service.port))
    try:
        sock.sendall(b"early bytes")
        echo = await service.stream(0)
        await bounded(echo.wait_received(11), reactor, 2.0)
        assert bytes(echo.received) == b"early bytes"
    finally:
        sock.close()


def _record_session_writes(monkeypatch: Any, relay: RelayFixture, port: int) -> list[bytes]:
    """Every write the relay makes on the session of the service at ``port``, one entry each."""
    from tcprelay import protocol

    session_transport = session_for(relay, port).transport
    writes: list[bytes] = []
    real = protocol.write_now

    def recording(transport: Any, data: bytes) -> None:
        if transport is session_transport:
            writes.append(bytes(data))
        real(transport, data)

    monkeypatch.setattr(protocol, "write_now", recording)
    return writes


def _frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in ``data``: 1 SYN, 3 DATA, others 0."""
    from tcprelay.mux.frames import Data, FrameDecoder, Syn

    return [
        (1 if isinstance(f, Syn) else 3 if isinstance(f, Data) else 0, f.stream_id,
         bytes(f.data) if isinstance(f, Data) else b"")
        for f in FrameDecoder().feed(data)
    ]


@pytest_twisted.ensureDeferred
async def test_early_bytes_leave_with_the_syn_in_one_write(
    reactor: Any, env: Cleanup, monkeypatch: Any
) -> None:
    """A visitor that wrote before it was accepted: its SYN and those bytes reach the service's socket in a single write."""
    from tcprelay.relay.core import Relay

    relay = await env.relay()
    service = await env.service(relay)
    writes = _record_session_writes(monkeypatch, relay, service.port)
    read_at_accept: list[bytes] = []
    real = Relay.splice_visitor

    def recording(self: Any, tunnel: Any, addr: Any, first: bytes) -> Any:
        read_at_accept.append(first)
        return real(self, tunnel, addr, first)

    monkeypatch.setattr(Relay, "splice_visitor", recording)
    sock = socket.create_connection(("127.0.0.1", service.port))
    try:
        sock.sendall(b"early bytes")  # before the reactor's next turn accepts it
        echo = await service.stream(0)
        await bounded(echo.wait_received(11), reactor, 2.0)
        assert read_at_accept == [b"early bytes"]  # read by the accept itself
        first = _frames(writes[0])
        assert first[0][0] == 1  # SYN
        assert (3, first[0][1], b"early bytes") in first  # DATA, same stream
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_silent_visitor_syn_waits_for_its_first_bytes(
    reactor: Any, env: Cleanup, monkeypatch: Any
) -> None:
    """A visitor that had sent nothing when accepted: its SYN is held for its first bytes, then both leave in one write."""
    from tcprelay.relay.doors import muxado as server

    monkeypatch.setattr(server, "SYN_HOLD", 30.0)  # longer than this test
    relay = await env.relay()
    service = await env.service(relay)
    writes = _record_session_writes(monkeypatch, relay, service.port)
    visitor = await env.visitor(service.port)
    await wait_for(reactor, lambda: relay.tunnel_at(service.port).visitors, what="the accept")
    assert not any(t == 1 for w in writes for t, _, _ in _frames(w))  # no SYN yet
    visitor.send(b"hello")
    echo = await service.stream(0)
    await bounded(echo.wait_received(5), reactor, 2.0)
    [write] = [w for w in writes if any(t == 1 for t, _, _ in _frames(w))]
    frames = _frames(write)
    assert frames[0][0] == 1 and (3, frames[0][1], b"hello") in frames


@pytest_twisted.ensureDeferred
async def test_visitor_socket_has_nagle_off(reactor: Any, env: Cleanup) -> None:
    """The relay's end of a visitor connection has TCP_NODELAY, as Go's relay has: no reply tail waits for an ACK."""
    relay = await env.relay()
    service, _, _ = await env.echoed(relay)
    side = only_splice(relay, service.port).visitor
    assert side.transport.getTcpNoDelay()


@pytest_twisted.ensureDeferred
async def test_a_visitors_fin_waits_for_the_next_frames(
    reactor: Any, env: Cleanup, monkeypatch: Any
) -> None:
    """A visitor's FIN may wait (up to FIN_HOLD; 30 s here): the next visitor's SYN and bytes take it along, in one write to the service, FIN first."""
    from tcprelay.mux.frames import Data, FrameDecoder, Syn
    from tcprelay.relay.doors import muxado as server

    assert server.FIN_HOLD > 0
    monkeypatch.setattr(server, "FIN_HOLD", 30.0)
    relay = await env.relay()
    service = await env.service(relay, Peer)  # a quiet service: nothing flushes the session
    writes = _record_session_writes(monkeypatch, relay, service.port)
    first = await env.visitor(service.port)
    await first.send(b"one", fin=True)
    one = await service.stream(0)
    await bounded(one.wait_received(3), reactor, 2.0)
    first_id = one.transport.stream_id  # type: ignore[union-attr]
    assert not any(
        isinstance(f, Data) and f.fin for w in writes for f in FrameDecoder().feed(w)
    ), "the FIN went on its own"
    second = await env.visitor(service.port)
    await second.send(b"two")
    two = await service.stream(1)
    await bounded(two.wait_received(3), reactor, 2.0)
    [write] = [w for w in writes if any(isinstance(f, Syn) for f in FrameDecoder().feed(w))
               and any(isinstance(f, Data) and f.fin for f in FrameDecoder().feed(w))]
    frames = FrameDecoder().feed(write)
    fin_at = next(i for i, f in enumerate(frames) if isinstance(f, Data) and f.fin)
    syn_at = next(i for i, f in enumerate(frames) if isinstance(f, Syn))
    assert frames[fin_at].stream_id == first_id and fin_at < syn_at
    assert frames[syn_at].stream_id == two.transport.stream_id  # type: ignore[union-attr]
