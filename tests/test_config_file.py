"""
``--config FILE`` (TOML) for ``twistd tcprelay``, and the limit options:
every option settable by its long name, the command line winning, clear
usage errors; generic over any Options' parameters, flags and repeatable
handlers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from tcprelay import tap
from tcprelay.config_file import ConfigFileOptions
from tcprelay.relay.limits import parse_networks


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


def _parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_file_sets_options_and_command_line_wins(tmp_path: Path) -> None:
    """Keys are long option names, numbers may be numbers, arrays feed repeatable options; the command line wins."""
    path = _file(
        tmp_path,
        'public-interface = "127.0.0.1"\n'
        "lease = 12.5\n"
        "max-visitors-per-ip = 7\n"
        'ports = "20000-20004"\n'
        'allow = ["10.0.0.0/8", "192.0.2.0/24,198.51.100.0/24"]\n'
        'secret = ["from-file"]\n',
    )
    options = _parse("--config", path, "--lease", "3", "--control", "tcp:19999")
    config = options.relay_config()
    assert config.public_interface == "127.0.0.1"
    assert config.lease == 3.0
    assert config.limits.max_visitors_per_ip == 7
    assert list(config.ports) == list(range(20000, 20005))
    assert config.limits.addresses.allow == parse_networks(
        ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24"]
    )
    assert config.secrets == (b"from-file",)
    assert config.config_file == path
    # a repeatable option on the command line replaces all of the file's values
    assert _parse("--config", path, "--secret", "cli").relay_config().secrets == (b"cli",)


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus = 1\n", "unknown option 'bogus'"),
        ("public_interface = 'x'\n", "unknown option 'public_interface'"),
        ("config = 'other.toml'\n", "unknown option 'config'"),
        ("lease = true\n", "'lease' must be a string or a number"),
        ("lease = [1, 2]\n", "'lease' takes one value, not an array"),
        ("allow = [{a = 1}]\n", "'allow' must be a string or a number"),
        ("lease = 'soon'\n", "--lease must be a number"),
        ("max-visitors = -1\n", "--max-visitors must be 0 or more"),
        ("deny = '10.0.0.1/8'\n", "--deny: '10.0.0.1/8' is not a CIDR network"),
        ("credentials = 1\n", "'credentials' must be a table"),
        ("[credentials.secret-text]\nallow = []\n", "not a credential id"),
        ("[credentials.0123456789abcdef]\npermit = []\n", "only 'allow' and 'deny'"),
        ("[credentials.0123456789abcdef]\nallow = [1]\n", "must be an array of strings"),
        ("this is = not toml [\n", "not valid TOML"),
    ],
)
def test_bad_file_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    """Unknown keys, wrong types and bad values name the file and the key."""
    with pytest.raises(usage.UsageError, match=message.replace("[", r"\[")):
        _parse("--config", _file(tmp_path, text))


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--config: .*No such file"):
        _parse("--config", str(tmp_path / "missing.toml"))


def test_credentials_table_gives_per_credential_filters(tmp_path: Path) -> None:
    """[credentials.ID] allow/deny become that credential's visitor filter."""
    path = _file(
        tmp_path,
        '[credentials.0123456789abcdef]\nallow = ["10.0.0.0/8"]\ndeny = "10.9.0.0/16"\n',
    )
    limits = _parse("--config", path).relay_config().limits
    f = limits.credentials["0123456789abcdef"]
    assert f.permits("10.1.1.1") and not f.permits("10.9.1.1") and not f.permits("192.0.2.1")


class _Generic(ConfigFileOptions):
    """Options added by someone else: a flag, a parameter, a repeatable handler."""

    optFlags = [["verbose", "v", "Talk."]]
    optParameters = [["config", None, None, ""], ["name", "n", "x", ""]]

    def __init__(self) -> None:
        super().__init__()
        self["tag"] = []

    def opt_tag(self, value: str) -> None:
        self["tag"].append(value)

    def postOptions(self) -> None:
        self.apply_config_file()


def test_generic_over_flags_parameters_and_handlers(tmp_path: Path) -> None:
    """Any Options: flags are booleans, parameters values, handlers arrays; a short option on the command line wins too."""
    path = _file(tmp_path, 'verbose = true\nname = "file"\ntag = ["a", "b"]\n')
    options = _Generic()
    options.parseOptions(["--config", path, "-n", "cli"])
    assert options["verbose"] and options["name"] == "cli" and options["tag"] == ["a", "b"]
    off = _Generic()
    off.parseOptions(["--config", _file(tmp_path, "verbose = false\n")])
    assert not off["verbose"]
    with pytest.raises(usage.UsageError, match="'verbose' is a flag: true or false"):
        _Generic().parseOptions(["--config", _file(tmp_path, 'verbose = "yes"\n')])


def test_limit_defaults_and_errors() -> None:
    """The production defaults, and bad values of the new options."""
    limits = _parse().relay_config().limits
    assert (limits.max_visitors, limits.max_visitors_per_service, limits.max_visitors_per_ip) == (
        100000,
        20000,
        16384,
    )
    assert (limits.visitor_rate, limits.visitor_burst) == (5000.0, 10000)
    assert (limits.max_sessions_per_ip, limits.max_pending_sessions) == (2048, 4096)
    assert limits.idle_timeout == 0 and not limits.addresses
    for argv, message in [
        (["--control-backlog", "0"], "--control-backlog must be positive"),
        (["--visitor-burst", "0"], "--visitor-burst must be positive"),
        (["--idle-timeout", "x"], "--idle-timeout must be a number"),
        (["--allow", "nowhere"], "--allow: 'nowhere' is not a CIDR network"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            _parse(*argv)


@pytest.mark.parametrize(
    "given, expected",
    [
        ("tcp:8080", "tcp:8080:backlog=1024"),
        ("tcp6:8080:interface=\\:\\:1", "tcp6:8080:interface=\\:\\:1:backlog=1024"),
        ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=1024"),
        ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
        ("systemd:domain=INET:name=control", "systemd:domain=INET:name=control"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_control_backlog_added_to_tcp_tcp6_ssl(given: str, expected: str) -> None:
    """backlog= is added to tcp:, tcp6: and ssl: control endpoints unless they give one."""
    assert tap.with_backlog(given, 1024) == expected
