"""
Serve any Twisted factory through a relay.

:class:`RelayServerEndpoint` is an ``IStreamServerEndpoint``: ``listen``
registers at the relay and fires with an ``IListeningPort`` whose
``getHost()`` is the public address.  Each visitor becomes a protocol from
the factory, running directly on a mux stream, whose ``transport.getPeer()``
is the visitor's address (from the relay's PROXY v2 header).

String form (the plugin in ``twisted/plugins/tcprelay_plugin.py``)::

    tcprelay:host=relay.example.com:port=8080[:secretFile=PATH][:secret=TEXT]
        [:requestPort=N][:kind=http|tls:name=NAME][:caFile=PATH][:leaseFile=PATH]

so ``serverFromString(reactor, "tcprelay:host=...:port=...")`` and
``twistd web --listen tcprelay:...`` work.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import interfaces
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import handshake as hs
from tcprelay.agent.client import Agent, AgentConfig, AgentRefused
from tcprelay.agent.expose import client_endpoint
from tcprelay.protocol import MuxStream

__all__ = ["RelayServerEndpoint", "RelayListeningPort", "parse_endpoint"]


@implementer(interfaces.IListeningPort)
class RelayListeningPort:
    """A registration at a relay, seen as a listening port."""

    def __init__(self, agent: Agent, factory: interfaces.IProtocolFactory) -> None:
        self.agent = agent
        self.factory = factory
        self._stopped = False

    def startListening(self) -> None:
        """Already registered by ``listen``."""

    def stopListening(self) -> Deferred[None]:
        """Leave the relay (GOAWAY) and stop the factory."""
        if self._stopped:
            return succeed(None)
        self._stopped = True
        d = self.agent.stopService()
        d.addBoth(lambda _: self.factory.doStop())
        return d

    def getHost(self) -> IPv4Address:
        """The public address (host as the relay names it)."""
        address = self.agent.address or ":0"
        if "://" in address:  # a named route's URL: its host, the entrance's port
            from urllib.parse import urlsplit

            return IPv4Address("TCP", urlsplit(address).hostname or "", self.agent.port or 0)
        host, _, port = address.rpartition(":")
        return IPv4Address("TCP", host, int(port))


@implementer(interfaces.IStreamServerEndpoint)
class RelayServerEndpoint:
    """Listen on a relay's public port (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        relay: interfaces.IStreamClientEndpoint,
        config: AgentConfig = AgentConfig(),
    ) -> None:
        self.reactor = reactor
        self.relay = relay
        self.config = config

    def listen(self, factory: interfaces.IProtocolFactory) -> Deferred[RelayListeningPort]:
        """Register at the relay; fires once the public address is known."""

        def handler(stream: MuxStream, header: Optional[hs.ProxyHeader]) -> Any:
            return factory.buildProtocol(stream.getPeer())

        agent = Agent(self.relay, self.config, self.reactor, handler)
        factory.doStart()
        result: Deferred[RelayListeningPort] = Deferred()

        def ready(address: str) -> None:
            if not result.called:
                result.callback(RelayListeningPort(agent, factory))

        def failed(failure: Failure) -> None:
            if not result.called:
                factory.doStop()
                reason = failure.getErrorMessage()
                if failure.check(AgentRefused):
                    result.errback(CannotListenError("tcprelay", 0, reason))
                else:
                    result.errback(failure)

        agent.when_ready().addCallbacks(ready, failed)
        agent.when_done().addErrback(failed)
        agent.startService()
        return result


def parse_endpoint(reactor: Any, *args: str, **kwargs: str) -> RelayServerEndpoint:
    """Build a :class:`RelayServerEndpoint` from endpoint-string arguments."""
    host = kwargs.pop("host", None)
    port = kwargs.pop("port", None)
    if args:
        host = host or args[0]
        if len(args) > 1:
            port = port or args[1]
    if not host or not port:
        raise ValueError("tcprelay: endpoint needs host= and port= of the relay")
    secret: Optional[bytes] = None
    if "secretFile" in kwargs:
        from tcprelay.secrets import read_secrets

        secret = read_secrets(kwargs.pop("secretFile"))[0]
    if "secret" in kwargs:
        secret = kwargs.pop("secret").encode("utf-8")
    request = kwargs.pop("requestPort", None)
    ca_file = kwargs.pop("caFile", None)
    lease_file = kwargs.pop("leaseFile", None)
    kind = kwargs.pop("kind", "port")
    name = kwargs.pop("name", None)
    if kind not in ("port", "http", "tls"):
        raise ValueError(f"tcprelay: kind must be port, http or tls, not {kind!r}")
    if name is not None and kind == "port":
        kind = "http"  # a name alone asks for the HTTP entrance
    if kind != "port" and not name:
        raise ValueError(f"tcprelay: kind={kind} needs name=")
    if kind != "port" and request:
        raise ValueError("tcprelay: requestPort= is for port routes, not names")
    pool = kwargs.pop("pool", "no").lower()
    if pool not in ("yes", "no", "true", "false"):
        raise ValueError(f"tcprelay: pool must be yes or no, not {pool!r}")
    if kwargs:
        raise ValueError(f"tcprelay: unknown endpoint arguments: {', '.join(sorted(kwargs))}")
    wanted: Optional[int] = None
    if request:
        if not request.isdigit() or not 0 < int(request) < 65536:
            raise ValueError(f"tcprelay: requestPort must be a port number, not {request!r}")
        wanted = int(request)
    relay = client_endpoint(reactor, f"{host}:{port}", ca_file)
    config = AgentConfig(
        secret=secret,
        port=wanted,
        kind=kind,
        name=name,
        proxy=True,
        lease_file=lease_file,
        pool=pool in ("yes", "true"),
    )
    return RelayServerEndpoint(reactor, relay, config)
