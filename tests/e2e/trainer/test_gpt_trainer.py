"""The GPT example trainer as the demo and the agent run it: 2 DDP ranks over gloo on one daemon.

A reference run without ftd, then an ftd run whose rank 1 is SIGKILLed mid-run (rank 0 then fails
in gloo), then a restart of both ranks: they resume after the same step, and every loss either rank
ever wrote equals the reference's for that step and rank, bit for bit.
"""
from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

from ftd.util.procs import wait_for

from support.jobs import start_gpt_ranks
from support.losses import read_losses

STEPS = 12
WORLD = 2
SMALL = ["--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch", "4",
         "--steps", str(STEPS), "--pg-timeout", "10"]
RESUMING = re.compile(r"rank (\d+) pid \d+: (?:resuming after step (\d+)|starting fresh)")


def start_ranks(job, daemon, out: Path, phase: str, *extra: str) -> list[subprocess.Popen]:
    return start_gpt_ranks(job, daemon, out, phase, WORLD, *SMALL, *extra)


def finish(procs: list[subprocess.Popen], out: Path, phase: str, timeout: float = 60) -> None:
    for rank, p in enumerate(procs):
        rc = p.wait(timeout)
        assert rc == 0, f"rank {rank} exited with {rc}:\n{(out / f'{phase}-rank{rank}.log').read_text()}"


def test_ddp_ranks_resume_bit_exact_after_a_rank_is_killed(job, tmp_path):
    daemon = job.daemon()
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    finish(start_ranks(job, daemon, ref, "ref", "--no-ftd"), ref, "ref")

    # --step-sleep: the kill lands mid-run, and each step's snapshot is committed during the sleep.
    first = start_ranks(job, daemon, run, "first", "--step-sleep", "0.1")
    wait_for(lambda: any(s >= 5 for s, _ in read_losses(run / "losses-rank1.txt")) or first[1].poll() is not None,
             40, "rank 1 to report step 5")
    assert first[1].poll() is None, (run / "first-rank1.log").read_text()
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    killed_after = max(s for s, _ in read_losses(run / "losses-rank1.txt"))
    try:  # gloo reports the lost peer ("Connection closed by peer") within a step; --pg-timeout bounds a hang
        assert first[0].wait(15) != 0, "rank 0 finished although its peer was killed"
    except subprocess.TimeoutExpired:
        first[0].kill()
        first[0].wait()
    assert killed_after < STEPS - 1, "the run ended before the kill: nothing left to resume"

    second = start_ranks(job, daemon, run, "second")
    finish(second, run, "second")
    resumed = {}
    for rank in range(WORLD):
        m = RESUMING.search((run / f"second-rank{rank}.log").read_text())
        assert m and int(m.group(1)) == rank and m.group(2) is not None, f"rank {rank} did not resume"
        resumed[rank] = int(m.group(2))
    assert len(set(resumed.values())) == 1, f"the ranks resumed after different steps: {resumed}"
    assert 0 <= resumed[0] <= killed_after

    for rank in range(WORLD):
        expected = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        assert sorted(expected) == list(range(STEPS)), "reference run incomplete"
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(range(STEPS)), f"rank {rank} did not reach every step"
        for step, value in got:
            assert value == expected[step], f"rank {rank} step {step}: loss {value} differs from the reference's"
        assert (run / f"stats-rank{rank}.json").exists()
    assert "Traceback" not in daemon.log()
