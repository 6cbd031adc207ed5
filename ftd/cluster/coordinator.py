"""Which step the cluster protects next, and when it becomes recoverable. Pure state machine.

One daemon at a time runs it: node 0 in term 0, then one that took over (``terms``: every message to or
from it carries its term, stale ones are refused); it first gathers the nodes' reports (``takeover``). A round:

1. *collect*: every node is told a target step T (``sync``); each node pins the first step >= T
   that all its ranks committed, refuses new snapshots while it holds that pin, and reports it
   (``candidate``). Nodes need not be in lockstep: a fast node waits (skipping snapshots) until a
   slow one reaches T. If all N nodes report the same step X, the round protects X; otherwise
   (a node skipped a step, its ranks disagree, or a trainer was already past T when the target
   arrived) they try again with a target further ahead. T is the newest step any trainer was seen
   at (``latest``, from its snapshot requests) plus a *lead* that doubles after each miss and
   halves after each success: one step for trainers in lockstep, more where they drift apart.
2. *protect*: every node sends its data chunks to the parity holders and reports ``done`` once it
   holds all its parity blocks and its group peers' metadata for X. When every node of a group is
   done, X is *protected* in that group; when every node is done, X is *recoverable*.
3. The coordinator then sends ``sync(T = X + 1, recoverable = X)`` to every node, which lets them
   drop older versions and start the next round.

Consistency: a node's recoverable step only changes on a ``sync``, which always carries the newest
step the coordinator knows to be recoverable. A node that reported ``done`` but has not yet heard the
``sync`` cannot know whether X is recoverable, so it answers restores with "wait" until it hears.
Messages may be lost (peers restart): the coordinator re-sends its current phase's message every
``resend`` seconds to nodes that have not answered, and nodes answer idempotently. A node that
(re)starts says ``hello``, which abandons a round in progress: that node lost its half of it.

Timelines: the cluster's recoverable step may go back in time only in a new *epoch*, and any report
from an older epoch is stale. An epoch starts with a restore from disk (``disk_decision``: when the
memory copies cannot give a step, every node loads the newest step all of them flushed), or with a
new run: a node asks for it (``reset``) when its trainers pass resume="never", rerun a run that
finished (every node reports in its ``alive`` that all its ranks called finish(); the syncs then say
``finished``), or on ``ftd clear``; every node then drops the previous run, memory and flushed
versions. Recoverable steps the ``FlushPolicy`` picks go out with ``flush`` in their ``sync``, so
every node flushes the same steps; none is picked while a node reports (in ``done``) that it still
flushes.

Liveness: every node answers each ``sync`` and ``protect`` with at least an ``alive``, so a node the
coordinator has not heard from for ``peer_timeout`` seconds is *silent* (frozen, partitioned or
dead): a round waiting for it is abandoned at once instead of after ``timeout``, and it is listed
in ``status()`` until it speaks again. Training never waits for any of this; protection resumes
with a newer step once the node answers (or its replacement has rebuilt).

Call order (the coordinating node's loop): ``start()`` once; for every message of its term from
node N, ``heard_from(N)``, then (while ``gathering`` only reports, hellos, disk offers) the ``on_<type>``
handler; ``tick()`` every loop turn; after each, ``take()`` the messages to send (``Outgoing``; the
caller adds the term). Every node hears from it every ``resend`` s (a ``beat`` if nothing else).
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

from ftd.cluster.disk_decision import DiskDecision, DiskRecovery
from ftd.cluster.stripes import Grouping
from ftd.cluster.takeover import Report, Takeover
from ftd.durable.policy import FlushPolicy

COLLECT, PROTECT = "collect", "protect"


@dataclasses.dataclass
class Round:
    id: int
    step: int
    sizes: list[int]
    started: float
    done: set[int] = dataclasses.field(default_factory=set)
    protected_groups: set[int] = dataclasses.field(default_factory=set)
    flushing: set[int] = dataclasses.field(default_factory=set)  # nodes whose flush worker is busy


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """A message for ``dests`` (node ranks) of type ``mtype``."""
    dests: tuple[int, ...]
    mtype: str
    fields: dict


class Coordinator:
    def __init__(self, grouping: Grouping, *, timeout: float = 120.0, resend: float = 1.0, peer_timeout: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 new_round_id: Callable[[], int] = lambda: random.getrandbits(52),
                 flush_policy: FlushPolicy | None = None, term: int = 0, gather: bool = False):
        self.grouping = grouping
        self.term = term                    # ``terms``: this coordinator's term, in every message it sends
        self.nodes = tuple(range(grouping.nodes))
        self.timeout, self.resend, self.clock, self.new_round_id = timeout, resend, clock, new_round_id
        self.peer_timeout = peer_timeout
        self.heard: dict[int, float] = {n: clock() for n in self.nodes}  # last message from each node
        self.phase = COLLECT
        self.target = 0
        self.recoverable = -1
        self.candidates: dict[int, tuple[int, int, bool]] = {}
        self.round: Round | None = None
        self.rounds_done = 0
        self.rounds_abandoned = 0
        self.retargets = 0
        self.lead = 1
        self.latest: dict[int, int] = {}
        self.last_event = ""
        self.epoch = 0                      # timelines so far: restores from disk and new runs
        self.flush_policy = flush_policy
        self.flush_step = -1                # the newest recoverable step to be flushed
        self.finished: set[int] = set()     # nodes whose every rank finished the run
        self.lost_nodes: set[int] = set()   # nodes that said they cannot be rebuilt, until they say hello
        self.resets: list[dict] = []        # new runs the cluster started (resume="never", a rerun, ftd clear)
        self.disk_decision = DiskDecision(self)
        self._outbox: list[Outgoing] = []
        self._last_send = clock()
        self._sent_to: dict[int, float] = {}  # last message to each node (a beat goes to those not told lately)
        self.takeover = Takeover(self) if gather else None

    # ---- outputs ------------------------------------------------------------------------------
    def take(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out

    def _send(self, dests, mtype: str, **fields) -> None:
        dests = tuple(dests)
        if dests:
            self._outbox.append(Outgoing(dests, mtype, fields))
        now = self._last_send = self.clock()
        for d in dests:
            self._sent_to[d] = now

    def _sync(self, dests=None) -> None:
        extra = {"finished": True} if self.run_finished else {}
        if self.lost_nodes:
            extra["lost"] = sorted(self.lost_nodes)
        self._send(self.nodes if dests is None else dests, "sync", target=self.target, recoverable=self.recoverable,
                   epoch=self.epoch, flush=self.recoverable >= 0 and self.recoverable == self.flush_step, **extra)

    @property
    def disk(self) -> DiskRecovery | None:
        """The restore from disk in progress, if any."""
        return self.disk_decision.active

    @property
    def run_finished(self) -> bool:
        """Every node reported that all its ranks finished the run (a rerun starts afresh)."""
        return len(self.finished) == len(self.nodes)

    @property
    def gathering(self) -> bool:  # collecting the nodes' reports (``takeover``): nothing else is acted on
        return self.takeover is not None

    def start(self) -> None:
        if self.takeover is not None:
            self.takeover.start()
        else:
            self._sync()

    def on_report(self, src: int, report: Report | None, fresh: bool = False) -> None:
        """Node ``src`` says what it knows (``None``: not ready yet). After the gathering, from a node new to
        this term: ``fresh`` (its daemon started since it last heard a coordinator) counts as a hello."""
        if self.takeover is not None:
            self.takeover.on_report(src, report)
        elif report is not None:
            if fresh:
                self.on_hello(src, report.recoverable, report.epoch)
            elif self._learn(report.epoch, report.recoverable):
                self.latest[src] = max(self.latest.get(src, -1), report.latest)

    # ---- inputs -------------------------------------------------------------------------------
    def heard_from(self, src: int) -> None:
        """Any message from ``src`` (call for every one, before the handler): it is alive."""
        self.heard[src] = self.clock()

    def on_alive(self, src: int, latest: int, finished: bool = False) -> None:
        self.latest[src] = max(self.latest.get(src, -1), latest)
        was = self.run_finished
        (self.finished.add if finished else self.finished.discard)(src)
        if self.run_finished != was:
            self.last_event = (f"every node's trainers finished the run (recoverable step {self.recoverable})"
                               if self.run_finished else f"node {src} trains again")
            self._sync()

    def on_lost(self, src: int) -> None:
        """Node ``src`` cannot be rebuilt from its peers' memory (more than m of its group are gone): the
        syncs say so until it says hello again, rebuilt, so that no node keeps refusing restores after
        the cluster is whole again."""
        if src not in self.lost_nodes and self.takeover is None:  # (gathering: its report says so)
            self.lost_nodes.add(src)
            self.last_event = f"node {src} cannot be rebuilt from memory"
            self._sync()

    def on_reset(self, src: int, epoch: int, reason: str) -> None:
        """Node ``src`` starts a new run (its trainers passed resume="never", reran a finished run, or
        `ftd clear` was called): every node drops the previous run, in a new epoch. ``epoch`` is the one
        the node asked from; a request about an older epoch is stale (that run is gone already)."""
        if epoch != self.epoch:
            self._sync((src,))
            return
        self.drop_round(f"a new run starts: {reason}")
        self.disk_decision.cancel()
        self.epoch += 1
        self.recoverable, self.target, self.lead, self.latest = -1, 0, 1, {}
        self.finished.clear()
        self.lost_nodes.clear()
        self.flush_step = -1
        if self.flush_policy is not None:
            self.flush_policy.last_step = None
        self.resets.append({"epoch": self.epoch, "node": src, "reason": reason[:200], "at": time.time()})
        self.last_event = f"node {src} starts a new run ({reason[:100]}): epoch {self.epoch}"
        self._sync()

    def silent(self) -> list[int]:
        """Nodes the coordinator waits for and has not heard from for peer_timeout seconds."""
        now = self.clock()
        waiting = self.candidates if self.phase == COLLECT else self.round.done
        return [n for n in self.nodes if n not in waiting and now - self.heard[n] > self.peer_timeout]

    def _ahead(self) -> int:
        return max(self.latest.values(), default=-1) + self.lead

    def _learn(self, epoch: int, recoverable: int) -> bool:
        """A node's view of the cluster: a restarted coordinator learns the cluster's state from it.
        False if it is stale (an older epoch)."""
        if epoch < self.epoch:
            return False
        if (epoch, recoverable) > (self.epoch, self.recoverable):
            self.epoch, self.recoverable = epoch, recoverable
            self.target = max(self.target, recoverable + 1)
        return True

    def on_candidate(self, src: int, target: int, step: int, nbytes: int, mismatch: bool, recoverable: int,
                     latest: int = -1, epoch: int = 0) -> None:
        if not self._learn(epoch, recoverable):
            self._sync((src,))  # it missed the restore from disk: the sync resets it
            return
        self.latest[src] = max(latest, step)
        if self.disk is not None or self.phase != COLLECT or target != self.target:
            return  # a late answer to an older target
        self.candidates[src] = (step, nbytes, mismatch)
        if len(self.candidates) < len(self.nodes):
            return
        steps = {c[0] for c in self.candidates.values()}
        if len(steps) == 1 and not any(c[2] for c in self.candidates.values()):
            (step,) = steps
            sizes = [self.candidates[n][1] for n in self.nodes]
            self.round = Round(self.new_round_id(), step, sizes, self.clock())
            self.phase = PROTECT
            self.candidates.clear()
            self.last_event = f"protecting step {step}"
            self._send(self.nodes, "protect", round=self.round.id, step=step, sizes=sizes)
        else:
            self.retargets += 1
            self.lead = min(self.lead * 2, 1024)
            self._retarget(max(max(steps) + 1, self._ahead()), f"nodes reported steps {sorted(steps)}")

    def on_done(self, src: int, round_id: int, step: int, latest: int = -1, flushing: bool = False) -> None:
        self.latest[src] = latest
        r = self.round
        if self.phase != PROTECT or r is None or r.id != round_id or r.step != step:
            return
        r.done.add(src)
        if flushing:
            r.flushing.add(src)
        for group in self.grouping.groups():
            if group.index not in r.protected_groups and set(group.nodes) <= r.done:
                r.protected_groups.add(group.index)
                self._send(group.nodes, "protected", round=r.id, step=step, group=group.index)
        if len(r.done) == len(self.nodes):
            self.recoverable = step
            if self.flush_policy is not None and not r.flushing and self.flush_policy.due(step):
                self.flush_step = step  # (while a node still flushes, none starts: all flush the same steps)
            self.rounds_done += 1
            self.round = None
            self.phase = COLLECT
            self.lead = max(1, self.lead // 2)
            self.target = max(step + 1, self._ahead())
            self.candidates.clear()
            self.last_event = f"step {step} recoverable"
            self._sync()

    def on_hello(self, src: int, recoverable: int, epoch: int = 0) -> None:
        """Node ``src`` (re)started: whatever it had of a round in flight is gone."""
        if self.takeover is not None:
            self.takeover.on_report(src, Report(epoch, recoverable))
            return
        self._learn(epoch, recoverable)
        self.finished.discard(src)
        if src in self.lost_nodes and recoverable >= self.recoverable:
            self.lost_nodes.discard(src)  # it rebuilt (or loaded) the recoverable step
            self._sync()
        if self.disk is not None:  # it must offer (and load) again
            self.disk_decision.on_hello(src)
            return
        if self.phase == PROTECT:
            self._abandon(f"node {src} restarted during the protection of step {self.round.step}")
        else:
            self.candidates.pop(src, None)
            self._sync((src,))

    def on_refuse(self, src: int, round_id: int, reason: str) -> None:
        """Node ``src`` cannot take part in the round (no memory for its parity, say)."""
        if self.phase == PROTECT and self.round.id == round_id:
            self._abandon(f"node {src} refused to protect step {self.round.step}: {reason}")

    def on_restored(self, src: int, step: int) -> None:
        """Trainers of ``src`` restored ``step`` (-1: started afresh): the job restarted. A round of a
        later step belongs to the timeline before the restart and must not complete now that some
        rank went back (the node dropped its part of it); training goes on from step + 1."""
        self.latest[src] = step
        if self.disk is not None:
            return
        if self.phase == PROTECT and self.round.step > step:
            self._abandon(f"trainers of node {src} restored step {step}; step {self.round.step} belongs to "
                          f"the run before the restart", target=step + 1)
            self.lead = 1
        elif self.phase == COLLECT and self.target != step + 1:
            self.lead = 1
            self._retarget(step + 1, f"trainers of node {src} restored step {step}")

    # ---- the restore from disk (decided in ``disk_decision``) -----------------------------------
    def on_disk_offer(self, src: int, epoch: int, recoverable: int, steps: list[int], need: bool) -> None:
        (self.takeover or self.disk_decision).on_offer(src, epoch, recoverable, steps, need)  # held while it gathers

    def on_disk_loaded(self, src: int, epoch: int, step: int, ok: bool, error: str) -> None:
        self.disk_decision.on_loaded(src, epoch, step, ok, error)

    def tick(self) -> None:
        """Call often: abandons a round past its timeout, re-sends to nodes that have not answered."""
        now = self.clock()
        try:
            if self.takeover is not None:
                self.takeover.tick(now)
                return
            if self.disk is not None:
                if now - self._last_send >= self.resend:
                    self.disk_decision.resend()
                return
            if self.phase == PROTECT and now - self.round.started > self.timeout:
                missing = sorted(set(self.nodes) - self.round.done)
                self._abandon(f"protection of step {self.round.step} timed out waiting for nodes {missing}")
                return
            if self.phase == PROTECT:
                silent = self.silent()
                if silent:
                    self._abandon(f"node(s) {silent} silent for more than {self.peer_timeout:g} s (peer_timeout): "
                                  f"declared lost; protection of step {self.round.step} abandoned")
                    return
            if now - self._last_send < self.resend:
                return
            if self.phase == COLLECT:
                self._sync([n for n in self.nodes if n not in self.candidates])
            else:
                r = self.round
                self._send([n for n in self.nodes if n not in r.done], "protect", round=r.id, step=r.step,
                           sizes=r.sizes)
        finally:
            self._beat(now)

    # ---- helpers ------------------------------------------------------------------------------
    def _beat(self, now: float) -> None:
        """Tell the nodes told nothing for ``resend`` s that it is alive (not by _send: no resend waits for it)."""
        quiet = tuple(n for n in self.nodes if now - self._sent_to.get(n, -1e18) >= self.resend)
        if quiet:
            self._outbox.append(Outgoing(quiet, "beat", {}))
            self._sent_to.update(dict.fromkeys(quiet, now))

    def drop_round(self, reason: str) -> None:
        """Abort the round in flight, if any, and collect candidates afresh."""
        if self.round is not None:
            self._send(self.nodes, "abort", round=self.round.id, reason=reason[:200])
            self.rounds_abandoned += 1
        self.round, self.phase = None, COLLECT
        self.candidates.clear()

    def _abandon(self, reason: str, target: int | None = None) -> None:
        r = self.round
        self.rounds_abandoned += 1
        self._send(self.nodes, "abort", round=r.id, reason=reason[:200])
        self.round = None
        self.phase = COLLECT
        self._retarget(max(self.target, r.step + 1, self._ahead()) if target is None else target, reason)

    def _retarget(self, target: int, reason: str) -> None:
        self.target = target
        self.candidates.clear()
        self.last_event = f"{reason}: next target step {target}"
        self._sync()

    def status(self) -> dict:
        r = self.round
        return {"phase": self.phase, "target": self.target, "recoverable": self.recoverable,
                "candidates": {str(n): c[0] for n, c in self.candidates.items()},
                "round": None if r is None else {"step": r.step, "done": sorted(r.done),
                                                 "protected_groups": sorted(r.protected_groups),
                                                 "seconds": self.clock() - r.started},
                "rounds_done": self.rounds_done, "rounds_abandoned": self.rounds_abandoned,
                "retargets": self.retargets, "lead": self.lead, "last_event": self.last_event,
                "epoch": self.epoch, "flush_step": self.flush_step, "disk_restores": self.disk_decision.restores,
                "disk": self.disk_decision.status(), "finished": sorted(self.finished), "resets": self.resets[-5:],
                "lost": sorted(self.lost_nodes), "term": self.term,
                "gathering": None if self.takeover is None else self.takeover.status(),
                "silent": [] if self.takeover else self.silent()}
