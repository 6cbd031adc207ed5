"""Which step the cluster protects next, and when it becomes recoverable. Pure state machine.

One daemon (node 0) runs it. A round goes:

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

Disk: when the memory copies cannot give a recoverable step (a node reports more than m losses in
its group, ``disk_offer`` with ``need``; or every node started with nothing in memory), the
coordinator asks every node which versions it flushed completely (``disk_query``/``disk_offer``),
picks the newest step all of them have, and has every node load it (``disk_load``). A node whose
copy fails its checksums says so (``disk_loaded`` not ok) and the next older common step is tried.
Once all loaded it, that step becomes recoverable in a new *epoch*: the cluster's recoverable step
may go back in time only by starting an epoch, and any report from an older epoch is stale.
Recoverable steps the ``FlushPolicy`` picks go out with ``flush`` in their ``sync``, so every node
flushes the same steps; none is picked while a node reports (in ``done``) that it still flushes.

Liveness: every node answers each ``sync`` and ``protect`` with at least an ``alive``, so a node the
coordinator has not heard from for ``peer_timeout`` seconds is *silent* (frozen, partitioned or
dead): a round waiting for it is abandoned at once instead of after ``timeout``, and it is listed
in ``status()`` until it speaks again. Training never waits for any of this; protection resumes
with a newer step once the node answers (or its replacement has rebuilt).

Call order (node 0's loop): ``start()`` once; for every message from node N, ``heard_from(N)`` and then
the ``on_<type>`` handler of its type; ``tick()`` every loop turn; after each of these, ``take()`` the
messages it wants sent (``Outgoing``: destinations, type, fields). Nothing here does I/O.
"""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

from ftd.cluster.stripes import Grouping
from ftd.durable.policy import FlushPolicy, common_step

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


@dataclasses.dataclass
class DiskRecovery:
    """A restore from disk in progress: what each node offers, and the step being loaded."""
    offers: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    step: int | None = None
    loaded: set[int] = dataclasses.field(default_factory=set)
    bad: dict[int, set[int]] = dataclasses.field(default_factory=dict)


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
                 flush_policy: FlushPolicy | None = None):
        self.grouping = grouping
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
        self.epoch = 0                      # restores from disk so far
        self.flush_policy = flush_policy
        self.flush_step = -1                # the newest recoverable step to be flushed
        self.disk: DiskRecovery | None = None
        self.cold: dict[int, list[int]] = {}  # offers of nodes that started with nothing in memory
        self.cold_decided = False           # ... and nothing on disk was common to all: start afresh
        self.disk_restores: list[dict] = []
        self._outbox: list[Outgoing] = []
        self._last_send = clock()

    # ---- outputs ------------------------------------------------------------------------------
    def take(self) -> list[Outgoing]:
        out, self._outbox = self._outbox, []
        return out

    def _send(self, dests, mtype: str, **fields) -> None:
        dests = tuple(dests)
        if dests:
            self._outbox.append(Outgoing(dests, mtype, fields))
        self._last_send = self.clock()

    def _sync(self, dests=None) -> None:
        self._send(self.nodes if dests is None else dests, "sync", target=self.target, recoverable=self.recoverable,
                   epoch=self.epoch, flush=self.recoverable >= 0 and self.recoverable == self.flush_step)

    def start(self) -> None:
        self._sync()

    # ---- inputs -------------------------------------------------------------------------------
    def heard_from(self, src: int) -> None:
        """Any message from ``src`` (call for every one, before the handler): it is alive."""
        self.heard[src] = self.clock()

    def on_alive(self, src: int, latest: int) -> None:
        self.latest[src] = max(self.latest.get(src, -1), latest)

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
        self._learn(epoch, recoverable)
        if self.disk is not None:  # it must offer (and load) again
            self.disk.offers.pop(src, None)
            self.disk.loaded.discard(src)
            if self.disk.step is not None and src not in self.disk.loaded:
                self._send((src,), "disk_load", epoch=self.epoch + 1, step=self.disk.step)
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

    # ---- the restore from disk ------------------------------------------------------------------
    def on_disk_offer(self, src: int, epoch: int, recoverable: int, steps: list[int], need: bool) -> None:
        """Node ``src`` lists the steps it flushed completely; ``need``: its memory cannot give the
        recoverable step (more than m nodes of its group lost)."""
        if self.disk is None:
            if need:
                self._start_disk({src: steps}, f"node {src} cannot rebuild from its peers' memory")
                return
            if recoverable >= 0 or self.recoverable >= 0 or self.cold_decided:
                # a node started empty, but the cluster's memory holds its step: it rebuilds that
                self._send((src,), "disk_none", reason=f"the cluster's recoverable step {self.recoverable} is "
                                                       f"in memory" if self.recoverable >= 0 else "start afresh")
                self._sync((src,))
                return
            self.cold[src] = list(steps)
            if len(self.cold) == len(self.nodes):
                if common_step(self.cold, self.nodes) is None:
                    self.cold_decided = True
                    self.last_event = "every node started empty and no version was flushed by all: start afresh"
                    self._send(self.nodes, "disk_none", reason="no version on disk was flushed completely by "
                                                              "every node: the job starts afresh")
                else:
                    self._start_disk(self.cold, "every node started with nothing in memory")
            return
        d = self.disk
        if d.step is None or src not in d.offers:
            d.offers[src] = [s for s in steps if s not in d.bad.get(src, ())]
            self._disk_decide()

    def _start_disk(self, offers: dict[int, list[int]], why: str) -> None:
        if self.round is not None:
            self._send(self.nodes, "abort", round=self.round.id, reason=f"restoring from disk: {why}"[:200])
            self.rounds_abandoned += 1
        self.round, self.phase = None, COLLECT
        self.candidates.clear()
        self.disk = DiskRecovery(offers={n: list(s) for n, s in offers.items()})
        self.cold.clear()
        self.last_event = f"{why}: restoring from disk"
        self._send([n for n in self.nodes if n not in self.disk.offers], "disk_query")
        self._disk_decide()

    def _disk_decide(self) -> None:
        d = self.disk
        if d.step is not None or len(d.offers) < len(self.nodes):
            return
        step = common_step(d.offers, self.nodes)
        if step is None:
            self.disk = None
            self.last_event = "restore from disk impossible: no version was flushed completely by every node"
            self._send(self.nodes, "disk_none", reason="no version on disk was flushed completely (and passes its "
                                                       "checks) on every node")
            return
        d.step, d.loaded = step, set()
        self.last_event = f"every node loads step {step} from disk"
        self._send(self.nodes, "disk_load", epoch=self.epoch + 1, step=step)

    def on_disk_loaded(self, src: int, epoch: int, step: int, ok: bool, error: str) -> None:
        d = self.disk
        if d is None or d.step != step or epoch != self.epoch + 1:
            return
        if not ok:
            d.bad.setdefault(src, set()).add(step)
            d.offers[src] = [s for s in d.offers.get(src, []) if s != step]
            d.step = None
            self.last_event = f"node {src} cannot use flushed step {step} ({error[:100]}); trying an older one"
            self._disk_decide()
            return
        d.loaded.add(src)
        if len(d.loaded) < len(self.nodes):
            return
        self.epoch += 1
        self.recoverable, self.target = step, step + 1
        self.disk = None
        self.lead = 1
        self.latest = {}
        self.flush_step = step  # it is on disk already
        if self.flush_policy is not None:
            self.flush_policy.last_step, self.flush_policy.last_time = step, self.clock()
        self.disk_restores.append({"epoch": self.epoch, "step": step, "at": time.time()})
        self.last_event = f"step {step} restored from disk on every node (epoch {self.epoch})"
        self._sync()

    def tick(self) -> None:
        """Call often: abandons a round past its timeout, re-sends to nodes that have not answered."""
        now = self.clock()
        if self.disk is not None:
            if now - self._last_send >= self.resend:
                d = self.disk
                if d.step is None:
                    self._send([n for n in self.nodes if n not in d.offers], "disk_query")
                else:
                    self._send([n for n in self.nodes if n not in d.loaded], "disk_load", epoch=self.epoch + 1,
                               step=d.step)
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
            self._send([n for n in self.nodes if n not in r.done], "protect", round=r.id, step=r.step, sizes=r.sizes)

    # ---- helpers ------------------------------------------------------------------------------
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
                "epoch": self.epoch, "flush_step": self.flush_step, "disk_restores": self.disk_restores,
                "disk": None if self.disk is None else {"offers": {str(n): s[:5] for n, s in self.disk.offers.items()},
                                                        "step": self.disk.step, "loaded": sorted(self.disk.loaded)},
                "silent": self.silent()}
