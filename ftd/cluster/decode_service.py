"""A survivor's side of a rebuild that moves only what is needed: gather, decode, send one frame.

A rebuilding peer asks this node (``decode``) for frame f of the block it lost in a stripe, naming
the k source blocks to decode from, one of them this node's own (``rebuild_plan``). This node reads
its own frame (verified against its checksums at this holder, as for any fetch), asks the other
holders for theirs (``fetch``, answered with ``block`` to this loop's DEALERs; each verified on
arrival), decodes (``erasure.Codec``), and answers ``decoded`` with that one frame and its checksum.
A source that fails (an error at its holder, a checksum, no answer within half the peer timeout) is
named in the answer's ``bad``, so the rebuilding node treats it as an erasure and asks again.

Runs on the daemon's loop, like every other answer to a peer: no thread, no socket of its own. The
decode of one frame (k frames in, XOR at ~10 GB/s, zfec at ~1 GB/s) takes the loop 1-16 ms; the N
daemons of a cluster decode in parallel, which is where the rebuild's work is spread.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import TYPE_CHECKING

from ftd.shm.checksum import chunk_checksum

if TYPE_CHECKING:
    from ftd.cluster.node import ClusterNode

log = logging.getLogger(__name__)

# decodes in progress per requesting node (an honest one has at most rebuild_repair.WINDOW_FRAMES in flight,
# over all its decoders) and in all: each holds up to k frames, so this bounds what requests can make a
# daemon buffer (32 x k x 4 MiB), whoever sends them
MAX_DECODES = 16
MAX_DECODES_TOTAL = 32


@dataclasses.dataclass
class _Decode:
    envelope: list
    requester: int
    qid: int
    step: int
    stripe: int
    frame: int
    number: int
    nums: tuple[int, ...]
    length: int
    deadline: float
    blocks: dict = dataclasses.field(default_factory=dict)      # block number -> frame
    waiting: dict = dataclasses.field(default_factory=dict)     # our fetch qid -> (block number, holder)
    answered: bool = False


class DecodeRequests:
    def __init__(self, node: "ClusterNode"):
        self.node = node
        self._qids = itertools.count(1)
        self._waiting: dict[int, _Decode] = {}   # our fetch qid -> its decode
        self._count: dict[int, int] = {}         # requester -> decodes in progress
        self.served = 0

    # ---- a request ------------------------------------------------------------------------------
    def on_request(self, msg: dict, envelope: list) -> None:
        if envelope is None:
            return  # not a query (it came on a DEALER): nobody to answer
        node, layout = self.node, self.node.layout
        src, step, stripe, number, f = msg["src"], msg["step"], msg["stripe"], msg["number"], msg["frame"]
        nums = tuple(msg["sources"])
        job = _Decode(envelope, src, msg["qid"], step, stripe, f, number, nums, 0, 0.0)
        mine = layout.block_number(node.pos, stripe)
        if src not in node.group.nodes or node.group.nodes[layout.holder(stripe, number)] != src:
            return self._answer(job, error=f"node {src} holds no block {number} of stripe {stripe} to rebuild")
        if len(nums) != layout.k or len(set(nums)) != layout.k or number in nums or mine not in nums:
            return self._answer(job, error=f"decode needs k={layout.k} distinct source blocks other than "
                                           f"{number}, one of them node {node.me}'s block {mine}; got {list(nums)}")
        if any(node.group.nodes[layout.holder(stripe, n)] == src for n in nums):
            return self._answer(job, error="a source is held by the rebuilding node itself")
        if self._count.get(src, 0) >= MAX_DECODES or sum(self._count.values()) >= MAX_DECODES_TOTAL:
            return self._answer(job, error=f"node {node.me} has {sum(self._count.values())} decodes in progress, "
                                           f"{self._count.get(src, 0)} of them for node {src}: ask another")
        data, error, corrupt = node.store.fetch(step, stripe, mine, f)
        if corrupt:
            node.recovery.schedule_repair(f"{corrupt} of step {step} fails its checksums")
        if error:
            return self._answer(job, error=error, bad=mine)
        job.length, job.blocks[mine] = len(data), data
        job.deadline = time.monotonic() + node.config.peer_timeout / 2
        self._count[src] = self._count.get(src, 0) + 1
        wanted = []
        for n in nums:
            if n != mine:
                q = next(self._qids)
                job.waiting[q] = (n, node.group.nodes[layout.holder(stripe, n)])
                self._waiting[q] = job
                wanted.append(q)
        for q in wanted:
            if q not in job.waiting:
                break  # answered or failed already
            n, holder = job.waiting[q]
            if not node.links.send(holder, "fetch", qid=q, step=step, stripe=stripe, number=n, frame=f):
                return self._fail(job, f"node {node.me} cannot reach node {holder} now", -1)
        self._maybe_decode(job)

    # ---- the sources' answers ---------------------------------------------------------------------
    def on_block(self, msg: dict, payload) -> None:
        """A ``block`` answer on this loop's links: one of our fetches, or dropped."""
        job = self._waiting.get(msg["qid"])
        if job is None or job.waiting[msg["qid"]][1] != msg["src"]:
            return  # late, duplicated, or not an answer to us
        n, holder = job.waiting.pop(msg["qid"])
        del self._waiting[msg["qid"]]
        if msg["error"]:
            return self._fail(job, f"node {holder}: {msg['error']}", n)
        if payload is None or len(payload) != job.length or chunk_checksum(payload) != msg["hash"]:
            return self._fail(job, f"frame {job.frame} of block {n} from node {holder} fails its checksum in "
                                   f"transit", n)
        job.blocks[n] = payload
        self._maybe_decode(job)

    def tick(self) -> None:
        now = time.monotonic()
        late = {id(j): j for j in self._waiting.values() if j.deadline < now}
        for job in late.values():
            n, holder = next(iter(job.waiting.values()))
            self._fail(job, f"node {holder} did not answer node {self.node.me}'s fetch", n)

    # ---- decode and answer --------------------------------------------------------------------------
    def _maybe_decode(self, job: _Decode) -> None:
        if len(job.blocks) < len(job.nums) or job.answered:
            return
        codec, k = self.node.codec, self.node.layout.k
        data = codec.decode([job.blocks[n] for n in job.nums], job.nums)
        out = data[job.number] if job.number < k else codec.encode(data, (job.number,))[0]
        self._done(job)
        self.served += 1
        self._answer(job, out)

    def _fail(self, job: _Decode, why: str, bad: int) -> None:
        if job.answered:
            return
        log.warning("decode for node %d (stripe %d frame %d): %s", job.requester, job.stripe, job.frame, why)
        self._done(job)
        self._answer(job, error=why, bad=bad)

    def _done(self, job: _Decode) -> None:
        for q in job.waiting:
            self._waiting.pop(q, None)
        job.waiting.clear()
        if job.deadline:
            self._count[job.requester] -= 1

    def _answer(self, job: _Decode, payload=None, error: str = "", bad: int = -1) -> None:
        job.answered = True
        payload = b"" if payload is None else payload
        self.node.links.reply(job.envelope, job.requester, "decoded", payload, qid=job.qid, length=len(payload),
                              hash=chunk_checksum(payload) if len(payload) else 0, error=error[:200], bad=bad)
