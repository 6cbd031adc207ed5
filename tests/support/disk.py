"""Damage done on purpose to a version (on disk, or in a shared-memory segment), for the tests of the
checks that must catch it."""
from __future__ import annotations

import json
from pathlib import Path


def flip_byte(path: Path, offset: int) -> None:
    """Invert the byte at ``offset`` of the file ``path`` (a version on disk or a /dev/shm segment)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def flip_tensor_byte(version: Path, node: int = 0, rank: int = 0) -> None:
    """In a version on disk, flip one byte in the middle of the largest tensor record of ``rank``
    (written by ``node``): inside its data, which the checksums must catch."""
    manifest = json.loads((version / f"ftd-export-node{node}.json").read_text())
    entry = manifest["restore"][str(rank)]
    where = max((w for w in entry["index"] if isinstance(w, list)), key=lambda w: w[2])
    path = version / where[0]  # (relative to the version directory)
    data = bytearray(path.read_bytes())
    data[where[1] + where[2] // 2] ^= 0x40
    path.write_bytes(bytes(data))
