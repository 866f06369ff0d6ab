"""tcprelay: a Twisted TCP relay (reverse tunnel) speaking muxado v1."""

__version__ = "0.1.0"
