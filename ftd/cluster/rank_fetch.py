"""One rank's version of a step, fetched from the node that holds it, for a restore on this node.

Why: under torchrun's c10d rendezvous (or a SLURM requeue onto other hosts, or Kubernetes pods with new
names) a restarted rank may land on another node than the one that holds its snapshot. The cluster's
recoverable step is the same everywhere, so the rank's version of it is fetched here, checked, and
served like any other.

Steps, on a thread of its own with its own sockets (``moves`` runs it):
1. ask every peer whether it holds ``rank``'s version of ``step`` (``rank_query``); the answer names the
   manifest and buffer size, or, from the parity metadata a node keeps of its group peers, which node's
   image holds the rank (so a lost holder is named in the wait). Holders must agree with each other and
   with the restoring trainer (its world size, the same checksums): nodes whose ranks are numbered
   each on its own (a job per node) hold different "rank 0"s, and none of them may be handed out;
2. fetch the version frame by frame from a holder (``rank_fetch``, answered like a rebuild's ``block``),
   ``WINDOW_FRAMES`` in flight, each frame checked against its xxh3 in transit, into a new segment;
3. verify the whole arena against its manifest's checksums, then write the sidecar that marks it
   complete (``foreign``: not part of this node's image), so a restarted daemon adopts it too.

``NotYet`` (a holder is lost or rebuilding, a peer did not answer: the restore waits and the fetch is
tried again) or ``Unplaceable`` (every node answered and none holds it: the restore is refused).
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import deque

from ftd.cluster.auth import PeerSecurity
from ftd.cluster.links import PeerQueries
from ftd.cluster.messages import PeerMessages
from ftd.cluster.traffic import PeerTraffic
from ftd.config import Config
from ftd.errors import FtdError
from ftd.shm import segments
from ftd.shm.checksum import bad_chunks, chunk_checksum
from ftd.shm.layout import Manifest

log = logging.getLogger(__name__)

WINDOW_FRAMES = 16  # frames being fetched at once
SURVEY_WAIT = 3.0   # seconds to wait for every peer to say whether it holds the rank
FRAME_TRIES = 3     # a frame that fails its checksum or gets no answer is asked again this often


class NotYet(FtdError):
    """The rank cannot be fetched now (its holder is lost or rebuilding, a peer is silent): try again."""


class Unplaceable(FtdError):
    """No node of the cluster holds the rank's version: it cannot be restored on this node."""


@dataclasses.dataclass
class Fetched:
    rank: int
    world: int
    step: int
    name: str
    capacity: int
    manifest: dict
    source: int          # the node it came from
    nbytes: int
    seconds: float


def check_same_rank(what: str, world: int, holders: dict[int, dict]) -> None:
    """Unplaceable unless every holder's answer (``rank_info``) is one version of the restoring trainer's
    rank: the same world size, the same checksums."""
    for node, info in holders.items():
        if info["world"] != world:
            raise Unplaceable(f"node {node} holds {what} of a job of {info['world']} rank(s), but the trainer "
                              f"restoring it here runs in a job of {world}: the ranks are not one job's")
    sums = {node: info["manifest"].get("checksums") for node, info in holders.items()}
    if len({str(v) for v in sums.values()}) > 1:
        raise Unplaceable(f"nodes {sorted(sums)} hold different versions of {what}: each node numbers its ranks "
                          f"on its own (a job per node?), so a rank cannot move between nodes; restart every "
                          f"rank on the node it ran on, or start afresh with a new job name")


class RankFetcher:
    def __init__(self, config: Config, security: PeerSecurity, me: int, nodes: int, group_size: int,
                 rank: int, step: int, world: int, *, stop: threading.Event, traffic: PeerTraffic | None = None):
        self.config, self.me, self.nodes, self.rank, self.step, self.world = config, me, nodes, rank, step, world
        self.messages = PeerMessages(config.job, me, nodes, group_size)
        self.stop = stop
        self.queries = PeerQueries(config, security, self.messages, stop, traffic)

    def run(self) -> Fetched:
        t0 = time.monotonic()
        try:
            node, info = self._locate()
            name = self._fetch(node, info)
        finally:
            self.queries.close()
        manifest = info["manifest"]
        return Fetched(self.rank, info["world"], self.step, name, info["capacity"], manifest, node,
                       manifest["nbytes"], time.monotonic() - t0)

    # ---- where is it ----------------------------------------------------------------------------
    def _locate(self) -> tuple[int, dict]:
        peers = [n for n in range(self.nodes) if n != self.me]
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + min(SURVEY_WAIT, self.config.peer_timeout)
        while time.monotonic() < deadline and len(answers) < len(peers):
            wanted = {self.queries.ask(n, "rank_query", step=self.step, rank=self.rank): n
                      for n in peers if n not in answers}
            for msg, _ in self.queries.collect(wanted, min(deadline, time.monotonic() + 0.3)).values():
                answers[msg["src"]] = msg
        what = f"rank {self.rank}'s version of step {self.step}"
        held = [n for n, a in sorted(answers.items()) if a["held"] and self._usable(a)]
        if held:
            check_same_rank(what, self.world, {n: answers[n] for n in held})
            return held[0], answers[held[0]]
        holders = sorted({a["holder"] for a in answers.values() if a["holder"] >= 0})
        silent = sorted(set(peers) - set(answers))
        rebuilding = sorted(n for n, a in answers.items() if a["rebuilding"])
        if holders:
            raise NotYet(f"{what} is in the image of node(s) {holders}, which {'is' if len(holders) == 1 else 'are'} "
                         f"lost or rebuilding; waiting for {'its' if len(holders) == 1 else 'their'} rebuild")
        if silent or rebuilding:
            raise NotYet(f"no node that answered holds {what}; waiting for node(s) {silent + rebuilding} "
                         f"({'silent' if silent else ''}{', ' if silent and rebuilding else ''}"
                         f"{'rebuilding' if rebuilding else ''})")
        raise Unplaceable(f"no node of the cluster holds {what} (every node answered: nodes {peers}); the job's "
                          f"ranks are not those of the run it resumes (another world size or numbering?)")

    def _usable(self, info: dict) -> bool:
        """A holder's answer this node can act on: a manifest that fits its buffer and the memory budget."""
        try:
            if not 0 < info["capacity"] <= self.config.memory_budget or not 1 <= info["world"] <= 1 << 20:
                raise ValueError(f"a buffer of {info['capacity']} bytes")
            Manifest.from_json(info["manifest"], max_nbytes=info["capacity"])
            if not 4096 <= info["frame_size"] <= 16 << 20:
                raise ValueError(f"frame size {info['frame_size']}")
            return True
        except (ValueError, KeyError, TypeError, FtdError) as e:
            log.warning("rank fetch: node %d's answer about rank %d is unusable: %s", info["src"], self.rank, e)
            return False

    # ---- the bytes ------------------------------------------------------------------------------
    def _fetch(self, node: int, info: dict) -> str:
        manifest = Manifest.from_json(info["manifest"], max_nbytes=info["capacity"])
        nbytes, fs = manifest.layout.nbytes, info["frame_size"]
        name = f"{self.config.shm_prefix}r{self.rank}.{secrets.token_hex(6)}"
        path = self.config.shm_dir / name
        segments.create(path, info["capacity"])
        target = segments.Mapping(path)
        try:
            self._frames(node, target.view(), nbytes, fs)
            bad = bad_chunks(target.view(), nbytes, manifest.chunk_size, manifest.checksums)
            if bad:
                raise NotYet(f"rank {self.rank}'s version of step {self.step} from node {node} fails {len(bad)} "
                             f"checksum(s) against its manifest; asking again")
            segments.write_meta(path, {"rank": self.rank, "world": info["world"], "step": self.step, "seq": 0,
                                       "committed_at": None, "manifest": info["manifest"], "foreign": True,
                                       "origin": f"fetched from node {node}"})
        except BaseException:
            target.close()
            segments.drop_meta(path)
            segments.unlink(path)
            raise
        target.close()
        return name

    def _frames(self, node: int, view: memoryview, nbytes: int, fs: int) -> None:
        todo = deque(range(max(1, -(-nbytes // fs))) if nbytes else [])
        tries: dict[int, int] = {}
        inflight: dict[int, int] = {}  # qid -> frame
        while todo or inflight:
            while todo and len(inflight) < WINDOW_FRAMES:
                f = todo.popleft()
                inflight[self.queries.ask(node, "rank_fetch", step=self.step, rank=self.rank, frame=f)] = f
            got = self.queries.collect(dict.fromkeys(inflight, node), time.monotonic() + self.config.peer_timeout,
                                       first_only=True)
            if not got:
                raise NotYet(f"node {node} stopped answering while rank {self.rank}'s version of step {self.step} "
                             f"was fetched from it")
            for q, (msg, payload) in got.items():
                f = inflight.pop(q)
                lo, hi = f * fs, min(nbytes, (f + 1) * fs)
                if msg["error"] or payload is None or len(payload) != hi - lo or chunk_checksum(payload) != msg["hash"]:
                    tries[f] = tries.get(f, 0) + 1
                    why = msg["error"] or "it fails its checksum in transit"
                    if tries[f] >= FRAME_TRIES:
                        raise NotYet(f"frame {f} of rank {self.rank} from node {node}: {why}")
                    todo.append(f)
                    continue
                view[lo:hi] = payload
