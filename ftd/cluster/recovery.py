"""A cluster node's rebuilds: when one starts, its thread, and taking its result into the catalog.

A rebuild (``rebuilder.Rebuilder``) runs on a thread of its own with its own sockets, so the daemon's
loop goes on serving; it starts when the daemon starts (the start-up sync: a replacement node gets its
snapshots back, a restarted one checks what it holds), when the cluster's recoverable step is one
this node lacks, on ``ftd recover``, and when a chunk failed its checksum (a trainer's restore, or a
peer's fetch: then after ``REPAIR_DELAY``, at most ``MAX_REPAIR_TRIES`` times in a row). Its result
comes back through a queue that ``tick()`` reads; only the loop touches the catalog.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from ftd.cluster.rebuilder import Holdings, Rebuilder

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

REPAIR_DELAY = 2.0
MAX_REPAIR_TRIES = 3


class Recovery:
    def __init__(self, node: "ClusterNode"):
        self.node = node
        self.rebuilding: str | None = None                # why a rebuild thread runs
        self._thread: threading.Thread | None = None
        self._results: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.last_rebuild: dict | None = None
        self.rebuilds: list[dict] = []                    # the last few outcomes, newest last
        self._repair_due: float | None = None
        self._repair_tries = 0
        self._epoch = 0                                   # the cluster's epoch when the running rebuild began

    def _holdings(self) -> Holdings:
        cat = self.node.catalog
        h = Holdings(recoverable=cat.recoverable)
        for step in cat.held_steps():
            h.data[step] = [{"rank": r.rank, "world": r.world, "name": b.name, "capacity": b.capacity,
                             "manifest": b.manifest, "committed_at": b.committed_at}
                            for r, b in cat.buffers_of(step)]
        h.parity = dict(self.node.store.parity)
        return h

    def start(self, why: str) -> bool:
        """Start a rebuild thread unless one runs; True if this call started it."""
        if self.rebuilding is not None:
            return False
        self.rebuilding = why
        self._epoch = self.node.epoch
        holdings = self._holdings()
        log.info("rebuild started (%s)", why)
        config, security = self.node.members.peer_config(), self.node.security  # the record's endpoints

        def work() -> None:
            try:
                rebuilder = Rebuilder(config, security, holdings, stop=self._stop, traffic=self.node.traffic)
                self._results.put(("ok", rebuilder.run()))
            except Exception as e:  # reported to the loop, which keeps serving
                self._results.put(("error", e))

        self._thread = threading.Thread(target=work, name="ftd-rebuild", daemon=True)
        self._thread.start()
        return True

    def start_recover(self) -> bool:
        """`ftd recover`: rebuild whatever of the recoverable step this node lacks or holds corrupt."""
        self.node.store.forget_verification()
        return self.start("ftd recover")

    def schedule_repair(self, why: str) -> None:
        if self._repair_due is None and self._repair_tries < MAX_REPAIR_TRIES:
            log.warning("%s; repairing it from the peers", why)
            self._repair_due = time.monotonic() + REPAIR_DELAY

    def on_corrupt(self) -> None:
        """A trainer found the recoverable version corrupt: repair it from the peers at once."""
        self.node.store.forget_verification()
        self.start("a trainer found a chunk failing its checksum")

    def tick(self) -> None:
        try:
            kind, value = self._results.get_nowait()
        except queue.Empty:
            pass
        else:
            self._finish(kind, value)
        if self._repair_due is not None and time.monotonic() > self._repair_due and self.rebuilding is None:
            self._repair_due = None
            self._repair_tries += 1
            self.start("a chunk failed its checksum while serving a peer")

    def _record(self, outcome: dict) -> None:
        self.last_rebuild = outcome
        self.rebuilds = (self.rebuilds + [outcome])[-5:]

    def _finish(self, kind: str, value) -> None:
        node = self.node
        why = self.rebuilding
        self.rebuilding = None
        self._thread = None
        node.store.forget_verification()
        if node.epoch != self._epoch:
            self._drop_stale(kind, value, why)
            return
        was_ready, node.ready = node.ready, True
        epoch = node.epoch
        if kind == "error":
            err = str(value)
            self._record({"ok": False, "error": err, "why": why, "at": time.time()})
            log.error("rebuild failed: %s", err)
            if "cannot be rebuilt" in err or "lost" in err:
                node.lost_error = err
                for n in range(node.config.nodes):
                    if n != node.me:
                        node.links.send(n, "lost", step=node.catalog.recoverable, nodes=[node.me], error=err[:250])
                if node.coordinator:
                    node.coordinator.on_lost(node.me)
            if not was_ready:
                node.to_coordinator("hello", recoverable=node.catalog.recoverable, epoch=epoch)
            if node.lost_error:
                node.disk.offer_disk(need=True)
            return
        res = value
        self._record({"ok": True, "why": why, "at": time.time(), "step": res.step,
                      "rebuilt_data": res.rebuilt_data, "rebuilt_parity": res.rebuilt_parity,
                      "fetched_bytes": res.fetched_bytes, "decoded_frames": res.decoded_frames,
                      "seconds": res.seconds, "phases": res.phases,
                      "bad_blocks": res.bad_blocks, "lost_nodes": res.lost_nodes})
        cat = node.catalog
        if res.step >= 0 and res.ranks:
            known = {b.name for r in cat.ranks.values() for b in r.buffers}
            for r in res.ranks:
                if r["name"] not in known:
                    cat.adopt(r["rank"], r["world"], r["name"], r["capacity"], res.step, r["manifest"],
                              r.get("committed_at"))
            if res.parity:
                node.store.keep(res.step, *res.parity)
            cat.recoverable = max(cat.recoverable, res.step)
            node.lost_error = None
        if res.rebuilt_data or res.rebuilt_parity:
            log.info("rebuild of step %d done in %.2f s: data %s, parity %s, %d bytes fetched", res.step,
                     res.seconds, res.rebuilt_data, res.rebuilt_parity, res.fetched_bytes)
        self._repair_tries = 0
        if not was_ready or res.rebuilt_data or res.rebuilt_parity:
            node.to_coordinator("hello", recoverable=cat.recoverable, epoch=epoch)
        if not was_ready and res.step < 0:
            node.disk.offer_disk(need=False)  # nothing in memory anywhere it asked: is there something on disk?

    def _drop_stale(self, kind: str, value, why: str | None) -> None:
        """A rebuild begun in an older epoch ended after a restore from disk or a new run began another:
        its outcome is the old timeline's. A failure says nothing about the new one (taken as a loss,
        it would send the cluster to the disk a second time), and a success must not bring the old
        timeline's versions back; so neither is taken, what it wrote goes, and the rebuild runs again
        where it is still needed (a daemon that was starting up, or a node that lacks the step)."""
        node, cat = self.node, self.node.catalog
        outcome = str(value)[:200] if kind == "error" else f"step {value.step}"
        log.info("a rebuild begun in epoch %d (%s) ended in epoch %d: its outcome (%s) is the older timeline's "
                 "and is dropped", self._epoch, why, node.epoch, outcome)
        if kind == "ok":
            known = {b.name for r in cat.ranks.values() for b in r.buffers}
            for name in {r["name"] for r in value.ranks} - known:
                cat.store.release(name)
            if value.parity and node.store.parity.get(value.step, (None,))[0] != value.parity[0]:
                node.store.drop_segment(value.parity[0])
        if not node.ready or (cat.recoverable >= 0 and not cat.buffers_of(cat.recoverable)):
            self.start(f"again in epoch {node.epoch}: the cluster's timeline changed while the last one ran")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
