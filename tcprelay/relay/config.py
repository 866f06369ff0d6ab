"""The relay's settings (:class:`RelayConfig`), validated by the tap Options."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import attrs

from tcprelay.mux.session import SessionConfig
from tcprelay.relay.limits import LimitsConfig
from tcprelay.secrets import CredentialRules

__all__ = ["DEFAULT_SESSION_BUFFER", "PRE_HANDSHAKE_BUFFER", "PRE_HANDSHAKE_READ", "RelayConfig"]

DEFAULT_SESSION_BUFFER = 4 * 1024 * 1024
"""Bytes a registered service's socket may hold unsent (``--session-buffer``):
stream data waits in its streams while the socket is full, so only what the
peer provokes without reading (echoes, RSTs, WNDINCs) grows past a few
hundred KiB; 4 MiB leaves honest peers far from it."""
PRE_HANDSHAKE_READ = 4096
"""Bytes one read takes from an unregistered session: a handshake is a few
hundred bytes, and a peer flooding frames before it has registered makes
the relay decode no more than this at a time."""
PRE_HANDSHAKE_BUFFER = 256 * 1024
"""The same limit before the handshake: nothing but control frames and the
handshake's reply go to an unregistered peer."""


@attrs.frozen
class RelayConfig:
    """Everything the relay needs to know, validated by the tap Options."""

    ports: Sequence[int]
    public_interface: str = ""
    public_host: str = "localhost"
    wait_timeout: float = 60.0
    drain_timeout: float = 30.0
    bind_retry: float = 5.0
    handshake_timeout: float = 30.0
    """Seconds a new session has to ask for a port before it is closed."""
    lease: float = 60.0
    """Seconds a lost extended session's port stays reserved for its lease."""
    secrets: tuple[bytes, ...] = ()
    """Accepted shared secrets; empty means no authentication."""
    secrets_file: Optional[str] = None
    """Where more secrets come from; re-read by :meth:`Relay.reload_secrets`."""
    secrets_inline: tuple[bytes, ...] = ()
    """The ``--secret`` ones (kept across reloads)."""
    rules: Mapping[str, CredentialRules] = attrs.field(factory=dict)
    """What each credential (by id) may claim, from the secrets file's
    ``#:`` lines; a credential not in here may claim any port and name."""
    session_buffer: int = DEFAULT_SESSION_BUFFER
    """Bytes a registered service's socket may hold unsent before it is cut."""
    open_timeout: Optional[float] = 30.0
    """Seconds a service has to answer a visitor's stream once the visitor
    has sent bytes (None: no limit)."""
    half_close_timeout: Optional[float] = 60.0
    """Seconds a service may stay silent on a stream its visitor has
    half-closed (None: no limit)."""
    frame_timeout: Optional[float] = 10.0
    """Seconds the rest of a started frame may take (None: no limit)."""
    domains: tuple[str, ...] = ()
    """Names the relay serves named routes under (``--domain``), normalised."""
    http_port: Optional[int] = None
    """The public port of the HTTP entrance (None: no ``--http``)."""
    tls_port: Optional[int] = None
    """The public port of the TLS entrance (None: no ``--tls``)."""
    head_timeout: float = 10.0
    """Seconds a visitor of a shared entrance has to name its host."""
    session: SessionConfig = SessionConfig()
    limits: LimitsConfig = LimitsConfig()
    """The edge limits (connection counts and rates, address lists, idle
    timeout); replaced by :meth:`Relay.reload_config`."""
    config_file: Optional[str] = None
    """The ``--config`` file, if any (informational: the relay re-reads it
    through :attr:`Relay.config_source`)."""
