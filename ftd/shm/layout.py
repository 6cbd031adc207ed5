"""Arena layout: where each tensor of a snapshot lives in a rank's shared-memory buffer. Pure.

A snapshot is one contiguous arena of ``nbytes``: tensors at 64-byte aligned offsets, in the
order the state flattens to. The arena is cut into fixed ``chunk_size`` chunks; each chunk has a
checksum, and the copy engine walks the arena chunk by chunk (copy, then hash while still in cache).
The manifest (layout + checksums + the non-tensor skeleton) travels as JSON and is validated here,
so a daemon never trusts offsets it did not check.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from ftd.errors import ProtocolError

FORMAT = 1
ALIGNMENT = 64
MAX_DIMS = 16

DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex128": 16, "complex64": 8,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclasses.dataclass(frozen=True)
class Layout:
    slots: tuple[TensorSlot, ...]
    nbytes: int

    @property
    def signature(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((s.dtype, s.shape) for s in self.slots)


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {sorted(DTYPE_SIZES)}")
    return DTYPE_SIZES[dtype] * math.prod(shape)


def plan_layout(specs: Sequence[tuple[str, Sequence[int]]], alignment: int = ALIGNMENT) -> Layout:
    """Place tensors (dtype name, shape) one after another at aligned offsets."""
    slots, offset = [], 0
    for dtype, shape in specs:
        n = tensor_nbytes(dtype, shape)
        slots.append(TensorSlot(dtype, tuple(int(d) for d in shape), offset, n))
        offset += -(-n // alignment) * alignment
    return Layout(tuple(slots), offset)


def chunk_count(nbytes: int, chunk_size: int) -> int:
    return max(1, -(-nbytes // chunk_size))


def chunk_ranges(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end)] covering [0, nbytes); one empty chunk for an empty arena."""
    return [(i * chunk_size, min(nbytes, (i + 1) * chunk_size)) for i in range(chunk_count(nbytes, chunk_size))]


@dataclasses.dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of slot ``slot`` (relative to the slot) that fall in one chunk."""
    slot: int
    start: int
    end: int


def chunk_plan(layout: Layout, chunk_size: int) -> list[tuple[tuple[int, int], list[Piece]]]:
    """For each chunk, the pieces of tensors inside it, in arena order."""
    plan, i = [], 0
    slots = layout.slots
    for lo, hi in chunk_ranges(layout.nbytes, chunk_size):
        pieces = []
        while i < len(slots) and slots[i].end <= lo:
            i += 1
        j = i
        while j < len(slots) and slots[j].offset < hi:
            s = slots[j]
            a, b = max(lo, s.offset), min(hi, s.end)
            if a < b:
                pieces.append(Piece(j, a - s.offset, b - s.offset))
            j += 1
        plan.append(((lo, hi), pieces))
    return plan


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Everything needed to read a snapshot back: layout, checksums, the JSON skeleton of the state."""
    layout: Layout
    chunk_size: int
    checksums: tuple[int, ...]
    tree: Any

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "nbytes": self.layout.nbytes,
            "chunk_size": self.chunk_size,
            "checksums": list(self.checksums),
            "tensors": [[s.dtype, list(s.shape), s.offset] for s in self.layout.slots],
            "tree": self.tree,
        }

    @classmethod
    def from_json(cls, obj: Any, *, max_nbytes: int | None = None) -> "Manifest":
        """Validate a manifest from another process; ProtocolError names the first problem."""
        def bad(why: str) -> ProtocolError:
            return ProtocolError(f"invalid snapshot manifest: {why}")

        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise bad(f"format must be {FORMAT}")
        nbytes, chunk = obj.get("nbytes"), obj.get("chunk_size")
        if not _is_int(nbytes) or nbytes < 0 or (max_nbytes is not None and nbytes > max_nbytes):
            raise bad(f"nbytes {nbytes!r} is not within [0, {max_nbytes}]")
        if not _is_int(chunk) or not 4096 <= chunk <= 64 << 20:
            raise bad(f"chunk_size {chunk!r} is not within [4096, 64 MiB]")
        sums = obj.get("checksums")
        if not isinstance(sums, list) or len(sums) != chunk_count(nbytes, chunk):
            raise bad(f"expected {chunk_count(nbytes, chunk)} checksums")
        if not all(_is_int(c) and 0 <= c < 1 << 64 for c in sums):
            raise bad("checksums must be unsigned 64-bit integers")
        tensors = obj.get("tensors")
        if not isinstance(tensors, list):
            raise bad("tensors must be a list")
        slots, prev_end = [], 0
        for k, t in enumerate(tensors):
            if not (isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], list)
                    and _is_int(t[2])):
                raise bad(f"tensor {k} must be [dtype, shape, offset]")
            dtype, shape, offset = t
            if dtype not in DTYPE_SIZES:
                raise bad(f"tensor {k} has unknown dtype {dtype!r}")
            if len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
                raise bad(f"tensor {k} has an invalid shape {shape!r}")
            n = tensor_nbytes(dtype, shape)
            if offset % ALIGNMENT or offset < prev_end or offset + n > nbytes:
                raise bad(f"tensor {k} at offset {offset} (+{n} bytes) overlaps or leaves the arena of {nbytes}")
            slots.append(TensorSlot(dtype, tuple(shape), offset, n))
            prev_end = offset + n
        return cls(Layout(tuple(slots), nbytes), chunk, tuple(sums), obj.get("tree"))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
