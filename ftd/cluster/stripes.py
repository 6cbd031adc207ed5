"""Cross-node stripes with rotating parity: which node holds which chunk and which parity. Pure.

No zfec, no I/O: this module only answers "who sends what to whom, and what does a rebuild read".
``codec`` turns the answers into bytes.

Vocabulary
----------
*Grouping.* N nodes are split into groups of g = k + m nodes (``Grouping``); a node's *position*
is its index 0..g-1 inside its group.

*Stripes.* Every node of a group cuts its snapshot (S bytes, zero-padded to the group's largest)
into k chunks of c = ceil(S / k) bytes. A version has g stripes. For stripe s and position p let
the *rotation* be r = (p - s) mod g:

- r < m: p is parity holder j = r of the stripe and computes zfec block k + j;
- r >= m: p gives its data chunk d = r - m as zfec block d.

In one formula, position p holds block ``(p - s - m) mod g`` of stripe s, and that block is a data
chunk (with chunk index = block number) when it is below k. The data blocks of a stripe are thus
ordered by rotation: block 0 comes from the position right after the last parity holder.

Why every chunk appears exactly once: p gives data in the k stripes where r = m..g-1, and as s
runs over all g stripes r = (p - s) mod g runs over all of 0..g-1 once, so d = r - m runs over
0..k-1 once. Likewise p holds parity in exactly the m stripes with r = 0..m-1 (one block each:
k + r), so every node stores m parity blocks of c bytes. No scheme in which all data positions of
a stripe give the *same* chunk index can work in general (for g = 4, m = 1 the constraints
contradict), so the chunk index varies with the position, and the block number carries it.

Memory per node: S (its own snapshot, kept whole for fast local restores) + m * c of parity,
i.e. S * (1 + m/k) up to padding. Network per node per version: each of its k chunks goes to the
m parity holders of its stripe, k * m * c ~ m * S sent, and as much received.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from ftd.errors import UnrecoverableLoss

#: zfec block numbers are bytes: a group (k + m blocks per stripe) may have at most 256 nodes.
MAX_GROUP = 256




def _check_km(k: int, m: int) -> None:
    for name, v in (("k", k), ("m", m)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if k < 1 or m < 1:
        raise ValueError(f"need k >= 1 data chunks and m >= 1 parity blocks per stripe, got k={k}, m={m}")
    if k + m > MAX_GROUP:
        raise ValueError(f"a group of k + m = {k + m} nodes exceeds zfec's {MAX_GROUP} blocks per stripe; "
                         f"use smaller groups")


@dataclasses.dataclass(frozen=True)
class Block:
    """Block ``number`` of a stripe (zfec numbering: data 0..k-1, parity k..k+m-1), held by ``position``."""
    position: int
    number: int


@dataclasses.dataclass(frozen=True)
class StripeLayout:
    """The stripes of one group of g = k + m positions (1 <= m, 1 <= k, g <= 256).

    Stripes are numbered 0..g-1, positions 0..g-1, block numbers 0..g-1; methods raise ValueError
    for anything outside those ranges.
    """
    k: int
    m: int

    def __post_init__(self) -> None:
        _check_km(self.k, self.m)

    @classmethod
    def for_group(cls, g: int, m: int) -> "StripeLayout":
        """The layout of a group of ``g`` nodes with ``m`` parity blocks per stripe (1 <= m < g)."""
        if not isinstance(g, int) or not isinstance(m, int) or not 1 <= m < g:
            raise ValueError(f"parity m={m!r} must satisfy 1 <= m < g for a group of g={g!r} nodes")
        return cls(g - m, m)

    @property
    def g(self) -> int:
        """Nodes per group = stripes per version = blocks per stripe."""
        return self.k + self.m

    def _pos(self, p: int, what: str = "position") -> int:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < self.g:
            raise ValueError(f"{what} {p!r} is not within 0..{self.g - 1} (group of g={self.g})")
        return p

    # -- who holds what ------------------------------------------------------------------------
    def block_number(self, position: int, stripe: int) -> int:
        """zfec block number that ``position`` holds in ``stripe``: (p - s - m) mod g."""
        return (self._pos(position) - self._pos(stripe, "stripe") - self.m) % self.g

    def holder(self, stripe: int, number: int) -> int:
        """Position holding block ``number`` of ``stripe`` (inverse of ``block_number``)."""
        return (self._pos(stripe, "stripe") + self.m + self._pos(number, "block number")) % self.g

    def is_parity(self, position: int, stripe: int) -> bool:
        return self.block_number(position, stripe) >= self.k

    def chunk_index(self, position: int, stripe: int) -> int | None:
        """Which of its k data chunks ``position`` gives in ``stripe``; None where it holds parity.
        Equal to the zfec block number of that chunk."""
        b = self.block_number(position, stripe)
        return b if b < self.k else None

    def data_stripe(self, position: int, chunk: int) -> int:
        """The stripe in which ``position`` gives its data chunk ``chunk`` (0 <= chunk < k)."""
        if not isinstance(chunk, int) or not 0 <= chunk < self.k:
            raise ValueError(f"chunk {chunk!r} is not within 0..{self.k - 1} (k={self.k})")
        return (self._pos(position) - self.m - chunk) % self.g

    def parity_stripes(self, position: int) -> tuple[int, ...]:
        """The m stripes in which ``position`` is a parity holder, for parity j = 0..m-1 (block k + j)."""
        p = self._pos(position)
        return tuple((p - j) % self.g for j in range(self.m))

    def parity_holders(self, stripe: int) -> tuple[int, ...]:
        """Positions of parity holders j = 0..m-1 of ``stripe``: (s + j) mod g; holder j computes block k + j."""
        s = self._pos(stripe, "stripe")
        return tuple((s + j) % self.g for j in range(self.m))

    def data_holders(self, stripe: int) -> tuple[int, ...]:
        """Positions giving data blocks 0..k-1 of ``stripe``, in block-number order."""
        s = self._pos(stripe, "stripe")
        return tuple((s + self.m + b) % self.g for b in range(self.k))

    def blocks(self, stripe: int) -> tuple[Block, ...]:
        """All g blocks of ``stripe`` in block-number order: data 0..k-1, then parity k..k+m-1."""
        return tuple(Block(self.holder(stripe, b), b) for b in range(self.g))

    # -- rebuilding ----------------------------------------------------------------------------
    def recoverable(self, lost: Iterable[int]) -> bool:
        """Whether losing these positions (any iterable of valid positions) is within the parity."""
        return len({self._pos(p) for p in lost}) <= self.m

    def plan_recovery(self, lost: Iterable[int], *, nodes: Sequence[int] | None = None,
                      group: int | None = None) -> "RecoveryPlan":
        """For every stripe, which k surviving blocks rebuild what the ``lost`` positions held.

        ``nodes`` (node rank of each position) and ``group`` only serve to name the lost nodes in
        UnrecoverableLoss, raised when more than m positions are lost. Sources are chosen as the
        surviving data blocks first (decoding from all data blocks is a copy), then the surviving
        parity blocks in block-number order, the first k of them.
        """
        lost_set = frozenset(self._pos(p, "lost position") for p in lost)
        if len(lost_set) > self.m:
            names = sorted(lost_set) if nodes is None else sorted(nodes[p] for p in lost_set)
            raise UnrecoverableLoss(names, self.m, group)
        repairs = []
        for s in range(self.g):
            blocks = self.blocks(s)
            alive = [b for b in blocks if b.position not in lost_set]  # data first, then parity
            gone = [b for b in blocks if b.position in lost_set]
            repairs.append(StripeRepair(
                stripe=s,
                sources=tuple(alive[:self.k]),
                lost_data=tuple(b for b in gone if b.number < self.k),
                lost_parity=tuple(b for b in gone if b.number >= self.k),
            ))
        return RecoveryPlan(tuple(sorted(lost_set)), tuple(repairs))


@dataclasses.dataclass(frozen=True)
class StripeRepair:
    """How to rebuild one stripe: feed ``sources`` (exactly k distinct surviving blocks) to the
    decoder to get data blocks 0..k-1, keep those in ``lost_data``, then re-encode ``lost_parity``.
    A stripe with no lost data needs no decode: its sources are its k data blocks."""
    stripe: int
    sources: tuple[Block, ...]
    lost_data: tuple[Block, ...]
    lost_parity: tuple[Block, ...]

    @property
    def needs_decode(self) -> bool:
        return bool(self.lost_data)


@dataclasses.dataclass(frozen=True)
class RecoveryPlan:
    lost: tuple[int, ...]
    stripes: tuple[StripeRepair, ...]


# -- groups of nodes ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Group:
    """One group: ``nodes[p]`` is the node rank at position p."""
    index: int
    nodes: tuple[int, ...]
    layout: StripeLayout

    def position(self, node: int) -> int:
        try:
            return self.nodes.index(node)
        except ValueError:
            raise ValueError(f"node {node!r} is not in group {self.index} (nodes {list(self.nodes)})") from None

    def plan_recovery(self, lost_nodes: Iterable[int]) -> RecoveryPlan:
        """``StripeLayout.plan_recovery`` for lost node ranks; UnrecoverableLoss names them."""
        return self.layout.plan_recovery([self.position(n) for n in lost_nodes], nodes=self.nodes,
                                         group=self.index)


@dataclasses.dataclass(frozen=True)
class Grouping:
    """N = ``nodes`` node ranks 0..N-1 split into groups of g = k + m.

    With ``stride`` s (default 1) the ranks are cut into blocks of g*s consecutive ranks, and inside
    each block the ranks r, r+s, ..., r+(g-1)s form one group, for the s first ranks r of the block.
    Hence rank r is in block b = r // (g*s), lane l = r % s, at position (r % (g*s)) // s, and in
    group b*s + l. Stride 1 gives consecutive ranks [0..g-1], [g..2g-1], ...

    Racks: if every rack holds R consecutive node ranks, stride R (with N a multiple of g*R) puts the
    g members of each group in g different racks, so losing a rack costs each group one node.
    N must be a multiple of g*s: no group is smaller than the others.
    """
    nodes: int
    k: int
    m: int
    stride: int = 1

    def __post_init__(self) -> None:
        _check_km(self.k, self.m)
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"the node count must be a positive int, got {self.nodes!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")
        span = self.g * self.stride
        if self.nodes % span:
            raise ValueError(
                f"{self.nodes} nodes cannot be split into groups of g = k + m = {self.k} + {self.m} = {self.g}"
                + (f" with stride {self.stride}" if self.stride > 1 else "")
                + f": the node count must be a multiple of {span}"
                + (" (g * stride)" if self.stride > 1 else "")
                + "; change the node count, k, m or the stride")

    @property
    def g(self) -> int:
        return self.k + self.m

    @property
    def count(self) -> int:
        """Number of groups, N / g."""
        return self.nodes // self.g

    @property
    def layout(self) -> StripeLayout:
        return StripeLayout(self.k, self.m)

    def _rank(self, rank: int) -> int:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.nodes:
            raise ValueError(f"node rank {rank!r} is not within 0..{self.nodes - 1}")
        return rank

    def group_of(self, rank: int) -> int:
        """Index (0..count-1) of the group of node ``rank`` (0..N-1)."""
        r, s = self._rank(rank), self.stride
        return (r // (self.g * s)) * s + r % s

    def position_of(self, rank: int) -> int:
        """Position (0..g-1) of node ``rank`` in its group."""
        return (self._rank(rank) % (self.g * self.stride)) // self.stride

    def members(self, group: int) -> tuple[int, ...]:
        """Node ranks of ``group`` (0..count-1), in position order."""
        if not isinstance(group, int) or not 0 <= group < self.count:
            raise ValueError(f"group {group!r} is not within 0..{self.count - 1}")
        s = self.stride
        base = (group // s) * self.g * s + group % s
        return tuple(base + i * s for i in range(self.g))

    def group(self, index: int) -> Group:
        return Group(index, self.members(index), self.layout)

    def group_for(self, rank: int) -> Group:
        return self.group(self.group_of(rank))

    def groups(self) -> tuple[Group, ...]:
        return tuple(self.group(i) for i in range(self.count))


# -- sizes -------------------------------------------------------------------------------------
def chunk_bytes(group_max_bytes: int, k: int, align: int = 1) -> int:
    """Chunk size c for a group whose largest snapshot has ``group_max_bytes`` (>= 0): ceil(S / k),
    rounded up to a multiple of ``align`` (>= 1). Every node's snapshot is zero-padded to k * c."""
    if group_max_bytes < 0 or k < 1 or align < 1:
        raise ValueError(f"need group_max_bytes >= 0, k >= 1, align >= 1; got {group_max_bytes}, {k}, {align}")
    c = -(-group_max_bytes // k)
    return -(-c // align) * align


def chunk_span(chunk: int, chunk_size: int, snapshot_bytes: int) -> tuple[int, int]:
    """Bytes [lo, hi) of a node's own snapshot (``snapshot_bytes`` long) inside data chunk ``chunk``;
    the chunk's remaining ``chunk_size - (hi - lo)`` bytes are zero padding. Empty (lo == hi) for a
    chunk entirely past the end of a smaller node's snapshot."""
    if chunk < 0 or chunk_size < 0 or snapshot_bytes < 0:
        raise ValueError(f"chunk, chunk_size and snapshot_bytes must be >= 0; got {chunk}, {chunk_size}, "
                         f"{snapshot_bytes}")
    lo = min(chunk * chunk_size, snapshot_bytes)
    return lo, min(lo + chunk_size, snapshot_bytes)


def held_bytes(snapshot_bytes: int, k: int, m: int, group_max_bytes: int | None = None, align: int = 1) -> int:
    """Bytes a node holds for one version: its own snapshot whole (S) plus m parity blocks of c bytes,
    since it is parity holder in exactly m of the g stripes. The ideal is S * (1 + m/k); padding to
    the group's largest snapshot (``group_max_bytes``, default S) and to ``align`` adds the rest."""
    _check_km(k, m)
    top = snapshot_bytes if group_max_bytes is None else group_max_bytes
    if top < snapshot_bytes:
        raise ValueError(f"group_max_bytes {top} is smaller than this node's snapshot ({snapshot_bytes})")
    return snapshot_bytes + m * chunk_bytes(top, k, align)

