"""A spare host: waits, offering itself to the coordinator, until it is admitted to a lost node's rank.

``ftd spare --config FILE --peer-endpoint tcp://HOST:PORT`` runs this. It has no node rank and holds
nothing: every second it asks the peers for their membership record (to learn who coordinates and
where everyone is) and offers itself (``spare_offer``) to the coordinator, which, once a node has been
silent for ``peer_timeout`` and its probes go unanswered, admits the spare to that rank (one spare per
rank, ``membership.SparePool``) and answers with the rank. ``wait()`` returns it; the command then
becomes that node's daemon (exec), which finds itself in the record and rebuilds the node's
snapshots from its peers, as any replacement does. Sockets only (DEALERs to the peers).
"""
from __future__ import annotations

import logging
import time

import zmq

from ftd.cluster.auth import PeerSecurity
from ftd.cluster.links import dealer
from ftd.cluster.membership import Membership
from ftd.cluster.messages import PeerMessages
from ftd.config import Config
from ftd.errors import FtdError, ProtocolError

log = logging.getLogger(__name__)

OFFER_EVERY = 1.0  # seconds between offers (the coordinator forgets a spare after 3 s without one)


class Spare:
    def __init__(self, config: Config, endpoint: str, identity: str):
        self.config, self.endpoint, self.identity = config, endpoint, identity
        self.record = Membership.from_peers(config.peers)
        self.coord_term = 0
        self.reason = "no answer from the cluster yet"
        self.messages = PeerMessages(config.job, 0, config.nodes, config.group_size)  # src 0: a spare has no rank
        self._security = PeerSecurity.from_key_file(config.peer_key_file, config.peer_roster)
        own = self._security.key.identity if self._security.key is not None else None
        if own is not None and own != identity:
            raise FtdError(f"spare {identity}: the key file {config.peer_key_file} is {own!r}'s; a spare connects with "
                           f"its own key (`ftd keygen --dir DIR --nodes N --spares S` writes DIR/{identity}.key): "
                           f"pass --key-file DIR/{identity}.key")
        self._ctx = zmq.Context()
        self._socks: dict[int, tuple[str, zmq.Socket]] = {}

    def _sock(self, node: int) -> zmq.Socket:
        ep = self.record.endpoint_of(node)
        cur = self._socks.get(node)
        if cur is None or cur[0] != ep:  # the record moved it: connect there
            if cur is not None:
                cur[1].close(0)
            cur = self._socks[node] = (ep, dealer(self._ctx, self._security, ep, node))
        return cur[1]

    def _send(self, node: int, mtype: str, **fields) -> None:
        try:
            self._sock(node).send_multipart(self.messages.encode(mtype, None, **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected (that node may be the lost one)

    def wait(self, timeout: float | None = None) -> int:
        """Block until admitted; returns the node rank (FtdError after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = -1e18
        while True:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise FtdError(f"spare {self.identity} at {self.endpoint} was not admitted within {timeout:g} s: "
                               f"{self.reason}")
            if now - last >= OFFER_EVERY:
                last = now
                for n in range(self.record.nodes):
                    self._send(n, "member_query")
                self._send(self.coord_term % self.record.nodes, "spare_offer", endpoint=self.endpoint,
                           identity=self.identity)
            rank = self._receive(0.1)
            if rank is not None:
                return rank

    def _receive(self, seconds: float) -> int | None:
        poller = zmq.Poller()
        for _, s in self._socks.values():
            poller.register(s, zmq.POLLIN)
        for s, _ in poller.poll(int(seconds * 1000)):
            try:
                msg, _ = self.messages.decode(s.recv_multipart(copy=False))
                theirs = Membership.from_wire(msg.get("members"), self.record.nodes)
            except ProtocolError as e:
                log.warning("spare: dropped an invalid answer: %s", e)
                continue
            if msg["type"] not in ("members", "spare_answer"):
                continue
            self.coord_term = max(self.coord_term, msg["coord_term"])
            self.record = self.record.merge(theirs).record
            if msg["type"] == "spare_answer":
                self.reason = msg["reason"] or self.reason
                node = msg["node"]
                if node >= 0 and self.record.endpoint_of(node) == self.endpoint:
                    return node
        return None

    def close(self) -> None:
        for _, s in self._socks.values():
            s.close(0)
        self._ctx.term()
