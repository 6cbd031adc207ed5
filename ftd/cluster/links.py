"""Peer links of one daemon: a ROUTER that peers send to, a DEALER to each peer. Sockets only.

Every message is one-way (DEALER -> the peer's ROUTER) except queries, whose answers go back
through the ROUTER to the asking DEALER; ``PeerQueries`` is the asking side a rebuild uses, on
sockets of its own (its thread must not touch the daemon loop's). Sends never block the daemon's loop: DEALERs queue only
on established connections (ZMQ_IMMEDIATE), so a message to a dead peer fails at once rather than
waiting in a queue to reach its restarted successor; protocol messages are re-sent by whoever
waits for an answer, and chunk frames stay queued in the round until a send succeeds.
What the links send is held to the node's ``protect_bandwidth`` (``bandwidth.SendBudget``): a chunk
frame waits in its round, an answer carrying blocks in ``PeerLinks``' own queue (``pump()``).
With per-node keys (``auth``) a received message is dropped (``impostors``) unless its sender may
speak for its ``src``: on the ROUTER by the identity of the key it connected with, on a DEALER by
being the node whose server key that DEALER pinned.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import zmq

from ftd.cluster.auth import SHARED_IDENTITY, PeerSecurity
from ftd.cluster.bandwidth import SendBudget
from ftd.cluster.messages import MAX_FRAME, MAX_HEADER, PeerMessages
from ftd.cluster.traffic import PeerTraffic, frame_bytes
from ftd.config import Config
from ftd.errors import FtdError, ProtocolError

log = logging.getLogger(__name__)

MAX_PEER_MESSAGE = MAX_FRAME + MAX_HEADER
ROUTER_QUEUE = 32  # messages the peer ROUTER queues per connection, each way


def dealer(ctx: zmq.Context, security: PeerSecurity, endpoint: str, node: int, hwm: int = 256,
           immediate: bool = True) -> zmq.Socket:
    """A DEALER to node rank ``node`` at ``endpoint`` (its server key pinned to that node's, ``auth``)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, int(immediate))
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_MESSAGE)
    security.client(s, node)
    s.connect(endpoint)
    return s


class PeerLinks:
    def __init__(self, config: Config, ctx: zmq.Context, security: PeerSecurity, messages: PeerMessages,
                 traffic: PeerTraffic | None = None):
        self.me = config.node_rank
        self.messages = messages
        self.traffic = traffic or PeerTraffic()
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
        self.security = security
        self.endpoints = {n: ep for n, ep in enumerate(config.peers) if n != self.me}
        self.dealers = {n: dealer(ctx, security, ep, n) for n, ep in self.endpoints.items()}
        self._dealer_node = {s: n for n, s in self.dealers.items()}
        self.impostors = 0                 # messages refused: the sender's key may not speak for their src
        self._impostors_logged: set = set()
        # who may send what: by default a key speaks for its own node rank (auth); a daemon's membership
        # record replaces it (members: a spare that took a rank speaks for it, a claim for itself)
        self.may_send = lambda identity, msg: security.may_speak(identity, msg["src"])
        self.dropped = 0
        self.budget = SendBudget(config.protect_bandwidth)
        self._deferred: collections.deque = collections.deque()  # answers with blocks waiting for the budget

    def sockets(self) -> list[zmq.Socket]:
        return [self.router, *self.dealers.values()]

    def repoint(self, node: int, endpoint: str) -> None:
        """Node ``node`` answers at ``endpoint`` now (``members``): its DEALER connects there instead
        (the same socket, so the daemon's poller keeps it; what was queued for the old address is dropped)."""
        old = self.endpoints.get(node)
        if node not in self.dealers or old == endpoint:
            return
        s = self.dealers[node]
        try:
            s.disconnect(old)
        except zmq.ZMQError:
            pass  # never connected
        if self.security.key is not None:  # the rank's holder may have changed (a spare): pin its key now
            s.curve_serverkey = self.security.server_key(node)
        s.connect(endpoint)
        self.endpoints[node] = endpoint

    def send(self, dest: int, mtype: str, payload=None, **fields) -> bool:
        """Send to node ``dest``; False if it cannot be sent now (peer not connected, queue full, or a
        message with a payload while the bandwidth budget is spent: the caller sends it again later)."""
        if _bulk(payload) and not self.budget.ready():
            return False
        frames = self.messages.encode(mtype, payload, **fields)
        try:
            self.dealers[dest].send_multipart(frames, flags=zmq.NOBLOCK, copy=payload is None or len(frames[-1]) < 65536)
        except zmq.Again:
            self.dropped += 1
            return False
        self._count(dest, mtype, frames)
        return True

    def reply(self, envelope: list, dest: int, mtype: str, payload=None, **fields) -> bool:
        """Answer node ``dest``'s query, which came with ``envelope``. An answer with a payload waits
        for the bandwidth budget (behind any that wait already), a copy of it in a queue of at most
        ROUTER_QUEUE answers that ``pump()`` sends; False if it was dropped."""
        frames = self.messages.encode(mtype, payload, **fields)
        if _bulk(payload) and (self._deferred or not self.budget.ready()):
            if len(self._deferred) >= ROUTER_QUEUE:
                self.dropped += 1
                return False
            self._deferred.append((envelope, dest, mtype, [*frames[:-1], bytes(frames[-1])]))  # its memory may change
            return True
        return self._send_reply(envelope, dest, mtype, frames)

    def _send_reply(self, envelope: list, dest: int, mtype: str, frames: list) -> bool:
        try:
            self.router.send_multipart(envelope + frames, flags=zmq.NOBLOCK, copy=len(frames) == 1)
            self._count(dest, mtype, frames)
            return True
        except (zmq.Again, zmq.ZMQError):  # the asker is gone (EHOSTUNREACH) or its queue is full
            self.dropped += 1
            return False

    def pump(self) -> None:
        """Send the answers that wait for the bandwidth budget, oldest first, while it lasts."""
        while self._deferred and self.budget.ready():
            self._send_reply(*self._deferred.popleft())

    def _count(self, dest: int, mtype: str, frames: list) -> None:
        nbytes = frame_bytes(frames)
        self.traffic.sent(dest, mtype, nbytes)
        self.budget.sent(nbytes)

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
        if self.security.enabled and not self._sender_ok(sock, frames, msg):
            return None
        self.traffic.received(msg["src"], msg["type"], frame_bytes(frames))
        return envelope, msg, None if payload is None else payload.buffer

    def _sender_ok(self, sock: zmq.Socket, frames: list, msg: dict) -> bool:
        """Whether the authenticated sender may speak for the message's ``src``: on the ROUTER, the
        identity its key has (the ZAP handler's User-Id, ``auth``); on a DEALER, the node whose server key
        it pinned, which must be the ``src``. Refused: counted, logged once per peer and node."""
        if sock is self.router:
            identity = _user_id(frames[0])
            if identity == SHARED_IDENTITY or self.may_send(identity, msg):
                return True
        else:
            node = self._dealer_node.get(sock)
            if not self.security.per_node or node == msg["src"]:
                return True
            identity = f"the server of node {node}"
        self.impostors += 1
        seen = (identity, msg["src"])
        if seen not in self._impostors_logged and len(self._impostors_logged) < 1024:
            self._impostors_logged.add(seen)
            log.warning("refused a %s from a peer authenticated as %r that claims to be node %d: its key may not "
                        "speak for that node (further ones from it are counted, not logged)",
                        msg["type"], identity, msg["src"])
        return False

    def close(self) -> None:
        for s in self.sockets():
            s.close(0)


def _user_id(frame) -> str | None:
    """The User-Id the ZAP handler gave the connection a frame came on (None: none, plain TCP)."""
    try:
        return frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        return None


def _bulk(payload) -> bool:
    """A message that waits for the bandwidth budget: one with a payload (chunks, blocks)."""
    return payload is not None and memoryview(payload).nbytes > 0


class PeerQueries:
    """Questions to peers and their answers (``state_query``, ``meta_query``, ``fetch``), each with a
    query id so that late or duplicated answers are told apart. For one thread. An answer is kept
    only from the node asked, on the socket to it: with per-node keys that socket pinned the node's
    server key (``auth``), so the answer is authenticated as that node's."""

    def __init__(self, config: Config, security: PeerSecurity, messages: PeerMessages,
                 stop: threading.Event, traffic: PeerTraffic | None = None):
        self.config, self.messages, self.stop = config, messages, stop
        self.traffic = traffic or PeerTraffic()
        self._ctx = zmq.Context()
        self._security = security
        self._socks: dict[int, zmq.Socket] = {}
        self._qid = itertools.count(1)

    def _sock(self, node: int) -> zmq.Socket:
        if node not in self._socks:
            # queue until connected: a rebuild asks right away, and a dropped first question costs a retry
            self._socks[node] = dealer(self._ctx, self._security, self.config.peers[node], node, hwm=4096,
                                       immediate=False)
        return self._socks[node]

    def ask(self, peer: int, mtype: str, **fields) -> int:
        """Send a query to ``peer``; returns its query id (a send that fails now is the deadline's to judge)."""
        qid = next(self._qid)
        frames = self.messages.encode(mtype, None, qid=qid, **fields)
        try:
            self._sock(peer).send_multipart(frames, flags=zmq.NOBLOCK)
            self.traffic.sent(peer, mtype, frame_bytes(frames))
        except zmq.Again:
            pass  # not connected (yet): the caller's deadline decides
        return qid

    def collect(self, wanted: dict[int, int], deadline: float,
                first_only: bool = False) -> dict[int, tuple[dict, object]]:
        """Answers to the queries ``wanted`` (qid -> node) until all came or the deadline passed;
        with ``first_only``, as soon as at least one came (and whatever else is waiting)."""
        got: dict[int, tuple[dict, object]] = {}
        poller = zmq.Poller()
        node_of = {}
        for n in set(wanted.values()):
            poller.register(self._sock(n), zmq.POLLIN)
            node_of[self._sock(n)] = n
        while len(got) < len(wanted) and not (first_only and got):
            if self.stop.is_set():
                raise FtdError("rebuild stopped: the daemon is shutting down")
            left = min(deadline - time.monotonic(), 0.2)
            if left <= 0:
                break
            for sock, _ in poller.poll(int(left * 1000) + 1):
                frames = sock.recv_multipart(copy=False)
                while True:
                    self._take(frames, wanted, got, node_of[sock])
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
        return got

    def _take(self, frames, wanted: dict[int, int], got: dict, node: int) -> None:
        """Keep one received answer if it is one of ``wanted``, from the node asked, on the socket to it."""
        try:
            msg, payload = self.messages.decode(frames)
        except FtdError as e:
            log.warning("rebuild: dropped an invalid answer: %s", e)
            return
        self.traffic.received(msg["src"], msg["type"], frame_bytes(frames))
        q = msg.get("qid")
        if q in wanted and wanted[q] == msg["src"] == node:
            got[q] = (msg, None if payload is None else payload.buffer)

    def close(self) -> None:
        for s in self._socks.values():
            s.close(0)
        self._ctx.term()
