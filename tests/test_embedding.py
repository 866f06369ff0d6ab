"""
The relay and the agent as libraries: embedding them changes nothing in the
host process, and the agent's side never loads the relay or Twisted's test
framework.
"""

from __future__ import annotations

import gc
import json
import resource
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import pytest_twisted

from tcprelay import _reactor
from tcprelay.testing import RelayFixture, free_ports


@pytest_twisted.ensureDeferred
async def test_relay_fixture_leaves_the_host_process_alone(
    reactor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RelayFixture started and stopped in a test suite leaves the reactor's poll step, SIGHUP, the open-files limit, the allocator and the garbage collector as they were."""
    tuned: list[str] = []
    monkeypatch.setattr(_reactor, "tune_malloc", lambda *a, **k: tuned.append("malloc"))
    poll_step = (reactor.__dict__.get("doIteration"), reactor.__dict__.get("doPoll"))
    hup = signal.getsignal(signal.SIGHUP)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    frozen = gc.get_freeze_count()

    relay = await RelayFixture.start(reactor)
    try:
        assert (reactor.__dict__.get("doIteration"), reactor.__dict__.get("doPoll")) == poll_step
        assert signal.getsignal(signal.SIGHUP) is hup
    finally:
        await relay.stop()

    assert (reactor.__dict__.get("doIteration"), reactor.__dict__.get("doPoll")) == poll_step
    assert signal.getsignal(signal.SIGHUP) is hup
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == limit
    assert gc.get_freeze_count() == frozen
    assert tuned == []


_EXPOSE_PROBE = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import reactor
    import tcprelay.cli

    def report():
        loaded = sorted(m for m in sys.modules
                        if m.startswith(("tcprelay.relay", "twisted.trial"))
                        or m in ("tcprelay.tap", "twisted.internet.testing"))
        print(json.dumps({"loaded": loaded, "agent": "tcprelay.agent.client" in sys.modules}))
        sys.stdout.flush()
        reactor.stop()

    reactor.callLater(0.3, report)
    sys.exit(tcprelay.cli.main(["expose", "1", "--relay", "127.0.0.1:%d", "--busy-poll", "0"]))
    """
)


def test_tcprelay_expose_loads_neither_the_relay_nor_trial() -> None:
    """A running `tcprelay expose` (reconnecting to a relay that is not there) has not imported tcprelay.relay, tcprelay.tap, twisted.trial or twisted.internet.testing."""
    [closed] = free_ports(1)
    done = subprocess.run(
        [sys.executable, "-c", _EXPOSE_PROBE % closed],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report: {done.stdout!r} {done.stderr!r}"
    report = json.loads(lines[-1])
    assert report["agent"], "the probe ran inside a started agent"
    assert report["loaded"] == []


def test_importing_the_agent_and_endpoint_loads_neither_the_relay_nor_trial() -> None:
    """Importing tcprelay.agent and the tcprelay: endpoint (as `twistd web --listen tcprelay:...` does) loads no relay module and no trial."""
    probe = (
        "import sys, json\n"
        "import tcprelay.agent, tcprelay.agent.client, tcprelay.agent.endpoint, tcprelay.agent.expose\n"
        "from twisted.plugins import tcprelay_plugin\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('tcprelay.relay', "
        "'twisted.trial')) or m in ('tcprelay.tap', 'twisted.internet.testing'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []
