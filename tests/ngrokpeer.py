"""
A scripted ngrok SDK for in-process tests of the ngrok door: a client-role
muxado v2 session (tcprelay.mux2.session) on a StringTransport facing the
door's NgrokSession, on the MemoryRelay of tests/memory_relay.py.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tcprelay.mux import events as ev
from tcprelay.mux.session import Role
from tcprelay.mux2 import rpc
from tcprelay.mux2.session import Session
from tcprelay.relay.doors.ngrok import NgrokFactory, NgrokSession
from tests.memory_relay import HOST, MemoryRelay


def ngrok_factory(mr: MemoryRelay) -> NgrokFactory:
    """The door's factory, as it listened on the memory reactor."""
    for _port, factory, _backlog, _interface in mr.clock.tcpServers:
        if isinstance(factory, NgrokFactory):
            return factory
    raise KeyError("no --ngrok door")


class NgrokPeer:
    """An SDK: typed requests, and the Proxy streams the relay opens."""

    def __init__(self, mr: MemoryRelay, host: str = HOST) -> None:
        self.mr = mr
        address = mr._address(host)
        protocol = ngrok_factory(mr).buildProtocol(address)
        assert isinstance(protocol, NgrokSession)
        self.protocol: NgrokSession = protocol
        self.transport = StringTransport(peerAddress=address)
        protocol.makeConnection(self.transport)
        self.client = Session(Role.CLIENT, now=mr.clock.seconds())
        self.data: dict[int, bytearray] = {}
        self.opened: dict[int, int] = {}
        """Streams the relay opened, by id: their type."""
        self.fin: set[int] = set()
        self.closed: dict[int, Optional[int]] = {}
        self.ended: Optional[ev.SessionEnded] = None
        self.reading = True
        self.lost = False
        self._heartbeat_stream: Optional[int] = None
        self._heartbeats = 0

    def pump(self, rounds: int = 100) -> None:
        """Exchange bytes both ways until nothing moves."""
        for _ in range(rounds):
            moved = False
            out = self.transport.value()
            if out:
                self.transport.clear()
                if not self.lost:
                    self._handle(self.client.receive_data(out))
                moved = True
            data = self.client.data_to_send()
            if data and not self.lost and not self.protocol.session.ended:
                self.protocol.dataReceived(data)
                moved = True
            self._handle(self.client.events())
            if self.transport.disconnecting and not self.lost:
                self.lose()
                moved = True
            if not moved:
                return
        raise AssertionError("never settled")

    def _handle(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.StreamOpened):
                self.client.accept_stream(event.stream_id)
                self.opened[event.stream_id] = event.stream_type
            elif isinstance(event, ev.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                if self.reading:
                    self.client.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, ev.StreamEnded):
                self.fin.add(event.stream_id)
            elif isinstance(event, ev.StreamClosed):
                self.closed[event.stream_id] = event.error_code
            elif isinstance(event, ev.SessionEnded):
                self.ended = event

    def lose(self) -> None:
        """The connection is gone (closed by either side)."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
            self.transport.producer = None  # as a closed socket lets go of it

    def raw_request(self, kind: int, body: bytes) -> bytes:
        """Open a typed stream of ``kind``, write ``body`` (no FIN); the reply up to the relay's FIN."""
        sid = self.client.open_stream(kind)
        self.client.send_data(sid, body)
        self.pump()
        assert sid in self.fin, f"no reply on stream {sid}: {self.data.get(sid)!r}"
        return bytes(self.data.get(sid, b""))

    def request(self, kind: int, message: dict[str, Any]) -> dict[str, Any]:
        reply = json.loads(self.raw_request(kind, json.dumps(message).encode()))
        assert isinstance(reply, dict)
        return reply

    def auth(self, token: str = "", **extra: Any) -> dict[str, Any]:
        return self.request(
            rpc.AUTH,
            {"Version": ["3", "2"], "ClientId": "", "Extra": {"AuthToken": token, "ClientType": "test", **extra}},
        )

    def bind(self, proto: str = "tcp", bind_id: str = "", **opts: Any) -> dict[str, Any]:
        return self.request(
            rpc.BIND,
            {"Id": bind_id, "Proto": proto, "ForwardsTo": "", "ForwardsProto": "", "Opts": opts,
             "Extra": {"Token": "", "IPPolicyRef": "", "Metadata": "", "Bindings": [], "PoolingEnabled": False}},
        )

    def heartbeat(self) -> None:
        """Send a heartbeat, as an SDK does every 10 s (opening its heartbeat
        stream the first time), and take the relay's echo."""
        if self._heartbeat_stream is None:
            self._heartbeat_stream = self.client.open_stream(0xFFFFFFFF)
        self._heartbeats += 1
        self.send(self._heartbeat_stream, self._heartbeats.to_bytes(4, "big"))

    def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        self.client.send_data(sid, data, fin)
        self.pump()
