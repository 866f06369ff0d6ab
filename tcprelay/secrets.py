"""
Shared secrets: reading the secrets file, the identity of a credential, and
what each credential may claim (the ``#:`` rules lines of the file).

Used by the relay (``--secrets-file``, reloaded on SIGHUP) and by the agent
(``--secret-file``, the ``tcprelay:`` endpoint's ``secretFile=``), so it
depends on nothing but the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from hashlib import sha256
from typing import Optional, Sequence

__all__ = [
    "CredentialRules",
    "RULES_MARKER",
    "SecretsFile",
    "credential_id",
    "parse_secrets",
    "read_secrets",
    "read_secrets_file",
]

RULES_MARKER = b"#:"
"""A line starting with this gives the rules of the next secret of the file
(``#: names=app,*.app ports=9000-9010``).  It starts with ``#``, so files
written before rules existed keep every secret byte for byte, and readers
that know nothing of rules (the agent) skip it as a comment."""

_RULE_KEYS = ("names", "ports")
_PATTERN = re.compile(r"[a-z0-9_*?\[\]!-]+")


@dataclass(frozen=True)
class CredentialRules:
    """
    What one credential may claim, from the ``#:`` lines before its secret.
    ``names``: name patterns (normalised; ending with ``.`` when absolute),
    None for any name; ``ports``: the public ports, None for any.  An empty
    tuple or set allows none.
    """

    names: Optional[tuple[str, ...]]
    ports: Optional[frozenset[int]]
    line: int = 0
    """The line of the secret the rules belong to (for messages)."""

    def allows_port(self, port: int) -> bool:
        """Whether the credential may have public port ``port``."""
        return self.ports is None or port in self.ports

    def allows_name(self, name: str, domains: Sequence[str]) -> bool:
        """
        Whether the credential may claim ``name`` (normalised, as the relay
        holds it, possibly ``*.``-wildcard) on a relay serving ``domains``:
        an absolute pattern (``app.example.com.``) is matched against the
        whole name, any other against the part of the name before one of
        the domains it is under (``app`` for ``app.example.com``).
        """
        if self.names is None:
            return True
        relative = [name[: -len(d) - 1] for d in domains if name.endswith("." + d)]
        for pattern in self.names:
            if pattern.endswith("."):
                if fnmatchcase(name, pattern[:-1]):
                    return True
            elif any(fnmatchcase(part, pattern) for part in relative):
                return True
        return False

    def describe(self) -> str:
        """The rules as written in a secrets file."""
        names = "*" if self.names is None else ",".join(self.names)
        ports = "*" if self.ports is None else _describe_ports(self.ports)
        return f"names={names} ports={ports}"


@dataclass(frozen=True)
class SecretsFile:
    """A parsed secrets file: its secrets in order, and the rules of those that have any."""

    secrets: list[bytes]
    rules: dict[str, CredentialRules]
    """Rules by credential id; a credential not in here may claim anything."""


def read_secrets(path: str) -> list[bytes]:
    """
    Secrets from a file: one per line, surrounding blanks stripped, empty
    lines and lines starting with ``#`` ignored.  ValueError if none.
    """
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    found = [
        line.strip() for line in lines if line.strip() and not line.strip().startswith(b"#")
    ]
    if not found:
        raise ValueError(f"{path} holds no secret")
    return found


def read_secrets_file(path: str) -> SecretsFile:
    """
    The secrets of a file with their rules (:func:`parse_secrets`);
    ValueError naming the file (and the line) when it holds no secret or a
    bad rules line.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_secrets(data)
    except ValueError as e:
        where = f"{path}:" if str(e).startswith("line ") else path
        raise ValueError(f"{where} {e}") from None


def parse_secrets(data: bytes) -> SecretsFile:
    """
    Parse a secrets file's bytes: one secret per line (surrounding blanks
    stripped; empty lines and ``#`` comments ignored), each optionally
    preceded by ``#:`` lines giving its rules: whitespace-separated
    ``names=PATTERN,...`` and ``ports=PORT|LOW-HIGH,...`` fields (``*``:
    any).  A secret with rules may claim only what they list.  ValueError
    (``line N: ...``) for a bad rules line, rules with no secret after them,
    a secret with rules given twice, or no secret at all.
    """
    secrets: list[bytes] = []
    rules: dict[str, CredentialRules] = {}
    seen: dict[bytes, int] = {}
    pending: dict[str, tuple[int, object]] = {}
    pending_line = 0
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if line.startswith(RULES_MARKER):
            for key, value in _parse_rules_line(line[len(RULES_MARKER) :], number).items():
                if key in pending:
                    raise ValueError(
                        f"line {number}: {key}= given twice for one secret "
                        f"(also on line {pending[key][0]})"
                    )
                pending[key] = (number, value)
            pending_line = pending_line or number
            continue
        if not line or line.startswith(b"#"):
            continue
        first = seen.setdefault(line, number)
        ident = credential_id(line)
        if first != number and (pending or ident in rules):
            raise ValueError(
                f"line {number}: secret repeated with rules (first on line {first}); "
                "give each secret once"
            )
        secrets.append(line)
        if pending_line:
            names = pending.get("names", (0, ()))[1]
            ports = pending.get("ports", (0, frozenset()))[1]
            rules[ident] = CredentialRules(names, ports, number)  # type: ignore[arg-type]
            pending, pending_line = {}, 0
    if pending_line:
        raise ValueError(f"line {pending_line}: rules with no secret after them")
    if not secrets:
        raise ValueError("holds no secret")
    return SecretsFile(secrets, rules)


def _parse_rules_line(text: bytes, number: int) -> dict[str, object]:
    try:
        fields = text.decode("utf-8").split()
    except UnicodeDecodeError:
        raise ValueError(f"line {number}: a rules line must be UTF-8") from None
    parsed: dict[str, object] = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise ValueError(f"line {number}: {field!r} is not KEY=VALUE (names=..., ports=...)")
        if key not in _RULE_KEYS:
            raise ValueError(f"line {number}: unknown rule {key!r} (names= or ports=)")
        if key in parsed:
            raise ValueError(f"line {number}: {key}= given twice")
        items = [item for item in value.split(",") if item]
        if key == "names":
            parsed[key] = None if items == ["*"] else tuple(_name_pattern(i, number) for i in items)
        else:
            parsed[key] = None if items == ["*"] else frozenset(
                port for item in items for port in _port_range(item, number)
            )
    if not parsed:
        raise ValueError(f"line {number}: an empty rules line (names=..., ports=...)")
    return parsed


def _name_pattern(text: str, number: int) -> str:
    """A name pattern as matched: lower case, non-ASCII labels in IDNA form."""
    absolute = text.endswith(".")
    labels = []
    for label in (text[:-1] if absolute else text).split("."):
        if not label.isascii():
            if any(c in label for c in "*?[]!"):
                raise ValueError(
                    f"line {number}: names: {text!r}: a non-ASCII label cannot hold "
                    "a wildcard; write its xn-- form"
                )
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"line {number}: names: {text!r} is not a name pattern") from None
        label = label.lower()
        if not _PATTERN.fullmatch(label):
            raise ValueError(f"line {number}: names: {text!r} is not a name pattern")
        labels.append(label)
    return ".".join(labels) + ("." if absolute else "")


def _port_range(text: str, number: int) -> range:
    from tcprelay.options import parse_port_range

    try:
        return parse_port_range(text)
    except ValueError as e:
        raise ValueError(f"line {number}: ports: {e}") from None


def _describe_ports(ports: frozenset[int]) -> str:
    """``9000-9002,9005`` for {9000, 9001, 9002, 9005}."""
    runs: list[list[int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][1] + 1:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


def credential_id(secret: bytes) -> str:
    """
    A short name for the credential ``secret`` is, safe to log and to keep
    in a registry (the first 16 hex digits of its SHA-256): leases and,
    later, claims on names and ports belong to it.
    """
    return sha256(b"tcprelay credential\x00" + secret).hexdigest()[:16]


def _print_ids(argv: list[str]) -> int:
    """``python -m tcprelay.secrets FILE``: each secret's credential id (never the secret)."""
    if len(argv) != 1:
        print("usage: python -m tcprelay.secrets SECRETS-FILE")
        return 2
    try:
        parsed = read_secrets_file(argv[0])
    except (OSError, ValueError) as e:
        print(f"error: {e}")
        return 1
    for number, secret in enumerate(parsed.secrets, 1):
        ident = credential_id(secret)
        rules = parsed.rules.get(ident)
        print(f"{ident}  secret {number}" + ("" if rules is None else f"  {rules.describe()}"))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_print_ids(sys.argv[1:]))
