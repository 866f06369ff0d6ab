"""twistd wiring for the relay: command-line options and ``makeService``.

twistd (through the ServiceMaker in twisted/plugins/tcprelay_plugin.py) parses
the command line with :class:`Options`, then calls :func:`makeService`. This
module only composes services; it never listens itself.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.python import usage


def normalise_endpoint(description: str) -> str:
    """Turn the shorthand of a bare port (``"8080"``) into ``"tcp:8080"``.

    Anything else is taken to be an endpoint string already and is returned
    unchanged; twistd's endpoint parser rejects a bare port, so callers
    normalise before handing the string to ``serverFromString``.
    """
    if description.isascii() and description.isdigit():
        port = int(description)
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"port out of range: {description}")
        return f"tcp:{port}"
    return description


class Options(usage.Options):
    """Command-line options of ``twistd tcprelay``."""

    synopsis = "[options]"
    longdesc = "Run the tcprelay relay: services dial in, visitors connect to public ports."

    optParameters = [
        [
            "control",
            "c",
            "tcp:8080",
            "Endpoint string for the control port services connect to "
            "(a bare port such as 8080 means tcp:8080).",
        ],
    ]

    def postOptions(self) -> None:
        self["control"] = normalise_endpoint(self["control"])


def makeService(options: Options) -> MultiService:
    """Build the relay's top-level service from parsed :class:`Options`.

    Placeholder: returns an empty MultiService; the relay work adds its named
    children (control listener, port pool, public listeners) here.
    """
    service = MultiService()
    return service
