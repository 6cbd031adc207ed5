"""A one-number signal from the daemon to its flush worker: "a trainer's copy runs until T".

The flush writes at low priority, but a nice-19 process still takes memory bandwidth and time in
the kernel that a trainer's background copy then lacks (on small hosts that copy can outgrow the
compute it hides behind, and the trainer waits). So the daemon, which sees every ``begin`` and
``commit``, writes into a small mapped file the time until which a copy is expected to run (0:
none), and the flush worker sleeps between two of its I/O slices while that time lies ahead. The
time is a deadline rather than a flag so that a trainer that dies mid-copy cannot stop the flush.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

_WORD = struct.Struct("<d")
MAX_PAUSE = 0.05  # longest one pause between two slices (the deadline is checked again after it)


class CopyGate:
    """The daemon's side: announce copies."""

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, _WORD.size)
            self._mm = mmap.mmap(fd, _WORD.size)
        finally:
            os.close(fd)

    def copying_until(self, deadline: float) -> None:
        _WORD.pack_into(self._mm, 0, deadline)

    def close(self) -> None:
        self._mm.close()
        self.path.unlink(missing_ok=True)


class GateWatcher:
    """The flush worker's side: wait while a trainer's copy runs (no gate file: never wait)."""

    def __init__(self, path: Path | None):
        self._mm = None
        self.paused = 0.0  # seconds spent waiting, for the flush's report
        if path is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                return
            try:
                self._mm = mmap.mmap(fd, _WORD.size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)

    def wait(self) -> None:
        if self._mm is None:
            return
        while True:
            left = _WORD.unpack_from(self._mm, 0)[0] - time.time()
            if left <= 0:
                return
            pause = min(left, MAX_PAUSE)
            time.sleep(pause)
            self.paused += pause
