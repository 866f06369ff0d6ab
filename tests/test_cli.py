"""
The ``tcprelay`` command line (tcprelay.cli.main, run in process): what it
says and exits with for --version, --help, a missing LOCAL and option
values that make no sense; and the same checks in AgentConfig and the
``tcprelay:`` endpoint for library callers.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactor

from tcprelay import __version__
from tcprelay.agent.client import AgentConfig
from tcprelay.agent.endpoint import parse_endpoint
from tcprelay.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) for a command line that exits before the reactor would run."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--version"], ["expose", "--version"]])
def test_version_is_tcprelays(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """--version names tcprelay and its version (Twisted's only in brackets)."""
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out.startswith(f"tcprelay {__version__} "), out


def test_help_names_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    """--help starts with a usage line naming the program, not COMMAND alone."""
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert out.splitlines()[0] == "Usage: tcprelay COMMAND [options]", out
    code, out, _ = run(capsys, "expose", "--help")
    assert code == 0
    assert out.splitlines()[0] == "Usage: tcprelay expose LOCAL --relay RELAY [options]", out


def test_expose_without_local_says_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    """No LOCAL: exit 2, an error naming LOCAL (the local service) and the usage line."""
    code, out, err = run(capsys, "expose", "--relay", "127.0.0.1:9")
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith("tcprelay: missing LOCAL, the local service"), err
    assert "Usage: tcprelay expose LOCAL --relay RELAY [options]" in lines, err
    assert "Wrong number of arguments" not in err
    code, _, err = run(capsys, "expose")
    assert code == 2 and "missing LOCAL" in err, err
    code, _, err = run(capsys, "expose", "80", "81", "--relay", "127.0.0.1:9")
    assert code == 2 and "one LOCAL service at a time" in err, err


@pytest.mark.parametrize("value", ["-1", "0", "0.1", "nan", "inf", "soon"])
def test_backoff_max_that_makes_no_sense_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], value: str, tmp_path
) -> None:
    """--backoff-max below the first wait (0.5 s), not finite or not a number: exit 2, the option and value named."""
    code, out, err = run(
        capsys, "expose", "3000", "--relay", "127.0.0.1:9",
        "--lease-file", str(tmp_path / "lease.json"), "--backoff-max", value,
    )
    assert code == 2, err
    assert f"tcprelay: --backoff-max must be" in err and repr(value) in err, err


@pytest.mark.parametrize("value, seconds", [("0.5", 0.5), ("1", 1.0), ("30", 30.0)])
def test_backoff_max_accepted(value: str, seconds: float, tmp_path) -> None:
    from tcprelay.cli import Options

    options = Options()
    options.parseOptions(["expose", "3000", "--relay", "127.0.0.1:9", "--lease-file",
                          str(tmp_path / "lease.json"), "--backoff-max", value])
    assert options.subOptions["backoff-max"] == seconds


@pytest.mark.parametrize(
    "field, value",
    [("backoff_max", -1.0), ("backoff_max", 0.0), ("backoff_initial", 0.0),
     ("handshake_timeout", float("nan")), ("backoff_max", float("inf")), ("port", -5)],
)
def test_agent_config_refuses_values_that_make_no_sense(field: str, value: float) -> None:
    """A library caller gets a ValueError naming the field, not an agent that stops retrying."""
    with pytest.raises(ValueError, match=f"AgentConfig.{field}"):
        AgentConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["-5", "0", "70000", "abc"])
def test_endpoint_request_port_must_be_a_port(value: str) -> None:
    with pytest.raises(ValueError, match="requestPort must be a port number"):
        parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", requestPort=value)


def test_expose_asks_for_a_name_with_http_or_tls() -> None:
    """--http NAME and --tls NAME ask for a named route; one of --port/--http/--tls at most."""
    from tcprelay.cli import ExposeOptions

    options = ExposeOptions()
    options.parseOptions(["3000", "--relay", "127.0.0.1:8080", "--http", "app", "--lease-file", "/tmp/x"])
    assert (options["kind"], options["name"]) == ("http", "app")
    options = ExposeOptions()
    options.parseOptions(["3000", "--relay", "127.0.0.1:8080", "--tls", "*.app", "--lease-file", "/tmp/x"])
    assert (options["kind"], options["name"]) == ("tls", "*.app")


def test_expose_refuses_two_routes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "expose", "3000", "--relay", "127.0.0.1:8080", "--http", "a", "--port", "9000")
    assert code == 2
    assert "give one of --port, --http, --tls" in err


def test_expose_lease_files_differ_by_name() -> None:
    """The default lease file of a name differs from the port route's of the same LOCAL."""
    from tcprelay.cli import ExposeOptions

    files = set()
    for extra in ([], ["--http", "a"], ["--http", "b"], ["--tls", "a"]):
        options = ExposeOptions()
        options.parseOptions(["3000", "--relay", "127.0.0.1:8080", *extra])
        files.add(options["lease-file"])
    assert len(files) == 4


def test_endpoint_takes_kind_and_name() -> None:
    endpoint = parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", kind="tls", name="app")
    assert (endpoint.config.kind, endpoint.config.name) == ("tls", "app")
    assert parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", name="app").config.kind == "http"
    with pytest.raises(ValueError, match="needs name"):
        parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", kind="http")
    with pytest.raises(ValueError, match="kind must be"):
        parse_endpoint(MemoryReactor(), host="127.0.0.1", port="9", kind="udp", name="a")
