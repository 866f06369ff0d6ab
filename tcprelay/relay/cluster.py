"""
The cluster layer: several relay nodes serving as one, through Redis.

Each node keeps its own in-memory registry (:class:`MemoryRegistry`) of the
routes its agents serve, so that a visitor of a local route is found
without a round trip.  :class:`Cluster` mirrors those routes into Redis
(:mod:`tcprelay.relay.cluster_scripts` has the key schema):

- **Claims** (:meth:`Cluster.claim`): before a node gives a route (a name
  or a port) to an agent, one Lua script decides it atomically: free (the
  node takes it), held by another credential or an unpooled agent elsewhere
  (refused), pooled by the same credential (joined, when the agent asks to
  pool), or held elsewhere for the lease token the agent presents (moved:
  the agent reconnected here, and the old node lets its tunnel go).
- **Liveness**: every ``ttl / 5`` seconds the node re-asserts its node key
  and every route it serves or holds for a lease (``PX ttl``).  A dead
  node's entries count as absent once ``ttl`` has passed.  A node whose
  entry for a route has been taken by another node (an agent that moved)
  closes its own tunnel of it.
- **Forwarding**: a visitor whose route is not local (a name on the shared
  entrances, or a port claimed by another node that this node listens on
  too) is handed to the owning node over a node-to-node connection
  (:mod:`tcprelay.relay.nodelink`), keeping the visitor's address.
- **Redis loss**: the node keeps serving its local routes and forwarding
  to the owners it knows, refuses new claims (retryable), and re-asserts
  every key when Redis is back.
- A clean stop deletes the node's keys.

The connection to Redis is :mod:`tcprelay.relay.redislink`, the Lua
scripts :mod:`tcprelay.relay.cluster_scripts`, the link header
:mod:`tcprelay.relay.nodelink` and the receiving end of node links
:mod:`tcprelay.relay.nodelink_server`.

Why one module of this size: what is left is the one :class:`Cluster`
whose claims, refresh, port mirroring and forwarding read and write the
same state (the live nodes, the other nodes' ports, the lookup cache, the
claims under way): one refresh answer feeds all of them.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import attrs

from twisted.application.service import MultiService
from twisted.internet import interfaces
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcprelay import handshake as hs
from tcprelay._fastio import connect_eager
from tcprelay.forward import Splice
from tcprelay.relay import cluster_scripts as scripts
from tcprelay.relay.nodelink import LinkHeader, encode_link_header
from tcprelay.relay.nodelink_server import NodeLinkFactory, node_listen_endpoint
from tcprelay.relay.redislink import RedisAddress, RedisLink, RedisUnavailable, parse_redis_url
from tcprelay.relay.routes import PortRoute, wildcards

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = [
    "Cluster",
    "ClusterConfig",
    "RedisAddress",
    "RedisLink",
    "RedisUnavailable",
    "parse_redis_url",
]

log = Logger()

DEFAULT_TTL = 5.0
"""Seconds a node's keys live without a refresh (``--cluster-ttl``)."""
LOOKUP_CACHE = 1.0
"""Seconds a node remembers which node serves a name it does not hold."""
LINK_CONNECT_TIMEOUT = 5.0
"""Seconds a node-to-node connection may take to connect."""
MIRROR_RETRY = 10.0
"""Seconds before a node tries again to listen on a port of another node
that it could not bind (another process, or that node on the same address)."""



@attrs.frozen
class ClusterConfig:
    """What a node needs to join a cluster (``--cluster`` and friends)."""

    redis: RedisAddress
    node_name: str
    node_host: str
    """The host other nodes reach this node at (``--node-address``)."""
    node_port: int
    secret: Optional[bytes]
    """The cluster secret: authenticates node-to-node connections (None:
    the one kept in Redis, created by the first node)."""
    ttl: float = DEFAULT_TTL
    prefix: str = "tcprelay:"

    @property
    def refresh(self) -> float:
        """Seconds between refreshes of the node's keys."""
        return self.ttl / 5

    @property
    def node_address(self) -> str:
        host = f"[{self.node_host}]" if ":" in self.node_host else self.node_host
        return f"{host}:{self.node_port}"


# -- the Redis connection -------------------------------------------------------
# -- the cluster layer ------------------------------------------------------------


def route_key(prefix: str, kind: str, name: str) -> str:
    return f"{prefix}route:{kind}:{name}"


@attrs.define
class NodeInfo:
    """What a node says of itself in its node key."""

    name: str
    address: str
    routes: list[str] = attrs.Factory(list)
    since: float = 0.0

    @classmethod
    def parse(cls, raw: Any) -> Optional[NodeInfo]:
        try:
            data = json.loads(raw)
            routes = data.get("routes") or []
            return cls(
                str(data["name"]),
                str(data["address"]),
                [str(r) for r in routes] if isinstance(routes, list) else [],
                float(data.get("since", 0.0)),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class ClusterStats:
    """The cluster layer's counters."""

    def __init__(self) -> None:
        self.forwarded_out = 0
        """Visitors handed to another node."""
        self.forwarded_in = 0
        """Visitors another node handed to this one."""
        self.forward_failures = 0
        """Visitors that could not be handed over (owner unknown or unreachable)."""
        self.claims_refused_unavailable = 0
        """Claims refused because Redis was unreachable."""
        self.links_refused = 0
        """Node-to-node connections refused (bad MAC, stale, no such local route)."""


class Cluster(MultiService):
    """
    A relay node's membership of a cluster (see the module docstring).
    Built by :func:`tcprelay.tap.makeService` for ``--cluster`` and set as
    :attr:`Relay.cluster`; its children are the Redis connection and the
    node-to-node listener.
    """

    log = Logger()
    name = "cluster"

    def __init__(
        self,
        relay: Relay,
        config: ClusterConfig,
        reactor: Any,
        listen_endpoint: Optional[interfaces.IStreamServerEndpoint] = None,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.config = config
        self.reactor = reactor
        self.stats = ClusterStats()
        self.redis = RedisLink(reactor, config.redis, self._redis_up, self._redis_down)
        self.redis.setServiceParent(self)
        self.channel = f"{config.prefix}events"
        self.events = RedisLink(
            reactor, config.redis, channel=self.channel, on_message=self._event
        )
        self.events.setServiceParent(self)
        self._claims: set[str] = set()
        """Route keys of the claims under way (a stop deletes them too)."""
        self._mirror_failed: dict[int, float] = {}
        """Ports of other nodes this node could not listen on, and when."""
        self._announced: dict[int, tuple[str, float]] = {}
        """Ports other nodes announced they claimed: (node, until when
        this holds without their node key listing it)."""
        self.nodes: dict[str, NodeInfo] = {}
        """The live nodes (this one included) as of the last refresh."""
        self.remote_ports: dict[int, str] = {}
        """Ports claimed by other nodes: the node's name.  Those of this
        node's range are out of its pool; all are listened on (mirrored)
        when they can be bound."""
        self._cache: dict[tuple[str, str], tuple[float, list[NodeInfo]]] = {}
        self._refresher: Optional[LoopingCall] = None
        self._soon: Optional[interfaces.IDelayedCall] = None
        self._refreshing: Optional[Deferred[None]] = None
        self._again = False
        self._left = False
        self._started_at = time.time()
        self._was_up = False
        self.secret: Optional[bytes] = config.secret
        """The cluster secret (None until read from Redis when not given)."""
        if listen_endpoint is None:
            listen_endpoint = node_listen_endpoint(reactor, config.node_host, config.node_port)
        from twisted.application.internet import StreamServerEndpointService

        self.listener = StreamServerEndpointService(listen_endpoint, NodeLinkFactory(self))
        self.listener._raiseSynchronously = True
        self.listener.setServiceParent(self)

    @property
    def node(self) -> str:
        return self.config.node_name

    @property
    def up(self) -> bool:
        """Whether Redis is reachable now."""
        return self.redis.up

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        self._left = False
        super().startService()
        self._refresher = LoopingCall(self.refresh)
        self._refresher.clock = self.reactor
        self._refresher.start(self.config.refresh, now=False).addErrback(
            lambda f: self.log.failure("cluster refresh loop", f)
        )

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop refreshing, delete this node's keys, then disconnect."""
        self._left = True
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        keys = [route_key(self.config.prefix, kind, name) for kind, name in self._local_routes()]
        keys += list(self._claims)
        node_key = f"{self.config.prefix}node:{self.node}"
        leave = self.redis.eval(
            scripts.LEAVE,
            [node_key, *sorted(set(keys))],
            [self.node, self.channel, self.config.prefix],
        )

        def left(result: object) -> None:
            if isinstance(result, Failure):
                self.log.warn(
                    "cluster: could not delete this node's keys ({error}); they expire in {ttl:g}s",
                    error=result.getErrorMessage(),
                    ttl=self.config.ttl,
                )

        def stop(_: object) -> Deferred[None]:
            return maybeDeferred(super(Cluster, self).stopService)

        return leave.addBoth(left).addBoth(stop)

    def _redis_up(self) -> None:
        self.log.info(
            "cluster: node {node} connected to Redis at {redis}{again}",
            node=self.node,
            redis=str(self.config.redis),
            again="; re-asserting its routes" if self._was_up else "",
        )
        self._was_up = True
        if self.config.secret is None:
            self._fetch_secret()
        self.soon()

    def _fetch_secret(self) -> None:
        """The cluster secret kept in Redis (this node's, if Redis has none:
        the first node, or Redis restarted empty)."""
        mine = self.secret.decode() if self.secret is not None else os.urandom(32).hex()
        key = f"{self.config.prefix}secret"

        def got(value: Any) -> None:
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str) and value:
                self.secret = value.encode()

        def failed(failure: Failure) -> None:
            if not failure.check(RedisUnavailable):
                self.log.failure("reading the cluster secret", failure)

        self.redis.eval(scripts.SECRET, [key], [mine]).addCallbacks(got, failed)

    def _redis_down(self) -> None:
        if self._left:
            return
        self.log.warn(
            "cluster: lost Redis at {redis}; serving the local routes, "
            "refusing new claims until it is back",
            redis=str(self.config.redis),
        )

    # -- what the node holds --------------------------------------------------

    def _local_routes(self) -> list[tuple[str, str]]:
        registry = self.relay.registry
        routes = [(route.kind, route.name) for route, _ in registry.routes()]
        for lease in self._leases():
            routes.append((lease.route.kind, lease.route.name))
        return routes

    def _leases(self) -> list[Any]:
        leases = getattr(self.relay.registry, "leases", None)
        return list(leases()) if leases is not None else []

    def _route_entries(self) -> list[tuple[Any, Optional[str], bool, list[str]]]:
        """Every route this node serves or holds: (route, credential, pooled, tokens)."""
        from tcprelay.relay.pooled import PooledTunnel

        entries: dict[Any, tuple[Any, Optional[str], bool, list[str]]] = {}
        for route, tunnel in self.relay.registry.routes():
            pooled = isinstance(tunnel, PooledTunnel)
            members = list(tunnel.members) if pooled else [tunnel]  # type: ignore[attr-defined]
            tokens = [t for t in (getattr(m, "lease_token", None) for m in members) if t]
            entries[route] = (route, tunnel.credential, pooled, tokens)
        for lease in self._leases():
            route = lease.route
            if route in entries:
                entries[route][3].append(lease.token)
            else:
                pooled = route in getattr(self.relay, "_pooled_leases", {})
                entries[route] = (route, lease.credential, pooled, [lease.token])
        return list(entries.values())

    def _info(self) -> str:
        routes = sorted({f"{kind}:{name}" for kind, name in self._local_routes()})
        return json.dumps(
            {
                "name": self.node,
                "address": self.config.node_address,
                "routes": routes,
                "since": self._started_at,
            },
            separators=(",", ":"),
        )

    # -- refresh ---------------------------------------------------------------

    def soon(self) -> None:
        """Refresh at the next turn of the reactor (a route was just published)."""
        if self._left or (self._soon is not None and self._soon.active()):
            return
        self._soon = self.reactor.callLater(0, self._refresh_soon)

    def _refresh_soon(self) -> None:
        self._soon = None
        self.refresh()

    def refresh(self) -> Deferred[None]:
        """
        Re-assert the node key and every route of this node (one script),
        close what other nodes have taken over, and update :attr:`nodes`
        and the mirrored ports.  Never fails (a lost Redis is logged once,
        by the connection).
        """
        if self._left:
            return succeed(None)
        if self._refreshing is not None:
            self._again = True
            return self._refreshing
        entries = self._route_entries()
        prefix = self.config.prefix
        keys = [f"{prefix}node:{self.node}"]
        args: list[Any] = [self.node, int(self.config.ttl * 1000), self._info(), prefix]
        for route, credential, pooled, tokens in entries:
            keys.append(route_key(prefix, route.kind, route.name))
            args += [credential or "", "1" if pooled else "0", json.dumps(tokens)]
        d = self.redis.eval(scripts.REFRESH, keys, args)
        self._refreshing = done = d.addCallbacks(
            lambda result: self._refreshed(entries, result), self._refresh_failed
        )

        def finished(_: object) -> None:
            self._refreshing = None
            if self._again:
                self._again = False
                self.refresh()

        done.addBoth(finished)
        return done

    def _refresh_failed(self, failure: Failure) -> None:
        if not failure.check(RedisUnavailable):
            self.log.failure("cluster refresh", failure)

    def _refreshed(self, entries: list[Any], result: Any) -> None:
        if self._left or not isinstance(result, list) or not result:
            return
        try:
            lost = json.loads(result[0])
        except (TypeError, ValueError):
            lost = []
        for item in lost if isinstance(lost, list) else []:
            try:
                index, what = int(item[0]), item[1]
                route, credential, _, _ = entries[index - 1]
            except (TypeError, ValueError, IndexError):
                continue
            self._lost(route, None if what == "*" else set(str(what).split()))
        nodes = {}
        for raw in result[1:]:
            info = NodeInfo.parse(raw)
            if info is not None:
                nodes[info.name] = info
        self.nodes = nodes
        self._sync_ports()

    def _lost(self, route: Any, tokens: Optional[set[str]]) -> None:
        """Another node has taken ``route`` (or the agents of ``tokens``): let ours go."""
        from tcprelay.relay.pooled import PooledTunnel

        relay = self.relay
        registry = relay.registry
        self.log.info(
            "cluster: {kind} {name} was taken over by another node; closing it here",
            kind=route.kind,
            name=route.name,
        )
        for lease in self._leases():
            if lease.route == route and (tokens is None or lease.token in tokens):
                if registry.resume_lease(lease.token, lease.credential) is not None:
                    relay._lease_expired(route)
        tunnel = registry.lookup(route)
        if tunnel is None:
            return
        members = list(tunnel.members) if isinstance(tunnel, PooledTunnel) else [tunnel]
        for member in members:
            if tokens is None or getattr(member, "lease_token", None) in tokens:
                # the agent is elsewhere now: this tunnel's lease must not hold the route
                member.lease_token = None
                member.close("its agent reconnected to another node of the cluster")

    # -- claims --------------------------------------------------------------------

    def claim(
        self, route: Any, credential: Optional[str], lease: Optional[str], pool: bool
    ) -> Deferred[str]:
        """
        Claim ``route`` for an agent of ``credential`` (presenting
        ``lease``, asking to ``pool``) in the whole cluster, one claim of a
        route at a time (another is refused, retryably).  Fires with
        ``ok`` (free), ``local`` (this node has it already), ``moved`` (the
        agent's lease was held by another node) or ``joined`` (a pool of
        another node); fails with :class:`~tcprelay.relay.core.RouteRefused`
        (retryable when Redis is unreachable or the route is held elsewhere).
        """
        from tcprelay.relay.core import RouteRefused

        what = f"port {route.name}" if route.kind == "port" else f"{route.kind} name {route.name}"
        if self._left:
            return fail(RouteRefused("the relay is shutting down", retry=True))
        key = route_key(self.config.prefix, route.kind, route.name)
        if key in self._claims:
            return fail(RouteRefused(f"{what} is being claimed", retry=True))
        self._claims.add(key)

        def settled(result: object) -> object:
            self._claims.discard(key)
            return result

        d = self.redis.eval(
            scripts.CLAIM,
            [key],
            [
                self.node,
                credential or "",
                lease or "",
                "1" if pool else "0",
                int(self.config.ttl * 1000),
                self.channel,
            ],
        )

        def decided(result: Any) -> str:
            status, owner = str(result[0]), str(result[1])
            if status in ("ok", "local", "moved", "joined"):
                if status == "moved":
                    self.log.info(
                        "cluster: {what} moved here from node {owner} with its agent's lease",
                        what=what,
                        owner=owner,
                    )
                self.soon()
                return status
            if status == "other":
                raise RouteRefused(f"{what} is taken (on node {owner})", retry=True, owner=owner)
            if status == "pooled":
                raise RouteRefused(
                    f"{what} is pooled on node {owner}: ask to pool to join it",
                    retry=True,
                    owner=owner,
                )
            raise RouteRefused(
                f"{what} is taken (not pooled, on node {owner})", retry=True, owner=owner
            )

        def unavailable(failure: Failure) -> Failure:
            if failure.check(RedisUnavailable):
                self.stats.claims_refused_unavailable += 1
                raise RouteRefused(
                    f"the cluster's registry is unreachable ({failure.getErrorMessage()}); "
                    "new routes are refused until it is back",
                    retry=True,
                )
            return failure

        return d.addBoth(settled).addCallbacks(decided, unavailable)

    def release(self, route: Any) -> None:
        """This node no longer serves or holds ``route`` (fire and forget)."""
        if self._left:
            return
        key = route_key(self.config.prefix, route.kind, route.name)
        d = self.redis.eval(scripts.RELEASE, [key], [self.node, self.channel])

        def failed(failure: Failure) -> None:
            if not failure.check(RedisUnavailable):
                self.log.failure("cluster release", failure)

        d.addCallbacks(lambda _: self.soon(), failed)

    # -- ports of other nodes ------------------------------------------------------

    def _event(self, message: str) -> None:
        """A message on the events channel: a port claimed or released."""
        what, _, rest = message.partition(" ")
        node, _, key = rest.partition(" ")
        prefix = f"{self.config.prefix}route:port:"
        if node == self.node or not key.startswith(prefix) or self._left:
            return
        name = key[len(prefix):]
        if not name.isdigit():
            return
        port = int(name)
        if what == "claim":
            self._announced[port] = (node, self.reactor.seconds() + 2 * self.config.ttl)
            self._sync_ports()
        elif what == "release":
            self._announced.pop(port, None)
            self.soon()

    def _sync_ports(self) -> None:
        """Keep the ports other nodes claimed out of the pool, and listen on them."""
        relay = self.relay
        in_range = set(relay.pool.ports)
        claimed: dict[int, str] = {}
        listed: set[tuple[int, str]] = set()
        for info in self.nodes.values():
            if info.name == self.node:
                continue
            for entry in info.routes:
                kind, _, name = entry.partition(":")
                if kind == "port" and name.isdigit():
                    claimed[int(name)] = info.name
                    listed.add((int(name), info.name))
        # an announcement is newer than a node key (a port that moved from a
        # dead node is still listed by its key until that expires)
        now = self.reactor.seconds()
        for port, (node, until) in list(self._announced.items()):
            if until < now or (port, node) in listed:
                del self._announced[port]
            if until >= now:
                claimed[port] = node
        local = {route.port for route, _ in relay.registry.routes() if isinstance(route, PortRoute)}
        local |= {lease.route.port for lease in self._leases() if isinstance(lease.route, PortRoute)}
        for port, owner in claimed.items():
            if port in local:
                continue
            if port not in self.remote_ports:
                if port in in_range and not relay.pool.take(port):
                    continue  # being claimed here right now
            self.remote_ports[port] = owner
            self._mirror(port, now)
        for port in [p for p in self.remote_ports if p not in claimed]:
            del self.remote_ports[port]
            self._mirror_failed.pop(port, None)
            closing = relay.ports.unmirror(port)
            if closing is None:
                relay.pool.release(port)
            else:
                closing.addBoth(lambda _, port=port: relay.pool.release(port))

    def _mirror(self, port: int, now: float) -> None:
        """Listen on another node's ``port`` (a port outside this node's
        range too: nodes with ranges of their own on addresses of their
        own); a port that cannot be bound is tried again after
        :data:`MIRROR_RETRY` seconds."""
        failed = self._mirror_failed.get(port)
        if failed is not None and now - failed < MIRROR_RETRY:
            return
        if self.relay.ports.mirror(port):
            self._mirror_failed.pop(port, None)
        else:
            self._mirror_failed[port] = now

    def take_remote(self, port: int) -> bool:
        """Take a port another node holds out of :attr:`remote_ports` (an
        agent claims it with its lease here); False if it is not one."""
        return self.remote_ports.pop(port, None) is not None

    def give_back_remote(self, port: int, owner: str) -> None:
        """A port whose claim lost to ``owner``: keep it out of the pool."""
        self.remote_ports[port] = owner
        self._mirror(port, self.reactor.seconds())

    # -- visitors of other nodes ------------------------------------------------------

    def port_owner(self, port: int) -> Optional[NodeInfo]:
        """The node serving ``port``, as of the last refresh."""
        owner = self.remote_ports.get(port)
        return None if owner is None else self.nodes.get(owner)

    def forwards_port(self, port: int) -> bool:
        """Whether ``port`` is another node's (its visitors are forwarded)."""
        return port in self.remote_ports

    def lookup(self, kind: str, name: str) -> Deferred[list[NodeInfo]]:
        """The other nodes serving a visitor of ``kind`` asking for ``name``
        (the exact name, else the most specific wildcard); [] if none.
        Fails with :class:`RedisUnavailable` when Redis cannot be asked and
        nothing is remembered for the name."""
        now = self.reactor.seconds()
        cached = self._cache.get((kind, name))
        if cached is not None and cached[0] > now:
            return succeed(cached[1])
        prefix = self.config.prefix
        candidates = [name, *wildcards(name)] if kind != "port" else [name]
        keys = [route_key(prefix, kind, n) for n in candidates]
        d = self.redis.eval(scripts.LOOKUP, keys, [prefix])

        def found(result: Any) -> list[NodeInfo]:
            nodes = []
            for raw in (result or [])[1:]:
                info = NodeInfo.parse(raw)
                if info is not None and info.name != self.node:
                    nodes.append(info)
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[(kind, name)] = (self.reactor.seconds() + LOOKUP_CACHE, nodes)
            return nodes

        def unavailable(failure: Failure) -> Any:
            failure.trap(RedisUnavailable)
            if cached is not None:
                return cached[1]  # stale, but the best this node knows
            return failure

        return d.addCallbacks(found, unavailable)

    def forget(self, kind: str, name: str) -> None:
        self._cache.pop((kind, name), None)

    def forward(
        self,
        kind: str,
        name: str,
        node: Optional[NodeInfo],
        peer: interfaces.IAddress,
        dialled: interfaces.IAddress,
        first: bytes,
        on_failed: Optional[Callable[[], None]] = None,
    ) -> Splice:
        """
        Hand a visitor over to ``node`` (None: the node Redis names, a port
        announced by a node this one has not heard of yet): a splice whose visitor side the
        caller runs on the visitor's transport; its service side is the
        connection to ``node``, which gets the link header, a PROXY v2
        header and ``first`` before anything else.  ``on_failed`` is called
        if ``node`` cannot be reached (the visitor is then closed).
        """
        splice = Splice()
        secret = self.secret
        if secret is None:  # not read from Redis yet: no link can be trusted
            self.stats.forward_failures += 1
            self.reactor.callLater(0, lambda: _abort(splice))
            return splice
        header = encode_link_header(LinkHeader(kind, name, self.node, time.time()), secret)
        proxy = hs.encode_proxy_v2(
            hs.ProxyHeader(
                getattr(peer, "host", "0.0.0.0"),
                getattr(peer, "port", 0),
                getattr(dialled, "host", "0.0.0.0"),
                getattr(dialled, "port", 0),
            )
        )
        splice.greeting = header + proxy + first
        splice.bytes_to_service = len(first)
        self.stats.forwarded_out += 1
        if node is not None:
            self._link_to(splice, kind, name, node, {node.name}, on_failed)
            return splice

        def found(nodes: list[NodeInfo]) -> None:
            chosen = choose_node(nodes)
            if chosen is None or splice.visitor.lost:
                self.stats.forward_failures += 1
                self.reactor.callLater(0, _abort, splice)
                return
            self._link_to(splice, kind, name, chosen, {chosen.name}, on_failed)

        def failed(_: Failure) -> None:
            self.stats.forward_failures += 1
            self.reactor.callLater(0, _abort, splice)

        self.lookup(kind, name).addCallbacks(found, failed)
        return splice

    def _link_to(
        self,
        splice: Splice,
        kind: str,
        name: str,
        node: NodeInfo,
        tried: set[str],
        on_failed: Optional[Callable[[], None]],
    ) -> None:
        """Connect ``splice``'s service side to ``node``; when it cannot be
        reached (a node that just died), ask again who serves the route and
        try another node once."""
        host, _, port = node.address.rpartition(":")

        def give_up() -> None:
            self.stats.forward_failures += 1
            if on_failed is not None:
                on_failed()
            transport = splice.visitor.transport
            if transport is not None:
                transport.abortConnection()

        def again(nodes: list[NodeInfo]) -> None:
            if splice.visitor.lost:
                return
            others = [n for n in nodes if n.name not in tried]
            if not others or len(tried) > 1:
                give_up()
                return
            chosen = choose_node(others)
            assert chosen is not None
            tried.add(chosen.name)
            self._link_to(splice, kind, name, chosen, tried, on_failed)

        def failed(failure: Failure) -> None:
            self.forget(kind, name)
            self.log.info(
                "cluster: cannot reach node {node} at {address} for a visitor of {kind} {name}: {error}",
                node=node.name,
                address=node.address,
                kind=kind,
                name=name,
                error=failure.getErrorMessage(),
            )
            if splice.visitor.lost or len(tried) > 1:
                give_up()
            elif kind == "port":
                owner = self.port_owner(int(name))
                again([owner] if owner is not None else [])
            else:
                self.lookup(kind, name).addCallbacks(again, lambda _: give_up())

        # connectTCP straight away (eager on loopback): no resolver thread
        # for an IP address, one connect per visitor
        connect_eager(
            self.reactor,
            host.strip("[]"),
            int(port),
            _LinkFactory(splice, failed),
            timeout=LINK_CONNECT_TIMEOUT,
        )

    # -- operators ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``cluster`` part of ``/status``."""
        return {
            "node": self.node,
            "address": self.config.node_address,
            "redis": {"url": str(self.config.redis), "connected": self.up},
            "ttl": self.config.ttl,
            "nodes": [
                {
                    "name": info.name,
                    "address": info.address,
                    "routes": info.routes,
                    "route_count": len(info.routes),
                    "self": info.name == self.node,
                }
                for info in sorted(self.nodes.values(), key=lambda i: i.name)
            ],
            "forwarded_out": self.stats.forwarded_out,
            "forwarded_in": self.stats.forwarded_in,
            "forward_failures": self.stats.forward_failures,
            "claims_refused_unavailable": self.stats.claims_refused_unavailable,
            "links_refused": self.stats.links_refused,
        }



def _abort(splice: Splice) -> None:
    transport = splice.visitor.transport
    if transport is not None:
        transport.abortConnection()


class _LinkFactory(ClientFactory):
    """Connects a forwarded visitor's splice to its route's node."""

    noisy = False

    def __init__(self, splice: Splice, failed: Callable[[Failure], None]) -> None:
        self.splice = splice
        self.failed = failed

    def buildProtocol(self, addr: interfaces.IAddress) -> Protocol:  # type: ignore[override]
        return self.splice.service

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed(reason)




def choose_node(nodes: Iterable[NodeInfo]) -> Optional[NodeInfo]:
    """One of ``nodes`` for a visitor (pooled routes spread at random)."""
    nodes = list(nodes)
    return random.choice(nodes) if nodes else None
