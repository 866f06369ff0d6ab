"""
What the documentation tells people to type: every twistd command in
README.rst and docs/*.rst names its pid file (``--pidfile=`` or a path), so
that following the docs leaves no ``twistd.pid`` in the current directory
for the next twistd to trip over; and a checkout ignores the files twistd
writes by default.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]

_COMMAND = re.compile(r"(?:^ {4,}|&& )(?:\$ )?(?:\S*/)?twistd(?: -[-\w]+(?:=\S*)?)* (?:tcprelay|web)\b")
"""A twistd command in a literal block (``twistd -n ... tcprelay``,
``$ twistd ...``, ``... && .venv/bin/twistd ...``)."""


def _twistd_commands() -> list[tuple[str, int, str]]:
    found = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            match = _COMMAND.search(line)
            if match:
                found.append((path.name, number, line[match.start():].strip()))
    return found


def test_documented_twistd_commands_name_their_pid_file() -> None:
    commands = _twistd_commands()
    assert any(name == "README.rst" for name, _, _ in commands), "the quick start was not found"
    missing = [c for c in commands if "--pidfile" not in c[2]]
    assert not missing, missing


def test_twistds_default_files_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "twistd.pid" in ignored and "twistd.log" in ignored
