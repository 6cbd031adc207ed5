"""Replica slices: which bytes of the replicated state each of R replicas keeps. Pure.

Under DDP every rank holds the same parameters, buffers and optimizer moments. Instead of each rank
copying all of them, the replicated tensors are laid end to end into one *stream* (in the order the
state flattens to, no padding) and the stream is cut into R contiguous ranges at multiples of the
checksum chunk size: replica i keeps range i. Every replica computes the same cut from the same
(dtype, shape) list, so nothing but that list has to agree (``signature_hash``; the client checks it
across the replica set before the first sliced snapshot, the restore checks it again per version).

A range boundary falls inside a tensor, so a tensor may be split between two replicas; each replica
stores the pieces of the tensors its range meets (at most one piece per tensor) as plain byte slots
of its own versioned snapshot, protected and fetched like any other rank's bytes.
"""
from __future__ import annotations

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
