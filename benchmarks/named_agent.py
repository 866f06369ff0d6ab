"""
``tcprelay expose`` on a named HTTP route, for the benchmark's
``expose-http`` stack when the install's ``tcprelay expose`` has no
``--http NAME`` option of its own::

    python named_agent.py --http NAME LOCAL --relay HOST:PORT [expose options]

It runs ``tcprelay.cli.main`` itself (the same agent, forwarder, process
tuning and output as ``tcprelay expose``), the one change being that the
agent's :class:`~tcprelay.agent.client.AgentConfig` asks for the HTTP
name NAME instead of a port.  Run it with the install's Python and
environment (the benchmark does), so that it imports that install's
tcprelay; it imports nothing of the benchmark.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def split_http(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(NAME, the other arguments) from ``--http NAME`` or ``--http=NAME``
    anywhere in ``argv``; ValueError without exactly one non-empty NAME."""
    names: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--http":
            if i + 1 >= len(args):
                raise ValueError("--http needs a NAME")
            names.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--http="):
            names.append(arg[len("--http="):])
        else:
            rest.append(arg)
        i += 1
    if len(names) != 1 or not names[0].strip():
        raise ValueError("give one --http NAME")
    return names[0].strip(), rest


def main(argv: Sequence[str] | None = None) -> int:
    try:
        name, rest = split_http(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.stderr.write(f"named_agent: {e}\n")
        return 2
    import tcprelay.agent.client as client
    from tcprelay import cli

    original = client.AgentConfig

    def named_config(**kwargs: Any) -> Any:
        kwargs.pop("port", None)  # a name, not a public port
        return original(kind="http", name=name, **kwargs)

    # cli.run_expose imports AgentConfig from the module when it runs
    client.AgentConfig = named_config  # type: ignore[assignment,misc]
    sys.argv[0] = "tcprelay"
    return cli.main(["expose", *rest])


if __name__ == "__main__":
    sys.exit(main())
