"""
The cluster's connection to Redis (:class:`RedisLink`): one txredisapi
connection kept up with backoff on the injected reactor, whose commands
fail at once (:class:`RedisUnavailable`) while Redis is unreachable, and
the ``redis://`` URL of ``--cluster`` (:func:`parse_redis_url`).

The Redis protocol is txredisapi's :class:`RedisProtocol`; the connection
is a :class:`~twisted.application.internet.ClientService`, so that a
command while Redis is unreachable fails at once instead of waiting for it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import attrs

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["RedisAddress", "RedisLink", "RedisUnavailable", "parse_redis_url"]

log = Logger(namespace="tcprelay.relay.cluster")


class RedisUnavailable(Exception):
    """Redis cannot be reached now (or did not answer in time)."""


@attrs.frozen
class RedisAddress:
    host: str
    port: int
    db: int = 0
    password: Optional[str] = None
    username: Optional[str] = None

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"{url!r} is not a redis:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{url!r}: the database must be a number, not {path!r}")
    return RedisAddress(
        parts.hostname,
        port,
        int(path) if path else 0,
        unquote(parts.password) if parts.password else None,
        unquote(parts.username) if parts.username else None,
    )


def _redis_protocol_class(subscriber: bool = False) -> Any:
    try:
        import txredisapi
    except ImportError:  # pragma: no cover - setup.cfg's dependency
        raise RuntimeError(
            "--cluster needs the txredisapi package (pip install 'tcprelay[cluster]')"
        ) from None

    base = txredisapi.SubscriberProtocol if subscriber else txredisapi.RedisProtocol

    class _Protocol(base):  # type: ignore[misc, valid-type]
        def connectionLost(self, why: Failure) -> None:
            super().connectionLost(why)
            link = getattr(self.factory, "link", None)
            if link is not None:
                link._lost(self)

        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            link = getattr(self.factory, "link", None)
            if link is not None and link.on_message is not None:
                link.on_message(message if isinstance(message, str) else str(message))

    return _Protocol


class _RedisFactory(Factory):
    noisy = False

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.protocol_class = _redis_protocol_class(link.channel is not None)
        self.isLazy = True

    def buildProtocol(self, addr: interfaces.IAddress) -> Protocol:  # type: ignore[override]
        address = self.link.address
        p = self.protocol_class(
            replyTimeout=self.link.reply_timeout,
            password=address.password,
            username=address.username,
            dbid=address.db,
        )
        p.callLater = self.link.reactor.callLater
        p.factory = self
        p.whenConnected().addCallback(self.link._ready)
        return p  # type: ignore[no-any-return]

    # what txredisapi's protocol calls on a failed AUTH or SELECT
    def stopTrying(self) -> None:
        pass

    def connectionError(self, message: str) -> None:
        log.warn("Redis at {address}: {message}", address=str(self.link.address), message=message)


class RedisLink(MultiService):
    """
    One connection to Redis, kept up with backoff.  :meth:`call` runs a
    command (a method of txredisapi's protocol) and fails at once with
    :class:`RedisUnavailable` while there is no connection;
    ``on_up``/``on_down`` are told when it comes and goes.
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        on_up: Callable[[], None] = lambda: None,
        on_down: Callable[[], None] = lambda: None,
        reply_timeout: float = 2.0,
        channel: Optional[str] = None,
        on_message: Optional[Callable[[str], None]] = None,
    ) -> None:
        """With ``channel``, the connection only subscribes to it and
        passes each message to ``on_message``."""
        super().__init__()
        self.reactor = reactor
        self.address = address
        self.on_up = on_up
        self.on_down = on_down
        self.reply_timeout = reply_timeout
        self.channel = channel
        self.on_message = on_message
        self.protocol: Optional[Any] = None
        endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=reply_timeout)
        self._client = ClientService(
            endpoint,
            _RedisFactory(self),
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=2.0, factor=2.0),
            clock=reactor,
        )
        self._client.setServiceParent(self)

    @property
    def up(self) -> bool:
        return self.protocol is not None

    def _ready(self, protocol: Any) -> None:
        if self.protocol is protocol:
            return
        self.protocol = protocol
        if self.channel is not None:
            protocol.subscribe(self.channel).addErrback(lambda f: None)
        self.on_up()

    def _lost(self, protocol: Any) -> None:
        if self.protocol is protocol:
            self.protocol = None
            self.on_down()

    def call(self, method: str, *args: Any) -> Deferred[Any]:
        """Run ``method`` of the connection; RedisUnavailable when there is none."""
        protocol = self.protocol
        if protocol is None:
            return fail(RedisUnavailable(f"no connection to Redis at {self.address}"))
        d = maybeDeferred(getattr(protocol, method), *args)

        def unavailable(failure: Failure) -> Failure:
            import txredisapi

            if failure.check(txredisapi.ConnectionError):  # TimeoutError too
                raise RedisUnavailable(f"Redis at {self.address}: {failure.getErrorMessage()}")
            return failure

        return d.addErrback(unavailable)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self.call("eval", script, keys, [str(a) for a in args])

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        protocol, self.protocol = self.protocol, None
        d = maybeDeferred(super().stopService)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()
        return d
