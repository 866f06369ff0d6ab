"""
Doors: how agents arrive (the control side of the relay).

- :mod:`.muxado`: muxado v1 sessions, in the original relay's dialect or
  tcprelay's extended one (:mod:`.muxado_handshake`).
- :mod:`.ssh`: OpenSSH clients (``ssh -R``), keys in :mod:`.ssh_keys`.
- :mod:`.ngrok`: ngrok's agent SDKs (muxado v2).
- :mod:`.base`: what the three share (a tunnel's bookkeeping, admission,
  the handshake deadline, giving a route up).

Each registered agent becomes an :class:`~tcprelay.relay.interfaces.ITunnel`
on a route claimed through :class:`~tcprelay.relay.core.Relay`.
"""
