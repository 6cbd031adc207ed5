"""A cluster node's part in the disk tier: flushing the steps the coordinator marks, and the restore
from disk when the memory copies cannot give a recoverable step (the coordinator's side: ``coordinator``).

Composed into ``cluster.node.ClusterNode`` and driven by the same single loop: the node offers the
steps it flushed completely (``disk_offer``), loads the one the coordinator chooses on a thread
(``disk_load.DiskLoad``) and reports (``disk_loaded``); restores wait meanwhile (``disk_wait``). A
``sync`` of a newer epoch ends the older timeline on this node (``reset_to_disk``; a new run's,
whose recoverable step is -1, drops everything and the node's flushed versions: ``new_run``).

Call order: ``offer_flush(step)`` when a sync marks a step; ``offer_disk(need)`` when a rebuild
cannot give the step (or finds nothing anywhere at start-up) and on ``disk_query``;
``on_disk_load``/``on_disk_none`` for the coordinator's answers; ``tick()`` every loop turn.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from ftd.durable.disk_load import DiskLoad
from ftd.durable.flusher import Flusher
from ftd.errors import ProtocolError

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

OFFER_AGAIN = 2.0  # seconds before an unanswered disk offer is sent again (the coordinator may have restarted)


class ClusterDisk:
    def __init__(self, node: "ClusterNode", flusher: Flusher | None):
        self.node = node
        self.flusher = flusher
        self.disk_wait: str | None = None                 # why restores wait for a decision about the disk
        self.disk_load: DiskLoad | None = None
        self._load_epoch = 0
        self._loaded: tuple[int, int] | None = None       # (epoch, step) loaded and reported
        self._need = False
        self._bad: set[int] = set()                       # flushed steps that failed their checks here
        self._offer_at = 0.0
        self._flush_offered = -1

    def offer_flush(self, recoverable: int) -> None:
        """The coordinator marked recoverable ``recoverable`` for a flush."""
        if self.flusher is not None and recoverable > self._flush_offered:
            self._flush_offered = recoverable
            self.flusher.offer(recoverable)

    def flushing(self) -> bool:
        """Whether this node's flush worker is busy (the coordinator marks no new flush meanwhile, so
        every node flushes the same steps)."""
        return self.flusher is not None and self.flusher.busy

    # ---- the restore from disk ------------------------------------------------------------------
    def offer_disk(self, need: bool, asked: bool = False) -> None:
        """Tell the coordinator which steps this node flushed completely (``need``: its memory
        cannot give the recoverable step). Restores wait until the cluster decided."""
        node = self.node
        if self.flusher is None:  # no flush_dir: nothing on disk, and any error stands
            if asked:
                node.to_coordinator("disk_offer", epoch=node.epoch, recoverable=node.catalog.recoverable, steps=[],
                                    need=False)
            return
        self._need = self._need or need
        steps = [s for s in self.flusher.on_disk() if s not in self._bad][:256]
        if self.disk_wait is None:
            self.disk_wait = ("the cluster restores from disk: its memory copies cannot give a recoverable step"
                              if self._need else "deciding whether the cluster restores from disk")
        self._offer_at = time.monotonic()
        node.to_coordinator("disk_offer", epoch=node.epoch, recoverable=node.catalog.recoverable, steps=steps,
                            need=self._need)
        node.flush_coordinator()

    def on_disk_load(self, epoch: int, step: int) -> None:
        node = self.node
        if epoch <= node.epoch or self.flusher is None:
            return  # a late resend of a restore that is over, or nothing on disk here
        if self.disk_wait is None:
            # the coordinator counts on this node for a restore it did not offer to (its offer was taken
            # by an older restore, which the sync of its epoch ended here): offer again, so that the
            # coordinator's next disk_load finds it waiting, instead of refusing every resend
            log.info("disk_load of step %d for epoch %d, but no offer of this node is open: offering again", step,
                     epoch)
            self.offer_disk(need=self.node.lost_error is not None, asked=True)
            return
        if self._loaded == (epoch, step):
            node.to_coordinator("disk_loaded", epoch=epoch, step=step, ok=True, error="")
            return
        if self.disk_load is not None:
            if self.disk_load.step == step:
                return  # loading it
            self.disk_load.abandon()
        self.disk_wait = f"loading step {step} from disk ({node.config.flush_dir})"
        self._load_epoch = epoch
        self.disk_load = DiskLoad(node.config, step, node.catalog.segment_name)
        log.warning("the cluster restores step %d from disk: loading this node's part", step)

    def tick(self) -> None:
        if self.flusher is None:
            return
        node = self.node
        load = self.disk_load
        if load is not None:
            done = load.result()
            if done is None:
                return
            self.disk_load = None
            ok, value, seconds = done
            if ok:
                for r in value:
                    node.catalog.adopt(r["rank"], r["world"], r["name"], r["capacity"], load.step, r["manifest"],
                                       None, origin=load.origin)
                self._loaded = (self._load_epoch, load.step)
                log.info("loaded step %d from disk in %.2f s (%d rank(s))", load.step, seconds, len(value))
                node.to_coordinator("disk_loaded", epoch=self._load_epoch, step=load.step, ok=True, error="")
            else:
                self._bad.add(load.step)
                log.warning("flushed step %d cannot be used: %s", load.step, value)
                node.to_coordinator("disk_loaded", epoch=self._load_epoch, step=load.step, ok=False,
                                    error=str(value)[:250])
            return
        if self.disk_wait and self._loaded is None and time.monotonic() - self._offer_at > OFFER_AGAIN:
            self.offer_disk(self._need)  # the coordinator may have restarted or missed it

    def on_disk_none(self, reason: str) -> None:
        if self.disk_wait is None:
            return
        self.disk_wait = None
        self._need = False
        node = self.node
        if node.lost_error:
            node.lost_error = f"{node.lost_error}; and no restore from disk: {reason}"
        log.warning("no restore from disk: %s", reason)

    def reset_to_disk(self, epoch: int, step: int) -> bool:
        """The cluster restored ``step`` from disk in epoch ``epoch``. A node that loaded it drops the
        older timeline (its later versions and all parity) and serves it. A node that did not take
        part (its daemon restarted since, or missed the restore) adopts the epoch: if it holds the
        step, or a later one would be synced anyway, nothing else changes; if it holds a later step
        of the old timeline, that goes, and it rebuilds the step like any node that lacks it (from
        disk again, if no peer holds parity of it). False: ignore this sync."""
        node = self.node
        if self.flusher is None:
            raise ProtocolError(f"sync of epoch {epoch} (a restore from disk), but this node has no flush_dir")
        cat = node.catalog
        loaded = any(b.origin.startswith("disk") for _, b in cat.buffers_of(step))
        node.epoch = epoch
        self.disk_wait, self._need, self._loaded = None, False, None
        if not loaded and step >= cat.recoverable:
            log.info("the cluster is in epoch %d (a restore from disk happened while this daemon was away)", epoch)
            return True  # the usual sync handling: it holds the step, or rebuilds it
        rounds = node.rounds
        if rounds.round is not None:
            rounds.drop_round(keep_parity=False)
        rounds.done_unsynced = None
        node.store.drop_steps(keep=lambda s: False)
        node.store.prune_mappings()
        rounds.group_protected = set()
        cat.reset_to(step)
        node.latest_step = step
        self._flush_offered = max(self._flush_offered, step)
        if loaded:
            node.lost_error = None
            log.warning("the cluster restored step %d from disk (epoch %d); training goes on from there", step, epoch)
        else:
            log.warning("the cluster went back to step %d (restored from disk); this node held a later one", step)
            if not cat.buffers_of(step):
                node.recovery.start(f"the cluster restored step {step} from disk, which this node lacks")
        return True

    def has_flushed(self) -> bool:
        """Whether this node has flushed versions of the job on disk."""
        return self.flusher is not None and bool(self.flusher.on_disk())

    def new_run(self) -> None:
        """A new run starts: no decision about the previous run's disk stands, and its flushed versions
        go (a later restore from disk must never bring the previous run back)."""
        if self.disk_load is not None:
            self.disk_load.abandon()
            self.disk_load = None
        self.disk_wait, self._need, self._loaded = None, False, None
        self._bad.clear()
        self._flush_offered = -1
        if self.flusher is not None:
            self.flusher.forget_all()

    def close(self) -> None:
        if self.disk_load is not None:
            self.disk_load.abandon()
