"""
Side-by-side benchmark of tcprelay against the original Go relay.

``python -m benchmarks``, run from the root of a source checkout, starts on
loopback only four stacks in one run and measures each with the same Go
load client (``goload``):

``direct``
    the Go echo server alone (the baseline: what TCP costs without a relay);
``go-relay``
    the Go muxado v1 relay with the original's behaviour (``legacyrelay``)
    and the Go echo service (``echosvc``) behind it;
``tcprelay``
    tcprelay's relay (``twistd -n tcprelay``) and the same Go echo service;
``expose``
    tcprelay's relay and ``tcprelay expose`` in front of the direct echo
    server.

For each it measures echo throughput with 1, 8 and 64 connections, connect +
1-byte echo + close latency (p50, p99), connections per second with 8
clients, relay RSS per idle visitor connection with 10,000 held open, and
relay CPU seconds per GB relayed.  It prints one table (with the ratios
tcprelay / Go relay and tcprelay / direct) and can write JSON.

With ``--baseline-venv PATH`` the tcprelay installed in that virtualenv (an
older commit) runs as two more stacks, ``tcprelay-baseline`` and
``expose-baseline``, so that one run compares both with the Go relay.

The Go programs are built from ``tests/interop/`` of the checkout
(``--go-src``), which is why this package is not installed with tcprelay.
Recorded runs are in ``benchmarks/results/``.  See ``docs/benchmarks.rst``
and ``--help``.
"""

from benchmarks.cli import main

__all__ = ["main"]
