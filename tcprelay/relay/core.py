"""
The relay's core (:class:`Relay`): what every door and entrance shares.

- Doors (agents' side) authenticate with :meth:`Relay.credential_for`,
  get a public port with :meth:`Relay.claim_port`, and put their tunnel on
  its route with :meth:`Relay.publish` / :meth:`Relay.unpublish`.
- Entrances (visitors' side) find a route's tunnel in
  :attr:`Relay.registry` and splice a visitor to it with
  :meth:`Relay.splice_visitor`.
- The relay keeps the counters (:attr:`Relay.stats`), the leases (through
  the registry), the secrets (reloaded on demand) and the drain on stop.

Nothing here listens or changes the process: the ports entrance
(:mod:`tcprelay.relay.entrances.ports`) owns the public listeners, and the
daemon (:mod:`tcprelay.relay.daemon`) the process.

Why one module of this size: it is the one place doors and entrances meet
(claiming routes, publishing tunnels, splicing visitors, draining); the
registry, routes, stats, entrances and doors live in modules of their own.
"""

from __future__ import annotations

from secrets import token_hex
from typing import Any, Callable, Optional

import attrs

from twisted.application.service import Service
from twisted.internet import interfaces
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    fail,
    succeed,
)
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcprelay import handshake as hs
from tcprelay.forward import Splice
from tcprelay.relay.config import RelayConfig
from tcprelay.relay.entrances.ports import PortEntrance
from tcprelay.relay.watchdog import Watchdog
from tcprelay.relay.guard import Guard
from tcprelay.relay.interfaces import (
    IAgentSession,
    IRegistry,
    ITunnel,
    IVisitor,
    TunnelUnavailable,
)
from tcprelay.relay.pool import PoolTimeout, PortPool
from tcprelay.relay.pooled import PooledTunnel
from tcprelay.relay.registry import MemoryRegistry
from tcprelay.relay.routes import NAME_KINDS, NameRoute, PortRoute, wildcards
from tcprelay.relay.sniff import normalise_name
from tcprelay.relay.stats import RelayStats
from tcprelay.secrets import CredentialRules, credential_id, read_secrets_file

__all__ = ["Relay", "Visitor"]


@implementer(IVisitor)
class RouteRefused(Exception):
    """A route cannot be given to this agent; the message says why, and
    ``retry`` whether asking again later may succeed (a name now taken)."""

    def __init__(self, reason: str, retry: bool = False, owner: Optional[str] = None) -> None:
        super().__init__(reason)
        self.retry = retry
        self.owner = owner
        """In a cluster: the node that holds the route (None: not held
        elsewhere, e.g. the cluster's registry is unreachable)."""


class Visitor:
    """A visitor a tunnel opens a stream for (see :class:`IVisitor`)."""

    __slots__ = ("peer", "first", "dialled", "_waiting")

    def __init__(
        self,
        peer: interfaces.IAddress,
        first: bytes,
        dialled: Optional[interfaces.IAddress] = None,
    ) -> None:
        self.peer = peer
        self.first = first
        self.dialled = dialled
        """The address the visitor dialled when it is not its transport's own
        (a visitor another node of the cluster forwarded), else None."""
        self._waiting: Optional[list[Callable[[Any], None]]] = None

    def when_connected(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback`` with the visitor's transport once it is connected."""
        if self._waiting is None:
            self._waiting = []
        self._waiting.append(callback)

    def _linked(self, splice: Splice) -> None:
        waiting, self._waiting = self._waiting or [], None
        for callback in waiting:
            callback(splice.visitor.transport)


class Relay(Service):
    """
    The registry of routes and tunnels with what surrounds it: the port
    pool, the ports entrance, the counters, the agent sessions of every
    door, and the drain.  ``stopService`` drains.
    """

    log = Logger()
    name = "public"

    def __init__(
        self,
        config: RelayConfig,
        pool: PortPool,
        reactor: Any,
        registry: Optional[IRegistry] = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.reactor = reactor
        self.registry: IRegistry = (
            registry if registry is not None else MemoryRegistry(reactor, self._lease_expired)
        )
        self.ports = PortEntrance(self)
        self.stats = RelayStats()
        self.sessions: set[IAgentSession] = set()
        """Every agent connection of every door, registered or not."""
        self.secrets: list[bytes] = list(config.secrets)
        self.rules: dict[str, CredentialRules] = dict(config.rules)
        """What each credential may claim (see :meth:`rules_for`)."""
        self.guard = Guard(self, config.limits)
        """The edge limits (:mod:`tcprelay.relay.guard`)."""
        self.config_source: Optional[Callable[[], RelayConfig]] = None
        """Where :meth:`reload_config` gets a fresh config (None: only the
        secrets file is re-read); raises ValueError for a bad one."""
        self.draining = False
        self._idle_waiters: list[Deferred[None]] = []
        self.key_rules: dict[str, Optional[CredentialRules]] = {}
        """Rules of credentials that are not secrets (an SSH key's options),
        set by their door as they log in."""
        self.watchdog = Watchdog(self)
        self._pooled_leases: dict[Any, str] = {}
        """Routes of ended pools held for a lease: the lease's token."""
        self.cluster: Optional[Any] = None
        """The :class:`tcprelay.relay.cluster.Cluster` this relay is a node
        of (``--cluster``), or None: claims are then decided here alone."""

    # -- credentials -------------------------------------------------------

    def credential_for(self, nonce: str, mac: object) -> Optional[str]:
        """
        The id of the secret ``mac`` proves (HMAC over ``nonce``), or None
        when it proves none.  Only meaningful while :attr:`secrets` is set.
        """
        secret = hs.matching_secret(self.secrets, nonce, mac)
        return None if secret is None else credential_id(secret)

    def reload_secrets(self) -> bool:
        """
        Re-read the secrets file (SIGHUP).  A file that cannot be read or
        holds no secret is refused with a log line and the old secrets stay.
        Sessions are untouched either way.
        """
        path = self.config.secrets_file
        if path is None:
            self.log.info("SIGHUP: no --secrets-file to reload")
            return False
        try:
            parsed = read_secrets_file(path)
        except (OSError, ValueError) as e:
            self.log.warn(
                "SIGHUP: secrets file {path} refused ({error}); keeping {count} old secrets",
                path=path,
                error=str(e),
                count=len(self.secrets),
            )
            return False
        self.secrets = list(self.config.secrets_inline) + parsed.secrets
        self.rules = dict(parsed.rules)
        self.log.info(
            "SIGHUP: reloaded {count} secrets from {path}", count=len(self.secrets), path=path
        )
        return True

    def rules_for(self, credential: Optional[str]) -> Optional[CredentialRules]:
        """What ``credential`` may claim; None when it may claim anything
        (no rules for it, or no authentication)."""
        if credential is None:
            return None
        if credential in self.key_rules:  # an SSH key's permitlisten
            return self.key_rules[credential]
        if not self.secrets:
            return None
        return self.rules.get(credential)

    RELOADABLE = ("secrets", "limits", "rules")
    """What :meth:`reload_config` changes in a running relay."""

    def reload_config(self) -> bool:
        """
        Reload what can change without a restart (SIGHUP): with a
        :attr:`config_source` (``--config``), the secrets and the limits
        from a fresh config, else :meth:`reload_secrets`.  A bad config is
        refused with one log line and every old setting stays; changes to
        settings that need a restart are logged and ignored.
        """
        source = self.config_source
        if source is None:
            return self.reload_secrets()
        where = self.config.config_file or "the configuration"
        try:
            fresh = source()
        except (OSError, ValueError) as e:
            self.log.warn(
                "SIGHUP: {path} refused ({error}); keeping the old settings",
                path=where,
                error=str(e),
            )
            return False
        old = self.config
        ignored = [
            f.name
            for f in attrs.fields(RelayConfig)
            if f.name not in self.RELOADABLE
            and f.name not in ("secrets_inline", "config_file")
            and getattr(old, f.name) != getattr(fresh, f.name)
        ]
        self.config = attrs.evolve(
            old, secrets=fresh.secrets, limits=fresh.limits, rules=fresh.rules
        )
        self.secrets = list(fresh.secrets)
        self.rules = dict(fresh.rules)
        self.guard.configure(fresh.limits)
        self.log.info(
            "SIGHUP: reloaded {path} ({count} secrets){ignored}",
            path=where,
            count=len(self.secrets),
            ignored=f"; needs a restart, ignored: {', '.join(ignored)}" if ignored else "",
        )
        return True

    # -- routes: claimed by doors -----------------------------------------

    def claim_port(
        self,
        wanted: Optional[int],
        lease: Optional[str],
        credential: Optional[str],
        on_queued: Callable[[int], None],
        pool: bool = False,
    ) -> Deferred[PortRoute]:
        """
        A listening public port for an agent: the one its ``lease`` holds
        (when ``credential`` created it), else ``wanted`` if free, else the
        pool's next one, queueing (``on_queued`` is told each position) up
        to the wait timeout (then :class:`PoolTimeout`).  A port that cannot
        be bound is quarantined and the next one tried.  Cancelling the
        Deferred leaves the queue.

        A credential with port rules (:meth:`rules_for`) gets only a port
        they allow, and never queues: ``wanted`` outside them fails with
        :class:`RouteRefused` (for good), and when none of its ports is
        free, with ``retry``.

        With ``pool`` (and a ``wanted`` port) the agent joins the pool
        serving ``wanted`` when its credential is the pool's, takes it up
        when free or held for a lease of its pool, and is refused
        (:class:`RouteRefused`, retry) rather than given another port.
        """
        rules = self.rules_for(credential)
        allowed = None if rules is None else rules.ports
        if pool and wanted:
            joined = self._pool_to_join(PortRoute(wanted, self.config.public_host), credential)
            if isinstance(joined, RouteRefused):
                return fail(joined)
            if joined is not None:
                return succeed(joined)  # type: ignore[arg-type]
            pooled_lease = self._pooled_lease(PortRoute(wanted), credential)
            if pooled_lease is not None:
                lease = pooled_lease
        acquiring: list[Optional[Deferred[int]]] = [None]

        def cancel(_: Deferred[PortRoute]) -> None:
            d, acquiring[0] = acquiring[0], None
            if d is not None:
                d.cancel()

        result: Deferred[PortRoute] = Deferred(cancel)

        def try_port(port: int, claimed: bool = False) -> None:
            acquiring[0] = None
            if result.called:  # cancelled meanwhile
                self.pool.release(port)
                return
            route = PortRoute(port, self.config.public_host)
            cluster = self.cluster
            if cluster is not None and not claimed:
                # the whole cluster must agree first (one Lua script in Redis)
                claim = cluster.claim(route, credential, lease, pool)
                claim.addCallbacks(lambda _: claimed_port(route), lambda f: refused(route, f))
                return
            try:
                self.ports.listen(route)
            except CannotListenError as e:
                if cluster is not None:
                    cluster.release(route)
                self.pool.quarantine(port)
                self.log.warn(
                    "cannot listen on public port {port}: {error}",
                    port=port,
                    error=str(e.socketError),
                    service_port=port,
                )
                next_port()
                return
            result.callback(route)

        def claimed_port(route: PortRoute) -> None:
            if result.called:  # cancelled meanwhile
                self.cluster.release(route)
                self.pool.release(route.port)
                return
            try_port(route.port, True)

        def refused(route: PortRoute, failure: Failure) -> None:
            owner = getattr(failure.value, "owner", None)
            if owner is not None:
                self.cluster.give_back_remote(route.port, owner)
            else:
                self.pool.release(route.port)
            if result.called:
                return
            if owner is None or (pool and wanted == route.port):
                result.errback(failure)
            else:
                next_port()

        def failed(failure: Failure) -> None:
            acquiring[0] = None
            if not result.called:
                result.errback(failure)
            elif not failure.check(CancelledError):
                self.log.failure("acquiring a port", failure)

        def next_port() -> None:
            if allowed is not None:
                next_allowed_port()
                return
            d = self.pool.acquire(self.config.wait_timeout, on_queued)
            acquiring[0] = d
            d.addCallbacks(try_port, failed)

        def next_allowed_port() -> None:
            assert allowed is not None
            for port in self.pool.ports:
                if port in allowed and self.pool.take(port):
                    try_port(port)
                    return
            if any(port in allowed for port in self.pool.ports):
                refusal = RouteRefused(
                    f"no allowed port free for credential {credential}", retry=True
                )
            else:
                refusal = RouteRefused(
                    f"none of the ports allowed for credential {credential} "
                    "is in this relay's range"
                )
            result.errback(refusal)

        def forget(outcome: object) -> object:
            # try_port and next_port call each other: a cycle through their
            # closures, which hold on_queued and the agent's handshake it
            # belongs to; reference counting alone would never free it.
            # Every step checks result.called before it takes another.
            nonlocal try_port, next_port
            del try_port, next_port
            return outcome

        result.addBoth(forget)
        held = self.registry.resume_lease(lease, credential) if lease else None
        if isinstance(held, PortRoute) and allowed is not None and held.port not in allowed:
            self.pool.release(held.port)  # the rules changed since (SIGHUP)
            if wanted == held.port:  # a reconnecting agent asks for its old port
                wanted = None
            held = None
        if isinstance(held, PortRoute):
            try_port(held.port)
        elif wanted and allowed is not None and wanted not in allowed:
            result.errback(
                RouteRefused(f"port {wanted} is not allowed for credential {credential}")
            )
        elif wanted and (
            self.pool.take(wanted) or (self.cluster is not None and self.cluster.take_remote(wanted))
        ):
            try_port(wanted)
        elif pool and wanted:
            result.errback(RouteRefused(f"port {wanted} is taken", retry=True))
        else:
            next_port()
        return result

    def claim_name(
        self,
        kind: str,
        requested: str,
        lease: Optional[str],
        credential: Optional[str],
        pool: bool = False,
    ) -> Deferred[NameRoute]:
        """
        The named route of ``kind`` an agent asks for (see
        :meth:`_claim_name_here`), as a Deferred: in a cluster, the route
        must also be free in the whole cluster (or pooled, or held for the
        agent's lease, by another node), which takes a round trip to Redis;
        it fails with :class:`RouteRefused` (also while another claim of
        the name is under way: :meth:`Cluster.claim`).
        """
        try:
            route, settled = self._claim_name_here(kind, requested, lease, credential, pool)
        except RouteRefused as e:
            return fail(e)
        cluster = self.cluster
        if cluster is None or settled:
            return succeed(route)
        return cluster.claim(route, credential, lease, pool).addCallback(lambda _: route)

    def _claim_name_here(
        self,
        kind: str,
        requested: str,
        lease: Optional[str],
        credential: Optional[str],
        pool: bool = False,
    ) -> tuple[NameRoute, bool]:
        """
        The named route of ``kind`` (``http``, ``tls``) an agent asks for:
        ``requested`` is a label (``app``: ``app.`` + the first
        ``--domain``), a wildcard label (``*.app``), a name relative to the
        first domain (``api.app``), or a full name under one of the domains
        (a trailing dot makes a name absolute: it must be under one).  Raises :class:`RouteRefused` when the relay has
        no such entrance or domain, the name is not a host name, the
        credential's rules (:meth:`rules_for`) do not allow it, or another
        agent serves it or holds it for its lease.  With ``pool``, an agent
        whose credential is that of the pool serving the name joins it, or
        takes up the lease its pool's last agent left.  Returns the route
        and whether this relay has settled it alone (a pool joined or a
        lease resumed here: nothing to ask the cluster).
        """
        config = self.config
        if kind not in NAME_KINDS:
            raise RouteRefused(f"unknown route kind {kind!r}")
        port = config.http_port if kind == "http" else config.tls_port
        if port is None:
            raise RouteRefused(f"this relay has no {kind} entrance")
        if not config.domains:
            raise RouteRefused("this relay serves no names (no --domain)")
        name = normalise_name(requested)
        if name is None:
            raise RouteRefused(f"{requested!r} is not a host name")
        bare = name[2:] if name.startswith("*.") else name
        if not any(bare == d or bare.endswith("." + d) for d in config.domains):
            if requested.strip().endswith("."):  # absolute: not relative to a domain
                raise RouteRefused(
                    f"{requested!r} is under none of this relay's domains "
                    f"({', '.join(config.domains)})"
                )
            name = f"{name}.{config.domains[0]}"
            bare = name[2:] if name.startswith("*.") else name
        if bare in config.domains:
            raise RouteRefused(f"{requested!r} is a domain of the relay itself")
        default = 80 if kind == "http" else 443
        scheme = "http" if kind == "http" else "https"
        shown = bare if not name.startswith("*.") else name
        url = f"{scheme}://{shown}{'' if port == default else f':{port}'}/"
        route = NameRoute(kind, name, url, port)
        rules = self.rules_for(credential)
        if rules is not None and not rules.allows_name(name, config.domains):
            raise RouteRefused(f"{kind} name {name} is not allowed for credential {credential}")
        if pool:
            joined = self._pool_to_join(route, credential)
            if isinstance(joined, RouteRefused):
                raise joined
            if joined is not None:
                return joined, True
            lease = self._pooled_lease(route, credential) or lease
        if self.registry.lookup(route) is not None:
            raise RouteRefused(f"{kind} name {name} is taken", retry=True)
        held = self.registry.lease_of(route)
        if held is not None:
            if held.token != lease or self.registry.resume_lease(lease, credential) != route:
                raise RouteRefused(f"{kind} name {name} is held for its agent's lease", retry=True)
            return route, True
        return route, False

    def _pool_to_join(self, route: Any, credential: Optional[str]) -> Any:
        """
        For a pooled claim of ``route``: the route of the pool serving it
        that ``credential`` may join; a :class:`RouteRefused` when another
        credential's pool or an unpooled tunnel serves it; None when
        nothing does.
        """
        current = self.registry.lookup(route)
        if current is None:
            return None
        what = f"port {route.name}" if route.kind == "port" else f"{route.kind} name {route.name}"
        if not isinstance(current, PooledTunnel):
            return RouteRefused(f"{what} is taken (not pooled)", retry=True)
        if not current.admits(credential):
            return RouteRefused(f"{what} is pooled for another credential", retry=True)
        return current.route

    def _pooled_lease(self, route: Any, credential: Optional[str]) -> Optional[str]:
        """The token of the lease holding ``route`` for an ended pool of
        ``credential`` (any agent of that pool may take it up), or None."""
        token = self._pooled_leases.get(route)
        if token is None:
            return None
        held: Any = self.registry.lease_of(route)
        if held is None or held.token != token:
            del self._pooled_leases[route]  # expired or taken up
            return None
        return token if held.credential == credential else None

    def find_named(self, kind: str, name: str) -> Optional[ITunnel]:
        """The tunnel for a visitor of ``kind`` asking for ``name``: the exact
        name first, then the wildcards that cover it, most specific first."""
        lookup = self.registry.lookup
        tunnel = lookup(NameRoute(kind, name))
        if tunnel is not None:
            return tunnel  # type: ignore[no-any-return]
        for wildcard in wildcards(name):
            tunnel = lookup(NameRoute(kind, wildcard))
            if tunnel is not None:
                return tunnel  # type: ignore[no-any-return]
        return None

    def publish(self, route: PortRoute, tunnel: ITunnel, pool: bool = False) -> None:
        """
        ``tunnel`` serves ``route`` (claimed with :meth:`claim_port`) from
        now on.  With ``pool`` it joins the route's :class:`PooledTunnel`,
        or starts one: the registry holds the pool, not ``tunnel``.
        """
        if pool:
            current = self.registry.lookup(route)
            if isinstance(current, PooledTunnel):
                current.add(tunnel)
            else:
                pooled = PooledTunnel(route, tunnel.credential)
                pooled.add(tunnel)
                self.registry.add(route, pooled)
        else:
            self.registry.add(route, tunnel)
        # the door's session behind the tunnel is no longer pending
        self.guard.session_registered(getattr(tunnel, "control", tunnel))
        if self.cluster is not None:
            self.cluster.soon()  # its lease token, once the door has given it

    def unpublish(
        self, tunnel: ITunnel, lease: Optional[tuple[str, Optional[str]]] = None
    ) -> Deferred[None]:
        """
        ``tunnel`` is gone: its route leaves the registry and its public
        port closes; the port is then held for ``lease`` (token,
        credential) unless the relay is draining, or freed.  A member of a
        pool only leaves the pool, unless it is the last one: the pool
        ends, and the route is released as a single tunnel's is.
        """
        route = tunnel.route
        current = self.registry.lookup(route)
        if isinstance(current, PooledTunnel) and tunnel in current:
            if not current.remove(tunnel):
                return succeed(None)  # the others keep the route
            self.registry.remove(route, current)
            current.ended.callback(None)
            if lease is not None and not self.draining:
                self._pooled_leases[route] = lease[0]
        self.registry.remove(route, tunnel)
        self.guard.service_gone(route)
        return self.release_route(route, None if self.draining else lease)

    def release_route(
        self, route: PortRoute, lease: Optional[tuple[str, Optional[str]]] = None
    ) -> Deferred[None]:
        """
        Stop listening on ``route``'s port, then free the port or hold it for
        ``lease``; nothing when that was done already (idempotent).
        """
        if isinstance(route, NameRoute):
            # no listener of its own: the name is held, or simply free
            if lease is not None and not self.draining:
                token, credential = lease
                self.registry.hold_lease(token, route, credential, self.config.lease)
            elif self.cluster is not None and self.registry.lookup(route) is None:
                self.cluster.release(route)
            return succeed(None)
        closing = self.ports.close(route)
        if closing is None:
            return succeed(None)

        def free(_: object) -> None:
            if lease is not None and not self.draining:
                token, credential = lease
                self.registry.hold_lease(token, route, credential, self.config.lease)
            else:
                self.pool.release(route.port)
                if self.cluster is not None:
                    self.cluster.release(route)

        return closing.addBoth(free)

    def new_lease_token(self) -> str:
        """A fresh, unguessable lease token."""
        return token_hex(16)

    def _lease_expired(self, route: Any) -> None:
        self._pooled_leases.pop(route, None)
        if isinstance(route, PortRoute):
            self.pool.release(route.port)
        if self.cluster is not None and self.registry.lookup(route) is None:
            self.cluster.release(route)

    # -- visitors: brought by entrances -----------------------------------

    def splice_visitor(
        self,
        tunnel: ITunnel,
        peer: interfaces.IAddress,
        first: bytes,
        dialled: Optional[interfaces.IAddress] = None,
    ) -> Optional[Any]:
        """
        Splice a new visitor from ``peer``, who has already sent ``first``,
        to a new stream of ``tunnel``: the protocol to run on the visitor's
        transport, or None (counted as refused) when the tunnel cannot.
        ``dialled`` is the address the visitor connected to when it is not
        that transport's own (a visitor forwarded by another node).
        """
        stats = self.stats
        if self.draining:
            stats.visitors_refused += 1
            return None
        visitor = Visitor(peer, first, dialled)
        try:
            if isinstance(tunnel, PooledTunnel):
                # the member's own visitor: it leaves (or drains) with it
                tunnel = tunnel.pick()
            visitors = tunnel.visitors
            stream = tunnel.open_stream(visitor)
        except TunnelUnavailable:
            stats.visitors_refused += 1
            return None
        splice = Splice()
        splice.bytes_to_service = len(first)
        if visitor._waiting is not None:
            splice.on_linked = visitor._linked
        stream.attach(splice.service)
        visitors.add(splice)
        splice.when_done(self._visitor_done, tunnel, splice)
        stats.visitors_accepted += 1
        self.watchdog.wake()
        return splice.visitor

    def _visitor_done(self, _: None, tunnel: ITunnel, splice: Splice) -> None:
        tunnel.visitors.discard(splice)
        tunnel.bytes_to_service += splice.bytes_to_service
        tunnel.bytes_to_visitor += splice.bytes_to_visitor
        self.stats.bytes_to_service += splice.bytes_to_service
        self.stats.bytes_to_visitor += splice.bytes_to_visitor

    # -- what operators read ----------------------------------------------

    def tunnels(self) -> list[ITunnel]:
        """Every registered tunnel, by route."""
        return [tunnel for _, tunnel in self.registry.routes()]

    def tunnel_at(self, port: int) -> Optional[ITunnel]:
        """The tunnel serving public port ``port``, or None."""
        return self.registry.lookup(PortRoute(port))  # type: ignore[no-any-return]

    def bytes_relayed(self) -> tuple[int, int]:
        """Payload bytes relayed to services and to visitors, open visitors included."""
        to_service, to_visitor = self.stats.bytes_to_service, self.stats.bytes_to_visitor
        for tunnel in self.tunnels():
            for splice in tunnel.visitors:
                to_service += splice.bytes_to_service
                to_visitor += splice.bytes_to_visitor
        return to_service, to_visitor

    @property
    def stream_count(self) -> int:
        """Streams open across every agent session."""
        return sum(s.stream_count() for s in self.sessions)  # type: ignore[attr-defined]

    @property
    def visitor_count(self) -> int:
        """Visitor connections currently spliced."""
        return sum(len(t.visitors) for t in self.tunnels())

    # -- sessions and shutdown --------------------------------------------

    def session_gone(self, session: IAgentSession) -> None:
        """A door's agent connection has closed for good."""
        self.sessions.discard(session)
        self.guard.session_gone(session)
        if not self.sessions:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no agent session remains."""
        if not self.sessions:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def drain(self) -> Deferred[None]:
        """
        Stop accepting visitors and sessions, close every public port, tell
        every session to go away, let open streams finish up to the drain
        timeout, then close what is left.  Fires when every session is gone.
        """
        self.draining = True
        for route in self.registry.release_leases():
            self._lease_expired(route)
        stops = [self.release_route(route) for route, _ in self.registry.routes()]
        for session in list(self.sessions):
            session.drain("relay shutting down")
        idle = self.when_idle()
        timer = self.reactor.callLater(self.config.drain_timeout, self._drain_expired)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()

        idle.addBoth(done)
        return DeferredList([idle, *stops]).addCallback(lambda _: None)

    def _drain_expired(self) -> None:
        if self.sessions:
            self.log.warn(
                "drain timeout: closing {count} sessions with open streams",
                count=len(self.sessions),
            )
        for session in list(self.sessions):
            session.end("drain timeout")

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        d = self.drain()
        d.addBoth(self._stop_watchdog)
        return d

    def _stop_watchdog(self, result: object) -> object:
        self.watchdog.stop()
        return result
