"""
Doors: how agents arrive (the control side of the relay).

- :mod:`.muxado`: muxado v1 sessions, in the original relay's dialect or
  tcprelay's extended one (:mod:`.muxado_handshake`).

Each registered agent becomes an :class:`~tcprelay.relay.interfaces.ITunnel`
on a route claimed through :class:`~tcprelay.relay.core.Relay`.
"""
