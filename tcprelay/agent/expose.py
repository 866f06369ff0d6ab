"""
``tcprelay expose``: forward every visitor stream to a new connection to a
local service, with backpressure, half-close, and the visitor's address
passed on as PROXY v1/v2 or dropped.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import handshake as hs
from tcprelay._fastio import connect_eager
from tcprelay.forward import Splice
from tcprelay.protocol import MuxStream

__all__ = ["FailoverEndpoint", "LocalForwarder", "client_endpoint", "PROXY_MODES"]

PROXY_MODES = ("none", "v1", "v2")


@implementer(interfaces.IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Several endpoints of one service (the nodes of a relay cluster), tried
    in turn: each :meth:`connect` starts with the endpoint after the one it
    connected to last (an agent whose node died goes to the next node) and
    moves on to the next whenever one fails, until all have failed once.
    """

    def __init__(self, endpoints: list[interfaces.IStreamClientEndpoint]) -> None:
        if not endpoints:
            raise ValueError("no endpoint to connect to")
        self.endpoints = list(endpoints)
        self._next = 0

    def connect(self, factory: Any) -> Deferred[Any]:
        count = len(self.endpoints)
        start = self._next
        attempt: list[Optional[Deferred[Any]]] = [None]

        def cancel(_: Deferred[Any]) -> None:
            d, attempt[0] = attempt[0], None
            if d is not None:
                d.cancel()

        result: Deferred[Any] = Deferred(cancel)
        errors: list[str] = []

        def try_one(step: int) -> None:
            index = (start + step) % count
            d = self.endpoints[index].connect(factory)
            attempt[0] = d

            def connected(protocol: Any) -> None:
                attempt[0] = None
                self._next = (index + 1) % count
                if not result.called:
                    result.callback(protocol)

            def failed(failure: Failure) -> None:
                attempt[0] = None
                if result.called:
                    return
                errors.append(failure.getErrorMessage())
                if step + 1 < count:
                    try_one(step + 1)
                else:
                    self._next = (start + 1) % count
                    result.errback(
                        ConnectError(string=f"no relay reachable ({'; '.join(errors)})")
                    )

            d.addCallbacks(connected, failed)

        try_one(0)
        return result


def client_endpoint(
    reactor: Any,
    description: str,
    ca_file: Optional[str] = None,
    default_host: str = "localhost",
    resolve_once: bool = False,
) -> interfaces.IStreamClientEndpoint:
    """
    A client endpoint from ``PORT``, ``HOST:PORT`` or a Twisted client
    endpoint string (``tcp:``, ``tls:``, ``unix:`` ...).  With ``ca_file``,
    a ``HOST:PORT`` relay is reached over TLS and its certificate must be
    issued by that CA for HOST.  With ``resolve_once`` (the local service,
    connected once per visitor) HOST is resolved now rather than per
    connection.  ValueError for unusable input.
    """
    text = description.strip()
    if text.isdigit():
        host, port = default_host, int(text)
    else:
        prefix = text.split(":", 1)[0]
        host_part, sep, port_part = text.rpartition(":")
        if sep and port_part.isdigit() and "=" not in text and prefix not in _PREFIXES:
            host, port = host_part.strip("[]"), int(port_part)
        else:
            if ca_file is not None:
                raise ValueError("--ca-file goes with a HOST:PORT relay, not an endpoint string")
            try:
                return clientFromString(reactor, text)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{description!r} is not PORT, HOST:PORT or an endpoint: {e}") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    endpoint: interfaces.IStreamClientEndpoint
    if resolve_once and ca_file is None:
        endpoint = ResolvedEndpoint(reactor, host, port)
    else:
        endpoint = HostnameEndpoint(reactor, host, port)
    if ca_file is not None:
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        with open(ca_file, "rb") as f:
            pem = f.read()
        try:
            authority = Certificate.loadPEM(pem)
        except Exception as e:  # OpenSSL's own error types
            raise ValueError(f"{ca_file} is not a PEM certificate: {e}") from None
        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=authority), endpoint)
    return endpoint


@implementer(interfaces.IStreamClientEndpoint)
class ResolvedEndpoint:
    """
    HOST:PORT resolved once (at start): connects to the address that worked
    last, trying the others in order when it fails.  Saves a thread-pool
    name lookup per visitor.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve {host}: {e}") from None
        self.reactor = reactor
        self.port = port
        self.addresses: list[tuple[int, str]] = []
        for family, _, _, _, sockaddr in infos:
            host = str(sockaddr[0])
            if family == socket.AF_INET6 and len(sockaddr) == 4 and sockaddr[3]:
                host = f"{host}%{sockaddr[3]}"  # keep a link-local address's scope
            entry = (family, host)
            if entry not in self.addresses:
                self.addresses.append(entry)

    def _prefer(self, entry: tuple[int, str]) -> None:
        """The address ``entry`` worked: try it first from now on."""
        if self.addresses and self.addresses[0] != entry and entry in self.addresses:
            self.addresses.remove(entry)
            self.addresses.insert(0, entry)

    def connect_protocol(
        self, protocol: Protocol, failed: Callable[[Failure], None]
    ) -> None:
        """
        Connect ``protocol`` itself (``connectTCP``, no wrapping protocol on
        the data path), trying the addresses like ``connect``; ``failed``
        hears about it when none works.  The connect is eager
        (:func:`~tcprelay._fastio.connect_eager`): to a local service the
        protocol is usually connected before this returns.
        """
        _Attempts(self, protocol, failed).next()

    def connect(self, factory: interfaces.IProtocolFactory) -> Deferred[Any]:
        """Connect to the preferred address, falling back to the others."""
        order = list(self.addresses)

        def attempt(index: int) -> Deferred[Any]:
            family, address = order[index]
            cls = TCP6ClientEndpoint if family == socket.AF_INET6 else TCP4ClientEndpoint
            d = cls(self.reactor, address, self.port).connect(factory)

            def worked(protocol: Any) -> Any:
                self._prefer(order[index])
                return protocol

            def failed(failure: Failure) -> Any:
                if index + 1 < len(order) and failure.check(ConnectError):
                    return attempt(index + 1)
                return failure

            return d.addCallbacks(worked, failed)

        return attempt(0)


class _Attempts(ClientFactory):
    """
    One ``connect_protocol``: the endpoint's addresses tried in turn, each
    with ``connect_eager`` and this as the factory, which hands the protocol
    over (not keeping it, nor telling it its factory) to the attempt that
    works.  (A class rather than closures calling each other: those were a
    reference cycle per visitor, left for the cyclic garbage collector.)
    """

    noisy = False

    def __init__(
        self, endpoint: ResolvedEndpoint, protocol: Protocol, failed: Callable[[Failure], None]
    ) -> None:
        self.endpoint = endpoint
        self.order = list(endpoint.addresses)
        self.index = -1
        self.instance: Optional[Protocol] = protocol
        """The protocol to connect, until an attempt takes it."""
        self.failed = failed

    def next(self) -> None:
        self.index += 1
        _, address = self.order[self.index]
        connect_eager(self.endpoint.reactor, address, self.endpoint.port, self)

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        self.endpoint._prefer(self.order[self.index])
        protocol, self.instance = self.instance, None
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.index + 1 < len(self.order) and reason.check(ConnectError):
            self.next()
        else:
            self.failed(reason)


_PREFIXES = {"tcp", "tcp6", "ssl", "tls", "unix", "systemd", "tor", "onion"}


class LocalForwarder:
    """
    The agent's visitor handler for ``expose``: each visitor stream is
    paused, a connection to the local service is made, the visitor's
    address is written first if asked, and the two are spliced.
    """

    log = Logger()

    def __init__(
        self,
        local: interfaces.IStreamClientEndpoint,
        proxy_mode: str = "none",
        on_splice_done: Optional[Callable[[Splice], None]] = None,
    ) -> None:
        if proxy_mode not in PROXY_MODES:
            raise ValueError(f"proxy mode must be one of {', '.join(PROXY_MODES)}")
        self.local = local
        self.proxy_mode = proxy_mode
        self.active: set[Splice] = set()
        self.on_splice_done = on_splice_done

    def __call__(
        self, stream: MuxStream, header: Optional[hs.ProxyHeader]
    ) -> Optional[interfaces.IProtocol]:
        splice = Splice()
        splice.when_done(self._done, splice)
        if header is not None and self.proxy_mode == "v2":
            splice.greeting = hs.encode_proxy_v2(header)
        elif header is not None and self.proxy_mode == "v1":
            splice.greeting = hs.encode_proxy_v1(header)
        self.active.add(splice)
        # Hold the visitor's bytes (and its window) until the local side is up.
        stream.pauseProducing()

        def failed(failure: Failure) -> None:
            self.log.warn(
                "cannot connect to the local service: {error}",
                error=failure.getErrorMessage(),
            )
            # The local side ends like a lost connection: the visitor's
            # stream is reset and the splice finishes (and is unlinked).
            splice.service.connectionLost(failure)

        local = self.local
        if isinstance(local, ResolvedEndpoint):
            # The common case: straight to connectTCP, no endpoint wrapper
            # between the socket and the splice.
            splice.on_linked = lambda _: stream.resumeProducing()
            local.connect_protocol(splice.service, failed)
            return splice.visitor
        factory = Factory.forProtocol(lambda: splice.service)
        factory.noisy = False
        d = local.connect(factory)
        d.addCallbacks(lambda _: stream.resumeProducing(), failed)
        return splice.visitor

    def _done(self, _: None, splice: Splice) -> None:
        self.active.discard(splice)
        if self.on_splice_done is not None:
            self.on_splice_done(splice)
