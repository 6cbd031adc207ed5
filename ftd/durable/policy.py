"""When to flush, and which flushed step a cluster restores. Pure.

The coordinator (a cluster) or the daemon (a standalone node) runs ``FlushPolicy`` over the
recoverable steps as they come, so every node of a cluster flushes the same steps. A node runs one
flush at a time; ``FlushQueue`` keeps at most one more, the newest: a newer due version supersedes
one that could not start, so a slow disk makes ftd flush less often, never queue without bound.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable


class FlushPolicy:
    """Flush the first recoverable step, then one once it is ``every`` steps past the last flushed
    step, or ``interval`` seconds after the last flush was decided (0 turns a rule off)."""

    def __init__(self, every: int, interval: float, clock: Callable[[], float] = time.monotonic):
        self.every, self.interval, self.clock = every, interval, clock
        self.last_step: int | None = None
        self.last_time = 0.0

    def due(self, step: int) -> bool:
        """Whether recoverable ``step`` is to be flushed (each step is decided once, in order)."""
        now = self.clock()
        if self.last_step is not None:
            if step <= self.last_step:
                return False
            by_steps = self.every > 0 and step - self.last_step >= self.every
            by_time = self.interval > 0 and now - self.last_time >= self.interval
            if not (by_steps or by_time):
                return False
        self.last_step, self.last_time = step, now
        return True


class FlushQueue:
    """The flush running on a node and at most one waiting (the newest)."""

    def __init__(self) -> None:
        self.running: int | None = None
        self.pending: int | None = None
        self.superseded = 0

    def offer(self, step: int) -> int | None:
        """A due step: returns it if a flush should start now, else keeps it as the one waiting."""
        if self.running is None:
            self.running = step
            return step
        if step <= self.running or (self.pending is not None and step <= self.pending):
            return None
        if self.pending is not None:
            self.superseded += 1
        self.pending = step
        return None

    def finished(self) -> int | None:
        """The running flush ended: returns the waiting step to start now, if any."""
        self.running, step = self.pending, self.pending
        self.pending = None
        return step


def common_step(offers: dict[int, Iterable[int]], nodes: Iterable[int]) -> int | None:
    """The newest step every node in ``nodes`` offers (has flushed completely), or None."""
    sets = [set(offers.get(n, ())) for n in nodes]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None
