"""Ranks that print at the same moment into one pipe, as torchrun's workers do (``python -u``, where
``print()`` writes a line's text and its newline in two calls and two ranks' lines run together):
the lines ftd and its example trainers print come out whole, one per line, so that a log parser
(ftd's own torchrun job, a test, a user's grep) finds each."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from support.jobs import ROOT

pytestmark = pytest.mark.timeout(60)
LINES = 20000

WRITER = """
import sys, time
from ftd.util.lines import say
start = float(sys.argv[2])
while time.time() < start:  # both writers begin together, so that their writes interleave
    pass
for i in range({lines}):
    say(f"rank {{sys.argv[1]}} pid 1: resuming after step {{i}}")
"""


def test_two_unbuffered_writers_into_one_pipe_keep_every_line_whole():
    read_end, write_end = os.pipe()
    start = time.time() + 1.0
    writers = [subprocess.Popen([sys.executable, "-u", "-c", WRITER.format(lines=LINES), str(rank), str(start)],
                                stdout=write_end, env=dict(os.environ, PYTHONPATH=str(ROOT))) for rank in (0, 1)]
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    assert [w.wait(30) for w in writers] == [0, 0]
    lines = out.splitlines()
    run_together = [line for line in lines if not re.fullmatch(r"rank [01] pid 1: resuming after step \d+", line)]
    assert not run_together, f"{len(run_together)} lines not whole, e.g. {run_together[:3]}"
    for rank in (0, 1):
        steps = [int(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(f"rank {rank} ")]
        assert steps == list(range(LINES)), f"rank {rank}'s lines lost or out of order"
