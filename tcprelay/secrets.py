"""
Shared secrets: reading the secrets file, and the identity of a credential.

Used by the relay (``--secrets-file``, reloaded on SIGHUP) and by the agent
(``--secret-file``, the ``tcprelay:`` endpoint's ``secretFile=``), so it
depends on nothing but the standard library.
"""

from __future__ import annotations

from hashlib import sha256

__all__ = ["credential_id", "read_secrets"]


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
    for number, secret in enumerate(read_secrets(argv[0]), 1):
        print(f"{credential_id(secret)}  secret {number}")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_print_ids(sys.argv[1:]))
