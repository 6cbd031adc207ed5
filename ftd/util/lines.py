"""Whole lines, each in one write.

torchrun starts its workers with ``python -u``: there ``print()`` writes a line's text and its
newline in two calls, so when two ranks print at the same moment into one pipe their lines run
together ("... resuming after step 7rank 1 pid 42: resuming after step 7") and whatever reads them
(a launcher's log parser, a test, a user's grep) misses one. One ``write`` of the whole line is
atomic on a pipe up to ``PIPE_BUF`` (4 KiB on Linux)."""
from __future__ import annotations

import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline to ``stream`` (default: stdout) in one call, and flush."""
    stream = sys.stdout if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
