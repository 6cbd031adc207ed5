"""The catalog's cluster part: pins, the recoverable step, and ranks that move between nodes. Pure logic.

A node's *image* of a step is what its parity protects: the versions of that step of the ranks it
hosted then, in rank order. Under torchrun's c10d rendezvous (or a SLURM requeue, or Kubernetes pods
that come back with new names) ranks can land on another node after a restart, so the image is not
"every rank this node knows" but:

  - a rank that *arrived* here by a restore of step X, its version fetched from another node (a
    ``foreign`` buffer), is part of this node's images only of the steps after X (``since``);
  - a rank that *left* (it restored elsewhere, or this node's own trainers took its place: its
    trainer is gone and ``local_world`` live trainers of other ranks registered here) is *departed*
    (``until`` = the recoverable step then): its version of that step stays, since the parity of
    this node's image of it needs it, but it takes no part in later rounds, so a dead registration
    never blocks protection; it is dropped once a later step is recoverable.

Mixed into ``catalog.Catalog`` (its state and store); see its docstring for the call order.
"""
from __future__ import annotations

import logging

from ftd.daemon.buffers import Buffer, RankEntry

log = logging.getLogger(__name__)


class ClusterCatalog:
    """The cluster methods of ``Catalog`` (a mixin: it uses the catalog's ``ranks``, ``store`` and clocks)."""

    # ---- which ranks make this node's image ------------------------------------------------------
    @staticmethod
    def in_image(entry: RankEntry, step: int) -> bool:
        """Whether ``entry``'s version of ``step`` belongs to this node's image of that step."""
        return step > entry.since and (entry.until is None or step <= entry.until)

    def hosted(self) -> list[RankEntry]:
        """Ranks whose trainers run on this node now (not departed)."""
        return [r for r in self.ranks.values() if r.until is None]

    def holds_rank(self, rank: int, step: int) -> bool:
        """Whether a restore of ``rank`` at ``step`` can be served here (its own version or a fetched one)."""
        entry = self.ranks.get(rank)
        return entry is not None and any(b.step == step for b in entry.complete())

    def rank_buffer(self, rank: int, step: int) -> tuple[RankEntry, Buffer] | None:
        """The complete buffer holding ``rank``'s version of ``step`` here (to serve a peer's fetch)."""
        entry = self.ranks.get(rank)
        buf = next((b for b in entry.complete() if b.step == step), None) if entry else None
        return None if buf is None else (entry, buf)

    def image_ranks(self, step: int) -> list[int]:
        """Ranks of this node's image of ``step`` (whether or not all are complete)."""
        return sorted(r.rank for r in self.ranks.values() if self.in_image(r, step))

    # ---- ranks arriving and leaving ----------------------------------------------------------------
    def arrived(self, rank: int, step: int) -> None:
        """``rank``'s version of ``step`` was fetched from another node for its restore here: it is part
        of this node's images from the next step on, and hosted here again if it had left."""
        entry = self.ranks[rank]
        entry.since = max(entry.since, step)
        entry.until = None

    def returned(self, rank: int) -> None:
        """``rank`` restores here again (it had left, say, while another node's trainer held it)."""
        entry = self.ranks.get(rank)
        if entry is not None and entry.until is not None:
            log.info("rank %d is hosted on this node again", rank)
            entry.until = None

    def depart(self, rank: int, why: str) -> bool:
        """``rank`` no longer trains on this node: keep only its version of the recoverable step (part of
        this node's protected image), drop the rest. False if its trainer here still runs."""
        entry = self.ranks.get(rank)
        if entry is None or entry.until is not None:
            return False
        if entry.pid is not None and entry.session is not None and self.alive(entry.pid):
            return False
        entry.until, entry.pinned, entry.session = self.recoverable, None, None
        for b in list(entry.buffers):
            if not (b.state == "complete" and b.step == self.recoverable and not b.foreign) and b.name != entry.flush_hold:
                self.store.release(b.name)
                entry.buffers.remove(b)
        log.info("rank %d left this node (%s); its version of step %d stays for the parity of this node's image",
                 rank, why, self.recoverable)
        if not entry.buffers:
            del self.ranks[rank]
        return True

    def settle_departures(self) -> list[int]:
        """Once ``local_world`` live trainers registered here, ranks whose trainer is gone have left (c10d
        gave this node other ranks): depart them. Returns the ranks that left."""
        if self.local_world <= 0:
            return []
        live = [r for r in self.hosted() if r.pid is not None and r.session is not None and self.alive(r.pid)]
        if len(live) < self.local_world:
            return []
        gone = [r.rank for r in self.hosted() if r not in live]
        return [rank for rank in gone
                if self.depart(rank, f"this node's {len(live)} trainer(s) now hold ranks {sorted(r.rank for r in live)}")]

    def _drop_departed(self) -> None:
        """Departed ranks whose kept version is older than the recoverable step are no longer needed."""
        for entry in [r for r in self.ranks.values() if r.until is not None and r.until < self.recoverable]:
            for b in list(entry.buffers):
                if b.name != entry.flush_hold:
                    self.store.release(b.name)
                    entry.buffers.remove(b)
            if not entry.buffers:
                del self.ranks[entry.rank]

    # ---- rounds ---------------------------------------------------------------------------------
    def _pinnable(self, entry: RankEntry, b: Buffer) -> bool:
        """Only versions the rank's live trainer committed may be protected: a dead trainer's last
        versions belong to a run that is over (its restart restores the recoverable step, so
        protecting them now could hand a later-restoring rank a step the others did not restore)."""
        return (b.state == "complete" and not b.foreign and b.pid is not None and b.pid == entry.pid
                and self.alive(entry.pid))

    def candidate(self) -> tuple[int, int, bool] | None:
        """(step, node bytes, mismatch) once every hosted rank's live trainer pinned a step for the current
        target. mismatch: the ranks pinned different steps (step is then the largest)."""
        self.settle_departures()
        hosted = self.hosted()
        if self.target is None or not hosted or any(r.pinned is None for r in hosted):
            return None
        if not all(r.pid is not None and self.alive(r.pid) for r in hosted):
            return None
        if len(hosted) < self.local_world:
            return None  # a rank of this node has not registered yet
        steps = {r.pinned for r in hosted}
        step = max(steps)
        nbytes = sum(b.manifest["nbytes"] for r in hosted for b in r.complete() if b.step == r.pinned and not b.foreign)
        return step, nbytes, len(steps) > 1

    def sync(self, target: int, recoverable: int) -> None:
        """The coordinator's word: ``recoverable`` is safe to serve (the caller checked this node holds
        it), and the next round pins the first commit at or after ``target``."""
        if recoverable > self.recoverable:
            self.recoverable = recoverable
        self._drop_departed()
        self.target = target
        for r in self.hosted():
            later = [b.step for b in r.complete() if b.step >= target and self._pinnable(r, b)]
            r.pinned = min(later) if later else None

    def forget_newer(self, rank: int, step: int) -> None:
        """Rank ``rank`` went back to ``step`` (a restore): its versions after that belong to the run
        before the restart; never pin, protect or serve them. The recoverable version always stays.
        Other ranks' versions are left alone: they may already be the new run's."""
        entry = self.ranks.get(rank)
        if entry is None:
            return
        step = max(step, self.recoverable)
        entry.pinned = None
        for b in entry.buffers:
            if b.state == "complete" and b.step > step:
                self.store.mark_writing(b.name)
                b.state, b.step, b.manifest, b.foreign = "free", None, None, False

    def reset_to(self, step: int) -> None:
        """The cluster restored ``step`` from disk (or, with -1, a new run begins): it is the
        recoverable step now, even if an older timeline had a later one; every version after it
        belongs to that timeline."""
        self.recoverable = step
        for rank in list(self.ranks):
            self.forget_newer(rank, step)
            self.ranks[rank].finished = False
        if step < 0:  # a new run: where ranks were in the old one no longer matters
            for entry in list(self.ranks.values()):
                entry.since = -1
                if entry.until is not None:
                    for b in entry.buffers:
                        self.store.release(b.name)
                    del self.ranks[entry.rank]
