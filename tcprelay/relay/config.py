"""The relay's settings (:class:`RelayConfig`), validated by the tap Options."""

from __future__ import annotations

from typing import Optional, Sequence

import attrs

from tcprelay.mux.session import SessionConfig
from tcprelay.relay.limits import LimitsConfig

__all__ = ["RelayConfig"]


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
    session: SessionConfig = SessionConfig()
    limits: LimitsConfig = LimitsConfig()
    """The edge limits (connection counts and rates, address lists, idle
    timeout); replaced by :meth:`Relay.reload_config`."""
    config_file: Optional[str] = None
    """The ``--config`` file, if any (informational: the relay re-reads it
    through :attr:`Relay.config_source`)."""
