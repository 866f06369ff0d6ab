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

import random
import socket
from typing import Any, Iterable, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

from tcprelay.agent.client import AgentConfig
from tcprelay.agent.endpoint import RelayListeningPort, RelayServerEndpoint
from tcprelay.forward import Splice
from tcprelay.mux.session import SessionConfig
from tcprelay.relay.pool import PortPool
from tcprelay.relay.server import Registration, Relay, RelayConfig, RelayService

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


def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 300) -> int:
    """
    The first of ``count`` consecutive ports that all bind on ``host`` just
    now, chosen below the kernel's ephemeral range so that client sockets
    cannot take one of them meanwhile (for a relay's ``--ports`` range in a
    test).  RuntimeError when none is found.
    """
    top = _ephemeral_low() - count
    if top <= 20000 + count:
        top = 60000 - count
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, top)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports on {host}")


class RelayFixture:
    """
    An in-process relay on 127.0.0.1.  Create it with :meth:`start`; serve
    factories with :meth:`serve`; finish with :meth:`stop`.
    """

    def __init__(self, reactor: Any, service: RelayService, control: StreamServerEndpointService) -> None:
        self.reactor = reactor
        self.service = service
        self.relay: Relay = service.relay
        self._control = control
        self._served: list[RelayListeningPort] = []
        self.control_port = 0

    @classmethod
    def start(
        cls,
        reactor: Any,
        ports: int = 8,
        secrets: Sequence[bytes] = (),
        wait_timeout: float = 5.0,
        lease: float = 0.5,
        session: SessionConfig = SessionConfig(),
    ) -> Deferred[RelayFixture]:
        """Start a relay with ``ports`` public ports; fires with the fixture."""
        config = RelayConfig(
            ports=free_ports(ports),
            public_interface="127.0.0.1",
            public_host="127.0.0.1",
            wait_timeout=wait_timeout,
            drain_timeout=2.0,
            lease=lease,
            secrets=tuple(secrets),
            session=session,
        )
        pool = PortPool(config.ports, reactor, config.bind_retry)
        relay = Relay(config, pool, reactor)
        control = StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), relay.factory()
        )
        control._raiseSynchronously = True
        service = RelayService(relay, control)
        fixture = cls(reactor, service, control)

        async def run() -> RelayFixture:
            service.startService()
            listening = await control._waitingForPort  # type: ignore[misc]
            fixture.control_port = listening.getHost().port
            return fixture

        return ensureDeferred(run())

    @property
    def control_endpoint(self) -> interfaces.IStreamClientEndpoint:
        """A client endpoint for the control port (for your own agents)."""
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.control_port)

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
            # A session's registration is forgotten as it ends, but its
            # visitor sockets may close a reactor turn later (an aborted
            # TCP connection is lost from a callLater(0)): keep them to wait on.
            registrations = set(self.relay.registrations.values())
            served, self._served = self._served, []
            await DeferredList([p.stopListening() for p in served])
            registrations.update(self.relay.registrations.values())
            if self.service.running:
                await self.service.stopService()
            await self.relay.when_idle()
            await _visitors_closed(registrations)

        return ensureDeferred(run())


def _visitors_closed(registrations: Iterable[Registration]) -> Deferred[None]:
    """Fires once every visitor connection of ``registrations`` is closed."""
    waits: list[Deferred[None]] = []
    for reg in registrations:
        for splice in list(reg.visitors):
            closed: Deferred[None] = Deferred()
            previous = splice.on_done

            def done(s: Splice, previous: Any = previous, closed: Deferred[None] = closed) -> None:
                if previous is not None:
                    previous(s)
                closed.callback(None)

            splice.on_done = done
            waits.append(closed)
    return DeferredList(waits).addCallback(lambda _: None)
