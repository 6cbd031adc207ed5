"""A run that restarts at another world size than its snapshots': which flushed version every rank
restores, resharded. Pure logic over the catalog and a way to find complete flushed versions.

A snapshot in memory holds one rank's shards and restores onto the mesh it was taken on only; a
version flushed to disk is one global checkpoint that any world size can read (``ftd.trainer.reshard``).
When the first rank of a run at world W asks to restore and this node holds versions of a run at
another world size, the daemon picks the newest complete flushed version, drops the memory versions
(they belong to the old world: counting its ranks as this run's would be wrong) and answers every
rank of world W with that version until each of them has committed a newer one, so a crash before
then reshards again from the same step. With no flushed version, or old trainers still alive, the
restore is refused with what to do.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ftd.daemon.catalog import Catalog
from ftd.errors import Refused

log = logging.getLogger(__name__)


class WorldChange:
    def __init__(self, catalog: Catalog, job: str, newest_complete: Callable[[], tuple[int, Path] | None] | None):
        """``newest_complete``: (step, directory) of the newest flushed version every node's part of
        which is on disk, or None; None itself where the daemon flushes nothing."""
        self.catalog, self.job, self.newest_complete = catalog, job, newest_complete
        self.pending: dict | None = None  # {"world", "step", "dir", "from_world"} while ranks reshard

    def answer(self, world: int, clustered: bool) -> dict | None:
        """The reshard answer for a rank of a run at ``world``, or None if memory serves it as usual."""
        if self.pending is not None:
            if self.pending["world"] == world and not self._all_newer(world, self.pending["step"]):
                return dict(self.pending)
            self.pending = None
        worlds = {r.world for r in self.catalog.ranks.values() if r.complete()}
        if not worlds or worlds == {world}:
            return None
        old = max(worlds)
        if clustered:
            raise Refused(f"job {self.job!r}: the cluster's snapshots were taken by a run of {old} rank(s), this one "
                          f"has {world}; a cluster restores at the world size of its snapshots. Restart with {old} "
                          f"ranks, or start afresh (restore(state, resume='never'), or `ftd clear`)")
        live = self.catalog.live_trainers()
        if live:
            who = ", ".join(f"rank {r} (pid {pid})" for r, pid in live)
            raise Refused(f"job {self.job!r}: a run of {old} rank(s) still holds this node ({who}) and this run has "
                          f"{world}; stop it first, or give this run another job name ($FTD_JOB)")
        found = self.newest_complete() if self.newest_complete is not None else None
        if found is None:
            where = ("no flush_dir is configured" if self.newest_complete is None
                     else "no complete version is flushed to disk yet")
            raise Refused(f"job {self.job!r}: its snapshots were taken by a run of {old} rank(s), this one has "
                          f"{world}. A snapshot in memory restores only at the world size it was taken at, and "
                          f"{where} to reshard from. Restart with {old} ranks, or start afresh "
                          f"(restore(state, resume='never'), or `ftd clear`)")
        step, directory = found
        self.catalog.release_all(forget=True)
        self.pending = {"world": world, "step": step, "dir": str(directory), "from_world": old}
        log.warning("job %r restarts at world size %d (its snapshots are of %d ranks): every rank restores "
                    "flushed step %d from %s, resharded; the memory versions of the old run are dropped",
                    self.job, world, old, step, directory)
        return dict(self.pending)

    def _all_newer(self, world: int, step: int) -> bool:
        """Every rank of the new run committed a version after the one it resharded from."""
        ranks = self.catalog.ranks
        return all(r in ranks and any(b.step > step for b in ranks[r].complete()) for r in range(world))

    def forget(self) -> None:
        """A new run starts: nothing is to be resharded."""
        self.pending = None
