"""Which blocks rebuild a node's frames, and which survivor decodes each. Pure.

A node that lost its data (a replacement node, or a live one whose data failed its checksums) needs,
per stripe, only the one block it holds there: its data chunk or its parity block. Every such block
is a function of any k surviving blocks of the stripe. Rather than fetch those k blocks itself (g * S
bytes into the node for a whole node), the node asks one of the k source holders, the *decoder*, to
gather the other k - 1 frames from their holders, decode, and send back the one frame it lacks: about
S * (1 + m/k) bytes come in. Each frame goes to the source holder with the fewest decodes so far
(``plan`` and ``rebuild_repair`` alike), so the gathering and decoding is spread over the survivors.

A node that needs only its parity (its own data intact) decodes it itself from its own data and the
other k - 1 data chunks (``direct``): no decoder gains anything there.
"""
from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

from ftd.cluster.stripes import StripeLayout

Source = tuple[int, "int | None"]  # (block number, holder node; None: this node's own data)


@dataclasses.dataclass(frozen=True)
class FrameJob:
    """Frame ``frame`` of the block ``number`` this node holds in ``stripe``, rebuilt from ``sources``
    (k distinct blocks) by ``decoder`` (a node among the sources' holders), or here if it is None."""
    stripe: int
    frame: int
    number: int
    sources: tuple[Source, ...]
    decoder: int | None


class NotEnoughBlocks(Exception):
    """Fewer than k usable blocks in a stripe; ``nodes`` are the holders of the blocks that are not."""

    def __init__(self, stripe: int, nodes: list[int]):
        super().__init__(f"stripe {stripe}: blocks unavailable at nodes {nodes}")
        self.stripe, self.nodes = stripe, nodes


def sources(layout: StripeLayout, nodes: Sequence[int], me: int, stripe: int, alive: Collection[int],
            bad: Collection[int], own_data: bool) -> tuple[Source, ...]:
    """The first k usable blocks of ``stripe`` (data blocks first: decoding from all data is a copy).
    Usable: not in ``bad``, held by a node in ``alive``, or this node's own data chunk when
    ``own_data`` (its data is intact). Raises NotEnoughBlocks when fewer than k are usable."""
    usable: list[Source] = []
    for b in layout.blocks(stripe):
        node = nodes[b.position]
        if b.number in bad:
            continue
        if node == me:
            if b.number < layout.k and own_data:
                usable.append((b.number, None))
        elif node in alive:
            usable.append((b.number, node))
    if len(usable) < layout.k:
        missing = sorted({nodes[b.position] for b in layout.blocks(stripe)
                          if b.number in bad or nodes[b.position] not in alive})
        raise NotEnoughBlocks(stripe, missing)
    return tuple(usable[:layout.k])


def decoder(srcs: Sequence[Source], stripe: int, frame: int, refused: Collection[int] = (),
            load: dict[int, int] | None = None) -> int | None:
    """The survivor that decodes this frame: with ``load`` (decodes given to each node so far, updated
    here) the least loaded source holder, ties broken by a rotation with stripe + frame; without, the
    rotation alone. None when a source is this node's own (it decodes itself) or every holder refused."""
    holders = [n for _, n in srcs]
    if None in holders:
        return None
    willing = sorted(n for n in holders if n not in refused)
    if not willing:
        return None
    start = (stripe + frame) % len(willing)
    rotated = willing[start:] + willing[:start]
    if load is None:
        return rotated[0]
    best = min(rotated, key=lambda n: load.get(n, 0))
    load[best] = load.get(best, 0) + 1
    return best


def plan(layout: StripeLayout, nodes: Sequence[int], me: int, frames: int, alive: Collection[int],
         need_data: bool, need_parity: bool) -> list[FrameJob]:
    """Every frame this node must rebuild, with its sources and decoder, stripe by stripe."""
    pos = list(nodes).index(me)
    jobs, load = [], {}
    for stripe in range(layout.g):
        number = layout.block_number(pos, stripe)
        if not ((need_data and number < layout.k) or (need_parity and number >= layout.k)):
            continue
        srcs = sources(layout, nodes, me, stripe, alive, (), own_data=not need_data)
        jobs += [FrameJob(stripe, f, number, srcs, decoder(srcs, stripe, f, load=load)) for f in range(frames)]
    return jobs


def traffic(jobs: Sequence[FrameJob], frame_bytes: Sequence[int]) -> dict[str, dict[int, int]]:
    """Bytes each node sends for ``jobs`` (frame f has ``frame_bytes[f]`` bytes): ``to_rebuilder`` (the
    decoded frames, or the sources themselves where this node decodes) and ``to_decoders`` (the
    sources a decoder gathers from the other holders). The plan's cost, for tests and benchmarks."""
    out: dict[str, dict[int, int]] = {"to_rebuilder": {}, "to_decoders": {}}
    for j in jobs:
        size = frame_bytes[j.frame]
        if j.decoder is None:
            for _, n in j.sources:
                if n is not None:
                    out["to_rebuilder"][n] = out["to_rebuilder"].get(n, 0) + size
            continue
        out["to_rebuilder"][j.decoder] = out["to_rebuilder"].get(j.decoder, 0) + size
        for _, n in j.sources:
            if n != j.decoder:
                out["to_decoders"][n] = out["to_decoders"].get(n, 0) + size
    return out
