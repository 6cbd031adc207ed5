"""Peer links of one daemon: a ROUTER that peers send to, a DEALER to each peer. Sockets only.

Every message is one-way (DEALER -> the peer's ROUTER) except queries, whose answers go back
through the ROUTER to the asking DEALER. Sends never block the daemon's loop: DEALERs queue only
on established connections (ZMQ_IMMEDIATE), so a message to a dead peer fails at once rather than
waiting in a queue to reach its restarted successor; protocol messages are re-sent by whoever
waits for an answer, and chunk frames stay queued in the round until a send succeeds.
"""
from __future__ import annotations

import logging

import zmq

from .config import Config
from .errors import ProtocolError
from .peerauth import PeerSecurity
from .peerproto import MAX_FRAME, MAX_HEADER, PeerMessages

log = logging.getLogger("ftd.peers")

MAX_PEER_MESSAGE = MAX_FRAME + MAX_HEADER
ROUTER_QUEUE = 32  # messages the peer ROUTER queues per connection, each way


def dealer(ctx: zmq.Context, security: PeerSecurity, endpoint: str, hwm: int = 256,
           immediate: bool = True) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, int(immediate))
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_MESSAGE)
    security.client(s)
    s.connect(endpoint)
    return s


class PeerLinks:
    def __init__(self, config: Config, ctx: zmq.Context, security: PeerSecurity, messages: PeerMessages):
        self.me = config.node_rank
        self.messages = messages
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_MESSAGE)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Messages queued per connection, each way (each up to MAX_PEER_MESSAGE): an honest peer has a few
        # protocol messages and inflight_bytes of frames unacknowledged, and an asker a window of fetches
        # (rebuild.WINDOW_FRAMES). Beyond it a sender waits (TCP) and answers are dropped, so a peer that
        # floods the daemon, or asks and never reads, cannot make it buffer more.
        self.router.setsockopt(zmq.SNDHWM, ROUTER_QUEUE)
        self.router.setsockopt(zmq.RCVHWM, ROUTER_QUEUE)
        security.server(self.router)
        self.router.bind(config.peer_bind)
        self.dealers = {n: dealer(ctx, security, ep) for n, ep in enumerate(config.peers) if n != self.me}
        self.dropped = 0

    def sockets(self) -> list[zmq.Socket]:
        return [self.router, *self.dealers.values()]

    def send(self, dest: int, mtype: str, payload=None, **fields) -> bool:
        """Send to node ``dest``; False if it cannot be sent now (peer not connected, queue full)."""
        frames = self.messages.encode(mtype, payload, **fields)
        try:
            self.dealers[dest].send_multipart(frames, flags=zmq.NOBLOCK, copy=payload is None or len(frames[-1]) < 65536)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def reply(self, envelope: list, mtype: str, payload=None, **fields) -> bool:
        frames = self.messages.encode(mtype, payload, **fields)
        try:
            self.router.send_multipart(envelope + frames, flags=zmq.NOBLOCK, copy=payload is None)
            return True
        except (zmq.Again, zmq.ZMQError):  # the asker is gone (EHOSTUNREACH) or its queue is full
            self.dropped += 1
            return False

    def receive(self, sock: zmq.Socket) -> tuple[list | None, dict, object] | None:
        """(envelope or None, header, payload) of one waiting message, or None if it was invalid
        (logged and dropped: a bad peer must not take the daemon down)."""
        frames = sock.recv_multipart(copy=False)
        envelope = None
        if sock is self.router:
            envelope, frames = [frames[0].bytes], frames[1:]
        try:
            msg, payload = self.messages.decode(frames)
        except ProtocolError as e:
            log.warning("dropped an invalid peer message: %s", e)
            return None
        return envelope, msg, None if payload is None else payload.buffer

    def close(self) -> None:
        for s in self.sockets():
            s.close(0)
