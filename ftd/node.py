"""The daemon's cluster side: protection rounds, parity held for peers, rebuilds, peer queries.

Driven by the daemon's single loop (no locks): ``on_socket`` for each peer message, ``tick`` every
loop turn, plus hooks for the control requests that change what the cluster may do (commit,
restore, corrupt, recover). Node 0 also hosts the ``Coordinator``; its messages to itself are
delivered in-process. Rebuilds run on their own thread (``rebuild.Rebuilder``) and hand their
result back through a queue; only this loop touches the catalog. With a ``flush_dir``, the node
flushes the recoverable steps the coordinator marks, and takes part in a restore from disk when
the memory copies cannot give a step (``nodedisk``).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time

import zmq

from .catalog import Catalog
from .checksum import chunk_checksum
from .codec import Codec
from .config import Config
from .coordinator import Coordinator
from .errors import FtdError, ProtocolError
from .flusher import Flusher
from .flushpolicy import FlushPolicy
from .nodedisk import DiskRestore
from .nodestore import NodeStore
from .peerauth import PeerSecurity
from .peerproto import PeerMessages
from .peers import PeerLinks
from .protection import ALIGN, NodeRound
from .rebuild import Holdings, Rebuilder
from .stripes import chunk_bytes

log = logging.getLogger("ftd.node")

REPAIR_DELAY = 2.0
DEBUG_PROTECT_DELAY = float(os.environ.get("FTD_DEBUG_PROTECT_DELAY", "0"))  # tests: hold each round open
MAX_REPAIR_TRIES = 3


class ClusterNode(DiskRestore):
    def __init__(self, config: Config, catalog: Catalog, flusher: Flusher | None = None):
        self.config, self.catalog = config, catalog
        self.me = config.node_rank
        self.grouping = config.grouping()
        self.group = self.grouping.group_for(self.me)
        self.layout = self.group.layout
        self.pos = self.group.position(self.me)
        self.codec = Codec(self.layout.k, self.layout.m, config.parity_code)
        self.messages = PeerMessages(config.job, self.me, config.nodes, self.layout.g)
        self.security = PeerSecurity.from_key_file(config.peer_key_file)
        policy = FlushPolicy(config.flush_every, config.flush_interval) if flusher is not None else None
        self.coordinator = (Coordinator(self.grouping, timeout=config.round_timeout, peer_timeout=config.peer_timeout,
                                        flush_policy=policy)
                            if self.me == 0 else None)
        self.links: PeerLinks | None = None
        catalog.clustered = True
        self.store = NodeStore(config, catalog, self.layout, self.pos)
        catalog.extra_used = lambda: self.store.parity_bytes
        self.round: NodeRound | None = None
        self._early: dict[int, list] = {}                 # round id -> messages that came before "protect"
        self._early_bytes = 0                             # payload bytes held in _early
        self.credits: dict[int, int] = {}
        self.done_unsynced: int | None = None             # reported done, not yet told whether it is recoverable
        self.group_protected: set[int] = set()
        self.ready = False                                # the start-up sync with the peers is over
        self.rebuilding: str | None = None                # why a rebuild thread runs
        self._rebuild_thread: threading.Thread | None = None
        self._rebuild_results: queue.Queue = queue.Queue()
        self._rebuild_stop = threading.Event()
        self.last_rebuild: dict | None = None
        self.rebuilds: list[dict] = []                    # the last few outcomes, newest last
        self.lost_error: str | None = None
        self._repair_due: float | None = None
        self._repair_tries = 0
        self._last_candidate: tuple | None = None
        self._behind_since = 0.0
        self.latest_step = -1                             # newest step a trainer asked to snapshot
        self.stats = {"rounds_done": 0, "rounds_aborted": 0, "bytes_sent": 0, "bytes_received": 0,
                      "last_round_seconds": None, "invalid_messages": 0,
                      # commit of a step by the node's last rank -> that step recoverable on every node
                      "protection_lag": {"count": 0, "total_seconds": 0.0, "max_seconds": 0.0, "last_seconds": None}}
        self._round_started = 0.0
        self._init_disk(flusher)

    # ---- start and stop ---------------------------------------------------------------------
    def start(self, ctx: zmq.Context) -> None:
        self.security.start(ctx)
        self.links = PeerLinks(self.config, ctx, self.security, self.messages)
        self._start_rebuild("start-up: checking what the peers hold")
        if self.coordinator:
            self.coordinator.start()

    def sockets(self) -> list[zmq.Socket]:
        return self.links.sockets() if self.links else []

    def close(self) -> None:
        self._rebuild_stop.set()
        if self._rebuild_thread is not None:
            self._rebuild_thread.join(15)
        if self.disk_load is not None:
            self.disk_load.abandon()
        self._drop_round()
        self.store.close()
        if self.links:
            self.links.close()
        self.security.stop()

    # ---- delivery -----------------------------------------------------------------------------
    def _send(self, dest: int, mtype: str, payload=None, **fields) -> bool:
        if dest == self.me:
            msg = {"type": mtype, "src": self.me, **fields}
            self._dispatch(None, msg, payload)
            return True
        return self.links.send(dest, mtype, payload, **fields)

    def _to_coordinator(self, mtype: str, **fields) -> None:
        self._send(0, mtype, **fields)

    def _flush_coordinator(self) -> None:
        if not self.coordinator:
            return
        for _ in range(100):  # messages to itself can make it speak again
            out = self.coordinator.take()
            if not out:
                return
            for o in out:
                for d in o.dests:
                    self._send(d, o.mtype, **o.fields)

    def on_socket(self, sock: zmq.Socket) -> None:
        got = self.links.receive(sock)
        if got is None:
            self.stats["invalid_messages"] += 1
            return
        envelope, msg, payload = got
        try:
            self._dispatch(envelope, msg, payload)
        except ProtocolError as e:
            self.stats["invalid_messages"] += 1
            log.warning("peer message from node %s refused: %s", msg.get("src"), e)
        self._flush_coordinator()

    def _dispatch(self, envelope, msg: dict, payload) -> None:
        t, src = msg["type"], msg["src"]
        c = self.coordinator
        if c:
            c.heard_from(src)
        if t == "alive" and c:
            c.on_alive(src, msg["latest"])
        elif t == "candidate" and c:
            c.on_candidate(src, msg["target"], msg["step"], msg["nbytes"], msg["mismatch"], msg["recoverable"],
                           msg["latest"], msg.get("epoch", 0))
        elif t == "done" and c:
            c.on_done(src, msg["round"], msg["step"], msg["latest"], msg.get("flushing", False))
        elif t == "hello" and c:
            c.on_hello(src, msg["recoverable"], msg.get("epoch", 0))
        elif t == "refuse" and c:
            c.on_refuse(src, msg["round"], msg["reason"])
        elif t == "restored" and c:
            c.on_restored(src, msg["step"])
        elif t == "disk_offer" and c:
            c.on_disk_offer(src, msg["epoch"], msg["recoverable"], msg["steps"], msg["need"])
        elif t == "disk_loaded" and c:
            c.on_disk_loaded(src, msg["epoch"], msg["step"], msg["ok"], msg["error"])
        elif t == "disk_query":
            self._offer_disk(need=self.lost_error is not None, asked=True)
        elif t == "disk_load":
            self._on_disk_load(msg["epoch"], msg["step"])
        elif t == "disk_none":
            self._on_disk_none(msg["reason"])
        elif t == "sync":
            self._on_sync(msg["target"], msg["recoverable"], msg.get("epoch", 0), msg.get("flush", False))
            self._to_coordinator("alive", latest=self.latest_step)
        elif t == "protect":
            self._on_protect(msg["round"], msg["step"], msg["sizes"])
            self._to_coordinator("alive", latest=self.latest_step)
        elif t in ("node_meta", "chunk"):
            self._on_round_message(src, msg, payload)
        elif t == "chunk_ack":
            if self.round and msg["round"] == self.round.round_id:
                self.credits[src] = self.credits.get(src, 0) + msg["length"]
        elif t == "protected":
            if msg["step"] in self.store.parity:  # (any other step would only grow the set)
                self.group_protected.add(msg["step"])
        elif t == "abort":
            if self.round and self.round.round_id == msg["round"]:
                log.info("protection of step %d abandoned: %s", self.round.step, msg["reason"])
                self.stats["rounds_aborted"] += 1
                if self.done_unsynced == self.round.step:
                    self.done_unsynced = None
                self._drop_round(keep_parity=False)
        elif t == "lost":
            self.lost_error = msg["error"]
            self._offer_disk(need=True)
        elif t == "state_query":
            self.links.reply(envelope, "state", qid=msg["qid"], recoverable=self.catalog.recoverable,
                             data=[s for s in self.catalog.held_steps() if s in self.store.parity],
                             parity=sorted(self.store.parity), rebuilding=self.rebuilding is not None)
        elif t == "meta_query":
            self.links.reply(envelope, "meta", qid=msg["qid"], step=msg["step"], node=msg["node"],
                             meta=self.store.meta_for(msg["step"], msg["node"]))
        elif t == "fetch":
            payload, error, corrupt = self.store.fetch(msg["step"], msg["stripe"], msg["number"], msg["frame"])
            if corrupt:
                self._schedule_repair(f"{corrupt} of step {msg['step']} fails its checksums")
            self.links.reply(envelope, "block", payload, qid=msg["qid"], length=len(payload),
                             hash=chunk_checksum(payload) if not error else 0, error=error[:200])

    # ---- coordination -------------------------------------------------------------------------
    def _on_sync(self, target: int, recoverable: int, epoch: int = 0, flush: bool = False) -> None:
        if not self.ready:
            return  # the start-up rebuild decides first what this node holds
        cat = self.catalog
        if epoch < self.epoch:  # a coordinator restarted since the cluster restored from disk: tell it
            self._to_coordinator("hello", recoverable=cat.recoverable, epoch=self.epoch)
            return
        if epoch > self.epoch and not self._reset_to_disk(epoch, recoverable):
            return
        if recoverable > cat.recoverable:
            if self.store.holds(recoverable):
                cat.recoverable = recoverable
                self.lost_error = None
                self._note_protection_lag(recoverable)
            elif self.rebuilding is None and time.monotonic() - self._behind_since > self.config.peer_timeout:
                self._behind_since = time.monotonic()
                self._start_rebuild(f"the cluster's recoverable step is {recoverable}, which this node lacks")
        if self.round is not None:
            keep = self.round.step == cat.recoverable and self.round.complete
            self._drop_round(keep_parity=keep)
        self.done_unsynced = None
        self.store.drop_steps(keep=lambda s: s == cat.recoverable)
        self.group_protected = {s for s in self.group_protected if s >= cat.recoverable}
        self.store.keep_verification(cat.recoverable)
        self.store.prune_mappings()  # rank buffers of older steps are about to be rewritten
        cat.sync(target, cat.recoverable)
        self._last_candidate = None
        if flush and recoverable == cat.recoverable:
            self._offer_flush(recoverable)
        self.maybe_candidate()

    def _note_protection_lag(self, step: int) -> None:
        """How long the trainers' copy of ``step`` went unprotected (what a node loss would have cost)."""
        held = self.catalog.buffers_of(step)
        if not held or any(b.pid is None or b.committed_at is None for _, b in held):
            return  # rebuilt or adopted: not committed by a trainer of this daemon's run
        lag = max(0.0, self.catalog.clock() - max(b.committed_at for _, b in held))
        acc = self.stats["protection_lag"]
        acc["count"] += 1
        acc["total_seconds"] += lag
        acc["max_seconds"] = max(acc["max_seconds"], lag)
        acc["last_seconds"] = lag

    def maybe_candidate(self) -> None:
        """Report the pinned step to the coordinator once every rank of the node pinned one."""
        if not self.ready or self.round is not None or self.catalog.target is None:
            return
        cand = self.catalog.candidate()
        if cand is None:
            return
        key = (self.catalog.target,) + cand
        if key == self._last_candidate:
            return
        self._last_candidate = key
        step, nbytes, mismatch = cand
        self._to_coordinator("candidate", target=self.catalog.target, step=step, nbytes=nbytes,
                             mismatch=mismatch, recoverable=self.catalog.recoverable, latest=self.latest_step,
                             epoch=self.epoch)
        self._flush_coordinator()

    def _on_protect(self, round_id: int, step: int, sizes: list[int]) -> None:
        if not self.ready:
            return
        if self.round is not None:
            if self.round.round_id == round_id:
                if self.round.complete:
                    self._to_coordinator("done", round=round_id, step=step, latest=self.latest_step,
                                         flushing=self._flushing())
                return
            self._drop_round(keep_parity=False)
        held = self.catalog.buffers_of(step)
        if not held:
            log.warning("asked to protect step %d, which this node no longer holds; the round restarts", step)
            self._to_coordinator("hello", recoverable=self.catalog.recoverable, epoch=self.epoch)
            return
        image = self.store.image(held)
        if sizes[self.me] != image.size:  # parity of another size than its metadata says: no rebuild could use it
            raise ProtocolError(f"protect of step {step} says node {self.me} holds {sizes[self.me]} bytes; it holds "
                                f"{image.size}")
        # the segment, within the memory budget, before anything else is sized by what the message says
        need = max(1, self.layout.m * chunk_bytes(max(sizes[n] for n in self.group.nodes), self.layout.k, ALIGN))
        try:
            name = self.store.take_segment(need)
            pmap = self.store.mapping(name, writable=True)
        except (OSError, FtdError) as e:
            log.error("cannot hold the parity of step %d: %s", step, e)
            self._to_coordinator("refuse", round=round_id, reason=str(e)[:250])
            return
        self.store.round_segment = name
        self.round = NodeRound(round_id, step, sizes, self.group, self.me, image, pmap.view()[:need], self.codec,
                               self.config.frame_size)
        self._round_started = time.monotonic()
        self.credits = {n: self.config.inflight_bytes for n in self.group.nodes if n != self.me}
        meta = self.store.node_meta(step)
        for n in self.group.nodes:
            if n != self.me:
                self._send(n, "node_meta", round=round_id, step=step, meta=meta)
        for src, msg, payload in self._early.pop(round_id, []):
            try:
                self._on_round_message(src, msg, payload)
            except ProtocolError as e:  # one bad message must not cost the round the good ones after it
                self.stats["invalid_messages"] += 1
                log.warning("peer message from node %s refused: %s", src, e)
        self._early.clear()
        self._early_bytes = 0
        self._check_done()

    def _on_round_message(self, src: int, msg: dict, payload) -> None:
        r = self.round
        if r is None or r.round_id != msg["round"]:
            if len(self._early) > 1 or (self._early and msg["round"] not in self._early):
                self._early.clear()  # only the newest unknown round is kept
                self._early_bytes = 0
            pending = self._early.setdefault(msg["round"], [])
            size = 0 if payload is None else len(payload)
            # no more than honest peers can send before "protect" comes: their credit, inflight_bytes a link
            limit = self.config.inflight_bytes * (len(self.group.nodes) - 1)
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
            self.stats["bytes_received"] += msg["length"]
            if senders:
                lo, hi = r.shape.frames[msg["frame"]]
                for n in senders:
                    self._send(n, "chunk_ack", round=r.round_id, step=r.step, stripe=msg["stripe"],
                               frame=msg["frame"], length=hi - lo)
        self._check_done()

    def _check_done(self) -> None:
        r = self.round
        if r is None or not r.complete or self.done_unsynced == r.step:
            return
        self.store.complete_round(r.step, r.parity_record())
        self.done_unsynced = r.step
        self.stats["rounds_done"] += 1
        self.stats["last_round_seconds"] = time.monotonic() - self._round_started
        self._to_coordinator("done", round=r.round_id, step=r.step, latest=self.latest_step,
                             flushing=self._flushing())

    def on_restored(self, rank: int, step: int) -> None:
        """Trainer ``rank`` restored ``step`` from this node (-1: it found nothing and starts afresh):
        the job restarted. That rank's newer versions are from the run before the restart: drop this
        node's part of any round protecting a later step (it needs this rank's data, which it has not
        written again yet), so no such step becomes recoverable after some rank went back; and tell
        the coordinator where training goes on."""
        self.latest_step = step
        if step < self.catalog.recoverable:
            return  # a rank new to this node starting afresh, not a restart of the job
        if self.round is not None and self.round.step > step:
            self._drop_round(keep_parity=False)
            self.done_unsynced = None
        self.store.drop_steps(keep=lambda s: s <= step)
        self.store.prune_mappings()
        self.catalog.forget_newer(rank, step)
        self._last_candidate = None
        self._to_coordinator("restored", step=step)
        self._flush_coordinator()

    def _pump(self) -> None:
        """Send queued chunk frames while the links have credit."""
        r = self.round
        if r is None or time.monotonic() - self._round_started < DEBUG_PROTECT_DELAY:
            return
        for dest in list(r.queue):
            while True:
                f = r.next_frame(dest)
                if f is None or self.credits.get(dest, 0) < f.hi - f.lo:
                    break
                payload, digest, zero = r.frame_payload(f)
                ok = self.links.send(dest, "chunk", b"" if zero else payload, round=r.round_id, step=r.step,
                                     stripe=f.stripe, number=f.number, frame=f.frame, length=f.hi - f.lo,
                                     hash=digest, zero=zero)
                if not ok:
                    break
                self.credits[dest] -= f.hi - f.lo
                self.stats["bytes_sent"] += f.hi - f.lo
                r.pop_frame(dest)

    def _drop_round(self, keep_parity: bool = False) -> None:
        if self.round is None:
            return
        step = self.round.step
        self.round = None
        segment, self.store.round_segment = self.store.round_segment, None
        if not keep_parity and segment:
            if self.store.parity.get(step, ("",))[0] == segment:
                self.store.parity.pop(step)
            self.store.drop_segment(segment)

    # ---- rebuilds -------------------------------------------------------------------------------
    def _holdings(self) -> Holdings:
        h = Holdings(recoverable=self.catalog.recoverable)
        for step in self.catalog.held_steps():
            h.data[step] = [{"rank": r.rank, "world": r.world, "name": b.name, "capacity": b.capacity,
                             "manifest": b.manifest, "committed_at": b.committed_at}
                            for r, b in self.catalog.buffers_of(step)]
        h.parity = dict(self.store.parity)
        return h

    def _start_rebuild(self, why: str) -> bool:
        if self.rebuilding is not None:
            return False
        self.rebuilding = why
        holdings = self._holdings()
        log.info("rebuild started (%s)", why)

        def work() -> None:
            try:
                rebuilder = Rebuilder(self.config, self.security, holdings, stop=self._rebuild_stop)
                self._rebuild_results.put(("ok", rebuilder.run()))
            except Exception as e:  # reported to the loop, which keeps serving
                self._rebuild_results.put(("error", e))

        self._rebuild_thread = threading.Thread(target=work, name="ftd-rebuild", daemon=True)
        self._rebuild_thread.start()
        return True

    def start_recover(self) -> bool:
        """`ftd recover`: rebuild whatever of the recoverable step this node lacks or holds corrupt."""
        self.store.forget_verification()
        return self._start_rebuild("ftd recover")

    def _schedule_repair(self, why: str) -> None:
        if self._repair_due is None and self._repair_tries < MAX_REPAIR_TRIES:
            log.warning("%s; repairing it from the peers", why)
            self._repair_due = time.monotonic() + REPAIR_DELAY

    def on_corrupt(self) -> None:
        """A trainer found the recoverable version corrupt: repair it from the peers at once."""
        self.store.forget_verification()
        self._start_rebuild("a trainer found a chunk failing its checksum")

    def _record_rebuild(self, outcome: dict) -> None:
        self.last_rebuild = outcome
        self.rebuilds = (self.rebuilds + [outcome])[-5:]

    def _finish_rebuild(self, kind: str, value) -> None:
        why = self.rebuilding
        self.rebuilding = None
        self._rebuild_thread = None
        self.store.forget_verification()
        was_ready, self.ready = self.ready, True
        if kind == "error":
            err = str(value)
            self._record_rebuild({"ok": False, "error": err, "why": why, "at": time.time()})
            log.error("rebuild failed: %s", err)
            if "cannot be rebuilt" in err or "lost" in err:
                self.lost_error = err
                for n in range(self.config.nodes):
                    if n != self.me:
                        self.links.send(n, "lost", step=self.catalog.recoverable, nodes=[self.me], error=err[:250])
            if not was_ready:
                self._to_coordinator("hello", recoverable=self.catalog.recoverable, epoch=self.epoch)
            if self.lost_error:
                self._offer_disk(need=True)
            return
        res = value
        self._record_rebuild({"ok": True, "why": why, "at": time.time(), "step": res.step,
                              "rebuilt_data": res.rebuilt_data, "rebuilt_parity": res.rebuilt_parity,
                              "fetched_bytes": res.fetched_bytes, "seconds": res.seconds,
                              "bad_blocks": res.bad_blocks, "lost_nodes": res.lost_nodes})
        if res.step >= 0 and res.ranks:
            known = {b.name for r in self.catalog.ranks.values() for b in r.buffers}
            for r in res.ranks:
                if r["name"] not in known:
                    self.catalog.adopt(r["rank"], r["world"], r["name"], r["capacity"], res.step, r["manifest"],
                                       r.get("committed_at"))
            if res.parity:
                self.store.keep(res.step, *res.parity)
            self.catalog.recoverable = max(self.catalog.recoverable, res.step)
            self.lost_error = None
        if res.rebuilt_data or res.rebuilt_parity:
            log.info("rebuild of step %d done in %.2f s: data %s, parity %s, %d bytes fetched", res.step,
                     res.seconds, res.rebuilt_data, res.rebuilt_parity, res.fetched_bytes)
        self._repair_tries = 0
        if not was_ready or res.rebuilt_data or res.rebuilt_parity:
            self._to_coordinator("hello", recoverable=self.catalog.recoverable, epoch=self.epoch)
        if not was_ready and res.step < 0:
            self._offer_disk(need=False)  # nothing in memory anywhere it asked: is there something on disk?

    # ---- loop turn ----------------------------------------------------------------------------------
    def tick(self) -> None:
        try:
            kind, value = self._rebuild_results.get_nowait()
        except queue.Empty:
            pass
        else:
            self._finish_rebuild(kind, value)
        if self._repair_due is not None and time.monotonic() > self._repair_due and self.rebuilding is None:
            self._repair_due = None
            self._repair_tries += 1
            self._start_rebuild("a chunk failed its checksum while serving a peer")
        self._pump()
        if self.flusher is not None:
            self._tick_disk()
        if self.coordinator:
            self.coordinator.tick()
        self._flush_coordinator()

    # ---- control-side hooks -----------------------------------------------------------------------
    def restore_wait(self) -> str | None:
        """Why a restore must wait now, or None."""
        if not self.ready or self.rebuilding:
            return f"node {self.me} is rebuilding from its peers ({self.rebuilding or 'start-up'})"
        if self.disk_wait:
            return self.disk_wait
        if self.done_unsynced is not None:
            return f"waiting for the coordinator to settle whether step {self.done_unsynced} is recoverable"
        return None

    def status(self) -> dict:
        cat = self.catalog
        versions = []
        steps = sorted(set(cat.held_steps()) | set(self.store.parity), reverse=True)
        for s in steps:
            held = cat.buffers_of(s)
            versions.append({"step": s, "local": bool(held),
                             "data_bytes": sum(b.manifest["nbytes"] for _, b in held),
                             "parity_bytes": self.store.segment_size(self.store.parity[s][0]) if s in self.store.parity else 0,
                             "protected": s in self.store.parity and (s in self.group_protected or s <= cat.recoverable),
                             "recoverable": s == cat.recoverable})
        r = self.round
        return {
            "node_rank": self.me, "nodes": self.config.nodes, "group": self.group.index,
            "group_nodes": list(self.group.nodes), "position": self.pos, "k": self.layout.k, "m": self.layout.m,
            "code": self.codec.kind, "peer_endpoint": self.config.peer_endpoint,
            "secure": self.security.enabled, "ready": self.ready, "recoverable": cat.recoverable,
            "target": cat.target, "versions": versions, "parity_bytes": self.store.parity_bytes,
            "data_bytes": cat.used,
            "round": None if r is None else {"step": r.step, "complete": r.complete, "frames_left": r.left,
                                             "sent_all": r.sent_all},
            "rebuilding": self.rebuilding, "last_rebuild": self.last_rebuild, "rebuilds": self.rebuilds,
            "lost_error": self.lost_error, "epoch": self.epoch, "disk_wait": self.disk_wait,
            "stats": {**self.stats, "sends_dropped": self.links.dropped if self.links else 0},
            "coordinator": self.coordinator.status() if self.coordinator else None,
        }
