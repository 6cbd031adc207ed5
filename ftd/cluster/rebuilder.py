"""Make this node whole again for the cluster's recoverable step, from its peers' memory.

Runs on its own thread with its own sockets (the daemon's loop goes on serving meanwhile), for a
node that starts with an empty store after a node loss, for one whose daemon was restarted, and
for a live node whose data or parity failed its checksums. Steps:

1. ask every peer what it holds (``state``); the target is the newest step any of them calls
   recoverable. A group peer that does not answer, or lacks that step, is lost;
2. fetch this node's metadata (ranks, manifests; kept by every group peer) and the group's sizes;
3. per stripe that holds something this node lacks, have each frame of its block decoded by one of
   the survivors holding k sources (``rebuild_repair``, ``rebuild_plan``): it gathers the other
   k - 1, decodes, and sends the one frame, so about S * (1 + m/k) bytes come in rather than g * S
   (a block whose checksum fails, at its holder, at the decoder or on arrival, is an erasure and
   another is taken; a survivor that does not decode has its sources fetched and decoded here);
   the new segments are reserved and first-touched on a thread meanwhile;
4. verify every rebuilt arena against its manifest's checksums, then write the sidecars that mark
   the versions complete, so the daemon adopts them like any other.

More than m unavailable nodes in the group: ``UnrecoverableLoss`` naming the nodes and the step.

Call order: ``Rebuilder(config, security, holdings, stop=event)`` and ``run()`` once, on the rebuild
thread (``recovery``); ``run`` returns a ``Result`` or raises, and closes its sockets either way.
Setting ``stop`` makes a running rebuild give up at its next wait.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftd.cluster.auth import PeerSecurity
from ftd.cluster.erasure import Codec
from ftd.cluster.links import PeerQueries
from ftd.cluster.messages import PeerMessages
from ftd.cluster.parity_store import parity_intact
from ftd.cluster.protection import ALIGN, NodeImage, Shape
from ftd.cluster.rebuild_repair import FrameRepair, Targets
from ftd.cluster.stripes import UnrecoverableLoss, chunk_bytes
from ftd.cluster.traffic import PeerTraffic
from ftd.config import Config
from ftd.errors import FtdError, ProtocolError
from ftd.shm import segments
from ftd.shm.checksum import bad_chunks
from ftd.shm.layout import Manifest

log = logging.getLogger(__name__)

SURVEY_WAIT = 3.0   # seconds a rebuild waits for every peer to say what it holds (at most peer_timeout)


@dataclasses.dataclass
class Holdings:
    """What the node holds when the rebuild starts (handed over by the daemon's loop)."""
    recoverable: int = -1
    data: dict[int, list[dict]] = dataclasses.field(default_factory=dict)   # step -> rank records
    parity: dict[int, tuple[str, dict]] = dataclasses.field(default_factory=dict)  # step -> (segment, record)


@dataclasses.dataclass
class Result:
    step: int = -1
    ranks: list[dict] = dataclasses.field(default_factory=list)  # rank, world, name, capacity, manifest, ...
    parity: tuple[str, dict] | None = None
    rebuilt_data: bool = False
    rebuilt_parity: bool = False
    fetched_bytes: int = 0     # frames received (decoded by a survivor, or sources decoded here)
    decoded_frames: int = 0    # frames a survivor decoded for this node
    phases: dict = dataclasses.field(default_factory=dict)  # seconds: survey, metadata, frames, targets, verify
    seconds: float = 0.0
    bad_blocks: list[str] = dataclasses.field(default_factory=list)
    lost_nodes: list[int] = dataclasses.field(default_factory=list)


class Rebuilder:
    def __init__(self, config: Config, security: PeerSecurity, holdings: Holdings, *, peer_wait: float | None = None,
                 stop: threading.Event | None = None, traffic: PeerTraffic | None = None):
        self.config = config
        self.me = config.node_rank
        self.holdings = holdings
        self.grouping = config.grouping()
        self.group = self.grouping.group_for(self.me)
        self.layout = self.group.layout
        self.codec = Codec(self.layout.k, self.layout.m, config.parity_code)
        self.messages = PeerMessages(config.job, self.me, config.nodes, self.layout.g)
        self.peer_wait = min(SURVEY_WAIT, config.peer_timeout) if peer_wait is None else peer_wait
        self.stop = stop or threading.Event()
        self.queries = PeerQueries(config, security, self.messages, self.stop, traffic)
        self.result = Result()

    # ---- the rebuild --------------------------------------------------------------------------
    def run(self) -> Result:
        t0 = time.monotonic()
        try:
            self._run()
        finally:
            self.close()
        self.result.seconds = time.monotonic() - t0
        return self.result

    def close(self) -> None:
        self.queries.close()

    def _states(self) -> dict[int, dict]:
        """State of every peer that answers within ``peer_wait`` (asked again every 0.3 s)."""
        states: dict[int, dict] = {}
        deadline = time.monotonic() + self.peer_wait
        peers = [n for n in range(self.config.nodes) if n != self.me]
        while time.monotonic() < deadline and len(states) < len(peers):
            wanted = {self.queries.ask(n, "state_query"): n for n in peers if n not in states}
            for msg, _ in self.queries.collect(wanted, min(deadline, time.monotonic() + 0.3)).values():
                states[msg["src"]] = msg
        return states

    def _run(self) -> None:
        t0 = time.monotonic()
        states = self._states()
        self.result.phases["survey"] = time.monotonic() - t0
        target = max([s["recoverable"] for s in states.values()] + [self.holdings.recoverable])
        res = self.result
        res.step = target
        if target < 0:
            return
        alive = {n for n, s in states.items() if n in self.group.nodes and target in s["data"]
                 and target in s["parity"] and not s["rebuilding"]}
        res.lost_nodes = sorted(n for n in self.group.nodes if n != self.me and n not in alive)
        ranks = self.holdings.data.get(target)
        parity = self.holdings.parity.get(target)
        need_data = ranks is None or not self._data_intact(ranks)
        need_parity = parity is None or not self._parity_intact(*parity)
        if not need_data and not need_parity:
            res.ranks, res.parity = ranks, parity
            return
        unavailable = res.lost_nodes + [self.me]
        if len(unavailable) > self.layout.m and need_data:
            raise self._unrecoverable(unavailable, target)
        t0 = time.monotonic()
        info = self._group_info(target, alive, ranks)
        res.phases["metadata"] = time.monotonic() - t0
        shape = Shape(info["c"], [(lo, min(info["c"], lo + info["frame_size"]))
                                  for lo in range(0, info["c"], info["frame_size"])])
        mine = info["metas"][self.me]
        created: list[Path] = []
        # the new segments are reserved and first-touched on a thread while the first frames are decoded
        pool = ThreadPoolExecutor(1, thread_name_prefix="ftd-rebuild-targets")
        made = pool.submit(self._targets, target, mine, ranks, need_data, parity, need_parity, shape.c, created)
        try:
            repair = FrameRepair(layout=self.layout, nodes=self.group.nodes, me=self.me, codec=self.codec,
                                 queries=self.queries, step=target, shape=shape, alive=alive, need_data=need_data,
                                 need_parity=need_parity, targets=lambda: made.result()[4],
                                 own_image=lambda: made.result()[4].image, timeout=self.config.peer_timeout,
                                 unrecoverable=lambda nodes: self._unrecoverable(nodes, target), result=res,
                                 decoders=self.config.rebuild_decoders)
            t0 = time.monotonic()
            checksums = repair.run()
            res.decoded_frames = repair.decoded
            ranks, arenas, pname, pmap, _ = made.result()
            res.phases["frames"] = time.monotonic() - t0
            if need_data:
                self._verify_and_mark(target, ranks, arenas)
                res.rebuilt_data = True
            res.phases["verify"] = time.monotonic() - t0 - res.phases["frames"]
            record = dict(parity[1]) if parity else self._new_record(target, info)
            if need_parity:
                record["blocks"] = [{"stripe": s, "number": self.layout.k + j, "checksums": checksums[j]}
                                    for j, s in enumerate(self.layout.parity_stripes(self.group.position(self.me)))]
                record["metas"] = {str(n): m for n, m in info["metas"].items() if n != self.me}
                segments.write_meta(self.config.shm_dir / pname, record)
                res.rebuilt_parity = True
            for a in arenas:
                a.close()
            pmap.close()
            res.ranks, res.parity = ranks, (pname, record)
        except BaseException:
            pool.shutdown(wait=True)  # the segments it made are in ``created``
            for p in created:
                segments.drop_meta(p)
                segments.unlink(p)
            raise
        finally:
            pool.shutdown(wait=True)

    def _targets(self, step, mine, ranks, need_data, parity, need_parity, c, created):
        """(ranks, arenas, parity name, parity mapping, Targets) of the rebuild, created where missing."""
        t0 = time.monotonic()
        ranks, arenas = self._data_targets(step, mine, ranks, need_data, created)
        image = NodeImage([a.view()[:r["manifest"]["nbytes"]] for a, r in zip(arenas, ranks)])
        pname, pmap = self._parity_target(step, c, parity, need_parity, created)
        self.result.phases["targets"] = time.monotonic() - t0  # on its thread, during "frames"
        return ranks, arenas, pname, pmap, Targets(image, pmap.view() if need_parity else None)

    def _unrecoverable(self, nodes: list[int], step: int) -> UnrecoverableLoss:
        err = UnrecoverableLoss(sorted(nodes), self.layout.m, self.group.index)
        err.args = (f"step {step}: {err.args[0]}",)
        return err

    # ---- local checks -------------------------------------------------------------------------
    def _data_intact(self, ranks: list[dict]) -> bool:
        for r in ranks:
            manifest = Manifest.from_json(r["manifest"])
            m = segments.Mapping(self.config.shm_dir / r["name"], populate=False, writable=False)
            try:
                if bad_chunks(m.view(), manifest.layout.nbytes, manifest.chunk_size, manifest.checksums):
                    return False
            finally:
                m.close()
        return True

    def _parity_intact(self, name: str, record: dict) -> bool:
        return parity_intact(self.config.shm_dir / name, record)

    # ---- metadata ---------------------------------------------------------------------------
    def _group_info(self, step: int, alive: set[int], ranks: list[dict] | None) -> dict:
        """c, frame size, sizes and every member's metadata for ``step``, from the survivors."""
        if not alive:
            raise self._unrecoverable(sorted(set(self.group.nodes)), step)
        metas: dict[int, dict] = {}
        info: dict = {}
        for n in self.group.nodes:
            askers = ([n] if n in alive else []) + sorted(alive - {n})
            for p in askers:
                q = self.queries.ask(p, "meta_query", step=step, node=n)
                got = self.queries.collect({q: p}, time.monotonic() + self.config.peer_timeout)
                reply = got[q][0]["meta"] if q in got else None
                if reply and reply.get("node"):
                    try:
                        self._check_meta(n, reply)
                    except (ValueError, KeyError, TypeError, ProtocolError) as e:
                        log.warning("rebuild: node %d sent unusable metadata of node %d: %s", p, n, e)
                        continue
                    metas[n] = reply["node"]
                    info = info or reply
                    break
        if self.me not in metas and ranks is not None:
            metas[self.me] = {"ranks": ranks}
        if self.me not in metas or not info:
            raise FtdError(f"no surviving peer holds the metadata of node {self.me} for step {step}; "
                           f"it cannot be rebuilt (peers asked: {sorted(alive)})")
        return {"c": info["c"], "frame_size": info["frame_size"], "sizes": info["sizes"], "metas": metas,
                "round": info.get("round", 0)}

    def _check_meta(self, node: int, reply: dict) -> None:
        """Refuse metadata a rebuild could not trust: segment sizes beyond the memory budget,
        manifests that do not fit them, group sizes that do not give the chunk size it claims."""
        sizes, c, fs = reply["sizes"], reply["c"], reply["frame_size"]
        if not (isinstance(sizes, list) and len(sizes) == self.layout.g
                and all(isinstance(x, int) and 0 <= x <= self.config.memory_budget for x in sizes)):
            raise ValueError(f"group sizes {sizes!r:.80} are not {self.layout.g} sizes within the memory budget")
        if c != chunk_bytes(max(sizes), self.layout.k, ALIGN):
            raise ValueError(f"chunk size {c} does not follow from the group's sizes")
        if not isinstance(fs, int) or not 4096 <= fs <= 16 << 20:
            raise ValueError(f"frame size {fs!r} is out of bounds")
        ranks = reply["node"]["ranks"]
        total = 0
        for r in ranks:
            if not (isinstance(r["rank"], int) and isinstance(r["world"], int) and 0 <= r["rank"] < r["world"]):
                raise ValueError(f"rank {r.get('rank')!r} of world {r.get('world')!r}")
            cap = r["capacity"]
            if not isinstance(cap, int) or not 0 < cap <= self.config.memory_budget:
                raise ValueError(f"rank {r['rank']} claims a buffer of {cap!r} bytes")
            total += Manifest.from_json(r["manifest"], max_nbytes=cap).layout.nbytes
        if total != sizes[self.group.position(node)]:
            raise ValueError(f"its ranks hold {total} bytes, the group's sizes say {sizes[self.group.position(node)]}")

    def _new_record(self, step: int, info: dict) -> dict:
        return {"kind": "parity", "step": step, "round": info["round"], "c": info["c"], "k": self.layout.k,
                "m": self.layout.m, "code": self.codec.kind, "group": self.group.index,
                "nodes": list(self.group.nodes), "frame_size": info["frame_size"], "sizes": info["sizes"],
                "blocks": [], "metas": {}}

    # ---- targets ------------------------------------------------------------------------------
    def _data_targets(self, step, mine, ranks, need_data, created):
        if ranks is not None:  # repair in place (or just read, for a parity repair)
            return ranks, [segments.Mapping(self.config.shm_dir / r["name"], populate=False, writable=need_data)
                           for r in ranks]
        out, maps = [], []
        for r in mine["ranks"]:
            name = f"{self.config.shm_prefix}r{r['rank']}.{secrets.token_hex(6)}"
            path = self.config.shm_dir / name
            segments.create(path, r["capacity"])
            created.append(path)
            maps.append(segments.Mapping(path))  # page tables built in one go, not a fault per page
            out.append({**r, "name": name, "step": step})
        return out, maps

    def _parity_target(self, step, c, parity, need_parity, created):
        if parity is not None:
            return parity[0], segments.Mapping(self.config.shm_dir / parity[0], populate=False, writable=need_parity)
        name = f"{self.config.shm_prefix}par.{secrets.token_hex(6)}"
        path = self.config.shm_dir / name
        segments.create(path, max(1, self.layout.m * c))
        created.append(path)
        return name, segments.Mapping(path)

    def _verify_and_mark(self, step, ranks, arenas) -> None:
        for r, a in zip(ranks, arenas):
            manifest = Manifest.from_json(r["manifest"], max_nbytes=a.size)
            bad = bad_chunks(a.view(), manifest.layout.nbytes, manifest.chunk_size, manifest.checksums)
            if bad:
                raise FtdError(f"rank {r['rank']} of step {step} still fails {len(bad)} checksum(s) after the "
                               f"rebuild; its sources disagree with its manifest")
        for r in ranks:
            segments.write_meta(self.config.shm_dir / r["name"],
                           {"rank": r["rank"], "world": r["world"], "step": step, "seq": 0,
                            "committed_at": r.get("committed_at"), "manifest": r["manifest"]})
