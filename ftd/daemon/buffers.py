"""What the catalog keeps per trainer rank: its buffers (shared-memory segments) and their states.

A buffer is ``writing`` (a copy is under way, or was abandoned), ``complete`` (holds a committed,
checksummed version) or ``free``. ``SegmentStore`` is the I/O the catalog asks for (``shm_store``
carries it out on the file system; the tests give a fake one).
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

from ftd.errors import Refused
from ftd.units import format_size

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


def check_room(rank: int, nbytes: int, capacity: int, *, in_use: int, budget: int, grows_by: int, available: int,
               reserve: int) -> None:
    """Refused, with the numbers and what to change, unless a buffer of ``capacity`` for a snapshot of
    ``nbytes`` fits the memory budget (``in_use``: everything else the daemon holds) and leaves
    ``reserve`` of the node's ``available`` memory (``grows_by``: what the daemon's use grows by)."""
    after = in_use + capacity
    if after > budget:
        raise Refused(
            f"rank {rank} needs {format_size(capacity)} of shared memory for a snapshot of "
            f"{format_size(nbytes)}, but the daemon's memory budget is {format_size(budget)} with "
            f"{format_size(in_use)} in use (two buffers per rank, and parity held for peers), so "
            f"{format_size(max(0, budget - in_use))} is free. Raise memory_budget to at least "
            f"{format_size(after)} in the daemon's config, or snapshot less state")
    if grows_by > available - reserve:
        raise Refused(
            f"rank {rank} needs {format_size(capacity)} of shared memory, but only "
            f"{format_size(available)} of memory is available and {format_size(reserve)} is kept in "
            f"reserve (memory_reserve). Free memory on the node or snapshot less state")
