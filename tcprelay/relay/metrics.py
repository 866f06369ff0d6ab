"""
Operator views of a running relay: Prometheus ``/metrics`` and JSON
``/status``, served by twisted.web on ``--metrics ENDPOINT``.

Nothing is counted per chunk for these: the collector reads the relay's own
counters and registrations when scraped.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tcprelay.relay.core import Relay
from tcprelay.relay.pooled import PooledTunnel
from tcprelay.relay.stats import HANDSHAKE_BUCKETS, error_label

__all__ = ["RelayCollector", "status", "metrics_site"]


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat()


class RelayCollector(Collector):
    """Builds every metric family from a :class:`Relay` at scrape time."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Any]:
        relay = self.relay
        pool = relay.pool
        stats = relay.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tcprelay_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"tcprelay_{name}", doc, value=value)

        def by_reason(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
            """A counter by ``reason``: the keys of ``counts`` are a fixed set."""
            family = CounterMetricFamily(f"tcprelay_{name}", doc, labels=["reason"])
            for reason, count in counts.items():
                family.add_metric([reason], count)
            return family

        yield gauge("sessions", "Service sessions connected.", len(relay.sessions))
        yield gauge(
            "services_registered", "Services holding a public port.", len(relay.tunnels())
        )
        yield gauge(
            "pooled_agents",
            "Agents serving a pooled route (each pooled route counts once in services_registered).",
            sum(len(t.members) for t in relay.tunnels() if isinstance(t, PooledTunnel)),
        )
        yield gauge("services_queued", "Services waiting for a free port.", pool.queued)
        yield gauge("port_pool_size", "Public ports in the configured range.", pool.size)
        yield gauge("port_pool_used", "Public ports handed out.", pool.in_use)
        yield gauge("port_pool_free", "Public ports ready to hand out.", pool.free)
        yield gauge(
            "port_pool_quarantined", "Ports set aside after a failed bind.", pool.quarantined
        )
        yield gauge(
            "port_leases_held",
            "Ports held for a lost agent's lease.",
            relay.registry.lease_count(),
        )
        yield gauge("visitors_connected", "Visitor connections open.", relay.visitor_count)
        yield gauge("streams_open", "Mux streams open across sessions.", relay.stream_count)
        yield counter(
            "visitors_accepted", "Visitor connections accepted.", stats.visitors_accepted
        )
        yield counter(
            "visitors_refused", "Visitor connections refused.", stats.visitors_refused
        )
        yield counter(
            "visitors_unrouted",
            "Visitors of a shared entrance asking for a name no route serves.",
            stats.visitors_unrouted,
        )
        yield counter(
            "services_refused",
            "Services turned away (queue timeout, auth).",
            stats.services_refused,
        )
        yield counter("auth_failures", "Failed authentications.", stats.auth_failures)
        yield counter(
            "heartbeat_timeouts",
            "Sessions closed because heartbeats went unanswered.",
            stats.heartbeat_timeouts,
        )
        yield by_reason(
            "visitors_limited",
            "Visitor connections refused by a limit (also in visitors_refused), by reason.",
            stats.visitors_limited,
        )
        yield by_reason(
            "sessions_limited",
            "Control connections refused by a limit, by reason.",
            stats.sessions_limited,
        )
        yield counter(
            "visitors_idle_closed",
            "Visitor connections closed by the idle timeout.",
            stats.visitors_idle_closed,
        )
        to_service, to_visitor = relay.bytes_relayed()
        relayed = CounterMetricFamily(
            "tcprelay_bytes_relayed", "Payload bytes relayed.", labels=["direction"]
        )
        relayed.add_metric(["to_service"], to_service)
        relayed.add_metric(["to_visitor"], to_visitor)
        yield relayed
        errors = CounterMetricFamily(
            "tcprelay_protocol_errors",
            "Sessions ended by a protocol error, by muxado error code.",
            labels=["code"],
        )
        for code, count in sorted(stats.protocol_errors.items()):
            errors.add_metric([error_label(code)], count)
        yield errors
        yield by_reason(
            "visitors_timed_out",
            "Visitor streams ended because the service left them waiting "
            "(unanswered: --open-timeout; half_closed: --half-close-timeout).",
            stats.visitors_timed_out,
        )
        cluster = relay.cluster
        if cluster is not None:
            yield from _cluster_metrics(cluster)
        buckets = []
        running = 0
        for bound, count in zip(HANDSHAKE_BUCKETS, stats.handshake_buckets):
            running += count
            buckets.append((repr(float(bound)) if bound != float("inf") else "+Inf", running))
        yield HistogramMetricFamily(
            "tcprelay_handshake_duration_seconds",
            "Time from a service's handshake to its public port (queueing included).",
            buckets=buckets,
            sum_value=stats.handshake_sum,
        )


def _cluster_metrics(cluster: Any) -> Iterator[Any]:
    """The cluster layer's families: this node's view of every node."""
    node = cluster.node
    up = GaugeMetricFamily(
        "tcprelay_cluster_redis_up", "Whether this node reaches the cluster's Redis.", labels=["node"]
    )
    up.add_metric([node], 1 if cluster.up else 0)
    yield up
    nodes = GaugeMetricFamily(
        "tcprelay_cluster_node_routes",
        "Routes each live node of the cluster serves or holds (as of the last refresh).",
        labels=["node"],
    )
    for info in sorted(cluster.nodes.values(), key=lambda i: i.name):
        nodes.add_metric([info.name], len(info.routes))
    yield nodes
    forwarded = CounterMetricFamily(
        "tcprelay_cluster_forwarded",
        "Visitors handed to another node (out) or from another node (in).",
        labels=["node", "direction"],
    )
    forwarded.add_metric([node, "out"], cluster.stats.forwarded_out)
    forwarded.add_metric([node, "in"], cluster.stats.forwarded_in)
    yield forwarded
    for name, text, value in (
        (
            "tcprelay_cluster_link_failures",
            "Visitors that could not be handed to their route's node.",
            cluster.stats.forward_failures,
        ),
        (
            "tcprelay_cluster_unavailable",
            "Claims refused because the cluster's Redis was unreachable.",
            cluster.stats.claims_refused_unavailable,
        ),
    ):
        counter = CounterMetricFamily(name, text, labels=["node"])
        counter.add_metric([node], value)
        yield counter


def _peer(tunnel: Any) -> str:
    peer = tunnel.peer
    return f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}"


def status(relay: Relay) -> dict[str, Any]:
    """The JSON document served at ``/status``."""
    pool = relay.pool
    to_service, to_visitor = relay.bytes_relayed()
    stats = relay.stats
    services = []
    for tunnel in sorted(relay.tunnels(), key=lambda t: (t.route.kind, getattr(t.route, "port", 0), t.route.name)):
        route = tunnel.route
        pooled = isinstance(tunnel, PooledTunnel)
        members = tunnel.members if pooled else [tunnel]  # type: ignore[attr-defined]
        entry: dict[str, Any] = {
            "address": route.address,
            "route": {"kind": route.kind, "name": route.name},
            "port": getattr(route, "port", None),
            "peer": _peer(tunnel),
            "pooled": pooled,
            "agents": len(members),
            "dialect": tunnel.dialect,
            "connected_since": _iso(tunnel.connected_since),
            "open_streams": tunnel.stream_count(),
            "visitors": len(tunnel.visitors),
            "bytes_to_service": tunnel.bytes_to_service
            + sum(s.bytes_to_service for s in tunnel.visitors),
            "bytes_to_visitor": tunnel.bytes_to_visitor
            + sum(s.bytes_to_visitor for s in tunnel.visitors),
        }
        if pooled:
            entry["members"] = [
                {
                    "peer": _peer(member),
                    "dialect": member.dialect,
                    "connected_since": _iso(member.connected_since),
                    "open_streams": member.stream_count(),
                    "visitors": len(member.visitors),
                }
                for member in members
            ]
        services.append(entry)
    return {
        "sessions": len(relay.sessions),
        "services": services,
        "queued": pool.queued,
        "pool": {
            "size": pool.size,
            "used": pool.in_use,
            "free": pool.free,
            "quarantined": pool.quarantined,
            "leases_held": relay.registry.lease_count(),
        },
        "visitors": {
            "connected": relay.visitor_count,
            "accepted": stats.visitors_accepted,
            "refused": stats.visitors_refused,
            "unrouted": stats.visitors_unrouted,
        },
        "limits": {
            "visitors_refused": dict(stats.visitors_limited),
            "sessions_refused": dict(stats.sessions_limited),
            "visitors_idle_closed": stats.visitors_idle_closed,
        },
        "bytes_relayed": {"to_service": to_service, "to_visitor": to_visitor},
        "services_refused": stats.services_refused,
        "auth_failures": stats.auth_failures,
        "heartbeat_timeouts": stats.heartbeat_timeouts,
        "protocol_errors": {error_label(c): n for c, n in sorted(stats.protocol_errors.items())},
        "visitors_timed_out": dict(stats.visitors_timed_out),
        "draining": relay.draining,
        **({"cluster": relay.cluster.status()} if relay.cluster is not None else {}),
    }


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(self.registry)


class _Status(Resource):
    isLeaf = True

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(status(self.relay), indent=2).encode("utf-8") + b"\n"


class _QuietSite(Site):
    """No access-log line per scrape."""

    def log(self, request: Request) -> None:
        pass


def metrics_site(relay: Relay) -> Site:
    """A twisted.web Site serving ``/metrics`` and ``/status``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RelayCollector(relay))
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry))
    root.putChild(b"status", _Status(relay))
    site = _QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
