"""The coordinator's part in the restore from disk: which flushed step every node loads. Pure.

When the memory copies cannot give a recoverable step (a node reports more than m losses in its
group, ``disk_offer`` with ``need``; or every node started with nothing in memory), the coordinator
asks every node which versions it flushed completely (``disk_query``/``disk_offer``), picks the newest
step all of them have, and has every node load it (``disk_load``). A node whose copy fails its
checksums says so (``disk_loaded`` not ok) and the next older common step is tried. Once all loaded
it, that step becomes recoverable in a new epoch (the coordinator's timeline number).

Composed into ``coordinator.Coordinator`` (``c``), whose outbox, nodes and timeline it uses; call
order: ``on_offer`` and ``on_loaded`` for the nodes' messages, ``on_hello`` when a node restarts
meanwhile, ``resend()`` from the coordinator's tick, ``cancel()`` when a new run replaces it all,
``restart()`` when a new coordinator took over in the middle of one (``takeover``).
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from ftd.durable.policy import common_step

if TYPE_CHECKING:
    from ftd.cluster.coordinator import Coordinator


@dataclasses.dataclass
class DiskRecovery:
    """A restore from disk in progress: what each node offers, and the step being loaded."""
    offers: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    step: int | None = None
    loaded: set[int] = dataclasses.field(default_factory=set)
    bad: dict[int, set[int]] = dataclasses.field(default_factory=dict)


class DiskDecision:
    def __init__(self, coordinator: "Coordinator"):
        self.c = coordinator
        self.active: DiskRecovery | None = None
        self.cold: dict[int, list[int]] = {}  # offers of nodes that started with nothing in memory
        self.cold_decided = False           # ... and nothing on disk was common to all: start afresh
        self.restores: list[dict] = []

    def on_offer(self, src: int, epoch: int, recoverable: int, steps: list[int], need: bool) -> None:
        """Node ``src`` lists the steps it flushed completely; ``need``: its memory cannot give the
        recoverable step (more than m nodes of its group lost)."""
        c = self.c
        if self.active is None:
            if need and epoch < c.epoch:
                # sent before the restore from disk (or new run) that began epoch c.epoch reached it: its
                # need was the older timeline's. The sync tells it the epoch; a need that outlasts it
                # comes again, of this epoch (a second trip to the disk here would be for nothing)
                c._sync((src,))
                return
            if need:
                self._start({src: steps}, f"node {src} cannot rebuild from its peers' memory")
                return
            if recoverable >= 0 or c.recoverable >= 0 or self.cold_decided:
                # a node started empty, but the cluster's memory holds its step: it rebuilds that
                c._send((src,), "disk_none", reason=f"the cluster's recoverable step {c.recoverable} is "
                                                    f"in memory" if c.recoverable >= 0 else "start afresh")
                c._sync((src,))
                return
            self.cold[src] = list(steps)
            if len(self.cold) == len(c.nodes):
                if common_step(self.cold, c.nodes) is None:
                    self.cold_decided = True
                    c.last_event = "every node started empty and no version was flushed by all: start afresh"
                    c._send(c.nodes, "disk_none", reason="no version on disk was flushed completely by "
                                                         "every node: the job starts afresh")
                else:
                    self._start(self.cold, "every node started with nothing in memory")
            return
        d = self.active
        if d.step is None or src not in d.offers:
            d.offers[src] = [s for s in steps if s not in d.bad.get(src, ())]
            self._decide()

    def restart(self, why: str) -> None:
        """A new coordinator took over while a restore from disk was under way: ask every node again."""
        self._start({}, why)

    def _start(self, offers: dict[int, list[int]], why: str) -> None:
        c = self.c
        c.drop_round(f"restoring from disk: {why}")
        self.active = DiskRecovery(offers={n: list(s) for n, s in offers.items()})
        self.cold.clear()
        c.last_event = f"{why}: restoring from disk"
        c._send([n for n in c.nodes if n not in self.active.offers], "disk_query")
        self._decide()

    def _decide(self) -> None:
        c = self.c
        d = self.active
        if d.step is not None or len(d.offers) < len(c.nodes):
            return
        step = common_step(d.offers, c.nodes)
        if step is None:
            self.active = None
            c.last_event = "restore from disk impossible: no version was flushed completely by every node"
            c._send(c.nodes, "disk_none", reason="no version on disk was flushed completely (and passes its "
                                                 "checks) on every node")
            return
        d.step, d.loaded = step, set()
        c.last_event = f"every node loads step {step} from disk"
        c._send(c.nodes, "disk_load", epoch=c.epoch + 1, step=step)

    def on_loaded(self, src: int, epoch: int, step: int, ok: bool, error: str) -> None:
        c = self.c
        d = self.active
        if d is None or d.step != step or epoch != c.epoch + 1:
            return
        if not ok:
            d.bad.setdefault(src, set()).add(step)
            d.offers[src] = [s for s in d.offers.get(src, []) if s != step]
            d.step = None
            c.last_event = f"node {src} cannot use flushed step {step} ({error[:100]}); trying an older one"
            self._decide()
            return
        d.loaded.add(src)
        if len(d.loaded) < len(c.nodes):
            return
        c.epoch += 1
        c.recoverable, c.target = step, step + 1
        c.lost_nodes.clear()  # every node holds the step again
        self.active = None
        c.lead = 1
        c.latest = {}
        c.flush_step = step  # it is on disk already
        if c.flush_policy is not None:
            c.flush_policy.last_step, c.flush_policy.last_time = step, c.clock()
        self.restores.append({"epoch": c.epoch, "step": step, "at": time.time()})
        c.last_event = f"step {step} restored from disk on every node (epoch {c.epoch})"
        c._sync()

    def on_hello(self, src: int) -> None:
        """Node ``src`` restarted during the restore: it must offer (and load) again."""
        d, c = self.active, self.c
        d.offers.pop(src, None)
        d.loaded.discard(src)
        if d.step is not None and src not in d.loaded:
            c._send((src,), "disk_load", epoch=c.epoch + 1, step=d.step)

    def resend(self) -> None:
        d, c = self.active, self.c
        if d.step is None:
            c._send([n for n in c.nodes if n not in d.offers], "disk_query")
        else:
            c._send([n for n in c.nodes if n not in d.loaded], "disk_load", epoch=c.epoch + 1, step=d.step)

    def cancel(self) -> None:
        """A new run starts: whatever was being decided about the previous one's disk is moot."""
        self.active = None
        self.cold.clear()
        self.cold_decided = False

    def status(self) -> dict | None:
        d = self.active
        return None if d is None else {"offers": {str(n): s[:5] for n, s in d.offers.items()}, "step": d.step,
                                       "loaded": sorted(d.loaded)}
