"""The ``tcprelay`` console script.

Subcommands (``expose`` and friends) come later; for now it only prints its
usage.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """\
usage: tcprelay <command> [options]

Commands are not implemented yet. To run the relay:

    twistd -n tcprelay --control 8080
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(f"tcprelay: unknown command: {args[0]}\n\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
