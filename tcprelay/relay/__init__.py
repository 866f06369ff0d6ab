"""
The relay daemon: the public port pool (:mod:`.pool`) and control sessions,
registrations and visitor forwarding (:mod:`.server`).
"""
