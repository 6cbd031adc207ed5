"""A standalone daemon's part in the disk tier: which steps it flushes, and the restore from disk.

Without peers there is no coordinator: the daemon runs the ``FlushPolicy`` itself over the newest
step every rank of the node holds, and when it starts with nothing in memory it loads the newest
flushed version (an older one if that fails its checks) while restores wait. A cluster member
decides both with its peers instead (``cluster_restore``).

Call order (the daemon's loop, one thread): ``start(adopted)`` once after adoption; ``after_commit()``
after each commit; ``tick()`` every loop turn; ``restore_wait()`` before serving a restore;
``close()`` at shutdown.
"""
from __future__ import annotations

import logging

from ftd.config import Config
from ftd.daemon.catalog import Catalog
from ftd.durable.disk_load import DiskLoad
from ftd.durable.flusher import Flusher
from ftd.durable.policy import FlushPolicy

log = logging.getLogger(__name__)


class StandaloneDisk:
    def __init__(self, config: Config, catalog: Catalog, flusher: Flusher):
        self.config, self.catalog, self.flusher = config, catalog, flusher
        self.policy = FlushPolicy(config.flush_every, config.flush_interval)
        self._offered = -1
        self.disk_load: DiskLoad | None = None  # a flushed version being loaded at start-up
        self._disk_steps: list[int] = []        # ... and the older ones to try if it fails its checks

    def start(self, adopted: int) -> None:
        """With nothing adopted from memory, start loading the newest flushed version."""
        if not adopted:
            self._disk_steps = self.flusher.on_disk()
            self._next_disk_load()

    def after_commit(self) -> None:
        step = self.catalog.newest_common()
        if step > self._offered:
            self._offered = step
            if self.policy.due(step):
                self.flusher.offer(step)

    def restore_wait(self) -> str | None:
        if self.disk_load is None:
            return None
        return f"loading step {self.disk_load.step} from disk ({self.config.flush_dir})"

    def _next_disk_load(self) -> None:
        if self._disk_steps:
            step = self._disk_steps.pop(0)
            self.disk_load = DiskLoad(self.config, step, self.catalog.segment_name)
            log.info("no snapshot in memory: loading step %d from %s", step, self.config.flush_dir)

    def tick(self) -> None:
        if self.disk_load is None:
            return
        done = self.disk_load.result()
        if done is None:
            return
        ok, value, seconds = done
        load, self.disk_load = self.disk_load, None
        if ok:
            for r in value:
                self.catalog.adopt(r["rank"], r["world"], r["name"], r["capacity"], load.step, r["manifest"], None,
                                   origin=load.origin)
            log.warning("restored step %d of %d rank(s) from disk in %.2f s (%s): memory held no snapshot",
                        load.step, len(value), seconds, load.origin[5:])
            return
        log.warning("flushed step %d cannot be used: %s; trying the one before it", load.step, value)
        self._next_disk_load()
        if self.disk_load is None:
            log.error("no flushed version on disk passes its checks: the trainers start afresh")

    def new_run(self) -> list[int]:
        """A new run starts (resume="never", a rerun of a finished run, `ftd clear`): forget the flush
        decisions and any load of the previous run, and remove its flushed versions."""
        if self.disk_load is not None:
            self.disk_load.abandon()
            self.disk_load = None
        self._disk_steps = []
        self._offered = -1
        self.policy = FlushPolicy(self.config.flush_every, self.config.flush_interval)
        return self.flusher.forget_all()

    def close(self) -> None:
        if self.disk_load is not None:  # its segments are not the catalog's yet
            self.disk_load.abandon()
