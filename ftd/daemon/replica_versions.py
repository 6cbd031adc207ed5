"""Other ranks' versions, for a rank that puts its replicated state together from its replicas' slices.

A replica-aware snapshot (``ftd.trainer.replicas``) holds only this rank's slice of the replicated
tensors; its restore needs the version of the same step of every other rank of its replica set. On
this node the daemon already holds the other local ranks' versions: ``answer`` names the buffer. A
rank whose version is on another node (a cluster) is fetched from the node that holds it with the
same checked fetch a rank that moved uses (``cluster.rank_fetch``), into a segment of its own that is
*not* taken into the catalog (the rank does not train here, and this node's image and parity do not
change); the trainer polls ("wait") until it is here, reads it, and lets it go (``release``).

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

    def answer(self, rank: int, step: int, world: int = 1) -> dict:
        """The buffer holding ``rank``'s version of ``step`` here, or {"wait": why} while it is fetched."""
        d = self.daemon
        self._tick()
        found = d.catalog.rank_buffer(rank, step)
        if found is not None:
            return {"buffer": found[1].name, "manifest": found[1].manifest, "origin": "memory"}
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
                log.info("rank %d's version of step %d (a replica's slice) fetched from node %d: %d bytes in %.2f s",
                         value.rank, value.step, value.source, value.nbytes, value.seconds)
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
                "fetched_bytes": self.fetched_bytes}

    def close(self) -> None:
        self._stop.set()
        for key in list(self.fetched):
            self.release(*key)
