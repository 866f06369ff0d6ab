"""
The relay's edge limits as plain logic, with no I/O and no reactor: every
function and class takes the time it needs as an argument (``now``, in
seconds of any monotonic clock), so it is tested with numbers alone.

- :class:`LimitsConfig`: the limits an operator sets (options of ``twistd
  tcprelay``, reloadable on SIGHUP).
- :class:`AddressFilter`: CIDR allow and deny lists.
- :class:`TokenBucket`: new connections per second (rate and burst).
- :class:`Tally`: open connections per key (a visitor's IP, a service).
- :class:`VisitorLimits`, :class:`SessionLimits`: the admission decisions,
  by a fixed set of reasons (:data:`VISITOR_REASONS`, :data:`SESSION_REASONS`).
- :class:`RefusalLog`: at most one log line per source per interval,
  bounded in memory.
- :class:`IdleWatch`: whether a connection's byte count stood still long
  enough.

The Twisted hooks around them are in :mod:`tcprelay.relay.guard`.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Hashable, Iterable, Mapping, Optional, Union

import attrs

__all__ = [
    "SESSION_REASONS",
    "VISITOR_REASONS",
    "AddressFilter",
    "IdleWatch",
    "LimitsConfig",
    "RefusalLog",
    "SessionLimits",
    "Tally",
    "TokenBucket",
    "VisitorLimits",
    "ip_key",
    "parse_networks",
]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

VISITOR_REASONS = (
    "denied",
    "credential_denied",
    "ip_limit",
    "service_limit",
    "relay_limit",
    "rate_limit",
)
"""Why a visitor may be refused by a limit: the only values of the
``reason`` label of ``tcprelay_visitors_limited_total``."""

SESSION_REASONS = ("ip_limit", "pending_limit")
"""Why a control connection may be refused by a limit (label ``reason`` of
``tcprelay_sessions_limited_total``)."""

IPV6_PREFIX = 64
"""IPv6 visitors and agents are counted by their /64: one host usually has
a whole /64 to pick addresses from."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """
    CIDR networks from ``values``, each one or more comma-separated
    networks or addresses (``10.0.0.0/8``, ``2001:db8::/32``,
    ``192.0.2.7``).  Host bits must be zero.  ValueError otherwise.
    """
    found: list[Network] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                found.append(ipaddress.ip_network(part))
            except ValueError as e:
                raise ValueError(f"{part!r} is not a CIDR network ({e})") from None
    return tuple(found)


def _address(host: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_key(host: str) -> Optional[str]:
    """
    What a peer's address is counted and logged by: the IPv4 address
    (IPv4-mapped IPv6 addresses included), the /64 of an IPv6 one, or None
    when it is no IP address (a UNIX socket's peer: not limited per IP).
    """
    address = _address(host)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


@attrs.frozen
class AddressFilter:
    """
    Allow and deny lists: an address is permitted when no ``deny`` network
    holds it and, if ``allow`` is not empty, an ``allow`` network does.
    Deny wins.  An address that is no IP address is permitted only when
    there is no allow list.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def permits(self, host: str) -> bool:
        """Whether the peer at ``host`` (an IP address string) may connect."""
        if not (self.allow or self.deny):
            return True
        address = _address(host)
        if address is None:
            return not self.allow
        for network in self.deny:
            if address.version == network.version and address in network:
                return False
        if not self.allow:
            return True
        return any(address.version == n.version and address in n for n in self.allow)


@attrs.frozen
class LimitsConfig:
    """The edge limits; 0 turns a count or rate limit off."""

    max_visitors: int = 100000
    """Visitor connections open at once, relay-wide."""
    max_visitors_per_service: int = 20000
    """Visitor connections open at once to one service."""
    max_visitors_per_ip: int = 16384
    """Visitor connections open at once from one IP (IPv6: one /64), relay-wide."""
    visitor_rate: float = 5000.0
    """New visitor connections per second per service (token bucket rate)."""
    visitor_burst: int = 10000
    """New visitor connections a service may take at once (bucket size)."""
    max_sessions_per_ip: int = 2048
    """Control connections open at once from one IP (IPv6: one /64)."""
    max_pending_sessions: int = 4096
    """Control connections that have not registered yet, in total."""
    idle_timeout: float = 0.0
    """Seconds without a byte either way before a visitor is closed (0: never)."""
    addresses: AddressFilter = AddressFilter()
    """Visitor addresses, relay-wide."""
    credentials: Mapping[str, AddressFilter] = attrs.field(factory=dict)
    """Visitor addresses of the services of one credential, by credential id."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(float(burst), 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Take one token if there is one (refilled up to ``now``)."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Tally:
    """
    Open things per key; keys with none are forgotten (memory follows the
    open count).  The key None is counted in the total only.
    """

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[Hashable, int] = {}
        self.total = 0

    def __getitem__(self, key: Hashable) -> int:
        return 0 if key is None else self.counts.get(key, 0)

    def add(self, key: Hashable) -> None:
        self.total += 1
        if key is not None:
            self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, key: Hashable) -> None:
        if key is None:
            self.total = max(0, self.total - 1)
            return
        count = self.counts.get(key, 0)
        if count <= 0:
            return
        self.total -= 1
        if count == 1:
            del self.counts[key]
        else:
            self.counts[key] = count - 1

    def __len__(self) -> int:
        return len(self.counts)


class VisitorLimits:
    """
    Admission of visitors: :meth:`admit` decides (and counts the admitted
    one), :meth:`release` forgets a visitor whose connection ended, and
    :meth:`forget_service` a service that left (its rate bucket).
    ``service`` is any hashable naming a service (its route).
    """

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.by_ip = Tally()
        self.by_service = Tally()
        self.buckets: dict[Hashable, TokenBucket] = {}

    def configure(self, config: LimitsConfig) -> None:
        """New limits (a reload): open connections stay; buckets restart full."""
        if (config.visitor_rate, config.visitor_burst) != (
            self.config.visitor_rate,
            self.config.visitor_burst,
        ):
            self.buckets.clear()
        self.config = config

    def admit(
        self, host: str, service: Hashable, credential: Optional[str], now: float
    ) -> Optional[str]:
        """
        None when the visitor from ``host`` may reach ``service`` (then it is
        counted until :meth:`release`), else the reason (one of
        :data:`VISITOR_REASONS`).
        """
        config = self.config
        if not config.addresses.permits(host):
            return "denied"
        if credential is not None and config.credentials:
            per_credential = config.credentials.get(credential)
            if per_credential is not None and not per_credential.permits(host):
                return "credential_denied"
        key = ip_key(host)
        if config.max_visitors and self.by_ip.total >= config.max_visitors:
            return "relay_limit"
        if config.max_visitors_per_service and (
            self.by_service[service] >= config.max_visitors_per_service
        ):
            return "service_limit"
        if config.max_visitors_per_ip and self.by_ip[key] >= config.max_visitors_per_ip:
            return "ip_limit"
        if config.visitor_rate:
            bucket = self.buckets.get(service)
            if bucket is None:
                bucket = self.buckets[service] = TokenBucket(
                    config.visitor_rate, config.visitor_burst, now
                )
            if not bucket.take(now):
                return "rate_limit"
        self.by_ip.add(key)
        self.by_service.add(service)
        return None

    def release(self, host: str, service: Hashable) -> None:
        """An admitted visitor's connection ended."""
        self.by_ip.remove(ip_key(host))
        self.by_service.remove(service)

    def forget_service(self, service: Hashable) -> None:
        """``service`` left: drop its rate bucket."""
        self.buckets.pop(service, None)


class SessionLimits:
    """
    Admission of control connections: :meth:`admit` (counted until
    :meth:`release`), :meth:`registered` once one has registered (it no
    longer counts as pending).  ``session`` is any hashable naming it.
    """

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.by_ip = Tally()
        self.pending: set[Hashable] = set()
        self._hosts: dict[Hashable, Optional[str]] = {}

    def configure(self, config: LimitsConfig) -> None:
        self.config = config

    def admit(self, host: str) -> Optional[str]:
        """None when a connection from ``host`` may be accepted, else the reason."""
        config = self.config
        if config.max_pending_sessions and len(self.pending) >= config.max_pending_sessions:
            return "pending_limit"
        if config.max_sessions_per_ip and self.by_ip[ip_key(host)] >= config.max_sessions_per_ip:
            return "ip_limit"
        return None

    def opened(self, session: Hashable, host: str) -> None:
        """An admitted connection's session exists: count it (pending)."""
        key = ip_key(host)
        self._hosts[session] = key
        self.by_ip.add(key)
        self.pending.add(session)

    def registered(self, session: Hashable) -> None:
        self.pending.discard(session)

    def release(self, session: Hashable) -> None:
        """The session's connection is gone."""
        self.pending.discard(session)
        if session in self._hosts:
            self.by_ip.remove(self._hosts.pop(session))


class RefusalLog:
    """
    Which refusals to log: at most one line per source (key) per
    ``interval`` seconds, and at most ``budget`` lines per interval in all;
    at most ``capacity`` sources remembered (the oldest are forgotten first,
    and may then be logged again sooner).
    """

    def __init__(self, interval: float = 60.0, capacity: int = 4096, budget: int = 100) -> None:
        self.interval = interval
        self.capacity = capacity
        self.budget = budget
        self._last: OrderedDict[str, list[float]] = OrderedDict()
        """Per source: [time of its last line, refusals not logged since]."""
        self._window = 0.0
        self._lines = 0
        self.suppressed = 0
        """Refusals not logged because the overall budget was spent."""

    def __len__(self) -> int:
        return len(self._last)

    def should_log(self, key: str, now: float) -> Optional[int]:
        """
        None when this refusal is not to be logged; otherwise how many
        refusals of ``key`` went unlogged since its previous line.
        """
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        if now - self._window >= self.interval:
            self._window = now
            self._lines = 0
        if self._lines >= self.budget:
            self.suppressed += 1
            if entry is not None:
                entry[1] += 1
            return None
        self._lines += 1
        skipped = 0 if entry is None else int(entry[1])
        if entry is not None:
            self._last.move_to_end(key)
            entry[0], entry[1] = now, 0
        else:
            self._last[key] = [now, 0]
            while len(self._last) > self.capacity:
                self._last.popitem(last=False)
        return skipped


class IdleWatch:
    """
    Whether a connection went ``timeout`` seconds without a byte, from its
    byte count sampled every ``step`` seconds (a quarter of the timeout):
    it is found idle between ``timeout`` and ``timeout + step`` seconds
    after its last byte, and the byte path is never touched.
    """

    __slots__ = ("timeout", "step", "count", "since")

    def __init__(self, timeout: float, count: int, now: float) -> None:
        self.timeout = timeout
        self.step = timeout / 4
        self.count = count
        self.since = now

    def idle(self, count: int, now: float) -> bool:
        """Sample the byte count ``count`` at ``now``: True once it stood still for the timeout."""
        if count != self.count:
            self.count = count
            self.since = now
            return False
        return now - self.since >= self.timeout - 1e-9
