"""Other ranks' versions, for a rank that puts its replicated state together from its replicas' slices.

A replica-aware snapshot (``ftd.trainer.replicas``) holds only this rank's slice of the replicated
tensors; its restore needs the version of the same step of every other rank of its replica set. On
this node the daemon already holds the other local ranks' versions: ``answer`` names the buffer. A
rank whose version is on another node (a cluster) is fetched from the node that holds it with the
same checked fetch a rank that moved uses (``cluster.rank_fetch``), into a segment of its own that is
*not* taken into the catalog (the rank does not train here, and this node's image and parity do not
change); the trainer polls ("wait") until it is here, reads it, and lets it go (``release``).

Prefetch (``tick``, from the daemon's loop; ``replica_prefetch``): once the trainer of a rank with a
sliced version of the recoverable step is gone (its process died, or it closed its client before the
run finished: a worker crash, torchrun about to start it again), the slices of that step that other
nodes hold are fetched at once, while the new worker starts, so that its restore finds them here as
on a single node. An unclaimed prefetch goes when the recoverable step moves on or after
``PREFETCH_HOLD``; none starts while it would take the node past its memory budget.

Nothing silent: standalone, a version that is not on the node is refused naming the rank and step.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from ftd.cluster.rank_fetch import Fetched, NotYet, RankFetcher, Unplaceable
from ftd.errors import Refused
from ftd.shm import segments

log = logging.getLogger(__name__)

RETRY = 1.0  # seconds between two tries of a fetch that could not succeed yet
PREFETCH_EVERY = 0.5   # seconds between two looks for ranks whose trainer is gone
PREFETCH_HOLD = 600.0  # seconds a prefetched slice waits for the restore that wants it


def prefetch_wanted(catalog, alive, held) -> list[tuple[int, int, int, int]]:
    """(rank, step, world, bytes expected) of every replica slice this node should fetch ahead: for each
    rank here whose trainer is gone and whose version of the recoverable step is sliced, the replicas
    of that version that no rank of this node holds (``held(rank, step)``: fetched or being fetched)."""
    step = catalog.recoverable
    if step < 0:
        return []
    out, wanted = [], set()
    for entry in sorted(catalog.ranks.values(), key=lambda r: r.rank):
        if entry.finished or (entry.pid is not None and not entry.detached and alive(entry.pid)):
            continue
        found = catalog.rank_buffer(entry.rank, step)
        tree = found[1].manifest.get("tree") if found and isinstance(found[1].manifest, dict) else None
        info = tree.get("replica") if isinstance(tree, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("ranks"), list):
            continue
        for other in info["ranks"]:
            if (isinstance(other, int) and other != entry.rank and other not in wanted
                    and catalog.rank_buffer(other, step) is None and not held(other, step)):
                wanted.add(other)
                out.append((other, step, entry.world, found[1].capacity))
    return out


class ReplicaVersions:
    def __init__(self, daemon):
        self.daemon = daemon
        self.fetched: dict[tuple[int, int], Fetched] = {}
        self._running: set[tuple[int, int]] = set()
        self._retry_at: dict[tuple[int, int], float] = {}
        self._why: dict[tuple[int, int], str] = {}
        self._refused: dict[tuple[int, int], str] = {}
        self._results: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.fetched_bytes = 0
        self._ahead: set[tuple[int, int]] = set()            # prefetches no trainer asked for yet
        self._ahead_at: dict[tuple[int, int], float] = {}    # ... and when each one arrived
        self._next_look = 0.0
        self._budget_said = False
        self.prefetched = 0                                  # prefetches a restore asked for (here or under way)

    def answer(self, rank: int, step: int, world: int = 1) -> dict:
        """The buffer holding ``rank``'s version of ``step`` here, or {"wait": why} while it is fetched."""
        d = self.daemon
        self._tick()
        found = d.catalog.rank_buffer(rank, step)
        if found is not None:
            return {"buffer": found[1].name, "manifest": found[1].manifest, "origin": "memory"}
        self._claim((rank, step))
        f = self.fetched.get((rank, step))
        if f is not None:
            return {"buffer": f.name, "manifest": f.manifest, "origin": f"fetched from node {f.source}"}
        holds = sorted(r for r in d.catalog.ranks if d.catalog.holds_rank(r, step))
        if d.node is None:
            raise Refused(f"rank {rank}'s version of step {step} is not on node {d.config.node_rank} (it holds that "
                          f"step of ranks {holds}): a slice of the replicated state is missing, so this step cannot be "
                          f"put together; a standalone node serves only its own ranks' versions (replicas on other "
                          f"nodes need a cluster config), or start afresh with restore(state, resume='never')")
        key = (rank, step)
        if key in self._refused:
            raise Refused(f"rank {rank}'s version of step {step} (a replica's slice) cannot be fetched: "
                          f"{self._refused.pop(key)}")
        if key not in self._running and time.monotonic() >= self._retry_at.get(key, 0.0):
            self._start(rank, step, world)
        return {"wait": self._why.get(key, f"fetching rank {rank}'s version of step {step} (a replica's slice of the "
                                           f"replicated state) from the node that holds it")}

    def _start(self, rank: int, step: int, world: int) -> None:
        node = self.daemon.node
        key = (rank, step)
        self._running.add(key)
        args = (node.config, node.security, node.me, node.config.nodes, node.layout.g, rank, step, world)

        def work() -> None:
            try:
                self._results.put((key, "ok", RankFetcher(*args, stop=self._stop, traffic=node.traffic).run()))
            except Exception as e:  # reported on the loop
                self._results.put((key, "error", e))

        threading.Thread(target=work, name=f"ftd-replica-fetch-{rank}", daemon=True).start()

    def _claim(self, key: tuple[int, int]) -> None:
        if key in self._ahead:
            self._ahead.discard(key)
            self.prefetched += 1
            self._ahead_at.pop(key, None)

    def tick(self) -> None:
        """From the daemon's loop: take finished fetches, start prefetches, drop stale ones."""
        self._tick()
        now = time.monotonic()
        d = self.daemon
        if d.node is None or not d.config.replica_prefetch or now < self._next_look:
            return
        self._next_look = now + PREFETCH_EVERY
        cat = d.catalog
        for key in [k for k, at in self._ahead_at.items() if k[1] != cat.recoverable or now - at > PREFETCH_HOLD]:
            log.info("dropping rank %d's prefetched slice of step %d: no restore took it", *key)
            self._ahead.discard(key)
            self._ahead_at.pop(key)
            self.release(*key)

        def held(rank: int, step: int) -> bool:
            key = (rank, step)
            return key in self.fetched or key in self._running or now < self._retry_at.get(key, 0.0)

        room = cat.budget - cat.used - cat.extra_used() - self._held_bytes()
        for rank, step, world, nbytes in prefetch_wanted(cat, cat.alive, held):
            if nbytes > room:
                if not self._budget_said:
                    log.warning("not prefetching rank %d's slice of step %d: %d bytes would exceed the memory "
                                "budget (%d left); the restore fetches it when it asks", rank, step, nbytes, room)
                    self._budget_said = True
                continue
            room -= nbytes
            log.info("prefetching rank %d's slice of step %d: the trainer of a replica is gone", rank, step)
            self._ahead.add((rank, step))
            self._start(rank, step, world)

    def _held_bytes(self) -> int:
        return sum(f.capacity for f in self.fetched.values())

    def _tick(self) -> None:
        while True:
            try:
                key, kind, value = self._results.get_nowait()
            except queue.Empty:
                return
            self._running.discard(key)
            if kind == "ok":
                segments.drop_meta(self.daemon.config.shm_dir / value.name)  # never adopted as this node's
                self.fetched[key] = value
                self.fetched_bytes += value.nbytes
                if key in self._ahead:
                    self._ahead_at[key] = time.monotonic()
                log.info("rank %d's version of step %d (a replica's slice) fetched from node %d: %d bytes in %.2f s",
                         value.rank, value.step, value.source, value.nbytes, value.seconds)
            elif key in self._ahead:  # a prefetch that failed: the restore fetches it when it asks
                self._ahead.discard(key)
                self._retry_at[key] = time.monotonic() + RETRY
                log.info("prefetch of rank %d's slice of step %d failed: %s", *key, value)
            elif isinstance(value, Unplaceable):
                self._refused[key] = str(value)
            else:
                why = str(value) if isinstance(value, NotYet) else f"fetch failed ({type(value).__name__}: {value})"
                self._why[key] = why
                self._retry_at[key] = time.monotonic() + RETRY

    def release(self, rank: int, step: int) -> dict:
        """The restoring trainer has read ``rank``'s fetched version of ``step``: unlink it."""
        f = self.fetched.pop((rank, step), None)
        if f is not None:
            self.daemon.catalog.store.release(f.name)
        return {}

    def status(self) -> dict:
        held = [{"rank": r, "step": s, "from": f.source, "bytes": f.nbytes} for (r, s), f in self.fetched.items()]
        return {"held": held, "fetching": [f"rank {r}, step {s}" for r, s in sorted(self._running)],
                "fetched_bytes": self.fetched_bytes, "prefetched_unclaimed": sorted(self._ahead),
                "prefetches_taken": self.prefetched}

    def close(self) -> None:
        self._stop.set()
        for key in list(self.fetched):
            self.release(*key)
