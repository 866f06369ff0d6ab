"""
twistd wiring for the relay: command-line options and ``makeService``.

twistd (through the ServiceMaker in twisted/plugins/tcprelay_plugin.py)
parses the command line with :class:`Options`, then calls
:func:`makeService`, which only composes services and never listens itself.

The options of the SSH and ngrok doors and of the cluster (their rows,
checks and services) are in :mod:`tcprelay.tap_doors`.

Why one module of this size: most of it is the option table of the relay
itself (endpoints, ports, timeouts, edge limits, each with its help text
and its check), which must stay in one Options class for twistd,
``--help`` and the ``--config`` file alike.
"""

from __future__ import annotations

import re
import socket
import sys
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.abstract import isIPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from tcprelay._reactor import DEFAULT_BUSY_POLL
from tcprelay.config_file import ConfigFileOptions
from tcprelay.mux.session import SessionConfig
from tcprelay.options import busy_poll_option, checked_endpoint, normalise_endpoint
from tcprelay.options import positive as _positive
from tcprelay.relay.config import DEFAULT_SESSION_BUFFER, PRE_HANDSHAKE_BUFFER, RelayConfig
from tcprelay.relay.core import Relay
from tcprelay.relay.doors.muxado import ControlFactory
from tcprelay.relay.entrances.named import NamedEntrance, NamedVisitorFactory
from tcprelay.relay.sniff import normalise_name
from tcprelay.relay.limits import AddressFilter, LimitsConfig, parse_networks
from tcprelay.relay.pool import PortPool, parse_port_range
from tcprelay.relay.service import RelayService
from tcprelay.secrets import read_secrets_file
from tcprelay.systemd import SystemdNotifier
from tcprelay.tap_doors import CLUSTER_OPTIONS, DOOR_OPTIONS, check_cluster, check_doors, door_services

DEFAULT_POOL_SIZE = 50
"""Public ports after the control port, as the original's ``-max 50``."""

DEFAULT_CONTROL_BACKLOG = 1024
"""
listen() backlog of the control port.  Twisted's default of 50 is too short
for a reconnect storm (every agent of a restarted relay dialling at once: a
burst of 1,000 sessions saw 60% of its connects wait for SYN
retransmissions, 1 s and more); 1024 holds such a burst while the relay
accepts, and is within Linux's default somaxconn (4096).  Public ports use
4096 (:data:`~tcprelay.relay.entrances.ports.PUBLIC_BACKLOG`): visitors come
in far larger numbers than agents.
"""

_BACKLOG_KINDS = ("tcp", "tcp6", "ssl")

_DEFAULT_LIMITS = LimitsConfig()



def control_port(description: str) -> Optional[int]:
    """The TCP port number in a ``tcp:``/``tcp6:``/``ssl:`` endpoint string, if any."""
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    fields = rest.split(":")
    for field in fields:
        key, eq, value = field.partition("=")
        if eq and key == "port" and value.isdigit():
            return int(value)
    if fields and fields[0].isdigit():
        return int(fields[0])
    return None


def with_backlog(description: str, backlog: int) -> str:
    """
    ``description`` with ``backlog=BACKLOG`` added when it is a ``tcp:``,
    ``tcp6:`` or ``ssl:`` endpoint string without a ``backlog=`` of its own
    (other endpoint types are returned unchanged).
    """
    kind, _, rest = description.partition(":")
    if kind not in _BACKLOG_KINDS:
        return description
    fields = re.split(r"(?<!\\):", rest) if rest else []
    if any(field.partition("=")[0] == "backlog" for field in fields):
        return description
    return f"{description}:backlog={backlog}"


def _count(name: str, value: Any) -> int:
    """A whole number, 0 or more (0 turns a limit off)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{name} must be a whole number, not {value!r}") from None
    if number < 0:
        raise usage.UsageError(f"--{name} must be 0 or more, not {value!r}")
    return number


def _non_negative(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
    if not number >= 0 or number == float("inf"):
        raise usage.UsageError(f"--{name} must be 0 or more, not {value!r}")
    return number


def _networks(name: str, values: list[str]) -> tuple[Any, ...]:
    try:
        return parse_networks(values)
    except ValueError as e:
        raise usage.UsageError(f"--{name}: {e}") from None


_CREDENTIAL_ID = re.compile(r"[0-9a-f]{16}")


def _public_port(description: Optional[str], default: int) -> Optional[int]:
    """The port an entrance's URL names: its endpoint's TCP port, else ``default``."""
    if description is None:
        return None
    return control_port(description) or default


def check_interface(interface: str) -> None:
    """
    UsageError unless a TCP socket can be bound to ``interface`` (port 0,
    closed at once): the public ports listen there, and an address the
    machine does not have would otherwise only show as "no free port".
    """
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((interface, 0))
    except (OSError, UnicodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise usage.UsageError(
            f"--public-interface {interface!r}: cannot listen on it ({reason})"
        ) from None


class Options(ConfigFileOptions):
    """Command-line options of ``twistd tcprelay``."""

    synopsis = "[options]"
    longdesc = (
        "Run the tcprelay relay: services dial in to the control endpoint and "
        "are given a public port; every visitor connection to that port "
        "becomes a new stream of the service's session."
    )

    config_tables = ("credentials",)

    optParameters = [
        [
            "config",
            None,
            None,
            "TOML file setting any of these options (key: the long option "
            "name); the command line wins.  Limits, allow/deny lists and "
            "secrets are re-read on SIGHUP.",
        ],
        [
            "control",
            "c",
            "tcp:8080",
            "Endpoint string for the control port services connect to "
            "(a bare port such as 8080 means tcp:8080; ssl:, tls:, systemd: work; "
            "give --ports unless it is tcp:PORT or ssl:PORT).",
        ],
        [
            "ports",
            "p",
            None,
            "Public port range LOW-HIGH (default: the 50 ports after the "
            "control port).",
        ],
        [
            "public-interface",
            None,
            "",
            "Address public ports listen on (default: all IPv4 interfaces); "
            "it must be one of this machine's.",
        ],
        [
            "public-host",
            None,
            "localhost",
            "Host name written into the address given to services.",
        ],
        [
            "wait-timeout",
            None,
            "60",
            "Seconds a service may wait for a free port before it is refused.",
        ],
        [
            "handshake-timeout",
            None,
            "30",
            "Seconds a new session has to complete its handshake (ask for a "
            "port) before it is closed.",
        ],
        [
            "drain-timeout",
            None,
            "30",
            "Seconds open streams may take to finish on shutdown.",
        ],
        [
            "bind-retry",
            None,
            "5",
            "Seconds before a port that failed to bind is tried again.",
        ],
        [
            "heartbeat-interval",
            None,
            "3",
            "Seconds between heartbeats on each session.",
        ],
        [
            "heartbeat-tolerance",
            None,
            "13",
            "Seconds without a heartbeat echo before a session is closed.",
        ],
        [
            "max-streams",
            None,
            "65536",
            "Most streams a service may open itself (visitors' streams are "
            "bounded by --max-visitors-per-service).",
        ],
        [
            "http",
            None,
            None,
            "Endpoint of the shared HTTP entrance: visitors are routed by the "
            "Host of their first request to the agent that claimed that name "
            "(e.g. tcp:80; off by default; needs --domain).",
        ],
        [
            "tls",
            None,
            None,
            "Endpoint of the shared TLS entrance: visitors are routed by the "
            "server name (SNI) of their ClientHello, TLS not terminated "
            "(e.g. tcp:443; off by default; needs --domain).",
        ],
        *DOOR_OPTIONS,
        [
            "head-timeout",
            None,
            "10",
            "Seconds a visitor of a shared entrance has to send its request "
            "head or ClientHello.",
        ],
        [
            "session-buffer",
            None,
            str(DEFAULT_SESSION_BUFFER),
            "Most bytes the relay holds unsent for one service's socket; a "
            "session over it is cut (before its handshake: "
            f"{PRE_HANDSHAKE_BUFFER} bytes).",
        ],
        [
            "open-timeout",
            None,
            "30",
            "Seconds a service has to answer a visitor's stream (any frame) "
            "once the visitor has sent bytes; then the stream is reset and the "
            "visitor closed (0: no limit).",
        ],
        [
            "half-close-timeout",
            None,
            "60",
            "Seconds a service may stay silent on a stream after its visitor "
            "closed its sending side; then the stream is reset and the visitor "
            "closed (0: no limit).",
        ],
        [
            "frame-timeout",
            None,
            "10",
            "Seconds the rest of a started frame may take to arrive from a "
            "service (0: no limit).",
        ],
        [
            "secrets-file",
            None,
            None,
            "File of shared secrets, one per line ('#' comments allowed); "
            "turns authentication on.  Re-read on SIGHUP.",
        ],
        [
            "lease",
            None,
            "60",
            "Seconds a lost agent session's public port stays reserved for "
            "its lease token.",
        ],
        [
            "metrics",
            None,
            None,
            "Endpoint serving /metrics (Prometheus) and /status (JSON), "
            "e.g. tcp:9100:interface=127.0.0.1 (off by default).",
        ],
        [
            "log-format",
            None,
            "text",
            "text (twistd's own format) or json (one JSON object per line).",
        ],
        [
            "receive-window",
            None,
            "262144",
            "Bytes each stream may have in flight towards the relay "
            "(at least 65536).",
        ],
        [
            "control-backlog",
            None,
            str(DEFAULT_CONTROL_BACKLOG),
            "listen() backlog of a tcp:/tcp6:/ssl: control endpoint (one that "
            "gives its own backlog= keeps it).",
        ],
        [
            "max-visitors",
            None,
            str(_DEFAULT_LIMITS.max_visitors),
            "Most visitor connections open at once, relay-wide (0: no limit).",
        ],
        [
            "max-visitors-per-service",
            None,
            str(_DEFAULT_LIMITS.max_visitors_per_service),
            "Most visitor connections open at once to one service (0: no limit).",
        ],
        [
            "max-visitors-per-ip",
            None,
            str(_DEFAULT_LIMITS.max_visitors_per_ip),
            "Most visitor connections open at once from one IP address (IPv6: "
            "one /64), relay-wide (0: no limit).",
        ],
        [
            "visitor-rate",
            None,
            f"{_DEFAULT_LIMITS.visitor_rate:g}",
            "New visitor connections per second per service (0: no limit).",
        ],
        [
            "visitor-burst",
            None,
            str(_DEFAULT_LIMITS.visitor_burst),
            "New visitor connections a service may take at once above "
            "--visitor-rate.",
        ],
        [
            "max-sessions-per-ip",
            None,
            str(_DEFAULT_LIMITS.max_sessions_per_ip),
            "Most control connections open at once from one IP address "
            "(IPv6: one /64) (0: no limit).",
        ],
        [
            "max-pending-sessions",
            None,
            str(_DEFAULT_LIMITS.max_pending_sessions),
            "Most control connections that have not registered a service "
            "yet, in total (0: no limit).",
        ],
        [
            "idle-timeout",
            None,
            "0",
            "Seconds a visitor connection may pass without a byte either "
            "way before it is closed (0: never).",
        ],
        [
            "busy-poll",
            None,
            str(round(DEFAULT_BUSY_POLL * 1e6)),
            "Microseconds the relay keeps polling for events after activity "
            "before it sleeps (lower latency for a little CPU; 0: off).",
        ],
        *CLUSTER_OPTIONS,
    ]

    def __init__(self) -> None:
        super().__init__()
        self["secret"] = []
        self["domain"] = []
        self["allow"] = []
        self["deny"] = []

    def opt_domain(self, value: str) -> None:
        """A domain the relay serves named routes under (repeatable): agents
        claim LABEL.DOMAIN (the first domain for a bare label)."""
        name = normalise_name(value)
        if name is None or name.startswith("*."):
            raise usage.UsageError(f"--domain {value!r} is not a domain name")
        if name not in self["domain"]:
            self["domain"].append(name)

    def opt_allow(self, value: str) -> None:
        """Visitor networks (CIDR, comma-separated; repeatable) allowed; others are refused."""
        self["allow"].append(value)

    def opt_deny(self, value: str) -> None:
        """Visitor networks (CIDR, comma-separated; repeatable) refused."""
        self["deny"].append(value)

    def opt_secret(self, value: str) -> None:
        """A shared secret agents must prove they know (repeatable; prefer --secrets-file)."""
        if not value:
            raise usage.UsageError("--secret must not be empty")
        self["secret"].append(value.encode("utf-8"))

    _failed = False

    def getUsage(self, width: Optional[int] = None) -> str:
        """After a bad value, a one-line hint instead of the whole usage."""
        if self._failed:
            return "Run 'twistd tcprelay --help' for every option."
        return super().getUsage(width)

    def parseOptions(self, options: Optional[list[str]] = None) -> None:
        """Parse; remember a failure so the usage shown is one line."""
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._failed = True
            raise

    def postOptions(self) -> None:
        """Apply --config, normalise shorthand and check every value; UsageError on bad input."""
        self.apply_config_file()
        self._check()

    reloading = False
    """Set on the Options :meth:`reparsed` makes for a reload: what only
    matters at start (the endpoints) is not checked again."""

    def reparsed(self) -> "Options":
        fresh = type(self)()
        fresh.parent = self.parent
        fresh.reloading = True
        fresh.parseOptions(list(self.argv))
        return fresh

    def _check(self) -> None:
        # endpoint strings are checked by parsing them against a reactor
        # that never runs (only the relay's options need it)
        from twisted.internet.testing import MemoryReactor

        self["control-backlog"] = _positive("control-backlog", self["control-backlog"], True)
        control = normalise_endpoint(self["control"])
        try:
            if not self.reloading:
                serverFromString(MemoryReactor(), self.control_endpoint(control))
        except Exception as e:
            if control.startswith("systemd:"):
                raise usage.UsageError(
                    f"--control {control!r}: no such socket was passed by systemd "
                    "(LISTEN_FDS/LISTEN_FDNAMES); run it from a .socket unit"
                ) from None
            raise usage.UsageError(f"--control {control!r}: {e}") from None
        self["control"] = control
        if self["public-interface"]:
            check_interface(self["public-interface"])
        if self["metrics"] is not None:
            self["metrics"] = checked_endpoint("metrics", self["metrics"], not self.reloading)
        for kind in ("http", "tls"):
            if self[kind] is not None:
                self[kind] = checked_endpoint(kind, self[kind])
                if not self["domain"]:
                    raise usage.UsageError(f"--{kind} needs --domain (the names it serves)")
        check_doors(self)
        self["head-timeout"] = _positive("head-timeout", self["head-timeout"])
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["log-format"] == "json":
            twistd = self.twistd_options()
            if twistd.get("syslog"):
                raise usage.UsageError(
                    "--log-format json cannot go to syslog: drop twistd's --syslog "
                    "(use --logfile, or -n and let systemd collect standard output)"
                )
            if twistd.get("logfile") == "-" and not twistd.get("nodaemon"):
                raise usage.UsageError("daemons cannot log to stdout: add -n or give --logfile")
        if self["ports"] is None:
            port = control_port(control)
            if not port:
                raise usage.UsageError(
                    "--ports is required when the control endpoint has no fixed TCP port"
                )
            if port + DEFAULT_POOL_SIZE > 65535:
                raise usage.UsageError(
                    f"control port {port} leaves no room for the default port "
                    "range: give --ports"
                )
            self["ports"] = range(port + 1, port + 1 + DEFAULT_POOL_SIZE)
        else:
            try:
                self["ports"] = parse_port_range(self["ports"])
            except ValueError as e:
                raise usage.UsageError(f"--ports: {e}") from None
        self["secret-inline"] = list(self["secret"])
        self["rules"] = {}
        if self["secrets-file"] is not None:
            try:
                parsed = read_secrets_file(self["secrets-file"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--secrets-file: {e}") from None
            self["secret"] = self["secret"] + parsed.secrets
            self["rules"] = parsed.rules
        for name in (
            "handshake-timeout",
            "lease",
            "wait-timeout",
            "drain-timeout",
            "bind-retry",
            "heartbeat-interval",
            "heartbeat-tolerance",
        ):
            self[name] = _positive(name, self[name])
        self["max-streams"] = _positive("max-streams", self["max-streams"], True)
        self["session-buffer"] = _positive("session-buffer", self["session-buffer"], True)
        if self["session-buffer"] < PRE_HANDSHAKE_BUFFER:
            raise usage.UsageError(f"--session-buffer must be at least {PRE_HANDSHAKE_BUFFER}")
        for name in ("open-timeout", "half-close-timeout", "frame-timeout"):
            self[name] = _non_negative(name, self[name])
        window = _positive("receive-window", self["receive-window"], True)
        if not 65536 <= window <= 0x7FFFFFFF:
            raise usage.UsageError("--receive-window must be between 65536 and 2147483647")
        self["receive-window"] = window
        self["busy-poll"] = busy_poll_option(self["busy-poll"])
        self["limits"] = self._limits()
        check_cluster(self)

    def _limits(self) -> LimitsConfig:
        counts = {
            name: _count(name, self[name])
            for name in (
                "max-visitors",
                "max-visitors-per-service",
                "max-visitors-per-ip",
                "max-sessions-per-ip",
                "max-pending-sessions",
            )
        }
        rate = _non_negative("visitor-rate", self["visitor-rate"])
        burst = _positive("visitor-burst", self["visitor-burst"], True)
        idle = _non_negative("idle-timeout", self["idle-timeout"])
        addresses = AddressFilter(
            _networks("allow", self["allow"]), _networks("deny", self["deny"])
        )
        credentials = {}
        table = self.config_extra.get("credentials", {})
        for ident, entry in table.items():
            where = f"--config {self['config']}: credentials.{ident}"
            if not _CREDENTIAL_ID.fullmatch(ident):
                raise usage.UsageError(
                    f"{where}: not a credential id (16 hex digits, from "
                    "'python -m tcprelay.secrets FILE')"
                )
            if not isinstance(entry, dict) or set(entry) - {"allow", "deny"}:
                raise usage.UsageError(f"{where}: only 'allow' and 'deny' may be set")
            lists = []
            for key in ("allow", "deny"):
                values = entry.get(key, [])
                if isinstance(values, str):
                    values = [values]
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise usage.UsageError(f"{where}.{key} must be an array of strings")
                try:
                    lists.append(parse_networks(values))
                except ValueError as e:
                    raise usage.UsageError(f"{where}.{key}: {e}") from None
            credentials[ident] = AddressFilter(lists[0], lists[1])
        return LimitsConfig(
            max_visitors=counts["max-visitors"],
            max_visitors_per_service=counts["max-visitors-per-service"],
            max_visitors_per_ip=counts["max-visitors-per-ip"],
            visitor_rate=rate,
            visitor_burst=burst,
            max_sessions_per_ip=counts["max-sessions-per-ip"],
            max_pending_sessions=counts["max-pending-sessions"],
            idle_timeout=idle,
            addresses=addresses,
            credentials=credentials,
        )

    def control_endpoint(self, control: Optional[str] = None) -> str:
        """The control endpoint string listened on: ``--control`` with
        ``backlog=`` from ``--control-backlog`` unless it gives its own."""
        return with_backlog(self["control"] if control is None else control, self["control-backlog"])

    def twistd_options(self) -> dict[str, Any]:
        """twistd's own options (``--logfile``, ``-n``, ``--syslog``) when run
        by twistd; empty otherwise (``twist``, or built directly)."""
        parent = getattr(self, "parent", None)
        if parent is None or "nodaemon" not in parent:
            return {}
        return {key: parent.get(key) for key in ("logfile", "nodaemon", "syslog")}

    def relay_config(self) -> RelayConfig:
        """The :class:`RelayConfig` these options describe."""
        return RelayConfig(
            ports=self["ports"],
            public_interface=self["public-interface"],
            public_host=self["public-host"],
            wait_timeout=self["wait-timeout"],
            drain_timeout=self["drain-timeout"],
            bind_retry=self["bind-retry"],
            lease=self["lease"],
            handshake_timeout=self["handshake-timeout"],
            session_buffer=self["session-buffer"],
            open_timeout=self["open-timeout"] or None,
            half_close_timeout=self["half-close-timeout"] or None,
            frame_timeout=self["frame-timeout"] or None,
            domains=tuple(self["domain"]),
            http_port=_public_port(self["http"], 80),
            tls_port=_public_port(self["tls"], 443),
            head_timeout=self["head-timeout"],
            secrets=tuple(self["secret"]),
            secrets_file=self["secrets-file"],
            secrets_inline=tuple(self["secret-inline"]),
            rules=dict(self["rules"]),
            limits=self["limits"],
            config_file=self["config"],
            session=SessionConfig(
                receive_window=self["receive-window"],
                max_streams=self["max-streams"],
                heartbeat_interval=self["heartbeat-interval"],
                heartbeat_tolerance=self["heartbeat-tolerance"],
            ),
        )


def _config_source(options: Options) -> Any:
    """What :meth:`Relay.reload_config` calls: the options parsed again, as a config."""

    def source() -> RelayConfig:
        try:
            return options.reparsed().relay_config()
        except usage.UsageError as e:
            raise ValueError(str(e)) from None

    return source


def makeService(
    options: Options,
    reactor: Any = None,
    service_class: type[RelayService] = RelayService,
    config: Optional[RelayConfig] = None,
) -> RelayService:
    """
    Build the relay from parsed :class:`Options`: a
    :class:`~tcprelay.relay.service.RelayService` with the named children
    ``control``, ``pool`` and ``public`` (and ``metrics``, ``systemd``),
    on ``reactor`` (default: the global one), with ``config`` (default:
    what the options say; the test kit refines it).  Nothing listens until the
    service starts, and nothing process-wide is changed: twistd runs
    :func:`tcprelay.relay.daemon.makeService`, which owns the process.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if config is None:
        config = options.relay_config()
    pool = PortPool(config.ports, reactor, config.bind_retry)
    relay = Relay(config, pool, reactor)
    if options["config"] is not None:
        relay.config_source = _config_source(options)
    endpoint = serverFromString(reactor, options.control_endpoint())
    control = StreamServerEndpointService(endpoint, ControlFactory(relay))
    control._raiseSynchronously = True
    metrics = None
    if options["metrics"] is not None:
        from tcprelay.relay.metrics import metrics_site

        metrics = StreamServerEndpointService(
            serverFromString(reactor, options["metrics"]), metrics_site(relay)
        )
        metrics._raiseSynchronously = True
    log_observer = None
    if options["log-format"] == "json":
        from tcprelay.logs import json_lines_observer, json_log_stream

        twistd = options.twistd_options()
        if twistd:
            try:
                stream = json_log_stream(twistd.get("logfile"), bool(twistd.get("nodaemon")))
            except OSError as e:
                sys.stderr.write(f"tcprelay: cannot open the log file ({e})\n")
                sys.stderr.flush()
                raise SystemExit(1) from None
            log_observer = json_lines_observer(stream)
        else:
            log_observer = json_lines_observer()
    notifier = SystemdNotifier(reactor, control)
    entrances: list[Any] = [
        NamedEntrance(serverFromString(reactor, options[kind]), NamedVisitorFactory(relay, kind))
        for kind in ("http", "tls")
        if options[kind] is not None
    ]
    first, last = door_services(relay, options, reactor)
    entrances = [*first, *entrances, *last]
    return service_class(
        relay,
        control,
        metrics,
        notifier,
        log_observer,
        busy_poll=options["busy-poll"],
        entrances=entrances,
    )
