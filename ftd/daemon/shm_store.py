"""The catalog's store: its buffers as segment files in ``shm_dir``, complete once their sidecar exists.

``Catalog`` decides; this class carries its decisions out on the file system (tests give the catalog
a fake store instead).
"""
from __future__ import annotations

from pathlib import Path

from ftd.shm import segments


class ShmStore:
    def __init__(self, shm_dir: Path):
        self.dir = shm_dir

    def allocate(self, name: str, size: int) -> None:
        """Sparse, at once: the trainer reserves the pages itself before it writes them (``trainer.arena``),
        so a first snapshot of GiBs does not keep the daemon's loop busy for seconds."""
        segments.create(self.dir / name, size, reserve=False)

    def release(self, name: str) -> None:
        segments.drop_meta(self.dir / name)
        segments.unlink(self.dir / name)

    def mark_writing(self, name: str) -> None:
        segments.drop_meta(self.dir / name)

    def mark_complete(self, name: str, meta: dict) -> None:
        segments.write_meta(self.dir / name, meta)
