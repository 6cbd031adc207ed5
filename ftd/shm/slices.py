"""Replica slices: which bytes of the replicated state each of R replicas keeps. Pure.

Under DDP every rank holds the same parameters, buffers and optimizer moments. Instead of each rank
copying all of them, the replicated tensors are laid end to end into one *stream* (in the order the
state flattens to, no padding) and the stream is cut into R contiguous ranges at multiples of the
checksum chunk size: replica i keeps range i. Every replica computes the same cut from the same
(dtype, shape) list, so nothing but that list has to agree (``signature_hash``; the client checks it
across the replica set before the first sliced snapshot, the restore checks it again per version).

A range boundary falls inside a tensor, so a tensor may be split between two replicas; the boundary
is then moved to the nearest bound of the tensor's rows (dim 0; ``snap_to_rows``), so each replica's
piece of a tensor is whole rows: one rectangular chunk of it, which the flush to disk writes as a
DCP chunk of the global tensor (each replicated byte once, by its holder). Each replica stores the
pieces of the tensors its range meets (at most one piece per tensor) as plain byte slots of its own
versioned snapshot, protected and fetched like any other rank's bytes.
"""
from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence


def partition(total: int, parts: int, align: int) -> list[tuple[int, int]]:
    """R contiguous ranges [lo, hi) covering [0, total), boundaries at multiples of ``align`` (the
    last range ends at ``total``); as even as the alignment allows, and empty ranges at the end when
    ``total`` is smaller than ``parts`` alignment units."""
    if parts < 1 or align < 1 or total < 0:
        raise ValueError(f"partition({total}, {parts}, {align}): need parts >= 1, align >= 1, total >= 0")
    units = -(-total // align)
    bounds = [min(total, (units * i // parts) * align) for i in range(parts)] + [total]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def snap_to_rows(bounds: Sequence[tuple[int, int]], tensors: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """``bounds`` with every boundary that falls strictly inside a tensor moved to the nearest bound
    of its rows; ``tensors``: (stream offset, bytes, bytes per row) of each non-empty replicated
    tensor, in stream order (a 0-d tensor's row is the whole of it). Monotone, so the ranges still
    cover the stream once, in order; each moves by at most half a row."""
    starts = [t[0] for t in tensors]
    cuts = []
    for lo, _ in bounds[1:]:
        k = bisect.bisect_right(starts, lo) - 1
        if k >= 0:
            off, size, row = tensors[k]
            if off < lo < off + size and row > 0:
                lo = off + min(size, (lo - off + row // 2) // row * row)
        cuts.append(lo)
    edges = [bounds[0][0], *cuts, bounds[-1][1]] if bounds else []
    return [(edges[i], edges[i + 1]) for i in range(len(bounds))]


def row_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Bytes of one dim-0 row of a tensor (of the whole of a 0-d one)."""
    n = itemsize
    for d in list(shape)[1:]:
        n *= d
    return n


def stream_offsets(sizes: Sequence[int]) -> list[int]:
    """Offset of each replicated tensor in the stream (their byte sizes laid end to end)."""
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return out


def piece(offset: int, size: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The bytes [a, b) of a tensor at ``offset`` (``size`` bytes) inside the stream range [lo, hi),
    relative to the tensor; None if the range does not meet it."""
    a, b = max(lo, offset), min(hi, offset + size)
    return (a - offset, b - offset) if a < b else None


def signature_hash(specs: Sequence[tuple[str, Sequence[int]]]) -> int:
    """A 63-bit hash of the replicated tensors' (dtype, shape) list: equal on every replica, or the
    replicas would cut different streams."""
    text = json.dumps([[d, list(s)] for d, s in specs], separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def spec_hash(dtype: str, shape: Sequence[int]) -> int:
    """The same for one tensor (to name the first one replicas disagree on)."""
    return signature_hash([(dtype, shape)])
