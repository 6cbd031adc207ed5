"""A new coordinator's first job: the nodes' reports, and what the cluster knows from them. Pure.

A coordinator that takes over (``terms``), and node 0's at start-up, asks every node for a
``report`` (its epoch, recoverable step, the round it finished and waits to hear about, newest
step, run finished, whether it is lost) and acts on nothing else until ``Gather.decide`` says what
the cluster knows. Composed into ``coordinator.Coordinator`` (``c``) like ``disk_decision``: call
``on_report`` for each report (and each hello meanwhile), ``on_offer`` for a disk offer meanwhile
(held, and handed to ``disk_decision`` once the coordinator acts), ``tick()`` from its tick.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftd.cluster.coordinator import Coordinator

#: resend periods (at most peer_timeout) a new coordinator waits for late reports before it acts
#: without every node's; only while no step is in doubt (``Gather``)
GATHER_WAIT = 2


@dataclasses.dataclass(frozen=True)
class Report:
    """A node's answer to a new coordinator: what it knows of the cluster."""
    epoch: int
    recoverable: int
    done: int = -1           # the step it reported done and has not heard the outcome of (-1: none)
    round: int = 0           # ... the round it was in
    latest: int = -1
    finished: bool = False
    lost: bool = False       # it cannot restore the cluster's step (a peer or itself could not be rebuilt)
    disk: bool = False       # it waits for a decision about the restore from disk


@dataclasses.dataclass(frozen=True)
class Decision:
    epoch: int
    recoverable: int
    declared: bool           # recoverable is a round every node finished, whose sync never came
    latest: dict[int, int]
    finished: set[int]
    lost: set[int]
    disk: bool               # a restore from disk was under way: decided again, from the nodes' offers


class Gather:
    """The reports a new coordinator collects before it acts, and when it may act on them.

    The cluster's timeline is the newest epoch reported, its recoverable step the newest one a node
    of that epoch holds (a node only adopts a step that the coordinator that declared it knew to be
    recoverable, and never lowers its own but in a new epoch). A step X above that is the old
    coordinator's last round if some nodes finished it and wait to hear: X was recoverable only if
    every node finished that round, so it is declared if all N report so. If some node did not
    finish it, X never was recoverable and the silent nodes need not be waited for (after ``wait``
    seconds for late answers: a silent node cannot hold a newer recoverable step than the others,
    as it adopted it from the sync of a round they all finished). If every node that answered
    finished it but some did not answer, nobody can know: the coordinator waits for them (the old
    coordinator may have declared X and told only the silent ones); no round could complete without
    them anyway.
    """

    def __init__(self, nodes: int, started: float, wait: float):
        self.nodes, self.started, self.wait = nodes, started, wait
        self.reports: dict[int, Report] = {}

    def on_report(self, src: int, report: Report | None) -> None:
        """``None``: the node is not ready (it rebuilds first, then says hello)."""
        if report is None:
            self.reports.pop(src, None)
        else:
            self.reports[src] = report

    def waiting_for(self) -> list[int]:
        return [n for n in range(self.nodes) if n not in self.reports]

    def unsure(self) -> int | None:
        """The step every reporting node finished above the newest recoverable one, if any."""
        top = [r for r in self.reports.values() if r.epoch == max(x.epoch for x in self.reports.values())]
        recoverable = max(r.recoverable for r in top)
        rounds = {(r.round, r.done) for r in top}
        if len(rounds) == 1 and len(top) == len(self.reports):
            ((_, done),) = rounds
            return done if done > recoverable else None
        return None

    def decide(self, now: float) -> Decision | None:
        """What the cluster knows, once the coordinator may act; None: keep gathering."""
        if not self.reports:
            return None
        complete = len(self.reports) == self.nodes
        unsure = self.unsure()
        if not complete and (unsure is not None or now - self.started < self.wait):
            return None
        epoch = max(r.epoch for r in self.reports.values())
        top = {n: r for n, r in self.reports.items() if r.epoch == epoch}
        recoverable = max(r.recoverable for r in top.values())
        declared = complete and unsure is not None
        if declared:
            recoverable = unsure
        return Decision(epoch, recoverable, declared, {n: r.latest for n, r in self.reports.items()},
                        {n for n, r in self.reports.items() if r.finished},
                        {n for n, r in top.items() if r.lost and r.recoverable < recoverable},
                        any(r.disk for r in self.reports.values()))


class Takeover:
    """The gathering of one new coordinator ``c``; ends (``c.takeover`` = None) once it acts."""

    def __init__(self, c: "Coordinator"):
        self.c = c
        self.gather = Gather(len(c.nodes), c.clock(), min(c.peer_timeout, GATHER_WAIT * c.resend))
        self.offers: dict[int, tuple] = {}  # disk offers that came meanwhile (the newest of each node)

    def start(self) -> None:
        self.c.last_event = f"term {self.c.term}: gathering the nodes' reports"
        self.c._send(self.c.nodes, "report_query")

    def on_report(self, src: int, report: Report | None) -> None:
        self.gather.on_report(src, report)
        self.settle()

    def on_offer(self, src: int, *offer) -> None:
        self.offers[src] = offer

    def tick(self, now: float) -> None:
        self.settle()
        if self.c.takeover is self and now - self.c._last_send >= self.c.resend:
            self.c._send(self.gather.waiting_for(), "report_query")

    def settle(self) -> None:
        d = self.gather.decide(self.c.clock())
        if d is None:
            return
        c = self.c
        c.takeover = None
        c.epoch, c.recoverable = d.epoch, d.recoverable
        c.latest = {n: s for n, s in d.latest.items() if s >= 0}
        c.finished, c.lost_nodes = set(d.finished), set(d.lost)
        c.target = max(c.recoverable + 1, c._ahead())
        c.candidates.clear()
        if d.declared:
            c.rounds_done += 1
        c.last_event = f"term {c.term}: coordinating; " + (
            f"step {d.recoverable} declared recoverable (every node finished its round)" if d.declared
            else f"recoverable step {d.recoverable} (epoch {d.epoch})")
        if d.disk and (d.recoverable < 0 or d.lost):
            # memory cannot give a step and a restore from disk was under way: decide it again (a node
            # that loaded its part already stops offering, so every node is asked)
            c.disk_decision.restart(f"term {c.term}: a restore from disk was under way when the coordinator changed")
        else:  # (a node that only wondered about the disk is told memory has the step, if it has)
            c._sync()
        for src, offer in self.offers.items():
            c.disk_decision.on_offer(src, *offer)

    def status(self) -> dict:
        return {"waiting_for": self.gather.waiting_for(), "reported": sorted(self.gather.reports)}
