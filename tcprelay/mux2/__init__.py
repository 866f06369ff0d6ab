"""
Sans-IO muxado v2, the framing of ngrok's agent SDKs: frame codec
(:mod:`.frames`), typed-stream session (:mod:`.session`) and the ngrok
agent protocol's messages (:mod:`.rpc`).

The session reports the events of :mod:`tcprelay.mux.events` and has the
interface of the v1 session, so that :class:`tcprelay.protocol.MuxProtocol`
runs it too.  Nothing in this package performs I/O or imports Twisted.
"""

from tcprelay.mux2.frames import ErrorCode, FrameError, FrameType
from tcprelay.mux2.session import MAX_FRAME, WINDOW, Session

__all__ = ["ErrorCode", "FrameError", "FrameType", "MAX_FRAME", "Session", "WINDOW"]
