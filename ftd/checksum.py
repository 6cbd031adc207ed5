"""Per-chunk checksums: xxh3-64, which runs at memory speed (about 15-20 GB/s here, against 2.2 GB/s
for zlib.crc32), so checking a snapshot costs less than copying it."""
from __future__ import annotations

import xxhash

from .layout import chunk_ranges


def chunk_checksum(buf) -> int:
    """Checksum of one chunk; ``buf`` is any buffer (memoryview of shared memory, bytes, numpy array)."""
    return xxhash.xxh3_64_intdigest(buf)


def checksums(buf: memoryview, nbytes: int, chunk_size: int) -> list[int]:
    return [chunk_checksum(buf[lo:hi]) for lo, hi in chunk_ranges(nbytes, chunk_size)]


def bad_chunks(buf: memoryview, nbytes: int, chunk_size: int, expected: list[int] | tuple[int, ...]) -> list[int]:
    """Indices of chunks whose bytes do not match ``expected``."""
    got = checksums(buf, nbytes, chunk_size)
    if len(got) != len(expected):
        return list(range(len(got)))
    return [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
