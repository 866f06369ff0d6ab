"""
The Twisted internals tcprelay relies on (``tcprelay._twisted``): every one
exists in the installed Twisted with the expected kind, the checker really
notices a missing or changed one, no private Twisted name is used without
being listed, and every fast path's public-API fallback behaves correctly
over real loopback connections when its flag is forced off.

Every connection a test opens is closed, and its end awaited, before the
test returns.
"""

from __future__ import annotations

import ast
import dis
import inspect
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import interfaces, tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import _fastio, _reactor, _twisted
from tcprelay._fastio import (
    EagerConnector,
    EagerPort,
    close_finished,
    close_now,
    connect_eager,
    listen_eager,
    lose_write_now,
    read_size,
    write_now,
)
from tcprelay._twisted import FAST_PATHS, INTERNALS, Internal, Kind, available, missing_internals
from tcprelay.forward import Splice
from tests.relay_helpers import bounded, wait_for

ROOT = Path(__file__).resolve().parent.parent

_FASTIO_FLAGS = (
    "_FAST_WRITE",
    "_FAST_FIN",
    "_FAST_CLOSE",
    "_FAST_READ_SIZE",
    "_FAST_ACCEPT",
    "_FAST_CONNECT",
)


# -- the table against the installed Twisted ---------------------------------


def test_every_listed_internal_exists_in_the_installed_twisted() -> None:
    """Each name of the table is in the installed Twisted with its expected kind (the failure names those that are not)."""
    missing = missing_internals()
    assert not missing, "Twisted internals missing or changed:\n" + "\n".join(missing)


def test_every_fast_path_is_on_with_a_supported_twisted() -> None:
    """On a Twisted of the supported range every fast path is enabled, so the suite's fast-path tests test the fast paths."""
    assert {path: available(path) for path in FAST_PATHS} == dict.fromkeys(FAST_PATHS, True)
    assert all(getattr(_fastio, flag) for flag in _FASTIO_FLAGS)
    assert _reactor._FAST_POLL


class _Fake:
    """Stands for a Twisted class in the checker's tests."""

    present = 0
    a_class = int

    def __init__(self) -> None:
        self.assigned = 1

    def method(self, first: int, second: int) -> None:
        pass


def _entry(name: str, kind: Kind, **kwargs: Any) -> Internal:
    return Internal("fake:_Fake", name, kind, "test", **kwargs)


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        (_entry("absent", Kind.ATTRIBUTE), "fake._Fake.absent (attribute): missing"),
        (_entry("absent", Kind.INSTANCE_ATTRIBUTE), "fake._Fake.absent (instance attribute, set in __init__): missing"),
        (_entry("absent", Kind.METHOD), "fake._Fake.absent (method): missing"),
        (_entry("method", Kind.ATTRIBUTE), "a method, not an attribute"),
        (_entry("present", Kind.METHOD), "not a method"),
        (_entry("present", Kind.CLASS), "not a class"),
        (_entry("method", Kind.METHOD, params=("first", "third")), "parameters changed"),
    ],
)
def test_the_checker_names_what_a_fake_twisted_lacks(entry: Internal, complaint: str) -> None:
    """missing_internals reports an entry whose name is absent or of another kind on its owner, naming it."""
    missing = missing_internals([entry], resolve=lambda path: _Fake)
    assert len(missing) == 1 and complaint in missing[0] and "_Fake" in missing[0]


def test_the_checker_accepts_what_the_fake_has() -> None:
    """Names present with their kind (an instance attribute through the method that assigns it) are not reported."""
    entries = [
        _entry("present", Kind.ATTRIBUTE),
        _entry("assigned", Kind.INSTANCE_ATTRIBUTE),
        _entry("a_class", Kind.CLASS),
        _entry("method", Kind.METHOD, params=("first", "second")),
    ]
    assert missing_internals(entries, resolve=lambda path: _Fake) == []


def test_the_checker_detects_a_missing_name_and_owner_in_real_twisted() -> None:
    """Against the real Twisted, an invented name and an invented class are both reported by name."""
    entries = [
        Internal("twisted.internet.tcp:Connection", "_noSuchInternal", Kind.ATTRIBUTE, "idle"),
        Internal("twisted.internet.tcp:NoSuchClass", "_tempDataLen", Kind.ATTRIBUTE, "idle"),
        Internal("twisted.no_such_module", "thing", Kind.CLASS, "idle"),
    ]
    missing = missing_internals(entries)
    assert len(missing) == 3
    assert "Connection._noSuchInternal" in missing[0]
    assert "NoSuchClass not found" in missing[1]
    assert "no_such_module not found" in missing[2]
    assert not available("write_now", INTERNALS + (entries[0],))
    assert available("listen_eager", INTERNALS + (entries[0],))  # other groups unaffected


def test_a_fast_path_is_off_when_twisted_really_lacks_one_of_its_internals() -> None:
    """With a needed internal deleted from Twisted before tcprelay is imported, exactly the fast paths that need it are off."""
    script = (
        "from twisted.internet import abstract, posixbase\n"
        "del abstract.FileDescriptor._writeDisconnecting\n"
        "del posixbase._PollLikeMixin._doReadOrWrite\n"
        "from tcprelay import _fastio, _reactor\n"
        f"print([getattr(_fastio, f) for f in {_FASTIO_FLAGS!r}], _reactor._FAST_POLL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[False,", "False,", "False,", "False,", "True,", "True]", "False"]


def test_the_docstring_table_lists_every_entry_in_order() -> None:
    """The module docstring's table has one row per entry of INTERNALS, in the same order."""
    doc = _twisted.__doc__ or ""
    rows = [m.group(1) for m in re.finditer(r"^\| ``(\w+)``\s+\|", doc, re.MULTILINE)]
    assert rows == [entry.name for entry in INTERNALS]
    for group in {entry.group for entry in INTERNALS}:
        assert f"[{group}]" in doc


# -- nothing private of Twisted's used without being listed -------------------

_SCANNED_MODULES = (
    "twisted.internet.abstract",
    "twisted.internet.tcp",
    "twisted.internet.base",
    "twisted.internet.posixbase",
    "twisted.internet.epollreactor",
    "twisted.internet.protocol",
    "twisted.internet.task",
    "twisted.internet.defer",
    "twisted.application.internet",
    "twisted.application.service",
    "twisted.python.usage",
    "twisted.web.server",
    "twisted.web.resource",
)


def _twisted_private_names() -> set[str]:
    """Private names defined or assigned by the classes of the Twisted
    modules tcprelay works with."""
    import importlib

    names: set[str] = set()
    for module_name in _SCANNED_MODULES:
        module = importlib.import_module(module_name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or not cls.__module__.startswith("twisted."):
                continue
            for name, value in vars(cls).items():
                names.add(name)
                if inspect.isfunction(value):
                    names.update(
                        i.argval for i in dis.get_instructions(value) if i.opname == "STORE_ATTR"
                    )
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_names_used(path: Path) -> set[str]:
    """Private attribute names a source file reads, writes or looks up by string."""
    tree = ast.parse(path.read_text(), str(path))
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            used.add(node.args[1].value)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            parts = (node.module or "").split(".") + [a.name for a in node.names]
            used.update(f"module:{p}" for p in parts if p.startswith("_"))
    return {n for n in used if n.startswith("_") and not n.startswith("__")}


# Private names of tcprelay's own classes that happen to match a private
# name somewhere in those Twisted modules; each was read at its use.
_OWN_NAMES = frozenset(
    {
        "_add",  # tcprelay's own helpers (PortPool, ...)
        "_check",
        "_clock",
        "_connect",
        "_connected",
        "_connecting",
        "_deferred",
        "_dispatch",
        "_done",
        "_failed",
        "_finished",
        "_get",
        "_open",
        "_parse",
        "_paused",
        "_pending",
        "_producer",
        "_pull",
        "_reactor",
        "_remove",
        "_send",
        "_started",
        "_timer",
        "_waiting",  # Visitor's callbacks (Twisted 23.10: also a _ClientMachine state)
        "_write",
    }
)


def test_no_private_twisted_name_is_used_without_being_listed() -> None:
    """Every private name tcprelay uses that Twisted also defines is in the table (or known to be tcprelay's own)."""
    used: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tcprelay").rglob("*.py")) + sorted((ROOT / "twisted").rglob("*.py")):
        for name in _private_names_used(path):
            used.setdefault(name, []).append(str(path.relative_to(ROOT)))
    listed = {entry.name for entry in INTERNALS}
    private_modules = {name: paths for name, paths in used.items() if name.startswith("module:")}
    assert not private_modules, f"private Twisted modules imported: {private_modules}"
    twisted_names = _twisted_private_names()
    unlisted = {
        name: paths
        for name, paths in used.items()
        if name in twisted_names and name not in listed and name not in _OWN_NAMES
    }
    assert not unlisted, f"private Twisted names used but not in tcprelay._twisted: {unlisted}"


# -- the fallbacks, over real loopback connections ---------------------------


@pytest.fixture
def public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fast path of tcprelay._fastio off, as with a Twisted lacking its internals."""
    for flag in _FASTIO_FLAGS:
        monkeypatch.setattr(_fastio, flag, False)


@implementer(interfaces.IHalfCloseableProtocol)
class _Peer(Protocol):
    """Records what it reads and how each direction ended; echoes, and
    closes once both directions are done, when told."""

    def __init__(self, echo: bool = False, close_when_done: bool = False) -> None:
        self.echo = echo
        self.close_when_done = close_when_done
        self.received = bytearray()
        self.write_lost = 0
        self.made: Deferred[None] = Deferred()
        self.eof: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.eof.callback(None)
        if self.echo:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self.write_lost += 1
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.close_when_done and self.eof.called and self.write_lost:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Pair:
    """A listening port and one connection to it: ``server`` and ``client``."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.server = _Peer()  # closed by the test
        self.client = _Peer(close_when_done=True)
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: self.server), interface="127.0.0.1")

    async def connect(self) -> None:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        await bounded(connectProtocol(endpoint, self.client), self.reactor)
        await bounded(self.server.made, self.reactor)

    async def close(self) -> None:
        """Abort what is still open, wait for both ends, stop listening."""
        try:
            for protocol in (self.server, self.client):
                transport = protocol.transport
                if transport is not None and transport.connected:  # type: ignore[attr-defined]
                    transport.abortConnection()  # type: ignore[attr-defined]
            for protocol in (self.server, self.client):
                if protocol.transport is not None:
                    await bounded(protocol.lost, self.reactor)
        finally:
            await self.port.stopListening()


@pytest_twisted.async_yield_fixture
async def tcp_pair(reactor: Any):  # type: ignore[no-untyped-def]
    """A connected pair of half-closeable protocols, closed after the test."""
    pair = _Pair(reactor)
    try:
        await pair.connect()
        yield pair
    finally:
        await pair.close()


class _ShutdownSpy:
    """Wraps a socket, counting ``shutdown`` calls."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.shutdowns: list[int] = []

    def shutdown(self, how: int) -> None:
        self.shutdowns.append(how)
        self._sock.shutdown(how)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _count_writes(transport: Any) -> list[bytes]:
    """Record every ``transport.write`` call (the public path) on ``transport``."""
    calls: list[bytes] = []
    original = transport.write

    def write(data: bytes) -> None:
        calls.append(data)
        original(data)

    transport.write = write
    return calls


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB: more than one send takes


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
@pytest_twisted.ensureDeferred
async def test_write_now_delivers_every_byte_either_way(
    reactor: Any, tcp_pair: _Pair, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """write_now's bytes arrive intact and in order; without the internals every write goes through transport.write."""
    monkeypatch.setattr(_fastio, "_FAST_WRITE", fast)
    transport = tcp_pair.server.transport
    writes = _count_writes(transport)
    write_now(transport, b"small")
    write_now(transport, PAYLOAD)
    write_now(transport, b"end")
    await wait_for(
        reactor,
        lambda: len(tcp_pair.client.received) >= len(PAYLOAD) + 8,
        what="the bytes",
    )
    assert bytes(tcp_pair.client.received) == b"small" + PAYLOAD + b"end"
    if fast:
        assert b"small" not in writes  # it went straight to the socket
    else:
        assert writes == [b"small", PAYLOAD, b"end"]


@pytest_twisted.ensureDeferred
async def test_lose_write_now_fallback_still_delivers_the_fin_and_the_reply(
    reactor: Any, tcp_pair: _Pair, public_api: None
) -> None:
    """Without the internals, lose_write_now is Twisted's loseWriteConnection: the peer reads the bytes then EOF, and its reply still arrives."""
    server, client, transport = tcp_pair.server, tcp_pair.client, tcp_pair.server.transport
    write_now(transport, b"question")
    lose_write_now(transport)
    assert server.write_lost == 0  # Twisted's way: after a writability pass
    await bounded(client.eof, reactor)
    assert bytes(client.received) == b"question"
    assert server.write_lost == 1
    client.transport.write(b"reply after the FIN")  # type: ignore[union-attr]
    await wait_for(reactor, lambda: bytes(server.received) == b"reply after the FIN", what="the reply")
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await bounded(server.eof, reactor)
    assert not close_now(transport)  # the fallback: close_now declines
    assert transport.connected  # type: ignore[union-attr]
    close_finished(transport)
    await bounded(server.lost, reactor)
    assert server.reason is not None and server.reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_close_finished_fallback_is_a_clean_loseconnection(
    reactor: Any, tcp_pair: _Pair, public_api: None
) -> None:
    """Without the internals, close_finished closes through Twisted's loseConnection (shutdown then close): clean on both ends."""
    server, client, transport = tcp_pair.server, tcp_pair.client, tcp_pair.server.transport
    spy = _ShutdownSpy(transport.socket)  # type: ignore[union-attr]
    transport.socket = spy  # type: ignore[union-attr]
    lose_write_now(transport)
    await bounded(client.eof, reactor)
    client.transport.write(b"last words")  # type: ignore[union-attr]
    client.transport.loseWriteConnection()  # type: ignore[union-attr]
    await bounded(server.eof, reactor)
    close_finished(transport)
    await bounded(server.lost, reactor)
    assert server.reason is not None and server.reason.check(ConnectionDone)
    await bounded(client.lost, reactor)
    assert client.reason is not None and client.reason.check(ConnectionDone)
    assert bytes(server.received) == b"last words"
    assert spy.shutdowns == [socket.SHUT_WR, socket.SHUT_RDWR]  # Twisted's own close


@pytest_twisted.ensureDeferred
async def test_read_size_fallback_leaves_twisteds_read_size(
    reactor: Any, tcp_pair: _Pair, public_api: None
) -> None:
    """Without the internals, read_size changes nothing and the transport keeps Twisted's read size."""
    transport = tcp_pair.server.transport
    default = type(transport).bufferSize
    read_size(transport, 4 * default)
    assert transport.bufferSize == default  # type: ignore[union-attr]


class _RelayLike(Factory):
    """Splices each accepted visitor to a new connection to ``target``, as
    the relay splices a visitor to a stream (through both ``build_eager``
    and ``buildProtocol``, as the relay's visitor factory does)."""

    def __init__(self, reactor: Any, target: int) -> None:
        self.reactor = reactor
        self.target = target
        self.done: Deferred[Splice] = Deferred()
        self.connectors: list[Any] = []

    def buildProtocol(self, addr: Any) -> Protocol:  # type: ignore[override]
        return self.build_eager(addr, b"")

    def build_eager(self, addr: Any, first: bytes) -> Protocol:
        splice = Splice()
        splice.done.addCallback(lambda _: self.done.callback(splice))
        if first:
            splice.service._pending.append(first)
        factory = ClientFactory.forProtocol(lambda: splice.service)
        self.connectors.append(connect_eager(self.reactor, "127.0.0.1", self.target, factory))
        return splice.visitor


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
@pytest_twisted.ensureDeferred
async def test_a_relay_like_splice_works_through_listen_eager_either_way(
    reactor: Any, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Without the internals, listen_eager is listenTCP and connect_eager connectTCP, and a splice through them still echoes every byte, passes the half-close and the reply, and ends cleanly."""
    if not fast:
        for flag in _FASTIO_FLAGS:
            monkeypatch.setattr(_fastio, flag, False)
    echoes: list[_Peer] = []
    service = reactor.listenTCP(
        0, Factory.forProtocol(lambda: echoes.append(_Peer(echo=True, close_when_done=True)) or echoes[-1]), interface="127.0.0.1"
    )
    relay = _RelayLike(reactor, service.getHost().port)
    public = listen_eager(reactor, 0, relay, 50, "127.0.0.1")
    visitor = _Peer(close_when_done=True)
    try:
        assert isinstance(public, EagerPort) is fast
        assert isinstance(public, tcp.Port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", public.getHost().port)
        await bounded(connectProtocol(endpoint, visitor), reactor)
        visitor.transport.write(PAYLOAD)  # type: ignore[union-attr]
        visitor.transport.loseWriteConnection()  # type: ignore[union-attr]
        await bounded(visitor.eof, reactor, 20)  # the service's FIN, after its echo
        assert bytes(visitor.received) == PAYLOAD
        assert len(echoes) == 1 and bytes(echoes[0].received) == PAYLOAD
        assert isinstance(relay.connectors[0], EagerConnector) is fast
        splice = await bounded(relay.done, reactor)
        assert splice.bytes_to_service == splice.bytes_to_visitor == len(PAYLOAD)
        await bounded(visitor.lost, reactor)
        assert visitor.reason is not None and visitor.reason.check(ConnectionDone)
        await bounded(echoes[0].lost, reactor)
        assert echoes[0].reason is not None and echoes[0].reason.check(ConnectionDone)
    finally:
        for peer in [visitor, *echoes]:
            if peer.transport is not None and peer.transport.connected:  # type: ignore[attr-defined]
                peer.transport.abortConnection()  # type: ignore[attr-defined]
                await bounded(peer.lost, reactor)
        await public.stopListening()
        await service.stopListening()


@pytest_twisted.ensureDeferred
async def test_connect_eager_fallback_connects_on_a_later_pass(reactor: Any, public_api: None) -> None:
    """Without the internals, connect_eager is connectTCP: not connected on return, connected soon after, bytes flow both ways."""
    server = _Peer(echo=True, close_when_done=True)
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: server), interface="127.0.0.1")
    client = _Peer()
    try:
        connector = connect_eager(reactor, "127.0.0.1", port.getHost().port, ClientFactory.forProtocol(lambda: client))
        assert type(connector) is tcp.Connector
        assert not client.made.called
        await bounded(client.made, reactor)
        client.transport.write(b"ping")  # type: ignore[union-attr]
        await wait_for(reactor, lambda: bytes(client.received) == b"ping", what="the echo")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await bounded(client.lost, reactor)
        await bounded(server.lost, reactor)
    finally:
        if client.transport is not None and client.transport.connected:  # type: ignore[attr-defined]
            client.transport.abortConnection()  # type: ignore[attr-defined]
        await port.stopListening()


def _epoll_shell() -> Any:
    """An EPollReactor without fds of its own, with the internals the poll step reads."""
    shell: Any = EPollReactor.__new__(EPollReactor)
    shell._poller = object()
    shell._selectables = {}
    shell._doReadOrWrite = lambda selectable, fd, event: None
    return shell


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "public"])
def test_tune_reactor_without_the_internals_leaves_twisteds_poll_step(
    monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Without the internals, tune_reactor returns False and the epoll reactor keeps its own doIteration; with them it installs its step."""
    monkeypatch.setattr(_reactor, "_FAST_POLL", fast)
    shell = _epoll_shell()
    assert _reactor.tune_reactor(shell, 0, cpus=2) is fast
    assert ("doIteration" in vars(shell)) is fast
    assert ("doPoll" in vars(shell)) is fast
