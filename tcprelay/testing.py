"""
A real relay inside your tests.

:class:`RelayFixture` starts tcprelay's relay in-process on loopback
(control port and public ports chosen by the kernel), serves any Twisted
factory through it the way a remote service would (a real agent session
over a real TCP connection), and tears everything down again, leaving no
listening ports, delayed calls or sessions behind.

pytest with pytest-twisted::

    import pytest_twisted
    from tcprelay.testing import RelayFixture

    @pytest_twisted.ensureDeferred
    async def test_my_service(reactor):
        relay = await RelayFixture.start(reactor)
        try:
            port = await relay.serve(MyFactory())
            host = port.getHost()          # the public address
            ...                            # connect to host.host:host.port
        finally:
            await relay.stop()

Trial::

    from twisted.trial import unittest
    from twisted.internet import reactor
    from tcprelay.testing import RelayFixture

    class MyTests(unittest.TestCase):
        async def test_it(self):
            relay = await RelayFixture.start(reactor)
            self.addCleanup(relay.stop)
            port = await relay.serve(MyFactory())
            ...
"""

from __future__ import annotations

import collections
import random
import socket
from typing import Any, Optional, Sequence

import attrs
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from zope.interface import implementer

from tcprelay import tap
from tcprelay.agent.client import AgentConfig
from tcprelay.agent.endpoint import RelayListeningPort, RelayServerEndpoint
from tcprelay.mux.session import SessionConfig
from tcprelay.relay.core import Relay
from tcprelay.relay.interfaces import ITunnel
from tcprelay.relay.service import RelayService

__all__ = ["RelayFixture", "free_port_block", "free_ports"]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the kernel just found free on ``host``."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: collections.deque[range] = collections.deque(maxlen=64)
"""The blocks :func:`free_port_block` gave lately: a test that asks for two
blocks before binding either (an SSH port, then a relay's ports) must not
get one port twice."""


def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 300) -> int:
    """
    The first of ``count`` consecutive ports that all bind on ``host`` just
    now, chosen below the kernel's ephemeral range so that client sockets
    cannot take one of them meanwhile (for a relay's ``--ports`` range in a
    test), and overlapping none of the last blocks it gave.  RuntimeError
    when none is found.
    """
    top = _ephemeral_low() - count
    if top <= 20000 + count:
        top = 60000 - count
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, top)
        block = range(base, base + count)
        if any(b.start < block.stop and block.start < b.stop for b in _HANDED_OUT):
            continue
        held: list[socket.socket] = []
        try:
            for port in block:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((host, port))
            _HANDED_OUT.append(block)
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports on {host}")


@implementer(interfaces.IStreamServerEndpoint)
class _Recording:
    """A server endpoint that remembers the port it listened on."""

    def __init__(self, endpoint: interfaces.IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.port: Optional[interfaces.IListeningPort] = None
        self.listened: Deferred[None] = Deferred()

    def listen(self, factory: interfaces.IProtocolFactory) -> Deferred[interfaces.IListeningPort]:
        def record(port: interfaces.IListeningPort) -> interfaces.IListeningPort:
            self.port = port
            self.listened.callback(None)
            return port

        return self.endpoint.listen(factory).addCallback(record)


class RelayFixture:
    """
    An in-process relay on 127.0.0.1, built as twistd builds it
    (:class:`tcprelay.tap.Options` and :func:`tcprelay.tap.makeService`)
    but without touching the process (no reactor tuning, no signal
    handlers).  Create it with :meth:`start`; serve factories with
    :meth:`serve`; finish with :meth:`stop`.
    """

    def __init__(self, reactor: Any, service: RelayService, options: tap.Options) -> None:
        self.reactor = reactor
        self.service = service
        self.options = options
        """The parsed relay options (as ``twistd tcprelay`` would have them)."""
        self.relay: Relay = service.relay
        self._control = _Recording(service.control.endpoint)  # type: ignore[attr-defined]
        service.control.endpoint = self._control  # type: ignore[attr-defined]
        self._served: list[RelayListeningPort] = []
        self.control_port = 0
        """The control port's number (once started)."""
        ports = self.relay.config.ports
        self.public_ports = range(ports[0], ports[-1] + 1)
        """The public port range."""

    @classmethod
    def start(cls, reactor: Any, *args: str, **kwargs: Any) -> Deferred[RelayFixture]:
        """
        Start a relay (arguments as for :meth:`create`: ``ports`` public
        ports, ``secrets``, ``wait_timeout``, ``lease``, ``session``, and
        more ``twistd tcprelay`` options in ``args``); fires with the
        fixture once it listens.
        """
        return cls.create(reactor, *args, **kwargs).begin()

    @classmethod
    def create(
        cls,
        reactor: Any,
        *args: str,
        ports: int = 8,
        secrets: Sequence[bytes] = (),
        wait_timeout: float = 5.0,
        lease: float = 0.5,
        session: Optional[SessionConfig] = None,
    ) -> RelayFixture:
        """
        A relay with ``ports`` public ports, not started yet: change what
        you need, then call :meth:`begin` (:meth:`start` does both).
        ``args`` are more ``twistd tcprelay`` options (``"--metrics",
        "tcp:0"``...), applied after the fixture's own; ``secrets`` (bytes)
        turns authentication on; ``session`` replaces the session settings
        the options give.
        """
        base = free_port_block(ports)
        argv = [
            "--control",
            "tcp:0:interface=127.0.0.1",
            "--ports",
            f"{base}-{base + ports - 1}",
            "--public-interface",
            "127.0.0.1",
            "--public-host",
            "127.0.0.1",
            "--wait-timeout",
            str(wait_timeout),
            "--lease",
            str(lease),
            "--drain-timeout",
            "2",
        ]
        for secret in secrets:
            argv += ["--secret", secret.decode("utf-8")]
        options = tap.Options()
        options.parseOptions([*argv, *args])
        config = options.relay_config()
        if session is not None:
            config = attrs.evolve(config, session=session)
        service = tap.makeService(options, reactor, config=config)
        return cls(reactor, service, options)

    def begin(self) -> Deferred[RelayFixture]:
        """Start the relay made by :meth:`create`; fires with the fixture once it listens."""
        self.service.startService()
        return ensureDeferred(self._listening())

    async def _listening(self) -> RelayFixture:
        await self._control.listened
        assert self._control.port is not None
        self.control_port = self._control.port.getHost().port  # type: ignore[attr-defined]
        return self

    @property
    def control_listener(self) -> Optional[interfaces.IListeningPort]:
        """The control port's listener (None before it listens)."""
        return self._control.port

    @property
    def control_endpoint(self) -> interfaces.IStreamClientEndpoint:
        """A client endpoint for the control port (for your own agents)."""
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.control_port)

    def tunnel_at(self, port: int) -> ITunnel:
        """The tunnel registered at public ``port`` (KeyError if none)."""
        tunnel = self.relay.tunnel_at(port)
        if tunnel is None:
            raise KeyError(port)
        return tunnel

    def serve(
        self,
        factory: interfaces.IProtocolFactory,
        secret: Optional[bytes] = None,
        port: Optional[int] = None,
    ) -> Deferred[RelayListeningPort]:
        """
        Serve ``factory`` through the relay; fires with a listening port
        whose ``getHost()`` is the public address.  Visitors' addresses
        reach the protocols in ``transport.getPeer()``.
        """
        endpoint = RelayServerEndpoint(
            self.reactor,
            self.control_endpoint,
            AgentConfig(secret=secret, port=port, proxy=True, backoff_initial=0.05),
        )
        d = endpoint.listen(factory)

        def keep(listening: RelayListeningPort) -> RelayListeningPort:
            self._served.append(listening)
            return listening

        return d.addCallback(keep)

    def stop(self) -> Deferred[None]:
        """Stop every served factory, then the relay; fires when all is closed."""

        async def run() -> None:
            # A tunnel leaves the registry as its session ends, but its
            # visitor sockets may close a reactor turn later (an aborted
            # TCP connection is lost from a callLater(0)): keep them to wait on.
            tunnels = set(self.relay.tunnels())
            tunnels.update([m for t in list(tunnels) for m in getattr(t, "members", ())])
            served, self._served = self._served, []
            await DeferredList([p.stopListening() for p in served])
            tunnels.update(self.relay.tunnels())
            # a pool's members keep their own visitors (and leave the pool)
            tunnels.update([m for t in list(tunnels) for m in getattr(t, "members", ())])
            if self.service.running:
                await self.service.stopService()
            await self.relay.when_idle()
            await DeferredList([s.done for t in tunnels for s in list(t.visitors)])

        return ensureDeferred(run())
