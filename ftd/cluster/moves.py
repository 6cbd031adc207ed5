"""Ranks that restore on this node though another node holds their version: fetches, and the map.

A restore of rank r at the recoverable step X on a node that lacks r's version of X (c10d gave the
node other ranks than before) asks ``want(r, X)``: it starts a ``rank_fetch.RankFetcher`` on a thread
of its own and tells the restore to wait, with the reason, until the version is here (the trainer
polls); ``tick()`` takes the result into the catalog as a *foreign* version (not part of this node's
image of X) and tells the node it came from (``moved``), which lets that rank go (``depart``). A
fetch that cannot succeed now (holder lost or rebuilding, a peer silent) is tried again every
``RETRY`` seconds; one that never can (no node holds it) makes the restore fail with the reason.

Also the answers to peers' ``rank_query`` and ``rank_fetch``, and what ``ftd status`` shows of it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from ftd.cluster.rank_fetch import Fetched, NotYet, RankFetcher, Unplaceable
from ftd.errors import ProtocolError, Refused
from ftd.shm.checksum import chunk_checksum

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

RETRY = 1.0       # seconds between two tries of a fetch that could not succeed yet
MAX_THREADS = 4   # fetches running at once


class RankMoves:
    def __init__(self, node: "ClusterNode"):
        self.node = node
        self._running: dict[tuple[int, int], str] = {}    # (rank, step) -> why the restore waits
        self._retry_at: dict[tuple[int, int], float] = {}
        self._refused: dict[tuple[int, int], str] = {}
        self._retry_reason: dict[tuple[int, int], str] = {}   # why the last try did not succeed
        self._results: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fetched: list[dict] = []                     # the last few fetches, for status (newest last)
        self.fetched_bytes = 0
        self._served: set[tuple[int, int, int]] = set()   # (node, rank, step) whose version this node gave out

    # ---- the restore side -----------------------------------------------------------------------------
    def want(self, rank: int, step: int, world: int) -> str:
        """Why a restore of ``rank`` (of a job of ``world`` ranks) at ``step`` waits (its version is being
        fetched); Refused if no node holds it. Call only while this node lacks that version."""
        key = (rank, step)
        if key in self._refused:
            raise Refused(f"rank {rank} cannot restore step {step} on node {self.node.me}: {self._refused.pop(key)}")
        if key not in self._running and time.monotonic() >= self._retry_at.get(key, 0.0):
            if sum(t.is_alive() for t in self._threads) < MAX_THREADS:
                self._start(rank, step, world)
        return self._running.get(key) or self._retry_reason.get(key, f"rank {rank}'s version of step {step} is "
                                                                     f"to be fetched from the node that holds it")

    def _start(self, rank: int, step: int, world: int) -> None:
        node = self.node
        key = (rank, step)
        self._running[key] = (f"rank {rank} restores on node {node.me}, which does not hold its version of step "
                              f"{step}: fetching it from the node that does")
        args = (node.members.peer_config(), node.security, node.me, node.config.nodes, node.layout.g, rank, step, world)

        def work() -> None:
            try:
                self._results.put((key, "ok", RankFetcher(*args, stop=self._stop, traffic=node.traffic).run()))
            except Exception as e:  # reported to the loop
                self._results.put((key, "error", e))

        t = threading.Thread(target=work, name=f"ftd-rank-fetch-{rank}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def tick(self) -> None:
        while True:
            try:
                key, kind, value = self._results.get_nowait()
            except queue.Empty:
                return
            self._running.pop(key, None)
            if kind == "ok":
                self._take(value)
            elif isinstance(value, Unplaceable):
                log.error("%s", value)
                self._refused[key] = str(value)
            else:
                why = str(value) if isinstance(value, NotYet) else f"fetch failed ({type(value).__name__}: {value})"
                log.info("rank %d, step %d: %s; trying again", key[0], key[1], why)
                self._retry_reason[key] = why
                self._retry_at[key] = time.monotonic() + RETRY

    def _take(self, f: Fetched) -> None:
        node, cat = self.node, self.node.catalog
        self._retry_reason.pop((f.rank, f.step), None)
        if f.step != cat.recoverable or cat.holds_rank(f.rank, f.step):
            node.catalog.store.release(f.name)  # the cluster moved on meanwhile, or another fetch won
            return
        cat.adopt(f.rank, f.world, f.name, f.capacity, f.step, f.manifest, None, origin=f"fetched from node {f.source}",
                  foreign=True)
        self.fetched_bytes += f.nbytes
        self.fetched = (self.fetched + [{"rank": f.rank, "step": f.step, "from": f.source, "bytes": f.nbytes,
                                         "seconds": round(f.seconds, 4), "at": time.time()}])[-8:]
        log.info("rank %d's version of step %d fetched from node %d: %d bytes in %.2f s", f.rank, f.step, f.source,
                 f.nbytes, f.seconds)
        node.send(f.source, "moved", step=f.step, rank=f.rank)

    # ---- the holder's side --------------------------------------------------------------------------------
    def on_moved(self, src: int, step: int, rank: int) -> None:
        """Node ``src`` restored ``rank`` from this node's copy: the rank trains there now. (Only a node
        this node gave that version to can say so.)"""
        if (src, rank, step) not in self._served:
            raise ProtocolError(f"node {src} says it restored rank {rank}'s step {step} from this node, which never "
                                f"gave it that version")
        self._served.discard((src, rank, step))
        if self.node.catalog.depart(rank, f"it restored step {step} on node {src}"):
            self.node.rounds.maybe_candidate()

    def answer_query(self, msg: dict, envelope) -> None:
        node, cat = self.node, self.node.catalog
        step, rank = msg["step"], msg["rank"]
        found = cat.rank_buffer(rank, step)
        fields = dict(qid=msg["qid"], step=step, rank=rank, held=found is not None, world=1, capacity=0,
                      manifest=None, holder=-1, frame_size=node.config.frame_size,
                      rebuilding=node.recovery.rebuilding is not None or not node.ready)
        if found is not None:
            entry, buf = found
            fields.update(world=entry.world, capacity=buf.capacity, manifest=buf.manifest, holder=node.me)
            if len(self._served) < 4096:
                self._served.add((msg["src"], rank, step))
        else:
            fields["holder"] = node.store.image_holder(step, rank)
        node.links.reply(envelope, msg["src"], "rank_info", **fields)

    def answer_fetch(self, msg: dict, envelope) -> None:
        node = self.node
        found = node.catalog.rank_buffer(msg["rank"], msg["step"])
        error, data = "", b""
        if found is None:
            error = f"node {node.me} no longer holds rank {msg['rank']}'s version of step {msg['step']}"
        else:
            _, buf = found
            nbytes, fs = buf.manifest["nbytes"], node.config.frame_size
            lo = msg["frame"] * fs
            if lo >= max(nbytes, 1):
                error = f"frame {msg['frame']} is past the {nbytes} bytes of rank {msg['rank']}"
            else:
                data = node.store.mapping(buf.name).view()[lo:min(nbytes, lo + fs)]
        node.links.reply(envelope, msg["src"], "block", data, qid=msg["qid"], length=len(data),
                         hash=chunk_checksum(data) if not error else 0, error=error[:200])

    def status(self) -> dict:
        return {"fetching": {str(r): why for (r, _), why in self._running.items()},
                "waiting": {str(r): why for (r, _), why in self._retry_reason.items()},
                "fetched": self.fetched, "fetched_bytes": self.fetched_bytes}

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
