"""
The edge limits' logic (tcprelay.relay.limits) on numbers alone: no
reactor, time is an argument.
"""

from __future__ import annotations

import pytest

from tcprelay.relay.limits import (
    AddressFilter,
    IdleWatch,
    LimitsConfig,
    RefusalLog,
    SessionLimits,
    Tally,
    TokenBucket,
    VisitorLimits,
    ip_key,
    parse_networks,
)


def test_parse_networks_accepts_lists_commas_and_hosts() -> None:
    """Repeated and comma-separated values, IPv4 and IPv6, bare hosts as /32 and /128."""
    nets = parse_networks(["10.0.0.0/8, 192.0.2.7", "2001:db8::/32", ""])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "nonsense", "300.0.0.0/8"])
def test_parse_networks_refuses_bad_values(bad: str) -> None:
    """Host bits set, names and impossible addresses are ValueErrors naming the value."""
    with pytest.raises(ValueError, match="is not a CIDR network"):
        parse_networks([bad])


def test_filter_deny_wins_and_allow_restricts() -> None:
    """Deny beats allow; with an allow list only its networks pass; IPv4-mapped IPv6 counts as IPv4."""
    f = AddressFilter(parse_networks(["10.0.0.0/8", "2001:db8::/32"]), parse_networks(["10.9.0.0/16"]))
    assert f.permits("10.1.2.3")
    assert f.permits("::ffff:10.1.2.3")
    assert f.permits("2001:db8::1")
    assert not f.permits("10.9.1.1")
    assert not f.permits("192.0.2.1")
    assert not f.permits("not-an-ip")
    deny_only = AddressFilter(deny=parse_networks(["192.0.2.0/24"]))
    assert not deny_only.permits("192.0.2.9") and deny_only.permits("198.51.100.1")
    assert deny_only.permits("not-an-ip")
    assert AddressFilter().permits("anything") and not AddressFilter()


def test_ip_key_groups_ipv6_by_64() -> None:
    """IPv4 by address, IPv6 by /64, IPv4-mapped as IPv4, non-IP as None."""
    assert ip_key("192.0.2.1") == "192.0.2.1"
    assert ip_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert ip_key("2001:db8:1:2:3::4") == ip_key("2001:db8:1:2:ffff::") == "2001:db8:1:2::/64"
    assert ip_key("/run/sock") is None


def test_token_bucket_rate_and_burst() -> None:
    """Starts with burst tokens, refills at rate, never above burst."""
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.49)
    assert bucket.take(0.5)  # one token per 0.5 s
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_tally_forgets_empty_keys() -> None:
    """Counts per key and in total; a key back at zero takes no memory; None counts in the total only."""
    tally = Tally()
    for key in ("a", "a", "b", None):
        tally.add(key)
    assert (tally["a"], tally["b"], tally[None], tally.total) == (2, 1, 0, 4)
    for key in ("a", "a", "b", None, "zzz"):
        tally.remove(key)
    assert len(tally) == 0 and tally.total == 0


def test_visitor_limits_each_reason() -> None:
    """Each limit refuses with its own reason; released visitors free their slots."""
    config = LimitsConfig(
        max_visitors=5,
        max_visitors_per_service=3,
        max_visitors_per_ip=2,
        visitor_rate=0,
        addresses=AddressFilter(deny=parse_networks(["192.0.2.0/24"])),
        credentials={"c" * 16: AddressFilter(allow=parse_networks(["10.0.0.0/8"]))},
    )
    limits = VisitorLimits(config)
    assert limits.admit("192.0.2.5", "s1", None, 0) == "denied"
    assert limits.admit("198.51.100.1", "s1", "c" * 16, 0) == "credential_denied"
    assert limits.admit("10.0.0.1", "s1", "c" * 16, 0) is None
    assert limits.admit("10.0.0.1", "s1", None, 0) is None
    assert limits.admit("10.0.0.1", "s2", None, 0) == "ip_limit"
    assert limits.admit("10.0.0.2", "s1", None, 0) is None
    assert limits.admit("10.0.0.3", "s1", None, 0) == "service_limit"
    assert limits.admit("10.0.0.3", "s2", None, 0) is None
    assert limits.admit("10.0.0.4", "s2", None, 0) is None
    assert limits.admit("10.0.0.5", "s3", None, 0) == "relay_limit"
    limits.release("10.0.0.1", "s1")
    assert limits.admit("10.0.0.5", "s3", None, 0) is None
    assert limits.admit("10.0.0.1", "s3", None, 0) == "relay_limit"


def test_visitor_rate_is_per_service() -> None:
    """The bucket is per service; forgetting a service and a changed rate restart it full."""
    limits = VisitorLimits(LimitsConfig(visitor_rate=1.0, visitor_burst=2))
    results = [limits.admit(f"10.0.0.{i}", "s1", None, 0.0) for i in range(3)]
    assert results == [None, None, "rate_limit"]
    assert limits.admit("10.0.0.9", "s2", None, 0.0) is None
    assert limits.admit("10.0.0.9", "s1", None, 1.0) is None
    limits.forget_service("s1")
    assert limits.admit("10.0.0.9", "s1", None, 1.0) is None
    limits.configure(LimitsConfig(visitor_rate=0))
    assert all(limits.admit("10.1.0.1", "s1", None, 1.0) is None for _ in range(10))


def test_session_limits_pending_and_per_ip() -> None:
    """Pending sessions count until registered; per-IP ones until released."""
    limits = SessionLimits(LimitsConfig(max_pending_sessions=2, max_sessions_per_ip=2))
    assert limits.admit("10.0.0.1") is None
    limits.opened("a", "10.0.0.1")
    limits.opened("b", "10.0.0.2")
    assert limits.admit("10.0.0.3") == "pending_limit"
    limits.registered("a")
    assert limits.admit("10.0.0.3") is None
    limits.opened("c", "10.0.0.1")
    assert limits.admit("10.0.0.1") == "pending_limit"
    limits.registered("c")
    assert limits.admit("10.0.0.1") == "ip_limit"
    limits.release("a")
    assert limits.admit("10.0.0.1") is None
    for s in ("b", "c", "never"):
        limits.release(s)
    assert limits.by_ip.total == 0 and not limits.pending


def test_refusal_log_one_line_per_source_per_interval() -> None:
    """A source logs once per interval, then says how many it skipped; memory is capped."""
    log = RefusalLog(interval=10.0, capacity=3, budget=100)
    assert log.should_log("a", 0.0) == 0
    assert [log.should_log("a", t) for t in (1.0, 5.0, 9.9)] == [None, None, None]
    assert log.should_log("b", 1.0) == 0
    assert log.should_log("a", 10.0) == 3
    for key in "cdefg":
        log.should_log(key, 11.0)
    assert len(log) == 3


def test_refusal_log_budget_caps_many_sources() -> None:
    """Many sources at once get at most `budget` lines per interval."""
    log = RefusalLog(interval=10.0, capacity=1000, budget=5)
    lines = [log.should_log(f"10.0.0.{i}", 0.0) for i in range(50)]
    assert sum(x is not None for x in lines) == 5 and log.suppressed == 45
    assert log.should_log("10.0.0.49", 10.0) == 0


def test_idle_watch_between_timeout_and_one_step_more() -> None:
    """Idle once the count stood still for the timeout, sampled every quarter."""
    watch = IdleWatch(timeout=8.0, count=0, now=0.0)
    assert watch.step == 2.0
    assert not watch.idle(0, 6.0)
    assert not watch.idle(5, 6.0)  # bytes moved: the clock restarts
    assert not watch.idle(5, 12.0)
    assert watch.idle(5, 14.0)
