"""What the catalog keeps per trainer rank: its buffers (shared-memory segments) and their states.

A buffer is ``writing`` (a copy is under way, or was abandoned), ``complete`` (holds a committed,
checksummed version) or ``free``. ``SegmentStore`` is the I/O the catalog asks for (``shm_store``
carries it out on the file system; the tests give a fake one).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

CAPACITY_QUANTUM = 1 << 20


class SegmentStore(Protocol):
    def allocate(self, name: str, size: int) -> None: ...
    def release(self, name: str) -> None: ...
    def mark_writing(self, name: str) -> None: ...
    def mark_complete(self, name: str, meta: dict) -> None: ...


@dataclasses.dataclass
class Buffer:
    name: str
    capacity: int
    state: str = "free"               # "free" | "writing" | "complete"
    step: int | None = None
    manifest: dict | None = None
    seq: int = 0                      # commit order, to tell the newest version
    committed_at: float | None = None
    pid: int | None = None            # the trainer process that committed it (None: adopted, rebuilt)
    origin: str = "memory"            # "disk:<dir>": loaded from a flushed version; "fetched from node N"
    foreign: bool = False             # fetched from another node for a restore: not part of this node's image


@dataclasses.dataclass
class RankEntry:
    rank: int
    world: int
    session: str | None = None
    pid: int | None = None
    buffers: list[Buffer] = dataclasses.field(default_factory=list)
    commits: int = 0
    last_commit_at: float | None = None
    last_copy_seconds: float | None = None
    last_blocked_seconds: float | None = None
    pinned: int | None = None         # cluster: step held for the next protection round
    flush_hold: str | None = None     # buffer a flush is copying out: never handed out meanwhile
    finished: bool = False            # its trainer called finish(): its part of the run is over
    detached: bool = False            # its trainer closed its client: it holds the rank no more
    since: int = -1                   # cluster: part of this node's image only for steps after this one
    until: int | None = None          # cluster: departed; part of this node's image only up to this step

    def complete(self) -> list[Buffer]:
        """Complete versions, newest first."""
        return sorted((b for b in self.buffers if b.state == "complete"), key=lambda b: -b.seq)
