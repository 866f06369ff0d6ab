"""
Entrances: how visitors arrive (the public side of the relay).

- :mod:`.ports`: a dedicated public port per route (:class:`~tcprelay.relay.routes.PortRoute`).

Each finds a route's tunnel in the relay's registry and hands the visitor
to :meth:`tcprelay.relay.core.Relay.splice_visitor`.
"""
