"""A cluster node's part in the durable tier: flushing the steps the coordinator marks, and the
restore from disk when the memory copies cannot give a recoverable step (see ``coordinator``).

A mixin of ``node.ClusterNode``, driven by the same single loop: the node offers the steps it
flushed completely (``disk_offer``), loads the one the coordinator chooses on a thread
(``flusher.DiskLoad``) and reports (``disk_loaded``); restores wait meanwhile (``disk_wait``).
A ``sync`` of a newer epoch ends the older timeline on this node.
"""
from __future__ import annotations

import logging
import time

from .errors import ProtocolError
from .flusher import DiskLoad, Flusher

log = logging.getLogger("ftd.node")


class DiskRestore:
    """Uses the node's catalog, store, round, config, lost_error and its _to_coordinator,
    _flush_coordinator, _drop_round and _start_rebuild."""

    def _init_disk(self, flusher: Flusher | None) -> None:
        self.flusher = flusher
        self.epoch = 0                                    # restores from disk the cluster made (coordinator's)
        self.disk_wait: str | None = None                 # why restores wait for a decision about the disk
        self.disk_load: DiskLoad | None = None
        self._disk_load_epoch = 0
        self._disk_loaded: tuple[int, int] | None = None  # (epoch, step) loaded and reported
        self._disk_need = False
        self._disk_bad: set[int] = set()                  # flushed steps that failed their checks here
        self._disk_offer_at = 0.0
        self._flush_offered = -1

    def _offer_flush(self, recoverable: int) -> None:
        """The coordinator marked recoverable ``recoverable`` for a flush."""
        if self.flusher is not None and recoverable > self._flush_offered:
            self._flush_offered = recoverable
            self.flusher.offer(recoverable)

    def _flushing(self) -> bool:
        """Whether this node's flush worker is busy (the coordinator marks no new flush meanwhile, so
        every node flushes the same steps)."""
        return self.flusher is not None and self.flusher.busy

    # ---- the restore from disk ------------------------------------------------------------------
    def _offer_disk(self, need: bool, asked: bool = False) -> None:
        """Tell the coordinator which steps this node flushed completely (``need``: its memory
        cannot give the recoverable step). Restores wait until the cluster decided."""
        if self.flusher is None:  # no flush_dir: nothing on disk, and any error stands
            if asked:
                self._to_coordinator("disk_offer", epoch=self.epoch, recoverable=self.catalog.recoverable, steps=[],
                                     need=False)
            return
        self._disk_need = self._disk_need or need
        steps = [s for s in self.flusher.on_disk() if s not in self._disk_bad][:256]
        if self.disk_wait is None:
            self.disk_wait = ("the cluster restores from disk: its memory copies cannot give a recoverable step"
                              if self._disk_need else "deciding whether the cluster restores from disk")
        self._disk_offer_at = time.monotonic()
        self._to_coordinator("disk_offer", epoch=self.epoch, recoverable=self.catalog.recoverable, steps=steps,
                             need=self._disk_need)
        self._flush_coordinator()

    def _on_disk_load(self, epoch: int, step: int) -> None:
        if epoch <= self.epoch or self.flusher is None:
            return  # a late resend of a restore that is over, or nothing on disk here
        if self.disk_wait is None:
            raise ProtocolError(f"disk_load of step {step}, but this node offered nothing to load")
        if self._disk_loaded == (epoch, step):
            self._to_coordinator("disk_loaded", epoch=epoch, step=step, ok=True, error="")
            return
        if self.disk_load is not None:
            if self.disk_load.step == step:
                return  # loading it
            self.disk_load.abandon()
        self.disk_wait = f"loading step {step} from disk ({self.config.flush_dir})"
        self._disk_load_epoch = epoch
        self.disk_load = DiskLoad(self.config, step, self.catalog.segment_name)
        log.warning("the cluster restores step %d from disk: loading this node's part", step)

    def _tick_disk(self) -> None:
        load = self.disk_load
        if load is not None:
            done = load.result()
            if done is None:
                return
            self.disk_load = None
            ok, value, seconds = done
            if ok:
                for r in value:
                    self.catalog.adopt(r["rank"], r["world"], r["name"], r["capacity"], load.step, r["manifest"],
                                       None, origin=load.origin)
                self._disk_loaded = (self._disk_load_epoch, load.step)
                log.info("loaded step %d from disk in %.2f s (%d rank(s))", load.step, seconds, len(value))
                self._to_coordinator("disk_loaded", epoch=self._disk_load_epoch, step=load.step, ok=True, error="")
            else:
                self._disk_bad.add(load.step)
                log.warning("flushed step %d cannot be used: %s", load.step, value)
                self._to_coordinator("disk_loaded", epoch=self._disk_load_epoch, step=load.step, ok=False,
                                     error=str(value)[:250])
            return
        if self.disk_wait and self._disk_loaded is None and time.monotonic() - self._disk_offer_at > 2.0:
            self._offer_disk(self._disk_need)  # the coordinator may have restarted or missed it

    def _on_disk_none(self, reason: str) -> None:
        if self.disk_wait is None:
            return
        self.disk_wait = None
        self._disk_need = False
        if self.lost_error:
            self.lost_error = f"{self.lost_error}; and no restore from disk: {reason}"
        log.warning("no restore from disk: %s", reason)

    def _reset_to_disk(self, epoch: int, step: int) -> bool:
        """The cluster restored ``step`` from disk in epoch ``epoch``. A node that loaded it drops the
        older timeline (its later versions and all parity) and serves it. A node that did not take
        part (its daemon restarted since, or missed the restore) adopts the epoch: if it holds the
        step, or a later one would be synced anyway, nothing else changes; if it holds a later step
        of the old timeline, that goes, and it rebuilds the step like any node that lacks it (from
        disk again, if no peer holds parity of it). False: ignore this sync."""
        if self.flusher is None:
            raise ProtocolError(f"sync of epoch {epoch} (a restore from disk), but this node has no flush_dir")
        cat = self.catalog
        loaded = any(b.origin.startswith("disk") for _, b in cat.buffers_of(step))
        self.epoch = epoch
        self.disk_wait, self._disk_need, self._disk_loaded = None, False, None
        if not loaded and step >= cat.recoverable:
            log.info("the cluster is in epoch %d (a restore from disk happened while this daemon was away)", epoch)
            return True  # the usual sync handling: it holds the step, or rebuilds it
        if self.round is not None:
            self._drop_round(keep_parity=False)
        self.done_unsynced = None
        self.store.drop_steps(keep=lambda s: False)
        self.store.prune_mappings()
        self.group_protected = set()
        cat.reset_to(step)
        self.latest_step = step
        self._flush_offered = max(self._flush_offered, step)
        if loaded:
            self.lost_error = None
            log.warning("the cluster restored step %d from disk (epoch %d); training goes on from there", step, epoch)
        else:
            log.warning("the cluster went back to step %d (restored from disk); this node held a later one", step)
            if not cat.buffers_of(step):
                self._start_rebuild(f"the cluster restored step {step} from disk, which this node lacks")
        return True
