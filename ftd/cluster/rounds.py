"""A cluster node's part in the protection rounds: what it pins, sends, encodes and reports.

Driven by the node's dispatch table (``sync``, ``protect``, round data, acks, aborts) and by the
daemon's commit and restore hooks; ``pump()`` runs every loop turn. The coordinator's side of the
same rounds is ``coordinator``; the bytes of one round (frames, parity) are ``protection.NodeRound``.

One round on this node:
  1. ``on_sync(target, recoverable)``: adopt the cluster's recoverable step if this node holds it
     (else start a rebuild), drop older parity, pin the first commit at or after ``target``;
  2. ``maybe_candidate()``, after every commit: report the pinned step once all ranks pinned one;
  3. ``on_protect(round, step, sizes)``: take a parity segment, send this node's metadata, queue
     its chunk frames (sent by ``pump()`` while the links have credit);
  4. ``on_round_message`` for every frame and metadata message: encode parity frames as their k
     inputs arrive and acknowledge them; ``check_done`` reports ``done`` once all parity is encoded
     and every group peer's metadata arrived.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from ftd.cluster.protection import ALIGN, NodeRound
from ftd.cluster.stripes import chunk_bytes
from ftd.errors import FtdError, ProtocolError
from ftd.units import format_size

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

DEBUG_PROTECT_DELAY = float(os.environ.get("FTD_DEBUG_PROTECT_DELAY", "0"))  # tests: hold each round open


class ProtectionRounds:
    def __init__(self, node: "ClusterNode"):
        self.node = node
        self.round: NodeRound | None = None
        self._early: dict[int, list] = {}                 # round id -> messages that came before "protect"
        self._early_bytes = 0                             # payload bytes held in _early
        self.credits: dict[int, int] = {}
        self.done_unsynced: int | None = None             # reported done, not yet told whether it is recoverable
        self.group_protected: set[int] = set()
        self._last_candidate: tuple | None = None
        self._behind_since = 0.0
        self._started = 0.0
        self._budget_warned = False

    # ---- coordination -------------------------------------------------------------------------
    def on_sync(self, target: int, recoverable: int, epoch: int = 0, flush: bool = False,
                finished: bool = False, lost: list[int] = ()) -> None:
        node = self.node
        if not node.ready:
            return  # the start-up rebuild decides first what this node holds
        cat, disk = node.catalog, node.disk
        if epoch < node.epoch:  # a coordinator restarted since the cluster's timeline changed: tell it
            node.to_coordinator("hello", recoverable=cat.recoverable, epoch=node.epoch)
            return
        if epoch > node.epoch and not node.new_timeline(epoch, recoverable):
            return
        node.cluster_finished = finished
        if recoverable > cat.recoverable:
            if node.store.holds(recoverable):
                cat.recoverable = recoverable
                node.lost_error = None
                self._note_protection_lag(recoverable)
            elif node.recovery.rebuilding is None and time.monotonic() - self._behind_since > node.config.peer_timeout:
                self._behind_since = time.monotonic()
                node.recovery.start(f"the cluster's recoverable step is {recoverable}, which this node lacks")
        elif node.lost_error and not lost and recoverable == cat.recoverable >= 0 and node.store.holds(recoverable):
            # A peer said it could not be rebuilt and has been since (the coordinator lists no lost node
            # any more): this node holds the recoverable step, so its trainers may restore it again.
            log.info("the loss reported earlier is over (%s); step %d is recoverable again", node.lost_error,
                     recoverable)
            node.lost_error = None
        if self.round is not None:
            keep = self.round.step == cat.recoverable and self.round.complete
            self.drop_round(keep_parity=keep)
        self.done_unsynced = None
        node.store.drop_steps(keep=lambda s: s == cat.recoverable)
        self.group_protected = {s for s in self.group_protected if s >= cat.recoverable}
        node.store.keep_verification(cat.recoverable)
        node.store.prune_mappings()  # rank buffers of older steps are about to be rewritten
        cat.sync(target, cat.recoverable)
        self._last_candidate = None
        if flush and recoverable == cat.recoverable:
            disk.offer_flush(recoverable)
        self.maybe_candidate()

    def _note_protection_lag(self, step: int) -> None:
        """How long the trainers' copy of ``step`` went unprotected (what a node loss would have cost)."""
        cat = self.node.catalog
        held = cat.buffers_of(step)
        if not held or any(b.pid is None or b.committed_at is None for _, b in held):
            return  # rebuilt or adopted: not committed by a trainer of this daemon's run
        lag = max(0.0, cat.clock() - max(b.committed_at for _, b in held))
        acc = self.node.stats["protection_lag"]
        acc["count"] += 1
        acc["total_seconds"] += lag
        acc["max_seconds"] = max(acc["max_seconds"], lag)
        acc["last_seconds"] = lag

    def maybe_candidate(self) -> None:
        """Report the pinned step to the coordinator once every rank of the node pinned one."""
        node = self.node
        if not node.ready or self.round is not None or node.catalog.target is None:
            return
        cand = node.catalog.candidate()
        if cand is None:
            return
        key = (node.catalog.target,) + cand
        if key == self._last_candidate:
            return
        self._last_candidate = key
        step, nbytes, mismatch = cand
        node.to_coordinator("candidate", target=node.catalog.target, step=step, nbytes=nbytes,
                            mismatch=mismatch, recoverable=node.catalog.recoverable, latest=node.latest_step,
                            epoch=node.epoch)
        node.flush_coordinator()

    def on_restored(self, rank: int, step: int) -> None:
        """Trainer ``rank`` restored ``step`` from this node (-1: it found nothing and starts afresh):
        the job restarted. That rank's newer versions are from the run before the restart: drop this
        node's part of any round protecting a later step (it needs this rank's data, which it has not
        written again yet), so no such step becomes recoverable after some rank went back; and tell
        the coordinator where training goes on."""
        node = self.node
        node.latest_step = step
        if step < node.catalog.recoverable:
            return  # a rank new to this node starting afresh, not a restart of the job
        if self.round is not None and self.round.step > step:
            self.drop_round(keep_parity=False)
            self.done_unsynced = None
        node.store.drop_steps(keep=lambda s: s <= step)
        node.store.prune_mappings()
        node.catalog.forget_newer(rank, step)
        self._last_candidate = None
        node.to_coordinator("restored", step=step)
        node.flush_coordinator()

    # ---- one round ------------------------------------------------------------------------------
    def on_protect(self, round_id: int, step: int, sizes: list[int]) -> None:
        node = self.node
        if not node.ready:
            return
        if self.round is not None:
            if self.round.round_id == round_id:
                if self.round.complete:
                    node.to_coordinator("done", round=round_id, step=step, latest=node.latest_step,
                                        flushing=node.disk.flushing())
                return
            self.drop_round(keep_parity=False)
        held = node.catalog.buffers_of(step)
        if not held:
            log.warning("asked to protect step %d, which this node no longer holds; the round restarts", step)
            node.to_coordinator("hello", recoverable=node.catalog.recoverable, epoch=node.epoch)
            return
        image = node.store.image(held)
        if sizes[node.me] != image.size:  # parity of another size than its metadata says: no rebuild could use it
            raise ProtocolError(f"protect of step {step} says node {node.me} holds {sizes[node.me]} bytes; it holds "
                                f"{image.size}")
        # the segment, within the memory budget, before anything else is sized by what the message says
        layout, group = node.layout, node.group
        need = max(1, layout.m * chunk_bytes(max(sizes[n] for n in group.nodes), layout.k, ALIGN))
        try:
            name = node.store.take_segment(need)
            pmap = node.store.mapping(name, writable=True)
        except (OSError, FtdError) as e:
            log.error("cannot hold the parity of step %d: %s", step, e)
            node.to_coordinator("refuse", round=round_id, reason=str(e)[:250])
            return
        node.store.round_segment = name
        self.round = NodeRound(round_id, step, sizes, group, node.me, image, pmap.view()[:need], node.codec,
                               node.config.frame_size)
        self._started = time.monotonic()
        self._check_budget(self.round)
        self.credits = {n: node.config.inflight_bytes for n in group.nodes if n != node.me}
        meta = node.store.node_meta(step)
        for n in group.nodes:
            if n != node.me:
                node.send(n, "node_meta", round=round_id, step=step, meta=meta)
        for src, msg, payload in self._early.pop(round_id, []):
            try:
                self.on_round_message(src, msg, payload)
            except ProtocolError as e:  # one bad message must not cost the round the good ones after it
                node.stats["invalid_messages"] += 1
                log.warning("peer message from node %s refused: %s", src, e)
        self._early.clear()
        self._early_bytes = 0
        self.check_done()

    def _check_budget(self, r: NodeRound) -> None:
        """Say so (once) when ``protect_bandwidth`` cannot send this node's frames within the round's
        timeout: every round would be abandoned, and no step would become recoverable."""
        rate, timeout = self.node.config.protect_bandwidth, self.node.config.round_timeout
        out = sum(f.hi - f.lo for q in r.queue.values() for f in q)
        if rate and out / rate > 0.8 * timeout and not self._budget_warned:
            self._budget_warned = True
            log.error("protect_bandwidth = %s/s sends this node's %s of step %d in %.0f s, near or past round_timeout "
                      "(%g s): its rounds will be abandoned and no step protected; raise protect_bandwidth or "
                      "round_timeout", format_size(rate), format_size(out), r.step, out / rate, timeout)

    def on_round_message(self, src: int, msg: dict, payload) -> None:
        """A ``node_meta`` or ``chunk`` of a round (kept, within the peers' credit, if it came early)."""
        node = self.node
        r = self.round
        if r is None or r.round_id != msg["round"]:
            if len(self._early) > 1 or (self._early and msg["round"] not in self._early):
                self._early.clear()  # only the newest unknown round is kept
                self._early_bytes = 0
            pending = self._early.setdefault(msg["round"], [])
            size = 0 if payload is None else len(payload)
            # no more than honest peers can send before "protect" comes: their credit, inflight_bytes a link
            limit = node.config.inflight_bytes * (len(node.group.nodes) - 1)
            if len(pending) >= 4096 or self._early_bytes + size > limit:
                raise ProtocolError(f"{msg['type']} of round {msg['round']}, which has not started here: more than "
                                    f"the peers' credit ({limit} bytes) came ahead of it")
            pending.append((src, msg, None if payload is None else bytes(payload)))
            self._early_bytes += size
            return
        if msg["step"] != r.step:
            raise ProtocolError(f"{msg['type']} for step {msg['step']} in the round of step {r.step}")
        if msg["type"] == "node_meta":
            r.receive_meta(src, msg["meta"] or {})
        else:
            senders = r.receive_chunk(src, msg, payload)
            node.stats["bytes_received"] += msg["length"]
            if senders:
                lo, hi = r.shape.frames[msg["frame"]]
                for n in senders:
                    node.send(n, "chunk_ack", round=r.round_id, step=r.step, stripe=msg["stripe"],
                              frame=msg["frame"], length=hi - lo)
        self.check_done()

    def on_chunk_ack(self, src: int, round_id: int, length: int) -> None:
        if self.round and round_id == self.round.round_id:
            self.credits[src] = self.credits.get(src, 0) + length

    def on_protected(self, step: int) -> None:
        if step in self.node.store.parity:  # (any other step would only grow the set)
            self.group_protected.add(step)

    def on_abort(self, round_id: int, reason: str) -> None:
        if self.round and self.round.round_id == round_id:
            log.info("protection of step %d abandoned: %s", self.round.step, reason)
            self.node.stats["rounds_aborted"] += 1
            if self.done_unsynced == self.round.step:
                self.done_unsynced = None
            self.drop_round(keep_parity=False)

    def check_done(self) -> None:
        node = self.node
        r = self.round
        if r is None or not r.complete or self.done_unsynced == r.step:
            return
        node.store.complete_round(r.step, r.parity_record())
        self.done_unsynced = r.step
        node.stats["rounds_done"] += 1
        node.stats["last_round_seconds"] = time.monotonic() - self._started
        node.to_coordinator("done", round=r.round_id, step=r.step, latest=node.latest_step,
                            flushing=node.disk.flushing())

    def pump(self) -> None:
        """Send queued chunk frames while the links have credit."""
        node = self.node
        r = self.round
        if r is None or time.monotonic() - self._started < DEBUG_PROTECT_DELAY:
            return
        for dest in list(r.queue):
            while True:
                f = r.next_frame(dest)
                if f is None or self.credits.get(dest, 0) < f.hi - f.lo:
                    break
                payload, digest, zero = r.frame_payload(f)
                ok = node.links.send(dest, "chunk", b"" if zero else payload, round=r.round_id, step=r.step,
                                     stripe=f.stripe, number=f.number, frame=f.frame, length=f.hi - f.lo,
                                     hash=digest, zero=zero)
                if not ok:
                    break
                self.credits[dest] -= f.hi - f.lo
                node.stats["bytes_sent"] += f.hi - f.lo
                r.pop_frame(dest)

    def drop_round(self, keep_parity: bool = False) -> None:
        if self.round is None:
            return
        store = self.node.store
        step = self.round.step
        self.round = None
        segment, store.round_segment = store.round_segment, None
        if not keep_parity and segment:
            if store.parity.get(step, ("",))[0] == segment:
                store.parity.pop(step)
            store.drop_segment(segment)

    def status(self) -> dict | None:
        r = self.round
        return None if r is None else {"step": r.step, "complete": r.complete, "frames_left": r.left,
                                       "sent_all": r.sent_all}
