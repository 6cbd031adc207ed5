"""A node's part in the membership record: learning it, claiming its own rank, admitting others.

Composed into ``cluster.node.ClusterNode``; the rules (record, merge, plausibility, when a claim is
admitted) are ``membership``'s, this module only sends and receives. A daemon starts from its
config's ``peers`` (generation 0) and asks every peer for its record (``member_query``); its cluster
side (the start-up rebuild, the coordinator) starts only once it is *settled*: a peer's record names
this daemon's endpoint for its rank, or (a daemon at the address its config lists) no peer answered
within ``ALONE_WAIT`` (the cluster starts). A daemon that is node r at another endpoint than the
record's (``FTD_PEER_ENDPOINT`` / ``ftd daemon --peer-endpoint``, or a config that lists its new
address) *claims* rank r from the coordinator of the term its peers follow, and sends nothing else
until it is admitted; refused for good (the rank's member is alive), it stops (``fatal``).

The coordinator (whoever it is) probes the claimed rank's member (``ping``; any word from it refuses
the claim), admits the claim after ``peer_timeout`` of silence, answers the claimant and sends the
new record to every node, which re-points its link to that rank (``PeerLinks.repoint``). Records
also travel as gossip: every coordinator message carries the version of its record (``mv``), and a
node whose version differs sends its own (``members`` with ``ask``) and is answered with the
coordinator's; the higher generation wins per rank. A settled daemon whose own rank the record gives
to another endpoint has been replaced (it was silent for ``peer_timeout``): it stops.

Spares (``cluster.spare``, no rank) offer themselves to the coordinator every second; for a rank
silent for ``peer_timeout`` the coordinator files the claim on a free spare's behalf (``SparePool``)
and, once it is admitted, answers the spare with the rank.

Call order (the daemon's loop): ``start()`` once the links exist; ``on_message`` for each membership
message (``messages.MEMBERSHIP``), ``heard(src)`` for every other one, ``on_version`` for a
coordinator message's ``mv``; ``tick()`` every loop turn.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from ftd.cluster.membership import (ENDPOINT, IDENTITY, Claims, Membership, MembershipRefused, SparePool,
                                    default_identity)
from ftd.errors import ProtocolError

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

ASK_EVERY = 0.5     # seconds between a waiting daemon's questions to its peers
CLAIM_EVERY = 2.0   # ... between its claims to the coordinator
ALONE_WAIT = 2.0    # a daemon at its listed address that no peer answered for this long starts with its config
PING_EVERY = 0.5    # the coordinator's probes of a claimed rank's member
GOSSIP_EVERY = 1.0  # at most one record sent to the coordinator per this many seconds


class Members:
    def __init__(self, node: "ClusterNode"):
        self.node = node
        cfg = node.config
        self.me = node.me
        self.record = Membership.from_peers(cfg.peers)
        self.endpoint = cfg.peer_endpoint       # where this daemon answers (its config's, or FTD_PEER_ENDPOINT)
        self.identity = default_identity(self.me)
        self.listed = self.record.endpoint_of(self.me) == self.endpoint  # at the address the config lists
        self.claims = Claims(cfg.nodes, cfg.peer_timeout, time.monotonic)
        self.settled = False
        self.answered = False                   # a peer's record came
        self.coord_term = 0                     # the highest term a peer said it follows
        self.fatal: str | None = None           # why this daemon must stop
        self.waiting = "asking the peers for the cluster's membership record"
        self.changes: list[dict] = []           # the record's recent changes (status)
        self._t0 = time.monotonic()
        self._asked = self._claimed = self._pinged = self._gossiped = self._told_alone = -1e18
        self._claimants: dict[int, list] = {}   # a pending claim's rank -> the claimant's envelope
        self.spares = SparePool(time.monotonic)  # the coordinator's: spares that offer themselves
        self._spare_envelopes: dict[str, list] = {}

    # ---- the waiting daemon's side -------------------------------------------------------------
    def start(self) -> None:
        self.tick()

    def _ask(self) -> None:
        self._asked = time.monotonic()
        for n in range(self.record.nodes):
            if n != self.me:
                self.node.links.send(n, "member_query")

    def _settle(self, why: str) -> None:
        self.settled, self.waiting = True, None
        log.info("node %d at %s: %s", self.me, self.endpoint, why)

    def _claim(self, now: float) -> None:
        leader = self.coord_term % self.record.nodes
        cur = self.record.members[self.me]
        self.waiting = (f"claiming node {self.me} (listed at {cur.endpoint}, generation {cur.generation}) for "
                        f"{self.endpoint}")
        if leader == self.me:
            self.waiting += (f": its coordinator of term {self.coord_term} is the node this daemon replaces; "
                             f"waiting for another node to take over")
            return
        self._claimed = now
        self.waiting += f" from the coordinator, node {leader} (term {self.coord_term})"
        self.node.links.send(leader, "claim", endpoint=self.endpoint, identity=self.identity, known=cur.generation)

    def _take_record(self, data, coord_term: int, src: int) -> Membership | None:
        """A peer's record: merged into ours (a waiting daemon takes its own rank's entry from it)."""
        try:
            theirs = Membership.from_wire(data, self.record.nodes)
        except ProtocolError as e:
            log.warning("a membership record refused: %s", e)
            return None
        self.answered = True
        self.coord_term = max(self.coord_term, coord_term)
        if not self.settled and theirs.generation_of(self.me) >= self.record.generation_of(self.me):
            mine = list(self.record.members)
            mine[self.me] = theirs.members[self.me]
            self.record = Membership(tuple(mine))
        self._apply(theirs, src)
        return theirs

    def _apply(self, theirs: Membership, src: int) -> None:
        """Merge a peer's record. A change is taken from the coordinator of this node's term, while this
        node learns the record (not settled), or for a rank whose member this node has not heard from
        for peer_timeout; any other is refused (a live member is never moved by hearsay)."""
        try:
            merged = self.record.merge(theirs)
        except ProtocolError as e:
            log.warning("a membership record refused: %s", e)
            return
        for c in merged.conflicts:
            log.warning("membership: a record disagrees with this node's, kept this node's: %s", c)
        trusted = not self.settled or src == self.node.leadership.leader
        refused = {r for r in merged.changed if not trusted and r != self.me
                   and self.claims.silence(r) < self.claims.peer_timeout}
        for r in sorted(refused):
            m = merged.record.members[r]
            log.warning("membership: node %d's record moves node %d to %s (generation %d), but node %d answered here "
                        "%.1f s ago: refused", src, r, m.endpoint, m.generation, r, self.claims.silence(r))
        record = Membership(tuple(self.record.members[r] if r in refused else m
                                  for r, m in enumerate(merged.record.members)))
        self._set(record, [r for r in merged.changed if r not in refused], f"learned from node {src}")

    def _set(self, record: Membership, changed, how: str) -> None:
        old, self.record = self.record, record
        for r in changed:
            m = record.members[r]
            self.changes = (self.changes + [{"node": r, "endpoint": m.endpoint, "generation": m.generation,
                                             "was": old.endpoint_of(r), "how": how, "at": time.time()}])[-8:]
            if r == self.me:
                if self.settled and m.endpoint != self.endpoint:
                    self.fatal = (f"node {r} was given to {m.endpoint} (generation {m.generation}) while this daemon, "
                                  f"at {self.endpoint}, was silent for longer than peer_timeout: it is no longer node "
                                  f"{r}, and stops (start it again to claim the rank back once that node is gone)")
                continue
            log.warning("membership: node %d is at %s now (generation %d, identity %s), was %s (%s)", r, m.endpoint,
                        m.generation, m.identity, old.endpoint_of(r), how)
            self.node.links.repoint(r, m.endpoint)

    # ---- messages --------------------------------------------------------------------------------
    def on_message(self, msg: dict, envelope) -> None:
        mtype, src, links = msg["type"], msg["src"], self.node.links
        term = self.node.leadership.terms.term
        if mtype == "member_query" and envelope is not None:
            links.reply(envelope, src, "members", members=self.record.to_wire(), coord_term=term)
        elif mtype == "members":
            if self._take_record(msg["members"], msg["coord_term"], src) is not None and msg.get("ask") and envelope:
                links.reply(envelope, src, "members", members=self.record.to_wire(), coord_term=term)
        elif mtype == "ping" and envelope is not None:
            links.reply(envelope, src, "pong", endpoint=self.endpoint)
        elif mtype == "pong":
            if msg["endpoint"] == self.record.endpoint_of(src):
                self.heard(src)
        elif mtype == "claim" and envelope is not None:
            self._on_claim(src, msg, envelope)
        elif mtype == "claim_answer":
            self._on_answer(msg)
        elif mtype == "spare_offer" and envelope is not None:
            self._on_spare(msg, envelope)

    def heard(self, src: int) -> None:
        """A message from node ``src``'s current member: it is alive, a claim of its rank is refused."""
        claim = self.claims.heard_from(src)
        if claim is not None:
            self._refuse(src, claim.endpoint, f"node {src} answers at {self.record.endpoint_of(src)}: a live node is "
                         f"not replaced (stop it first, or give this daemon another node rank)", retry=False)

    def on_version(self, src: int, version: int) -> None:
        """A coordinator message said its record's version: if ours differs, compare records."""
        now = time.monotonic()
        if version != self.record.version and now - self._gossiped >= GOSSIP_EVERY:
            self._gossiped = now
            self.node.links.send(src, "members", members=self.record.to_wire(),
                                 coord_term=self.node.leadership.terms.term, ask=True)

    def _on_answer(self, msg: dict) -> None:
        if self.settled:
            return
        if msg["ok"]:
            self._take_record(msg["members"], msg["coord_term"], msg["src"])
            return
        self.coord_term = max(self.coord_term, msg["coord_term"])
        if msg["retry"]:
            self.waiting = f"claiming node {self.me}: {msg['reason']}"
            log.info("node %d's claim for %s not decided: %s", self.me, self.endpoint, msg["reason"])
        else:
            self.fatal = f"the claim of node {self.me} for {self.endpoint} was refused: {msg['reason']}"

    # ---- the coordinator's side -----------------------------------------------------------------
    def _coordinates(self) -> bool:
        return self.settled and self.node.started and self.node.coordinator is not None

    def _on_claim(self, src: int, msg: dict, envelope: list) -> None:
        links, term = self.node.links, self.node.leadership.terms.term
        if not self._coordinates():
            links.reply(envelope, src, "claim_answer", ok=False, retry=True, members=self.record.to_wire(),
                        coord_term=term, reason=f"node {self.me} does not coordinate (term {term}: node "
                                                f"{self.node.leadership.leader})")
            return
        if src == self.me:
            self._refuse(src, msg["endpoint"], f"node {src} is the coordinator's own node, which answers", False,
                         envelope)
            return
        try:
            known = self.claims.submit(self.record, src, msg["endpoint"], msg["identity"], msg["known"])
        except MembershipRefused as e:
            self._refuse(src, msg["endpoint"], str(e), e.retry, envelope)
            return
        if known:
            links.reply(envelope, src, "claim_answer", ok=True, retry=False, reason="", coord_term=term,
                        members=self.record.to_wire())
            return
        if src not in self._claimants:
            log.warning("membership: %s claims node %d (now at %s); probing it for %.1f s of silence", msg["endpoint"],
                        src, self.record.endpoint_of(src), self.claims.peer_timeout)
        self._claimants[src] = envelope

    def _on_spare(self, msg: dict, envelope: list) -> None:
        """A spare offers itself: kept (while it offers every second) for the next rank lost for peer_timeout."""
        ident, ep, term = msg["identity"], msg["endpoint"], self.node.leadership.terms.term
        rank = self.record.rank_at(ep)
        node, reason = -1, "waiting for a node to be lost for peer_timeout"
        if rank is not None and self.record.identity_for(rank) == ident:
            node, reason = rank, ""                       # admitted already (the answer was lost)
        elif not ENDPOINT.match(ep) or not IDENTITY.match(ident):
            reason = "a spare's endpoint must be tcp://host:port and its identity 1-64 letters, digits, '.', '_', '-'"
        elif rank is not None:
            reason = f"{ep} is node {rank}'s peer endpoint"
        elif not self._coordinates():
            reason = f"node {self.me} does not coordinate (term {term}: node {self.node.leadership.leader})"
        else:
            if ident not in self.spares.offers:
                log.info("membership: spare %s at %s offers itself", ident, ep)
            self.spares.offer(ident, ep)
            self._spare_envelopes[ident] = envelope
        self.node.links.reply(envelope, 0, "spare_answer", node=node, reason=reason, coord_term=term,
                              members=self.record.to_wire())

    def _refuse(self, rank: int, endpoint: str, reason: str, retry: bool, envelope=None) -> None:
        self.spares.done(rank, admitted=False)
        envelope = envelope or self._claimants.pop(rank, None)
        if not retry:
            log.error("membership: the claim of node %d for %s refused: %s", rank, endpoint, reason)
            self.claims.note_refusal(rank, endpoint, reason, time.time())
        if envelope is not None:
            self.node.links.reply(envelope, rank, "claim_answer", ok=False, retry=retry, reason=reason[:500],
                                  members=self.record.to_wire(), coord_term=self.node.leadership.terms.term)

    def _admit_due(self, now: float) -> None:
        lost = [r for r in range(self.record.nodes) if r != self.me and r not in self.claims.pending
                and self.claims.silence(r) >= self.claims.peer_timeout]
        for rank, ident, ep in self.spares.pick(lost) if lost else ():
            try:
                self.claims.submit(self.record, rank, ep, ident, self.record.generation_of(rank))
            except MembershipRefused as e:
                self.spares.done(rank, admitted=False)
                log.warning("membership: spare %s cannot take node %d: %s", ident, rank, e)
                continue
            log.warning("membership: node %d silent for %.1f s: spare %s (%s) claims it", rank,
                        self.claims.silence(rank), ident, ep)
        if self.claims.pending and now - self._pinged >= PING_EVERY:
            self._pinged = now
            for r in self.claims.pending:
                self.node.links.send(r, "ping")
        for c in self.claims.due():
            old = self.record.members[c.rank]
            self._set(self.record.admit(c.rank, c.endpoint, c.identity), [c.rank],
                      f"admitted by node {self.me}, the coordinator: {old.endpoint} silent for "
                      f"{self.claims.silence(c.rank):.1f} s")
            envelope = self._claimants.pop(c.rank, None)
            term = self.node.leadership.terms.term
            spare = self.spares.done(c.rank, admitted=True)
            if spare is not None and spare in self._spare_envelopes:
                self.node.links.reply(self._spare_envelopes.pop(spare), c.rank, "spare_answer", node=c.rank, reason="",
                                      coord_term=term, members=self.record.to_wire())
            if envelope is not None:
                self.node.links.reply(envelope, c.rank, "claim_answer", ok=True, retry=False, reason="",
                                      coord_term=term, members=self.record.to_wire())
            for n in range(self.record.nodes):
                if n not in (self.me, c.rank):
                    self.node.links.send(n, "members", members=self.record.to_wire(), coord_term=term)

    # ---- loop turn --------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if not self.settled:
            if self.answered and self.record.endpoint_of(self.me) == self.endpoint:
                self._settle(f"the peers' record names this endpoint for node {self.me} "
                             f"(generation {self.record.generation_of(self.me)})")
            elif not self.answered and self.listed and now - self._t0 >= ALONE_WAIT:
                self._settle(f"no peer answered within {ALONE_WAIT:g} s: the config's membership record")
            else:
                if now - self._asked >= ASK_EVERY:
                    self._ask()
                if self.answered and now - self._claimed >= CLAIM_EVERY:
                    self._claim(now)
                elif not self.answered and now - self._told_alone >= 10.0 and now - self._t0 >= ALONE_WAIT:
                    self._told_alone = now
                    log.warning("node %d at %s (not the %s its config lists): no peer answered yet; waiting for one "
                                "to learn the record and claim the rank", self.me, self.endpoint,
                                self.record.endpoint_of(self.me))
            return
        if self._coordinates():
            self._admit_due(now)

    def peer_config(self):
        """The config with the record's endpoints (for the threads that open links of their own; once
        settled, the record names this daemon's own endpoint for its rank)."""
        return dataclasses.replace(self.node.config, peers=self.record.endpoints)

    def status(self) -> dict:
        return {"members": self.record.table(), "version": self.record.version, "settled": self.settled,
                "waiting": self.waiting, "changes": self.changes[-5:],
                "claims": {str(r): c.endpoint for r, c in self.claims.pending.items()},
                "refused": self.claims.refused,
                "spares": {i: ep for i, (ep, _) in sorted(self.spares.offers.items())}}
