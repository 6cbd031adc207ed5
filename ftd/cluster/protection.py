"""One node's share of a protection round: the chunks it sends, the parity it computes. No sockets.

The node's snapshot of a step is its *image*: the arenas of its ranks back to back, in rank order,
zero-padded to k * c where c = ceil(S_max / k) for the largest image S_max of the group. Data chunk d
is image bytes [d*c, (d+1)*c). Chunks travel in frames of ``frame_size`` bytes (4 MiB: ZeroMQ's sweet
spot), each with its xxh3 checksum; frames entirely past the image are sent as ``zero`` without bytes.

A parity holder keeps the frames of one frame index until all k data holders of the stripe sent it,
encodes that frame of its parity block straight into shared memory, checksums it, and acknowledges
each sender, which returns that sender's credit (``inflight_bytes`` per link bound what is buffered).
``NodeRound`` is driven by the daemon: ``outgoing()`` yields frames to send, ``receive_chunk()``
consumes one, ``ack()`` returns credit; ``complete`` says when this node can report done.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any, Iterator

from ftd.cluster.erasure import Codec
from ftd.cluster.stripes import Group, chunk_bytes
from ftd.errors import ProtocolError
from ftd.shm.checksum import chunk_checksum

ALIGN = 64


class NodeImage:
    """Read (and, for a rebuild, write) a node's image across its ranks' arenas without copying."""

    def __init__(self, arenas: list[memoryview]):
        self.arenas = arenas
        self.starts = []
        pos = 0
        for a in arenas:
            self.starts.append(pos)
            pos += a.nbytes
        self.size = pos

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, memoryview]]:
        """(offset in [lo, hi), view) for the image bytes in [lo, hi); gaps past the image are zeros."""
        for start, a in zip(self.starts, self.arenas):
            a_lo, a_hi = max(lo, start), min(hi, start + a.nbytes)
            if a_lo < a_hi:
                yield a_lo - lo, a[a_lo - start:a_hi - start]

    def read(self, lo: int, hi: int) -> memoryview | bytearray | None:
        """Bytes [lo, hi) zero-padded; a view when they lie in one arena; None when all are padding."""
        parts = list(self.pieces(lo, hi))
        if not parts:
            return None
        if len(parts) == 1 and parts[0][0] == 0 and parts[0][1].nbytes == hi - lo:
            return parts[0][1]
        out = bytearray(hi - lo)
        for off, view in parts:
            out[off:off + view.nbytes] = view
        return out

    def write(self, lo: int, data: Any) -> None:
        """Write ``data`` at image offset ``lo``; bytes past the image (padding) are dropped."""
        src = memoryview(data).cast("B")
        for off, view in self.pieces(lo, lo + src.nbytes):
            view[:] = src[off:off + view.nbytes]


def frame_ranges(c: int, frame_size: int) -> list[tuple[int, int]]:
    """[(lo, hi)] of each frame inside a chunk of c bytes."""
    return [(lo, min(c, lo + frame_size)) for lo in range(0, c, frame_size)]


@dataclasses.dataclass
class Shape:
    """The sizes of one step's stripes in one group."""
    c: int
    frames: list[tuple[int, int]]

    @classmethod
    def of(cls, sizes_in_group: list[int], k: int, frame_size: int) -> "Shape":
        c = chunk_bytes(max(sizes_in_group), k, ALIGN)
        return cls(c, frame_ranges(c, frame_size))


@dataclasses.dataclass
class OutFrame:
    dest: int        # node rank
    stripe: int
    number: int      # data block number = chunk index
    frame: int
    lo: int          # image offsets
    hi: int


class NodeRound:
    """This node's part of protecting ``step`` (round ``round_id``) in its group.

    parity: a writable view of m * c bytes (parity block of stripe ``parity_stripes[j]`` at j * c).
    """

    def __init__(self, round_id: int, step: int, sizes: list[int], group: Group, me: int, image: NodeImage,
                 parity: memoryview, codec: Codec, frame_size: int):
        self.round_id, self.step, self.group, self.me = round_id, step, group, me
        self.layout = group.layout
        self.k, self.m = self.layout.k, self.layout.m
        self.pos = group.position(me)
        self.shape = Shape.of([sizes[n] for n in group.nodes], self.k, frame_size)
        self.sizes = sizes
        self.image, self.parity, self.codec = image, parity, codec
        c, frames = self.shape.c, self.shape.frames
        self.queue: dict[int, deque[OutFrame]] = {}
        for d in range(self.k):
            stripe = self.layout.data_stripe(self.pos, d)
            for hp in self.layout.parity_holders(stripe):
                q = self.queue.setdefault(group.nodes[hp], deque())
                for f, (lo, hi) in enumerate(frames):
                    q.append(OutFrame(group.nodes[hp], stripe, d, f, d * c + lo, d * c + hi))
        self.parity_stripes = self.layout.parity_stripes(self.pos)
        self.pending: dict[tuple[int, int], dict[int, Any]] = {}   # (stripe, frame) -> {number: buffer}
        self.checksums = [[None] * len(frames) for _ in range(self.m)]
        self.left = self.m * len(frames)
        self.metas: dict[int, dict] = {}
        self._digests: dict[int, int] = {}  # image offset -> checksum of the frame starting there

    # ---- sending ------------------------------------------------------------------------------
    def next_frame(self, dest: int) -> OutFrame | None:
        q = self.queue.get(dest)
        return q[0] if q else None

    def pop_frame(self, dest: int) -> None:
        self.queue[dest].popleft()

    def frame_payload(self, f: OutFrame) -> tuple[Any, int, bool]:
        """(payload or None, checksum, zero) of an outgoing frame. With m > 1 the same frame goes to
        m parity holders: its checksum is computed once."""
        data = self.image.read(f.lo, f.hi)
        if data is None:
            return None, 0, True
        digest = self._digests.get(f.lo)
        if digest is None:
            digest = self._digests[f.lo] = chunk_checksum(data)
        return data, digest, False

    @property
    def sent_all(self) -> bool:
        return not any(self.queue.values())

    # ---- receiving ----------------------------------------------------------------------------
    def receive_chunk(self, src: int, msg: dict, payload: Any) -> list[int] | None:
        """Take one data frame; returns the senders to acknowledge when a parity frame got encoded
        (all k inputs were there), else None. ProtocolError for a frame this node did not expect."""
        stripe, number, f = msg["stripe"], msg["number"], msg["frame"]
        if stripe not in self.parity_stripes:
            raise ProtocolError(f"node {src} sent step {self.step} stripe {stripe} to node {self.me}, "
                                f"which holds no parity of it")
        try:
            spos = self.group.position(src)
        except ValueError:
            raise ProtocolError(f"node {src} is not in group {self.group.index}") from None
        if self.layout.block_number(spos, stripe) != number or number >= self.k:
            raise ProtocolError(f"node {src} sent block {number} of stripe {stripe}; it holds "
                                f"block {self.layout.block_number(spos, stripe)}")
        if not 0 <= f < len(self.shape.frames):
            raise ProtocolError(f"frame {f} is outside 0..{len(self.shape.frames) - 1}")
        lo, hi = self.shape.frames[f]
        if msg["length"] != hi - lo:
            raise ProtocolError(f"frame {f} of stripe {stripe} has {msg['length']} bytes, expected {hi - lo}")
        if msg["zero"]:
            data = bytes(hi - lo)
        else:
            data = payload
            got = chunk_checksum(data)
            if got != msg["hash"]:
                raise ProtocolError(f"frame {f} of stripe {stripe} from node {src} fails its checksum")
        j = self.parity_stripes.index(stripe)
        if self.checksums[j][f] is not None:
            return None  # encoded already: a replay must not count this frame twice towards ``complete``
        inputs = self.pending.setdefault((stripe, f), {})
        if number in inputs:
            return None
        inputs[number] = data
        if len(inputs) < self.k:
            return None
        del self.pending[(stripe, f)]
        out = self.parity[j * self.shape.c + lo:j * self.shape.c + hi]
        self.codec.encode([inputs[d] for d in range(self.k)], (self.k + j,), out=[out])
        self.checksums[j][f] = chunk_checksum(out)
        self.left -= 1
        return [self.group.nodes[self.layout.holder(stripe, d)] for d in range(self.k)]

    def receive_meta(self, src: int, meta: dict) -> None:
        """Keep a group peer's metadata (ProtocolError from any other node: it would count towards
        ``complete`` in place of a peer whose metadata is still missing)."""
        if src == self.me or src not in self.group.nodes:
            raise ProtocolError(f"node {src} sent its metadata to node {self.me}, but is not its peer in group "
                                f"{self.group.index}")
        self.metas[src] = meta

    @property
    def complete(self) -> bool:
        """All parity frames encoded and every group peer's metadata received."""
        return self.left == 0 and len(self.metas) >= len(self.group.nodes) - 1

    def parity_record(self) -> dict:
        """What the parity segment's sidecar stores, for serving fetches and for adoption."""
        return {
            "kind": "parity", "step": self.step, "round": self.round_id, "c": self.shape.c,
            "k": self.k, "m": self.m, "code": self.codec.kind, "group": self.group.index,
            "nodes": list(self.group.nodes), "frame_size": self.shape.frames[0][1] if self.shape.frames else 0,
            "sizes": [self.sizes[n] for n in self.group.nodes],
            "blocks": [{"stripe": s, "number": self.k + j, "checksums": self.checksums[j]}
                       for j, s in enumerate(self.parity_stripes)],
            "metas": {str(n): m for n, m in self.metas.items()},
        }
