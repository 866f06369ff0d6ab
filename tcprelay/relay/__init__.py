"""
The relay: one core, many doors.

- :mod:`.interfaces`: the seams (tunnel, route, registry, visitor).
- :mod:`.core`: :class:`~.core.Relay`, what every door and entrance shares.
- :mod:`.registry`: the in-memory registry of routes, tunnels and leases.
- :mod:`.routes`: route values (a dedicated port).
- :mod:`.doors`: agents' side (muxado v1, legacy and extended dialects).
- :mod:`.entrances`: visitors' side (dedicated public ports).
- :mod:`.pool`: the public port pool.
- :mod:`.stats`, :mod:`.metrics`: counters, Prometheus ``/metrics`` and ``/status``.
- :mod:`.config`: :class:`~.config.RelayConfig`.
- :mod:`.service`: the relay as a composable MultiService.
- :mod:`.daemon`: ``twistd tcprelay``, which owns its process.
"""
