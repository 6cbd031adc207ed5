"""A rebuild's frames: have each decoded by a survivor (or fetch k sources and decode here), and write it.

``FrameRepair.run`` keeps ``WINDOW_FRAMES`` frames in flight, across stripes. A frame whose plan
(``rebuild_plan``) names a decoder is asked of it (``decode``): one frame comes back, verified on
arrival. A frame without one (this node's own data is a source: a parity-only repair), or whose
decoder refused, did not answer or sent a frame failing its checksum, is rebuilt the old way: k
source frames fetched (``fetch``) and decoded here. A source that fails, at its holder, at a decoder
or on arrival, is an erasure: the stripe takes the next usable block. Fewer than k usable blocks:
``UnrecoverableLoss`` (raised by ``unrecoverable``).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Callable

from ftd.cluster import rebuild_plan
from ftd.cluster.erasure import Codec
from ftd.cluster.links import PeerQueries
from ftd.cluster.protection import NodeImage, Shape
from ftd.cluster.stripes import StripeLayout
from ftd.shm.checksum import chunk_checksum

log = logging.getLogger(__name__)

WINDOW_FRAMES = 16  # frames being rebuilt at once (4 MiB each by default)


@dataclasses.dataclass
class _Frame:
    stripe: int
    frame: int
    number: int
    got: dict = dataclasses.field(default_factory=dict)      # direct: block number -> frame
    asked: set = dataclasses.field(default_factory=set)      # direct: block numbers asked for
    decode_q: int | None = None                              # the decode in flight, if any
    decode_from: tuple = ()                                  # the source block numbers it decodes from


@dataclasses.dataclass
class Targets:
    """Where rebuilt frames go: the node's image (data), its parity segment's view (or None)."""
    image: NodeImage
    parity: memoryview | None


class FrameRepair:
    def __init__(self, *, layout: StripeLayout, nodes: tuple[int, ...], me: int, codec: Codec,
                 queries: PeerQueries, step: int, shape: Shape, alive: set[int], need_data: bool,
                 need_parity: bool, targets: Callable[[], Targets], own_image: Callable[[], NodeImage],
                 timeout: float, unrecoverable: Callable[[list[int]], Exception], result, decoders: bool = True):
        self.layout, self.nodes, self.me, self.codec, self.queries = layout, nodes, me, codec, queries
        self.step, self.shape, self.alive, self.need_data = step, shape, alive, need_data
        self.need_parity = need_parity
        self._targets, self._own_image, self._t = targets, own_image, None
        self.timeout, self.unrecoverable, self.result = timeout, unrecoverable, result
        self.bad: dict[int, set[int]] = {}
        # survivors that did not decode for us (all of them with ``decoders`` off): fetch their sources
        self.refused: set[int] = set() if decoders else set(nodes)
        self._sources: dict[int, tuple] = {}
        self.load: dict[int, int] = {}         # decodes asked of each survivor: the next goes to the least loaded
        self.active: dict[tuple[int, int], _Frame] = {}
        self.inflight: dict[int, tuple[tuple[int, int], int | None, int]] = {}  # qid -> (task, number, node)
        self.checksums = [[None] * len(shape.frames) for _ in range(layout.m)]
        self.decoded = 0                       # frames a survivor decoded for us

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> list[list]:
        """Rebuild every frame; returns the checksums of the parity frames written (m lists)."""
        try:
            jobs = rebuild_plan.plan(self.layout, self.nodes, self.me, len(self.shape.frames), self.alive,
                                     self.need_data, self.need_parity)
        except rebuild_plan.NotEnoughBlocks as e:
            raise self.unrecoverable(e.nodes) from None
        todo = deque((j.stripe, j.frame, j.number) for j in jobs)
        while todo or self.active:
            while todo and len(self.active) < WINDOW_FRAMES:
                stripe, f, number = todo.popleft()
                self.active[(stripe, f)] = _Frame(stripe, f, number)
                self._request((stripe, f))
            for task in [t for t, fr in self.active.items() if fr.decode_q is None and fr.asked
                         and set(n for n, _ in self._sources_of(t[0])) <= set(fr.got)]:
                self._finish_here(task)
            if not self.inflight:
                continue
            answers = self.queries.collect({q: node for q, (_, _, node) in self.inflight.items()},
                                           time.monotonic() + self.timeout, first_only=True)
            if not answers:
                self._nobody_answered()
                continue
            for q, (msg, payload) in answers.items():
                task, num, node = self.inflight.pop(q)
                fr = self.active.get(task)
                if fr is None:
                    continue
                if num is None:
                    self._on_decoded(fr, q, node, msg, payload)
                else:
                    self._on_block(fr, num, node, msg, payload)
        return self.checksums

    def _sources_of(self, stripe: int) -> tuple:
        if stripe not in self._sources:
            try:
                self._sources[stripe] = rebuild_plan.sources(self.layout, self.nodes, self.me, stripe, self.alive,
                                                             self.bad.setdefault(stripe, set()),
                                                             own_data=not self.need_data)
            except rebuild_plan.NotEnoughBlocks as e:
                raise self.unrecoverable(e.nodes) from None
        return self._sources[stripe]

    def _request(self, task: tuple[int, int]) -> None:
        fr = self.active[task]
        srcs = self._sources_of(fr.stripe)
        decoder = rebuild_plan.decoder(srcs, fr.stripe, fr.frame, self.refused, self.load) if not fr.asked else None
        if decoder is not None:
            q = self.queries.ask(decoder, "decode", step=self.step, stripe=fr.stripe, number=fr.number,
                                 frame=fr.frame, sources=[n for n, _ in srcs])
            self.inflight[q] = (task, None, decoder)
            fr.decode_q, fr.decode_from = q, tuple(n for n, _ in srcs)
            return
        lo, hi = self.shape.frames[fr.frame]
        for num, node in srcs:
            if num in fr.asked:
                continue
            fr.asked.add(num)
            if node is None:
                data = self._own_image().read(num * self.shape.c + lo, num * self.shape.c + hi)
                fr.got[num] = bytes(hi - lo) if data is None else data
            else:
                q = self.queries.ask(node, "fetch", step=self.step, stripe=fr.stripe, number=num, frame=fr.frame)
                self.inflight[q] = (task, num, node)

    # ---- answers ------------------------------------------------------------------------------
    def _on_decoded(self, fr: _Frame, q: int, node: int, msg: dict, payload) -> None:
        if fr.decode_q != q:
            return
        fr.decode_q = None
        lo, hi = self.shape.frames[fr.frame]
        if msg["error"] and msg["bad"] in fr.decode_from:  # a source failed: an erasure
            self._lose(fr.stripe, msg["bad"], f"node {node}: {msg['error']}")
        elif msg["error"] or payload is None or len(payload) != hi - lo or chunk_checksum(payload) != msg["hash"]:
            why = msg["error"] or f"frame {fr.frame} of stripe {fr.stripe} fails its checksum in transit"
            self._refuse(node, fr, why)
        else:
            self.decoded += 1
            self._write(fr, payload, msg["hash"])

    def _on_block(self, fr: _Frame, num: int, node: int, msg: dict, payload) -> None:
        lo, hi = self.shape.frames[fr.frame]
        if msg["error"]:
            self._lose(fr.stripe, num, f"node {node}: {msg['error']}")
        elif payload is None or len(payload) != hi - lo or chunk_checksum(payload) != msg["hash"]:
            self._lose(fr.stripe, num, f"frame {fr.frame} from node {node} fails its checksum in transit")
        elif num in {n for n, _ in self._sources_of(fr.stripe)}:
            fr.got[num] = payload
            self.result.fetched_bytes += len(payload)

    def _nobody_answered(self) -> None:
        for q, (task, num, node) in list(self.inflight.items()):
            del self.inflight[q]
            fr = self.active.get(task)
            if fr is None:
                continue
            if num is None:
                if fr.decode_q == q:
                    fr.decode_q = None
                    self._refuse(node, fr, "did not answer")
            else:
                self._lose(task[0], num, f"node {node} did not answer")

    def _refuse(self, node: int, fr: _Frame, why: str) -> None:
        """``node`` did not decode a frame for us: ask it no more; this frame is fetched and decoded here."""
        if node not in self.refused:
            log.warning("rebuild: node %d did not decode stripe %d frame %d (%s); fetching its sources instead",
                        node, fr.stripe, fr.frame, why)
            self.refused.add(node)
        fr.asked.add(-1)  # direct from now on
        self._request((fr.stripe, fr.frame))

    def _lose(self, stripe: int, num: int, why: str) -> None:
        self.bad.setdefault(stripe, set()).add(num)
        self.result.bad_blocks.append(f"stripe {stripe} block {num}: {why}")
        log.warning("rebuild: stripe %d block %d unavailable (%s); using another", stripe, num, why)
        self._sources.pop(stripe, None)
        for task in [t for t in self.active if t[0] == stripe]:
            fr = self.active[task]
            fr.got.pop(num, None)
            fr.asked.discard(num)
            if fr.decode_q is None:
                self._request(task)

    # ---- writing ------------------------------------------------------------------------------
    def _finish_here(self, task: tuple[int, int]) -> None:
        fr = self.active[task]
        nums = [num for num, _ in self._sources_of(fr.stripe)]
        data = self.codec.decode([fr.got[n] for n in nums], nums)
        out = data[fr.number] if fr.number < self.layout.k else self.codec.encode(data, (fr.number,))[0]
        self._write(fr, out, None)

    def _write(self, fr: _Frame, payload, digest: int | None) -> None:
        if self._t is None:
            self._t = self._targets()
        lo, hi = self.shape.frames[fr.frame]
        c, k = self.shape.c, self.layout.k
        if fr.number < k:
            self._t.image.write(fr.number * c + lo, payload)
        else:
            j = fr.number - k
            out = self._t.parity[j * c + lo:j * c + hi]
            out[:] = memoryview(payload).cast("B")
            self.checksums[j][fr.frame] = chunk_checksum(out) if digest is None else digest
        if digest is not None:
            self.result.fetched_bytes += hi - lo
        del self.active[(fr.stripe, fr.frame)]
