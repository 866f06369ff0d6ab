"""
Keys of the SSH door (:mod:`tcprelay.relay.doors.ssh`): the relay's host
key, the agents' ``authorized_keys`` file, and the checker that lets in
exactly the keys listed there.

- :func:`load_host_key` reads the host key (any private key file OpenSSH
  or Conch reads), or creates an Ed25519 one (mode 0600) when the file does
  not exist yet.
- :class:`AuthorizedKeys` reads an OpenSSH ``authorized_keys`` file
  (options before the key type are parsed and kept; comments and blank
  lines skipped), again whenever the file changes.
- :class:`AuthorizedKeysChecker` is a ``twisted.cred`` checker of
  ``ISSHPrivateKey`` credentials: a listed key with a valid signature
  logs in, as its fingerprint (:func:`fingerprint`); nothing else does.
  Only public keys are checked, so a portal with only this checker offers
  no password or keyboard-interactive authentication.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import attrs
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

__all__ = [
    "AuthorizedKey",
    "AuthorizedKeys",
    "AuthorizedKeysChecker",
    "check_ssh_files",
    "fingerprint",
    "load_host_key",
    "parse_authorized_keys",
]

log = Logger()


def fingerprint(key: keys.Key) -> str:
    """The key's SHA256 fingerprint as OpenSSH prints it (``SHA256:...``, no padding)."""
    digest = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    return "SHA256:" + str(digest).rstrip("=")


def load_host_key(path: str) -> tuple[keys.Key, bool]:
    """
    The private host key in ``path``, and whether it was created now: when
    the file does not exist, a new Ed25519 key is written there (OpenSSH's
    format, mode 0600, never over an existing file).  Raises OSError or
    :class:`twisted.conch.ssh.keys.BadKeyError` for a file that cannot be
    read or holds no private key.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        pass
    else:
        key = keys.Key.fromString(data)
        if key.isPublic():
            raise keys.BadKeyError(f"{path} holds a public key, not a private one")
        return key, False
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = keys.Key(Ed25519PrivateKey.generate())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    return key, True


def check_ssh_files(host_key: Optional[str], authorized_keys: Optional[str]) -> Optional[str]:
    """
    What is wrong with the SSH door's files, for an error message, or None:
    both must be given, the authorized keys file must be readable, and a
    host key file that exists must hold a private key (one that does not
    exist yet is created at start).
    """
    if host_key is None or authorized_keys is None:
        return "--ssh needs --ssh-host-key PATH and --ssh-authorized-keys PATH"
    try:
        with open(authorized_keys, "rb"):
            pass
    except OSError as e:
        return f"--ssh-authorized-keys: cannot read {authorized_keys} ({e.strerror})"
    if os.path.exists(host_key):
        try:
            with open(host_key, "rb") as f:
                key = keys.Key.fromString(f.read())
        except OSError as e:
            return f"--ssh-host-key: cannot read {host_key} ({e.strerror})"
        except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
            return f"--ssh-host-key: {host_key} is not a usable private key ({e})"
        if key.isPublic():
            return f"--ssh-host-key: {host_key} holds a public key, not a private one"
    elif not os.path.isdir(os.path.dirname(os.path.abspath(host_key))):
        return f"--ssh-host-key: no directory to create {host_key} in"
    return None


@attrs.frozen
class AuthorizedKey:
    """One line of an ``authorized_keys`` file: the key and its options."""

    key: keys.Key = attrs.field(eq=False)
    fingerprint: str
    options: dict[str, list[str]] = attrs.field(factory=dict, eq=False)
    """Each option by name (lower case), with its values (``permitlisten``
    may come several times; a flag such as ``restrict`` has an empty value)."""
    comment: str = attrs.field(default="", eq=False)


def _split_options(text: str) -> tuple[list[str], str]:
    """The comma-separated options at the start of ``text`` (quotes kept
    together), and the rest of the line after them."""
    options: list[str] = []
    current: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted and i + 1 < len(text):
            current.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            options.append("".join(current))
            current = []
        elif c in " \t" and not quoted:
            break
        else:
            current.append(c)
        i += 1
    if quoted:
        raise ValueError("unterminated quoted option")
    options.append("".join(current))
    return options, text[i:].strip()


_KEY_TYPES = (
    "ssh-",
    "ecdsa-sha2-",
    "sk-ssh-",
    "sk-ecdsa-",
)


def parse_authorized_keys(text: str, where: str = "authorized_keys") -> list[AuthorizedKey]:
    """
    The keys of an OpenSSH ``authorized_keys`` file's text.  A line that
    cannot be read is skipped with a warning naming it (as sshd does): one
    bad line does not lock every agent out.
    """
    found: list[AuthorizedKey] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            options: dict[str, list[str]] = {}
            if not line.startswith(_KEY_TYPES):
                names, line = _split_options(line)
                for option in names:
                    name, _, value = option.partition("=")
                    options.setdefault(name.strip().lower(), []).append(value)
            fields = line.split(None, 2)
            if len(fields) < 2:
                raise ValueError("no key")
            key = keys.Key.fromString(f"{fields[0]} {fields[1]}".encode("ascii"))
            comment = fields[2] if len(fields) > 2 else ""
        except (ValueError, keys.BadKeyError, UnicodeError) as e:
            log.warn(
                "SSH: {where} line {number} skipped: {error}",
                where=where,
                number=number,
                error=str(e) or type(e).__name__,
            )
            continue
        found.append(AuthorizedKey(key, fingerprint(key), options, comment))
    return found


class AuthorizedKeys:
    """
    The keys of an ``authorized_keys`` file, read again whenever its
    modification time or size changes (edits need no restart).  A file
    that cannot be read lets no key in (logged once per change).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: Optional[tuple[int, int]] = None
        self._keys: dict[bytes, AuthorizedKey] = {}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            if self._stamp != (-1, -1):
                log.warn("SSH: cannot read {path} ({error}): no key can log in", path=self.path, error=str(e))
            self._stamp = (-1, -1)
            self._keys = {}
            return
        self._stamp = stamp
        self._keys = {entry.key.blob(): entry for entry in parse_authorized_keys(text, self.path)}

    def lookup(self, blob: bytes) -> Optional[AuthorizedKey]:
        """The entry of the public key ``blob`` (SSH wire format), or None."""
        self._refresh()
        return self._keys.get(blob)

    def __len__(self) -> int:
        self._refresh()
        return len(self._keys)


@implementer(ICredentialsChecker)
class AuthorizedKeysChecker:
    """
    Logs in the keys of :class:`AuthorizedKeys` that prove themselves: the
    avatar id is the key's :class:`AuthorizedKey`.  An unlisted key is
    refused before the client is asked for a signature.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, authorized: AuthorizedKeys) -> None:
        self.authorized = authorized

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        entry = self.authorized.lookup(credentials.blob)
        if entry is None:
            return fail(UnauthorizedLogin("key not authorized"))
        if not credentials.signature:
            return fail(ValidPublicKey())  # listed: the client may sign now
        try:
            good = entry.key.verify(credentials.signature, credentials.sigData)
        except Exception:  # noqa: BLE001 - a malformed signature is a bad one
            good = False
        if not good:
            return fail(UnauthorizedLogin("bad signature"))
        return succeed(entry)


def key_rules(entry: AuthorizedKey) -> Optional["CredentialRules"]:
    """
    What a key may claim, from its ``permitlisten`` options (OpenSSH's
    syntax, repeatable or comma-separated inside the quotes): ``PORT``,
    ``LOW-HIGH`` or ``*`` (ports; a host part such as ``localhost:`` is
    ignored), ``LABEL:80`` / ``LABEL:443`` (an HTTP / TLS name pattern, as
    in a secrets file's ``names=``: ``app``, ``*.app``, ``api-*``).  None
    (anything) without the option.  A value that is none of these raises
    ValueError.
    """
    from tcprelay.secrets import CredentialRules

    values = entry.options.get("permitlisten")
    if values is None:
        return None
    ports: set[int] = set()
    any_port = False
    names: list[str] = []
    for value in values:
        for item in value.strip().strip('"').split(","):
            item = item.strip()
            host, colon, port_text = item.rpartition(":")
            if not colon:
                host, port_text = "", item
            if port_text == "*":
                any_port = True
                continue
            low, dash, high = port_text.partition("-")
            if not low.isdigit() or (dash and not high.isdigit()):
                raise ValueError(f"permitlisten {item!r}: not PORT, LOW-HIGH, * or NAME:80|443")
            first, last = int(low), int(high) if dash else int(low)
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"permitlisten {item!r}: ports run 1-65535")
            if host and host not in ("localhost", "*", "0.0.0.0", "::") and not dash and first in (80, 443):
                names.append(host.lower())
            else:
                ports.update(range(first, last + 1))
    return CredentialRules(tuple(names), None if any_port else frozenset(ports))
