"""A node's part in who coordinates: its view of the term, the coordinator it may run, the takeover.

Composed into ``cluster.node.ClusterNode``. Every coordination message passes through here before
its handler (``terms`` has the rules): a coordinator message (``messages.FROM_COORDINATOR``) is acted
on only if it comes from the current term's coordinator (a newer term is followed first; an older
one is refused, counted (``Terms.stale``), and answered with this node's term so that an
old coordinator learns it was replaced); a node's message to the coordinator
(``messages.TO_COORDINATOR``) only by this node's coordinator, in its own term. A coordinator that
hears of a newer term steps down at once, dropping what it had not sent.

Node 0 runs the coordinator of term 0 from the start. ``tick()`` takes over when the term's
coordinator has been silent for this node's wait (``Terms.due``), with a new ``Coordinator`` that
gathers the nodes' reports first (``takeover``). A node that hears of a new term drops its part of a
round still in flight (that round's coordinator is gone) but keeps a round it finished, which its
report mentions, and tells the new coordinator what it knows (``report``).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ftd.cluster.coordinator import Coordinator
from ftd.cluster.takeover import Report
from ftd.cluster.terms import NEWER, STALE, Terms
from ftd.durable.policy import FlushPolicy

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)


class Leadership:
    def __init__(self, node: "ClusterNode", flushes: bool):
        self.node = node
        self.flushes = flushes  # the coordinator picks steps to flush (the nodes have a flush_dir)
        self.terms = Terms(node.me, node.config.nodes, node.config.peer_timeout, time.monotonic)
        self.fresh = True       # no coordinator heard since this daemon started
        self.coordinator: Coordinator | None = self._coordinator(0) if node.me == 0 else None

    def _coordinator(self, term: int) -> Coordinator:
        cfg = self.node.config
        policy = FlushPolicy(cfg.flush_every, cfg.flush_interval) if self.flushes else None
        return Coordinator(self.node.grouping, timeout=cfg.round_timeout, peer_timeout=cfg.peer_timeout,
                           flush_policy=policy, term=term, gather=True)

    @property
    def leader(self) -> int:
        return self.terms.leader

    def start(self) -> None:
        if self.coordinator:
            self.coordinator.start()

    # ---- the gate before every coordination message's handler ----------------------------------
    def from_coordinator(self, msg: dict) -> bool:
        """A coordinator message: True to act on it (ProtocolError if its sender does not coordinate
        its term)."""
        verdict = self.terms.from_coordinator(msg["src"], msg["term"])
        if verdict == STALE:
            self._refuse_stale(msg)
            return False
        if verdict == NEWER:
            self._follow(f"node {msg['src']} coordinates term {msg['term']}")
        first, self.fresh = self.fresh, False
        if msg["type"] == "report_query" or verdict == NEWER or first:
            self.report(fresh=first)
        return msg["type"] not in ("report_query", "beat")

    def from_node(self, msg: dict) -> bool:
        """A node's message to the coordinator: True if this node's coordinator acts on it."""
        verdict = self.terms.from_node(msg["term"])
        c = self.coordinator
        if verdict == STALE:
            self._refuse_stale(msg)
            if c is not None:
                c._send((msg["src"],), "beat")  # it learns the term (a beat changes nothing else)
            return False
        if verdict == NEWER:
            self._follow(f"node {msg['src']} is in term {msg['term']}")
            return False
        return c is not None and c.term == self.terms.term and (
            not c.gathering or msg["type"] in ("report", "hello", "disk_offer"))

    def _refuse_stale(self, msg: dict) -> None:
        node = self.node
        log.info("a %s of term %d from node %d refused: this node is in term %d (coordinator node %d)",
                 msg["type"], msg["term"], msg["src"], self.terms.term, self.leader)
        if msg["type"] in ("sync", "protect", "report_query", "beat", "disk_query", "disk_load"):
            # the old coordinator may still be running: it learns the newer term from this answer
            node.send(msg["src"], "alive", term=self.terms.term, latest=node.latest_step,
                      finished=node.catalog.run_finished())

    def _follow(self, why: str) -> None:
        """The term went up: step down if this node coordinated an older one, drop the round in flight."""
        node, term = self.node, self.terms.term
        if self.coordinator is not None and self.coordinator.term < term:
            log.warning("coordinator of term %d on node %d steps down: %s", self.coordinator.term, node.me, why)
            self.coordinator = None
        log.warning("node %d follows term %d (coordinator node %d): %s", node.me, term, self.leader, why)
        rounds = node.rounds
        if rounds.round is not None and not rounds.round.complete:
            rounds.drop_round(keep_parity=False)
        if self.leader == node.me and self.coordinator is None:
            # a term of this node's that this daemon does not run (it restarted since): a new one
            self._take_over(f"term {term} named this node, whose daemon restarted since")

    def report(self, fresh: bool = False) -> None:
        """Tell the term's coordinator what this node knows (``takeover.Report``)."""
        node = self.node
        rounds, cat = node.rounds, node.catalog
        done = rounds.done_unsynced if rounds.done_unsynced is not None else -1
        r = rounds.round
        rid = r.round_id if r is not None and r.complete and r.step == done else 0
        node.to_coordinator("report", ready=node.ready, recoverable=cat.recoverable, epoch=node.epoch, done=done,
                            round=rid, latest=node.latest_step, finished=cat.run_finished(),
                            lost=node.lost_error is not None, disk=node.disk.disk_wait is not None, fresh=fresh)

    @staticmethod
    def report_of(m: dict) -> Report | None:
        """The report in a ``report`` message (None: the node is not ready yet)."""
        if not m["ready"]:
            return None
        return Report(m["epoch"], m["recoverable"], m["done"], m["round"], m["latest"], m["finished"], m["lost"],
                      m["disk"])

    # ---- taking over --------------------------------------------------------------------------
    def tick(self) -> None:
        if self.terms.due():
            self._take_over(f"coordinator node {self.leader} (term {self.terms.term}) silent for "
                            f"{self.terms.silence():.1f} s")
        if self.coordinator:
            self.coordinator.tick()

    def _take_over(self, why: str) -> None:
        node = self.node
        term = self.terms.take_over(why, time.time())
        log.warning("node %d takes over as the coordinator, term %d: %s", node.me, term, why)
        rounds = node.rounds
        if rounds.round is not None and not rounds.round.complete:
            rounds.drop_round(keep_parity=False)
        self.coordinator = self._coordinator(term)
        self.coordinator.start()

    def status(self) -> dict:
        t = self.terms
        return {"term": t.term, "node": t.leader, "here": self.coordinator is not None,
                "heard_seconds_ago": round(t.silence(), 3) if t.leader != self.node.me else 0.0,
                "stale_refused": t.stale, "implausible_refused": t.implausible, "takeovers": t.takeovers}
