"""
Which credential may claim what: the ``#:`` rules lines of a secrets file
(parsing), and the relay enforcing them on real agents in process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from tcprelay.agent.client import Agent, AgentConfig, AgentRefused
from tcprelay.relay.sniff import normalise_name
from tcprelay.secrets import (
    credential_id,
    parse_secrets,
    read_secrets,
    read_secrets_file,
)
from tcprelay.testing import RelayFixture, free_port_block, free_ports
from tests.relay_helpers import bounded, wait_for

DOMAIN = "example.test"

# -- parsing ------------------------------------------------------------------


def test_a_file_without_rules_means_what_it_always_meant() -> None:
    """Old files: every line a secret (inner blanks included), comments skipped, no rules."""
    data = b"# team secrets\n\n  alpha  \nbeta gamma\tdelta\n#names=app\n"
    parsed = parse_secrets(data)
    assert parsed.secrets == [b"alpha", b"beta gamma\tdelta"]
    assert parsed.rules == {}


def test_rules_lines_belong_to_the_next_secret() -> None:
    parsed = parse_secrets(
        b"free-for-all\n"
        b"#: names=app,*.app,API-*  ports=9000-9002,9100\n"
        b"# an ordinary comment between\n"
        b"team a secret\n"
        b"#: names=*\n"
        b"#: ports=*\n"
        b"team-b\n"
        b"#: ports=9005\n"
        b"team-c\n"
    )
    assert parsed.secrets == [b"free-for-all", b"team a secret", b"team-b", b"team-c"]
    assert credential_id(b"free-for-all") not in parsed.rules
    a = parsed.rules[credential_id(b"team a secret")]
    assert a.names == ("app", "*.app", "api-*")
    assert a.ports == frozenset({9000, 9001, 9002, 9100})
    b = parsed.rules[credential_id(b"team-b")]
    assert b.names is None and b.ports is None, "* allows any"
    c = parsed.rules[credential_id(b"team-c")]
    assert c.names == () and c.ports == frozenset({9005}), "a key left out allows nothing"
    assert not c.allows_name("anything.example.test", [DOMAIN])


def test_the_agent_reads_a_file_with_rules_as_before() -> None:
    """read_secrets (the agent's --secret-file) skips rules lines as comments."""
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".secrets") as f:
        f.write(b"#: names=app\nteam-a\n")
        f.flush()
        assert read_secrets(f.name) == [b"team-a"]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"a\n#: names=app\n", "line 2: rules with no secret after them"),
        (b"#: nmes=app\na\n", "line 1: unknown rule 'nmes'"),
        (b"#: app\na\n", "line 1: 'app' is not KEY=VALUE"),
        (b"#:\na\n", "line 1: an empty rules line"),
        (b"x\n\n#: ports=9000-80\na\n", "line 3: ports: port range '9000-80' must satisfy"),
        (b"#: ports=http\na\n", "line 1: ports: port range 'http' is not LOW-HIGH"),
        (b"#: names=a/b\na\n", "line 1: names: 'a/b' is not a name pattern"),
        (b"#: names=a names=b\na\n", "line 1: names= given twice"),
        (b"#: names=a\n#: names=b\na\n", "line 2: names= given twice for one secret"),
        (b"#: names=a\nsame\nsame\n", "line 3: secret repeated with rules (first on line 2)"),
        (b"#: names=a\n# only comments\n", "line 1: rules with no secret after them"),
    ],
)
def test_a_bad_rules_line_is_an_error_naming_the_line(data: bytes, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_secrets(data)
    assert str(caught.value).startswith(message)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_bytes(b"#: ports=x\na\n")
    with pytest.raises(ValueError, match=rf"^{path}: line 1: ports:"):
        read_secrets_file(str(path))
    path.write_bytes(b"# nothing\n")
    with pytest.raises(ValueError, match=rf"^{path} holds no secret$"):
        read_secrets_file(str(path))


def test_name_patterns_match_the_label_under_a_domain_or_the_whole_name() -> None:
    rules = parse_secrets(
        "#: names=app,*.app,api-?,BÜCHER,full.other.test.\nt\n".encode()
    ).rules[credential_id(b"t")]
    domains = ["example.test", "other.test"]

    def allows(requested: str) -> bool:
        name = normalise_name(requested)
        assert name is not None
        return rules.allows_name(name, domains)

    assert allows("app.example.test") and allows("APP.other.test.")
    assert allows("x.app.example.test") and allows("a.b.app.example.test")
    assert allows("*.app.example.test"), "the wildcard route itself"
    assert allows("api-1.example.test") and not allows("api-12.example.test")
    assert allows("bücher.example.test") and allows("Bücher.example.test")
    assert allows("xn--bcher-kva.example.test")
    assert allows("full.other.test") and not allows("full.example.test")
    assert not allows("app2.example.test") and not allows("app.example.test.evil.test")


def test_the_ids_tool_shows_the_rules(tmp_path: Path, capsys: Any) -> None:
    from tcprelay.secrets import _print_ids

    path = tmp_path / "secrets"
    path.write_bytes(b"open\n#: names=app ports=9000-9002,9005\nteam-a\n")
    assert _print_ids([str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{credential_id(b'open')}  secret 1",
        f"{credential_id(b'team-a')}  secret 2  names=app ports=9000-9002,9005",
    ]


def test_a_bad_secrets_file_is_a_usage_error_at_start(tmp_path: Path) -> None:
    from twisted.python import usage

    from tcprelay import tap

    path = tmp_path / "secrets"
    path.write_bytes(b"#: names=app ports=1-2-3\nteam-a\n")
    with pytest.raises(usage.UsageError, match=r"^--secrets-file: .*: line 1: ports: port range '1-2-3'"):
        tap.Options().parseOptions(["--ports", "9000-9009", "--secrets-file", str(path)])


# -- the relay enforcing them ---------------------------------------------------


class Tenants:
    """A relay with an HTTP entrance, a secrets file with rules, and agents."""

    def __init__(self, reactor: Any, tmp_path: Path) -> None:
        self.reactor = reactor
        self.secrets = tmp_path / "secrets"
        self.http_port = free_ports(1)[0]
        self.base = free_port_block(8)
        self.ports = list(range(self.base, self.base + 8))
        self.agents: list[Agent] = []
        self.relay: Optional[RelayFixture] = None
        self.logged: list[dict[str, Any]] = []

    async def start(self, secrets: str, *args: str) -> RelayFixture:
        self.secrets.write_text(secrets)
        globalLogPublisher.addObserver(self.logged.append)
        self.relay = await bounded(
            RelayFixture.start(
                self.reactor,
                "--ports", f"{self.base}-{self.base + 7}",
                "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
                "--domain", DOMAIN,
                "--secrets-file", str(self.secrets),
                *args,
            ),
            self.reactor,
        )
        return self.relay

    def agent(self, secret: bytes, refusals: Optional[list[str]] = None, **config: Any) -> Agent:
        assert self.relay is not None
        seen = refusals if refusals is not None else []

        class Observer:
            def ready(self, *a: object) -> None: ...
            def queued(self, *a: object) -> None: ...
            def lost(self, reason: str, retry_in: object) -> None:
                seen.append(reason)
            def refused(self, reason: str, fatal: bool) -> None:
                seen.append(reason)

        made = Agent(
            self.relay.control_endpoint,
            AgentConfig(secret=secret, proxy=False, backoff_initial=0.05, backoff_max=0.1, **config),
            self.reactor,
            lambda s, h: Protocol(),
            observer=Observer(),
        )
        self.agents.append(made)
        made.startService()
        return made

    def refusal_lines(self) -> list[str]:
        return [
            f"{e.get('reason')}"
            for e in self.logged
            if e.get("log_format") == "service {peer} refused: {reason}"
        ]

    async def stop(self) -> None:
        try:
            for made in self.agents:
                await bounded(made.stopService(), self.reactor)
            if self.relay is not None:
                await bounded(self.relay.stop(), self.reactor)
        finally:
            globalLogPublisher.removeObserver(self.logged.append)


@pytest.fixture
def tenants(reactor: Any, tmp_path: Path) -> Any:
    env = Tenants(reactor, tmp_path)
    yield env
    pytest_twisted.blockon(Deferred.fromCoroutine(env.stop()))


@pytest_twisted.ensureDeferred
async def test_an_allowed_name_is_served(reactor: Any, tenants: Tenants) -> None:
    await tenants.start("#: names=app,*.app\nteam-a\n")
    for name in ("APP", "x.app", "*.app"):
        agent = tenants.agent(b"team-a", kind="http", name=name)
        assert await bounded(agent.when_ready(), reactor)
    assert {t.route.name for t in tenants.relay.relay.tunnels()} == {  # type: ignore[union-attr]
        f"app.{DOMAIN}", f"x.app.{DOMAIN}", f"*.app.{DOMAIN}",
    }


@pytest_twisted.ensureDeferred
async def test_a_name_outside_the_patterns_is_refused_for_good(reactor: Any, tenants: Tenants) -> None:
    """The agent stops with the reason; the relay logs one line and registers nothing."""
    await tenants.start("#: names=app ports=*\nteam-a\n")
    agent = tenants.agent(b"team-a", kind="http", name="Other")
    ident = credential_id(b"team-a")
    with pytest.raises(AgentRefused, match=f"http name other.{DOMAIN} is not allowed for credential {ident}"):
        await bounded(agent.when_done(), reactor)
    assert tenants.refusal_lines() == [f"http name other.{DOMAIN} is not allowed for credential {ident}"]
    assert len(tenants.relay.relay.registry) == 0  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_port_outside_the_rules_is_refused_and_any_port_is_an_allowed_one(
    reactor: Any, tenants: Tenants
) -> None:
    allowed = tenants.ports[5]
    await tenants.start(f"#: ports={allowed}\nteam-a\nopen\n")
    outside = tenants.agent(b"team-a", port=tenants.ports[0])
    with pytest.raises(AgentRefused, match=f"port {tenants.ports[0]} is not allowed for credential"):
        await bounded(outside.when_done(), reactor)
    assert len(tenants.refusal_lines()) == 1

    anywhere = tenants.agent(b"team-a")
    await bounded(anywhere.when_ready(), reactor)
    assert anywhere.port == allowed, "the pool's first port is not the credential's"

    # its only port is in use: a second agent is refused, to retry later
    refusals: list[str] = []
    second = tenants.agent(b"team-a", refusals)
    await wait_for(reactor, lambda: any("no allowed port free" in r for r in refusals), what="the refusal")
    assert second.port is None
    # the secret without rules still gets any port
    free = tenants.agent(b"open")
    await bounded(free.when_ready(), reactor)
    assert free.port == tenants.ports[0]


@pytest_twisted.ensureDeferred
async def test_another_credentials_name_is_refused(reactor: Any, tenants: Tenants) -> None:
    """B may claim app by its patterns, but A serves it: B is refused (retry), A keeps it."""
    await tenants.start("#: names=app\nteam-a\n#: names=*\nteam-b\n")
    a = tenants.agent(b"team-a", kind="http", name="app")
    await bounded(a.when_ready(), reactor)
    refusals: list[str] = []
    b = tenants.agent(b"team-b", refusals, kind="http", name="app")
    await wait_for(reactor, lambda: any(f"http name app.{DOMAIN} is taken" in r for r in refusals), what="the refusal")
    assert b.address is None
    tunnel = tenants.relay.relay.find_named("http", f"app.{DOMAIN}")  # type: ignore[union-attr]
    assert tunnel is not None and tunnel.credential == credential_id(b"team-a")


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_rules(reactor: Any, tenants: Tenants) -> None:
    """reload_secrets re-reads the rules; a bad rules line keeps the old ones."""
    await tenants.start("#: names=app\nteam-a\n")
    relay = tenants.relay.relay  # type: ignore[union-attr]
    tenants.secrets.write_text("#: names=api\nteam-a\n")
    assert relay.reload_secrets()
    refused = tenants.agent(b"team-a", kind="http", name="app")
    with pytest.raises(AgentRefused, match="is not allowed"):
        await bounded(refused.when_done(), reactor)
    allowed = tenants.agent(b"team-a", kind="http", name="api")
    await bounded(allowed.when_ready(), reactor)

    tenants.secrets.write_text("#: names=app prots=1\nteam-a\n")
    assert not relay.reload_secrets()
    assert relay.rules[credential_id(b"team-a")].names == ("api",)

    tenants.secrets.write_text("team-a\n")  # no rules: anything again
    assert relay.reload_secrets()
    free = tenants.agent(b"team-a", kind="http", name="app")
    await bounded(free.when_ready(), reactor)


@pytest_twisted.ensureDeferred
async def test_reload_config_reloads_the_rules(reactor: Any, tenants: Tenants, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'secrets-file = "{tenants.secrets}"\n')
    tenants.secrets.write_text("team-a\n")
    await tenants.start("team-a\n", "--config", str(config))
    relay = tenants.relay.relay  # type: ignore[union-attr]
    assert relay.config_source is not None
    tenants.secrets.write_text(f"#: ports={tenants.ports[3]}\nteam-a\n")
    assert relay.reload_config()
    agent = tenants.agent(b"team-a")
    await bounded(agent.when_ready(), reactor)
    assert agent.port == tenants.ports[3]


@pytest_twisted.ensureDeferred
async def test_a_lease_on_a_port_the_new_rules_forbid_is_given_up(reactor: Any, tenants: Tenants) -> None:
    """After SIGHUP, a reconnecting agent whose held port is no longer allowed gets an allowed one; the old port is free."""
    first, later = tenants.ports[0], tenants.ports[4]
    await tenants.start(f"#: ports={first}\nteam-a\n", "--lease", "30")
    relay = tenants.relay.relay  # type: ignore[union-attr]
    agent = tenants.agent(b"team-a")
    await bounded(agent.when_ready(), reactor)
    assert agent.port == first
    tenants.secrets.write_text(f"#: ports={later}\nteam-a\n")
    assert relay.reload_secrets()
    agent.session.transport.abortConnection()  # type: ignore[union-attr]
    await wait_for(reactor, lambda: agent.port == later and relay.tunnel_at(later) is not None, what="the agent on its new port")
    assert relay.registry.lease_count() == 0
    assert relay.tunnel_at(first) is None and relay.pool.take(first), "the old port is back in the pool"
