"""
Twisted's private names that tcprelay relies on, in one place.

Twisted promises nothing about a name that starts with an underscore, nor
about the implementation attributes of its reactor, transport and port
classes (those in no ``twisted.internet.interfaces`` interface).  tcprelay
uses such a name only for a measured win, lists it below, checks it
against the installed Twisted (:func:`missing_internals`, run by
``tests/test_twisted_internals.py``), and keeps a public-API fallback that
it takes when a name is missing.  ``setup.cfg`` pins the Twisted releases
this table was checked with; CI runs the tests on the newest and on the
lowest of them.

Kinds: *class*; *method* (a function on the class, with the parameters
shown when tcprelay calls or overrides it positionally); *attribute* (on
the class, so every instance has it); *instance attribute* (assigned by
the method named in parentheses, or present on the class).  The owner is
the class tcprelay uses the name on (for an instance attribute: the class
whose method assigns it); ``abstract``, ``tcp``, ``base``,
``posixbase``, ``epollreactor`` are modules of ``twisted.internet``,
``application`` is ``twisted.application.internet``.  Figures are from
``benchmarks/results/`` (2-CPU VM, loopback).

+----------------------------+-----------------------------------------+---------------------------+
| Name                       | Owner                                   | Kind                      |
+============================+=========================================+===========================+
| **Write-through** [idle] -- used by: ``_fastio.write_now`` (its test for an idle plain TCP       |
| transport also gates ``lose_write_now``, ``close_now``, ``close_finished`` and ``read_size``).   |
| Win: no ``epoll_ctl``/``epoll_wait`` round trip per write (before it, 3 ``epoll_ctl`` and 1      |
| ``epoll_wait`` per ``sendto``, ``strace``). ``_fastio.queued`` reads the same buffer fields to   |
| tell how much a session's socket holds unsent (the per-session cap). Fallback:                   |
| ``transport.write(data)``; without ``queued``, a session counts what it wrote while its socket   |
| was full.                                                                                        |
+----------------------------+-----------------------------------------+---------------------------+
| ``Server``                 | tcp                                     | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| ``Client``                 | tcp                                     | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| ``TLS``                    | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``socket``                 | tcp.Connection                          | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``_tempDataLen``           | abstract.FileDescriptor                 | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``dataBuffer``             | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``offset``                 | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``_writeDisconnecting``    | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``_writeDisconnected``     | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| **FIN at once** [fin] -- used by: ``_fastio.lose_write_now``. Win: the FIN leaves now, not after |
| a writability pass (an ``epoll_ctl`` pair, a reactor pass, an empty ``send``): connect + first   |
| echo p50 about 7% lower (ten alternating pairs). Fallback: ``transport.loseWriteConnection()``.  |
+----------------------------+-----------------------------------------+---------------------------+
| ``_closeWriteConnection``  | tcp.Connection                          | method ()                 |
+----------------------------+-----------------------------------------+---------------------------+
| **One close() per finished socket** [close] -- used by: ``_fastio.close_finished``,              |
| ``_fastio.close_now``. Win: ``close()`` alone instead of ``shutdown(SHUT_WR)``,                  |
| ``shutdown(SHUT_RDWR)``, ``close()`` (the agent: 2 -> 1 ``shutdown`` per visitor). Fallback:     |
| ``close_finished``: ``transport.loseConnection()``; ``close_now``: returns False (its caller     |
| half-closes, then closes).                                                                       |
+----------------------------+-----------------------------------------+---------------------------+
| ``_shouldShutdown``        | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| **Read size** [read] -- used by: ``_fastio.read_size`` (splice sides, session sockets). Win:     |
| whole muxado frames per read: 354 against 329 MB/s with 8 connections (with whole-frame          |
| sending); session reads of up to 1 MiB: relay CPU per GB 18% lower with 64 connections.          |
| Fallback: reads stay at Twisted's 64 KiB.                                                        |
+----------------------------+-----------------------------------------+---------------------------+
| ``bufferSize``             | tcp.Connection                          | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| **Eager accept** [accept] -- used by: ``_fastio.listen_eager``, ``EagerPort``, ``NoDelayServer`` |
| (the relay's public ports). Win: a visitor's SYN and first bytes handed to ``send`` 29 us after  |
| the listener's ``doRead``, against 73 us (2,000 sequential connections, medians);                |
| ``TCP_NODELAY`` inherited from the listener: one ``setsockopt`` fewer per visitor. Fallback:     |
| ``reactor.listenTCP``: visitors reach the factory's ``buildProtocol``.                           |
+----------------------------+-----------------------------------------+---------------------------+
| ``Port``                   | tcp                                     | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| ``_buildAddr``             | tcp.Port                                | method (address)          |
+----------------------------+-----------------------------------------+---------------------------+
| ``numberAccepts``          | tcp.Port                                | instance attribute        |
|                            |                                         | (startListening)          |
+----------------------------+-----------------------------------------+---------------------------+
| ``sessionno``              | tcp.Port                                | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``transport``              | tcp.Port                                | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``__init__``               | tcp.Server                              | method (sock, protocol,   |
|                            |                                         | client, server,           |
|                            |                                         | sessionno, reactor)       |
+----------------------------+-----------------------------------------+---------------------------+
| ``PosixReactorBase``       | posixbase                               | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| **Eager connect** [connect] -- used by: ``_fastio.connect_eager``, ``EagerConnector``,           |
| ``EagerClient`` (``tcprelay expose`` to the local service). Win: a loopback connection is made   |
| and its protocol connected before the call returns; with ``close_finished``, the agent's system  |
| calls per visitor 25.1 -> 16.1, and 2,447 against 2,165 connections/s through ``expose`` (8      |
| clients). Fallback: ``reactor.connectTCP``.                                                      |
+----------------------------+-----------------------------------------+---------------------------+
| ``__init__``               | tcp.Client                              | method (host, port,       |
|                            |                                         | bindAddress, connector,   |
|                            |                                         | reactor)                  |
+----------------------------+-----------------------------------------+---------------------------+
| ``_finishInit``            | tcp.Client                              | method (whenDone, skt,    |
|                            |                                         | error, reactor)           |
+----------------------------+-----------------------------------------+---------------------------+
| ``_requiresResolution``    | tcp._BaseTCPClient                      | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``addr``                   | tcp._BaseTCPClient                      | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``addressFamily``          | tcp.Client                              | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``socketType``             | tcp.Client                              | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``_commonConnection``      | tcp.Client                              | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``__init__``               | tcp.Connection                          | method (skt, protocol,    |
|                            |                                         | reactor)                  |
+----------------------------+-----------------------------------------+---------------------------+
| ``_connectDone``           | tcp.Client                              | method ()                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``doConnect``              | tcp.Client                              | method ()                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``failIfNotConnected``     | tcp.Client                              | method (err)              |
+----------------------------+-----------------------------------------+---------------------------+
| ``realAddress``            | tcp._BaseBaseClient                     | instance attribute        |
|                            |                                         | (_setRealAddress)         |
+----------------------------+-----------------------------------------+---------------------------+
| ``Connector``              | tcp                                     | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| ``__init__``               | tcp.Connector                           | method (host, port,       |
|                            |                                         | factory, timeout,         |
|                            |                                         | bindAddress, reactor)     |
+----------------------------+-----------------------------------------+---------------------------+
| ``_makeTransport``         | tcp.Connector                           | method ()                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``timeoutID``              | tcp.Connector                           | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``state``                  | base.BaseConnector                      | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``transport``              | base.BaseConnector                      | instance attribute        |
|                            |                                         | (connect)                 |
+----------------------------+-----------------------------------------+---------------------------+
| **Lean poll step** [poll] -- used by: ``_reactor.tune_reactor`` (the daemons). Win: events       |
| dispatched without ``log.callWithLogger`` (several us each), and busy polling: connect + 1-byte  |
| echo p50 397 against 430 us. Fallback: ``tune_reactor`` returns False: Twisted's own poll step   |
| (the daemon logs one line).                                                                      |
+----------------------------+-----------------------------------------+---------------------------+
| ``EPollReactor``           | epollreactor                            | class                     |
+----------------------------+-----------------------------------------+---------------------------+
| ``_poller``                | epollreactor.EPollReactor               | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``_selectables``           | epollreactor.EPollReactor               | instance attribute        |
|                            |                                         | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| ``_doReadOrWrite``         | epollreactor.EPollReactor               | method (selectable, fd,   |
|                            |                                         | event)                    |
+----------------------------+-----------------------------------------+---------------------------+
| ``doPoll``                 | epollreactor.EPollReactor               | method (timeout)          |
+----------------------------+-----------------------------------------+---------------------------+
| ``doIteration``            | epollreactor.EPollReactor               | method (timeout)          |
+----------------------------+-----------------------------------------+---------------------------+
| **Endpoint services** [service] -- used by: ``_raiseSynchronously``: ``tap.py``;                 |
| ``_waitingForPort``: ``systemd.py``. Win: none in speed: a port that cannot listen fails         |
| ``startService`` at once (twistd exits non-zero); READY=1 and the test kit wait for the port.    |
| Fallback: ``_raiseSynchronously`` unknown: Twisted logs the failure and runs on;                 |
| ``_waitingForPort`` absent: ``systemd.py`` sends READY=1 at once; public way:                    |
| ``endpoint.listen(factory)``.                                                                    |
+----------------------------+-----------------------------------------+---------------------------+
| ``_raiseSynchronously``    | application.internet.StreamServerEndpoi | attribute                 |
|                            | ntService                               |                           |
+----------------------------+-----------------------------------------+---------------------------+
| ``_waitingForPort``        | application.internet.StreamServerEndpoi | instance attribute        |
|                            | ntService                               | (__init__)                |
+----------------------------+-----------------------------------------+---------------------------+
| **Shutdown signals** [signals] -- used by: ``_exitSignal``: ``relay/daemon.py``                  |
| (``RelayDaemon``); ``_stopped``: ``_signals.py``. Win: none in speed: a drained SIGTERM exits 0; |
| a repeated SIGTERM while stopping is ignored. Fallback: both read with ``getattr`` defaults: the |
| exit status is Twisted's (the signal re-raised); a repeated signal reaches Twisted's handler     |
| unless the relay is draining.                                                                    |
+----------------------------+-----------------------------------------+---------------------------+
| ``_exitSignal``            | base.ReactorBase                        | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
| ``_stopped``               | base.ReactorBase                        | attribute                 |
+----------------------------+-----------------------------------------+---------------------------+
"""

from __future__ import annotations

import dis
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any, Optional

import attrs

__all__ = [
    "CLOSE_FINISHED",
    "CLOSE_NOW",
    "CONNECT_EAGER",
    "FAST_PATHS",
    "INTERNALS",
    "Internal",
    "Kind",
    "LISTEN_EAGER",
    "LOSE_WRITE_NOW",
    "READ_SIZE",
    "TUNE_REACTOR",
    "WRITE_NOW",
    "available",
    "missing_internals",
]


class Kind(Enum):
    """What an :class:`Internal` is expected to be on its owner."""

    MODULE = "module"
    CLASS = "class"
    METHOD = "method"
    ATTRIBUTE = "attribute"
    INSTANCE_ATTRIBUTE = "instance attribute"


@attrs.frozen
class Internal:
    """
    One row of the table: a Twisted name tcprelay relies on.

    ``owner`` is ``"module"`` or ``"module:Class"``; for a module or a class,
    ``name`` is looked up in the module.  ``group`` is the set of names a
    fast path needs together (see :data:`FAST_PATHS`); ``set_in`` names the
    method that assigns an instance attribute; ``params`` are the leading
    parameters (after ``self``) of a method tcprelay calls or overrides
    with positional arguments.
    """

    owner: str
    name: str
    kind: Kind
    group: str
    set_in: str = "__init__"
    params: Optional[tuple[str, ...]] = None

    def __str__(self) -> str:
        where = self.owner.replace(":", ".")
        detail = f", set in {self.set_in}" if self.kind is Kind.INSTANCE_ATTRIBUTE else ""
        if self.params is not None:
            detail = f"({', '.join(self.params)})"
        return f"{where}.{self.name} ({self.kind.value}{detail})"


_A = "twisted.internet.abstract"
_T = "twisted.internet.tcp"
_FD = f"{_A}:FileDescriptor"
_CONN = f"{_T}:Connection"
_PORT = f"{_T}:Port"
_CLIENT = f"{_T}:Client"
_BASEBASE_CLIENT = f"{_T}:_BaseBaseClient"
_TCP_CLIENT = f"{_T}:_BaseTCPClient"
_CONNECTOR = f"{_T}:Connector"
_BASE_CONNECTOR = "twisted.internet.base:BaseConnector"
_REACTOR_BASE = "twisted.internet.base:ReactorBase"
_EPOLL = "twisted.internet.epollreactor:EPollReactor"
_SESS = "twisted.application.internet:StreamServerEndpointService"
_M = Kind.METHOD
_AT = Kind.ATTRIBUTE
_IA = Kind.INSTANCE_ATTRIBUTE
_C = Kind.CLASS

INTERNALS: tuple[Internal, ...] = (
    # write-through: an idle plain TCP transport
    Internal(_T, "Server", _C, "idle"),
    Internal(_T, "Client", _C, "idle"),
    Internal(_CONN, "TLS", _AT, "idle"),
    Internal(_CONN, "socket", _IA, "idle"),
    Internal(_FD, "_tempDataLen", _IA, "idle"),
    Internal(_CONN, "dataBuffer", _AT, "idle"),
    Internal(_CONN, "offset", _AT, "idle"),
    Internal(_CONN, "_writeDisconnecting", _AT, "idle"),
    Internal(_CONN, "_writeDisconnected", _AT, "idle"),
    # the FIN at once
    Internal(_CONN, "_closeWriteConnection", _M, "fin", params=()),
    # close() alone
    Internal(_CONN, "_shouldShutdown", _AT, "close"),
    # read size
    Internal(_CONN, "bufferSize", _AT, "read"),
    # eager accept
    Internal(_T, "Port", _C, "accept"),
    Internal(_PORT, "_buildAddr", _M, "accept", params=("address",)),
    Internal(_PORT, "numberAccepts", _IA, "accept", set_in="startListening"),
    Internal(_PORT, "sessionno", _AT, "accept"),
    Internal(_PORT, "transport", _AT, "accept"),
    Internal(
        f"{_T}:Server",
        "__init__",
        _M,
        "accept",
        params=("sock", "protocol", "client", "server", "sessionno", "reactor"),
    ),
    Internal("twisted.internet.posixbase", "PosixReactorBase", _C, "accept"),
    # eager connect
    Internal(
        _CLIENT,
        "__init__",
        _M,
        "connect",
        params=("host", "port", "bindAddress", "connector", "reactor"),
    ),
    Internal(
        _CLIENT, "_finishInit", _M, "connect", params=("whenDone", "skt", "error", "reactor")
    ),
    Internal(_TCP_CLIENT, "_requiresResolution", _IA, "connect"),
    Internal(_TCP_CLIENT, "addr", _IA, "connect"),
    Internal(_CLIENT, "addressFamily", _AT, "connect"),
    Internal(_CLIENT, "socketType", _AT, "connect"),
    Internal(_CLIENT, "_commonConnection", _AT, "connect"),
    Internal(_CONN, "__init__", _M, "connect", params=("skt", "protocol", "reactor")),
    Internal(_CLIENT, "_connectDone", _M, "connect", params=()),
    Internal(_CLIENT, "doConnect", _M, "connect", params=()),
    Internal(_CLIENT, "failIfNotConnected", _M, "connect", params=("err",)),
    Internal(_BASEBASE_CLIENT, "realAddress", _IA, "connect", set_in="_setRealAddress"),
    Internal(_T, "Connector", _C, "connect"),
    Internal(
        _CONNECTOR,
        "__init__",
        _M,
        "connect",
        params=("host", "port", "factory", "timeout", "bindAddress", "reactor"),
    ),
    Internal(_CONNECTOR, "_makeTransport", _M, "connect", params=()),
    Internal(_CONNECTOR, "timeoutID", _AT, "connect"),
    Internal(_BASE_CONNECTOR, "state", _IA, "connect"),
    Internal(_BASE_CONNECTOR, "transport", _IA, "connect", set_in="connect"),
    # lean poll step
    Internal("twisted.internet.epollreactor", "EPollReactor", _C, "poll"),
    Internal(_EPOLL, "_poller", _IA, "poll"),
    Internal(_EPOLL, "_selectables", _IA, "poll"),
    Internal(_EPOLL, "_doReadOrWrite", _M, "poll", params=("selectable", "fd", "event")),
    Internal(_EPOLL, "doPoll", _M, "poll", params=("timeout",)),
    Internal(_EPOLL, "doIteration", _M, "poll", params=("timeout",)),
    # used elsewhere in tcprelay, each with its own fallback
    Internal(_SESS, "_raiseSynchronously", _AT, "service"),
    Internal(_SESS, "_waitingForPort", _IA, "service"),
    Internal(_REACTOR_BASE, "_exitSignal", _AT, "signals"),
    Internal(_REACTOR_BASE, "_stopped", _AT, "signals"),
)
"""Every Twisted name of the module docstring's table, in its order."""

FAST_PATHS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "write_now": ("idle",),
        "lose_write_now": ("idle", "fin"),
        "close_finished": ("idle", "close"),
        "close_now": ("idle", "close"),
        "read_size": ("idle", "read"),
        "listen_eager": ("accept",),
        "connect_eager": ("connect",),
        "tune_reactor": ("poll",),
    }
)
"""Each fast path of ``tcprelay._fastio`` and ``tcprelay._reactor``, and the
groups of :data:`INTERNALS` it needs, all of them."""


def _resolve(path: str) -> Any:
    """The module or class named by ``"module"`` or ``"module:Class"``; None
    when it cannot be imported or found."""
    module_name, _, qualname = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part, None)
        if found is None:
            return None
    return found


def _stores(function: Any, name: str) -> bool:
    """Whether ``function``'s code assigns ``self.<name>`` (or any
    ``<something>.<name>``), nested functions included."""
    code = getattr(function, "__code__", None)
    if code is None:
        return False
    pending = [code]
    while pending:
        code = pending.pop()
        for instruction in dis.get_instructions(code):
            if instruction.opname == "STORE_ATTR" and instruction.argval == name:
                return True
        pending.extend(c for c in code.co_consts if inspect.iscode(c))
    return False


def _params_match(function: Any, expected: tuple[str, ...]) -> bool:
    """Whether ``function``'s parameters after ``self`` start with ``expected``."""
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(names[1 : 1 + len(expected)]) == expected


def problem(entry: Internal, owner: Any = None) -> Optional[str]:
    """
    Why ``entry`` does not hold for the installed Twisted (or for ``owner``,
    when given: the object standing for ``entry.owner``), or None when it
    does.
    """
    if owner is None:
        owner = _resolve(entry.owner)
    if owner is None:
        return f"{entry}: {entry.owner.replace(':', '.')} not found"
    if entry.kind is Kind.MODULE:
        return None if _resolve(f"{entry.owner}.{entry.name}") is not None else f"{entry}: missing"
    if not hasattr(owner, entry.name):
        if entry.kind is Kind.INSTANCE_ATTRIBUTE and _stores(
            getattr(owner, entry.set_in, None), entry.name
        ):
            return None
        return f"{entry}: missing"
    found = getattr(owner, entry.name)
    if entry.kind is Kind.CLASS:
        return None if inspect.isclass(found) else f"{entry}: not a class"
    if entry.kind is Kind.METHOD:
        if not inspect.isfunction(found):
            return f"{entry}: not a method"
        if entry.params is not None and not _params_match(found, entry.params):
            return f"{entry}: parameters changed to {inspect.signature(found)}"
        return None
    if callable(found) and not inspect.isclass(found):
        return f"{entry}: a method, not an attribute"
    return None


def missing_internals(
    internals: Iterable[Internal] = INTERNALS,
    resolve: Callable[[str], Any] = _resolve,
) -> list[str]:
    """
    One line for every entry of ``internals`` that the installed Twisted
    does not have with the expected kind (empty: all there).  ``resolve``
    finds an entry's owner (for tests).
    """
    found: dict[str, Any] = {}
    missing = []
    for entry in internals:
        if entry.owner not in found:
            found[entry.owner] = resolve(entry.owner)
        if found[entry.owner] is None:
            missing.append(f"{entry}: {entry.owner.replace(':', '.')} not found")
            continue
        reason = problem(entry, found[entry.owner])
        if reason is not None:
            missing.append(reason)
    return missing


def available(fast_path: str, internals: Iterable[Internal] = INTERNALS) -> bool:
    """Whether every Twisted name that ``fast_path`` (a key of
    :data:`FAST_PATHS`) needs is there."""
    groups = FAST_PATHS[fast_path]
    return not missing_internals(e for e in internals if e.group in groups)


_AVAILABLE = {path: available(path) for path in FAST_PATHS}

WRITE_NOW: bool = _AVAILABLE["write_now"]
"""``_fastio.write_now`` may write to an idle socket directly."""
LOSE_WRITE_NOW: bool = _AVAILABLE["lose_write_now"]
"""``_fastio.lose_write_now`` may send the FIN itself."""
CLOSE_FINISHED: bool = _AVAILABLE["close_finished"]
"""``_fastio.close_finished`` may skip ``shutdown(SHUT_RDWR)``."""
CLOSE_NOW: bool = _AVAILABLE["close_now"]
"""``_fastio.close_now`` may close a finished socket with one ``close()``."""
READ_SIZE: bool = _AVAILABLE["read_size"]
"""``_fastio.read_size`` may set a plain TCP transport's read size."""
LISTEN_EAGER: bool = _AVAILABLE["listen_eager"]
"""``_fastio.listen_eager`` may listen with an ``EagerPort``."""
CONNECT_EAGER: bool = _AVAILABLE["connect_eager"]
"""``_fastio.connect_eager`` may connect with an ``EagerConnector``."""
TUNE_REACTOR: bool = _AVAILABLE["tune_reactor"]
"""``_reactor.tune_reactor`` may replace the epoll reactor's poll step."""
