"""
The options of the doors beyond the control port (``--ssh``, ``--ngrok``)
and of the cluster (``--cluster``, ``--node-*``) of ``twistd tcprelay``:
their rows of the option table (:class:`tcprelay.tap.Options` lists them
among its own, in the order ``--help`` shows), their checks, and the
services they add to the relay (:func:`door_services`).  Each door's and
the cluster's modules are imported only when its option is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from tcprelay.options import checked_endpoint, positive
from tcprelay.secrets import read_secrets

if TYPE_CHECKING:
    from tcprelay.relay.core import Relay

__all__ = ["CLUSTER_OPTIONS", "DOOR_OPTIONS", "check_cluster", "check_doors", "door_services"]

DOOR_OPTIONS: list[list[Any]] = [
    [
        "ssh",
        None,
        None,
        "Endpoint of the SSH door: OpenSSH clients are agents, each "
        "remote forward (ssh -R) a service (e.g. tcp:2222; off by default; "
        "needs --ssh-host-key and --ssh-authorized-keys).",
    ],
    [
        "ssh-host-key",
        None,
        None,
        "Private host key file of the SSH door; an Ed25519 key is created "
        "there (mode 0600) when the file does not exist.",
    ],
    [
        "ssh-authorized-keys",
        None,
        None,
        "OpenSSH authorized_keys file of the keys that may log in to the "
        "SSH door (public keys only); re-read when it changes.",
    ],
    [
        "ngrok",
        None,
        None,
        "Endpoint of the ngrok door: ngrok's agent SDKs (Python ngrok, "
        "JavaScript @ngrok/ngrok) are agents, given server_addr and the "
        "relay's CA; their authtoken is one of the relay's secrets (a TLS "
        "endpoint, e.g. ssl:4443:privateKey=key.pem:certKey=cert.pem; "
        "off by default).",
    ],
]
"""``--ssh``, ``--ssh-host-key``, ``--ssh-authorized-keys``, ``--ngrok``."""

CLUSTER_OPTIONS: list[list[Any]] = [
    [
        "cluster",
        None,
        None,
        "Join a cluster of relay nodes sharing one registry in Redis: "
        "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB] (needs --node-address).",
    ],
    [
        "node-address",
        None,
        None,
        "HOST:PORT other nodes of the cluster reach this node at; the node "
        "listens there for visitors they forward.",
    ],
    [
        "node-name",
        None,
        None,
        "This node's name in the cluster, unique (default: --node-address).",
    ],
    [
        "cluster-secret",
        None,
        None,
        "File holding the cluster secret (first line), the same on every "
        "node: it authenticates node-to-node connections (default: one "
        "the first node keeps in Redis).",
    ],
    [
        "cluster-ttl",
        None,
        "5",
        "Seconds a node's entries in Redis outlive its last refresh (it "
        "refreshes every TTL/5): a dead node's routes are free after it.",
    ],
]
"""``--cluster``, ``--node-address``, ``--node-name``, ``--cluster-secret``, ``--cluster-ttl``."""


def check_doors(options: Any) -> None:
    """--ssh with both of its files (the host key may be absent), and --ngrok."""
    check = not options.reloading
    if options["ssh"] is None:
        for name in ("ssh-host-key", "ssh-authorized-keys"):
            if options[name] is not None:
                raise usage.UsageError(f"--{name} needs --ssh (the SSH door's endpoint)")
    else:
        options["ssh"] = checked_endpoint("ssh", options["ssh"], check)
        from tcprelay.relay.doors.ssh_keys import check_ssh_files

        problem = check_ssh_files(options["ssh-host-key"], options["ssh-authorized-keys"])
        if problem is not None:
            raise usage.UsageError(problem)
    if options["ngrok"] is not None:
        options["ngrok"] = checked_endpoint("ngrok", options["ngrok"], check)


def check_cluster(options: Any) -> None:
    """--cluster and the options that go with it: ``cluster-config``, a
    :class:`~tcprelay.relay.cluster.ClusterConfig` or None."""
    options["cluster-config"] = None
    if options["cluster"] is None:
        for name in ("node-address", "node-name", "cluster-secret"):
            if options[name] is not None:
                raise usage.UsageError(f"--{name} needs --cluster (the Redis URL)")
        return
    # only a cluster node loads the cluster layer
    from tcprelay.relay.cluster import ClusterConfig, parse_redis_url

    try:
        import txredisapi  # noqa: F401
    except ImportError:
        raise usage.UsageError(
            "--cluster needs the txredisapi package: pip install 'tcprelay[cluster]'"
        ) from None
    try:
        redis = parse_redis_url(options["cluster"])
    except ValueError as e:
        raise usage.UsageError(f"--cluster: {e}") from None
    address = options["node-address"]
    if not address:
        raise usage.UsageError("--cluster needs --node-address HOST:PORT (where other nodes reach this one)")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--node-address {address!r} is not HOST:PORT")
    secret = None
    if options["cluster-secret"]:
        try:
            secret = read_secrets(options["cluster-secret"])[0]
        except (OSError, ValueError, IndexError) as e:
            raise usage.UsageError(f"--cluster-secret: {e}") from None
    ttl = positive("cluster-ttl", options["cluster-ttl"])
    if ttl < 1:
        raise usage.UsageError("--cluster-ttl must be at least 1 (second)")
    options["cluster-config"] = ClusterConfig(
        redis=redis,
        node_name=options["node-name"] or address,
        node_host=host,
        node_port=int(port),
        secret=secret,
        ttl=ttl,
    )


def door_services(relay: Relay, options: Any, reactor: Any) -> tuple[list[Any], list[Any]]:
    """
    The services the options add: the cluster (``relay.cluster`` is set;
    it starts before the entrances) and the SSH and ngrok doors (after
    them), as (first, last).
    """
    first: list[Any] = []
    last: list[Any] = []
    cluster_config = options.get("cluster-config")
    if cluster_config is not None:
        from tcprelay.relay.cluster import Cluster

        relay.cluster = Cluster(relay, cluster_config, reactor)
        first.append(relay.cluster)
    if options["ssh"] is not None:
        from tcprelay.relay.doors.ssh import SshDoor

        last.append(
            SshDoor(
                relay,
                serverFromString(reactor, options["ssh"]),
                options["ssh-host-key"],
                options["ssh-authorized-keys"],
            )
        )
    if options["ngrok"] is not None:
        from tcprelay.relay.doors.ngrok import NgrokDoor

        last.append(NgrokDoor(relay, serverFromString(reactor, options["ngrok"])))
    return first, last
