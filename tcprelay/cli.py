"""
The ``tcprelay`` console script.

``tcprelay expose LOCAL --relay RELAY`` publishes a local port through a
relay: it prints the public address on a line of its own, forwards every
visitor to a new connection to LOCAL, and keeps the tunnel up.  The relay
itself runs under twistd (``twistd -n tcprelay --control 8080``).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from twisted.python import usage

from tcprelay._reactor import DEFAULT_BUSY_POLL
from tcprelay.options import busy_poll_option
from tcprelay.secrets import read_secrets

EXIT_REFUSED = 3
"""Exit status when the relay refuses the agent for good (e.g. bad secret)."""

MIN_BACKOFF_MAX = 0.5
"""The least ``--backoff-max``: the agent's first wait (AgentConfig.backoff_initial)."""

EXPOSE_USAGE = "Usage: tcprelay expose LOCAL --relay RELAY [options]"


class _Common(usage.Options):
    """What every ``tcprelay`` command line has: tcprelay's ``--version``."""

    def opt_version(self) -> None:
        """Display the tcprelay version and exit."""
        from twisted import copyright

        from tcprelay import __version__

        print(f"tcprelay {__version__} (Twisted {copyright.version})")
        sys.exit(0)


class ExposeOptions(_Common):
    """Options of ``tcprelay expose``."""

    synopsis = EXPOSE_USAGE
    longdesc = (
        "Publish LOCAL (a port on localhost, HOST:PORT, or a client endpoint "
        "string) through the relay at RELAY (HOST:PORT or a client endpoint "
        "string).  Prints the public address on its own line and keeps the "
        "tunnel up, reconnecting with backoff and keeping the same public "
        "port across short losses."
    )
    optParameters = [
        ["secret-file", "s", None, "File holding the shared secret (first line)."],
        ["port", "p", None, "Public port to ask for (default: any)."],
        [
            "http",
            None,
            None,
            "Ask for the name NAME on the relay's shared HTTP entrance instead of "
            "a port (NAME.DOMAIN, or a full name; '*.NAME' for a wildcard).",
        ],
        [
            "tls",
            None,
            None,
            "Ask for the name NAME on the relay's shared TLS entrance (SNI; LOCAL "
            "terminates TLS itself).",
        ],
        [
            "proxy-protocol",
            None,
            "none",
            "Pass each visitor's address to LOCAL as a PROXY header: none, v1 or v2.",
        ],
        ["ca-file", None, None, "Reach the relay over TLS, trusting this CA (PEM)."],
        [
            "lease-file",
            None,
            None,
            "Where the lease is kept across restarts (default: under "
            "$XDG_STATE_HOME/tcprelay, one file per relay and LOCAL).",
        ],
        ["backoff-max", None, "30", "Longest wait between reconnection attempts (seconds)."],
        [
            "busy-poll",
            None,
            str(round(DEFAULT_BUSY_POLL * 1e6)),
            "Microseconds to keep polling for events after activity before "
            "sleeping (lower latency for a little CPU; 0: off).",
        ],
    ]

    optFlags = [
        [
            "pool",
            None,
            "Share the route with the other agents of the same secret that ask "
            "to pool (joining a port route: give its --port): the relay "
            "spreads visitors over them.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["secret"] = None
        self["relays"] = []
        self["relay"] = None

    def opt_relay(self, value: str) -> None:
        """The relay's control address: HOST:PORT or an endpoint string.  Several
        (repeated, or comma-separated: the nodes of a relay cluster) are tried in
        turn, moving to the next one whenever the connection is lost."""
        for part in value.split(","):
            if part.strip():
                self["relays"].append(part.strip())

    opt_r = opt_relay

    def opt_secret(self, value: str) -> None:
        """The shared secret (prefer --secret-file: command lines are visible)."""
        self["secret"] = value.encode("utf-8")

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Accept LOCAL before or after the options (GNU style)."""
        args = list(sys.argv[1:] if options is None else options)
        takes_value = {f"--{p[0]}" for p in self.optParameters} | {"--secret", "--relay", "-r"}
        takes_value |= {f"-{p[1]}" for p in self.optParameters if p[1]}
        flags: list[str] = []
        positional: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                positional.extend(args[i + 1 :])
                break
            if arg.startswith("-") and arg != "-":
                flags.append(arg)
                if arg in takes_value and i + 1 < len(args):
                    flags.append(args[i + 1])
                    i += 1
            else:
                positional.append(arg)
            i += 1
        super().parseOptions(flags + positional)

    def getSynopsis(self) -> str:
        """``Usage: tcprelay expose ...`` (not the parent's synopsis before it)."""
        return EXPOSE_USAGE

    def parseArgs(self, *args: str) -> None:
        if not args:
            raise usage.UsageError(
                "missing LOCAL, the local service to publish "
                "(PORT, HOST:PORT or a client endpoint string)"
            )
        if len(args) > 1:
            raise usage.UsageError(
                f"one LOCAL service at a time, not {len(args)}: {' '.join(args)}"
            )
        self["local"] = args[0]

    def postOptions(self) -> None:
        if not self["relays"]:
            raise usage.UsageError("--relay is required")
        self["relay"] = ",".join(self["relays"])
        if self["proxy-protocol"] not in ("none", "v1", "v2"):
            raise usage.UsageError("--proxy-protocol must be none, v1 or v2")
        if self["secret-file"]:
            try:
                self["secret"] = read_secrets(self["secret-file"])[0]
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--secret-file: {e}") from None
        if self["port"] is not None:
            if not self["port"].isdigit() or not 0 < int(self["port"]) < 65536:
                raise usage.UsageError("--port must be a port number")
            self["port"] = int(self["port"])
        asked = [k for k in ("port", "http", "tls") if self[k] is not None]
        if len(asked) > 1:
            raise usage.UsageError(f"give one of --port, --http, --tls, not {' and '.join('--' + a for a in asked)}")
        self["kind"], self["name"] = "port", None
        for kind in ("http", "tls"):
            if self[kind] is not None:
                name = self[kind].strip()
                if not name:
                    raise usage.UsageError(f"--{kind} needs a name")
                self["kind"], self["name"] = kind, name
        self["busy-poll"] = busy_poll_option(self["busy-poll"])
        self["backoff-max"] = _backoff_max(self["backoff-max"])
        if self["lease-file"] is None:
            state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
            what = f"|{self['kind']}:{self['name']}" if self["name"] else ""
            key = hashlib.sha256(f"{self['relay']}|{self['local']}{what}".encode()).hexdigest()[:16]
            self["lease-file"] = os.path.join(state, "tcprelay", f"lease-{key}.json")


def _backoff_max(value: str) -> float:
    """``--backoff-max`` seconds: a finite number, at least the first wait."""
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError(f"--backoff-max must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds < MIN_BACKOFF_MAX:
        raise usage.UsageError(
            f"--backoff-max must be at least {MIN_BACKOFF_MAX} seconds (the first "
            f"wait) and finite, not {value!r}"
        )
    return seconds


class Options(_Common):
    """``tcprelay COMMAND``."""

    synopsis = "Usage: tcprelay COMMAND [options]"
    subCommands = [
        ["expose", None, ExposeOptions, "Publish a local port through a relay."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required (expose)")


class _Printer:
    """Reports agent events: the address on stdout, the rest on stderr."""

    def __init__(self) -> None:
        self.shown: Optional[str] = None

    def ready(self, address: str, port: int, legacy: bool) -> None:
        if address != self.shown:
            self.shown = address
            print(address, flush=True)
        note = " (legacy relay: no auth, no visitor addresses)" if legacy else ""
        _err(f"tcprelay: tunnel up at {address}{note}")

    def queued(self, position: int) -> None:
        _err(f"tcprelay: waiting for a public port, queue position {position}")

    def lost(self, reason: str, retry_in: Optional[float]) -> None:
        _err(f"tcprelay: relay connection lost ({reason}); retrying in {retry_in:.1f}s")

    def refused(self, reason: str, fatal: bool) -> None:
        _err(f"tcprelay: {reason}")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def endpoints(reactor: Any, options: ExposeOptions) -> tuple[Any, Any]:
    """The relay and local client endpoints; ValueError/OSError on bad input."""
    from tcprelay.agent.expose import client_endpoint

    relays = [client_endpoint(reactor, r, options["ca-file"]) for r in options["relays"]]
    if len(relays) == 1:
        relay = relays[0]
    else:
        from tcprelay.agent.expose import FailoverEndpoint

        relay = FailoverEndpoint(relays)
    local = client_endpoint(reactor, options["local"], resolve_once=True)
    return relay, local


def run_expose(reactor: Any, options: ExposeOptions, relay: Any, local: Any) -> Any:
    """Run the agent until stopped; the Deferred fires with the exit code."""
    from twisted.internet.defer import Deferred

    from tcprelay.agent.client import Agent, AgentConfig, AgentRefused
    from tcprelay.agent.expose import LocalForwarder
    agent = Agent(
        relay,
        AgentConfig(
            secret=options["secret"],
            port=options["port"],
            kind=options["kind"],
            name=options["name"],
            proxy=options["proxy-protocol"] != "none",
            lease_file=options["lease-file"],
            backoff_max=options["backoff-max"],
            pool=bool(options["pool"]),
        ),
        reactor,
        LocalForwarder(local, options["proxy-protocol"]),
        _Printer(),
    )
    result: Deferred[int] = Deferred()

    def finished(_: object) -> None:
        if not result.called:
            result.callback(0)

    def refused(failure: Any) -> None:
        if not result.called:
            failure.trap(AgentRefused)
            result.callback(EXIT_REFUSED)

    agent.when_done().addCallbacks(finished, refused)
    reactor.addSystemEventTrigger("before", "shutdown", agent.stopService)
    agent.startService()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    options = Options()
    try:
        options.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        expose = options.subCommand == "expose" or "expose" in (argv or sys.argv)
        _err(f"tcprelay: {e}")
        if expose:
            _err(EXPOSE_USAGE)
        _err(f"Try 'tcprelay {'expose ' if expose else ''}--help'.")
        return 2
    from twisted.internet import reactor
    from twisted.internet.error import ReactorNotRunning
    from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

    try:
        relay, local = endpoints(reactor, options.subOptions)
    except (ValueError, OSError) as e:
        _err(f"tcprelay: {e}")
        return 2

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    code: list[int] = [0]

    def done(value: int) -> None:
        code[0] = value
        try:
            reactor.stop()  # type: ignore[attr-defined]
        except ReactorNotRunning:
            pass

    def start() -> None:
        run_expose(reactor, options.subOptions, relay, local).addCallback(done)

    from tcprelay._signals import calm_repeated_signals
    from tcprelay.process import own_process

    # first, so that the heap is frozen before the relay connection's objects exist
    own_process(reactor, options.subOptions["busy-poll"], Logger("tcprelay.cli"))
    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.callWhenRunning(calm_repeated_signals, reactor)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return code[0]


if __name__ == "__main__":
    sys.exit(main())
