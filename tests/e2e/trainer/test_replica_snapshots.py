"""Replica-aware snapshots on one node: 2 DDP ranks of the GPT example, each snapshotting only its half
of the replicated parameters and Adam moments (replica_snapshots = true).

An uninterrupted run with whole-rank snapshots (replica_snapshots = false, another daemon) gives the
reference losses and today's shared-memory bytes; the sliced run's rank 1 is SIGKILLed mid-run, both
ranks restart, restore the same step (each putting its replicated state together from both ranks'
slices) and every loss equals the reference's bit for bit. The sliced run's node holds about half of
today's bytes.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support.jobs import ROOT, start_gpt_ranks
from support.losses import assert_bit_exact, read_losses

from ftd.util.procs import wait_for

pytestmark = pytest.mark.timeout(420)

STEPS = 10
WORLD = 2
# dim 384: ~44 MB of replicated state per rank, so the 1 MiB rounding of buffer sizes is small
MODEL = ["--layers", "2", "--dim", "384", "--heads", "2", "--context", "16", "--batch", "2",
         "--steps", str(STEPS), "--pg-timeout", "20", "--dropout", "0.1"]
RESUMING = re.compile(r"rank (\d+) pid \d+: (?:resuming after step (\d+)|starting fresh)")
ON, OFF = "replica_snapshots = true\n", "replica_snapshots = false\n"


def start_ranks(job, daemon, out: Path, phase: str, *extra: str) -> list[subprocess.Popen]:
    return start_gpt_ranks(job, daemon, out, phase, WORLD, *MODEL, *extra)


def finish(procs, out: Path, phase: str, timeout: float = 180) -> None:
    for rank, p in enumerate(procs):
        rc = p.wait(timeout)
        assert rc == 0, f"rank {rank} exited with {rc}:\n{(out / f'{phase}-rank{rank}.log').read_text()}"


def test_ddp_ranks_restore_bit_exact_from_replica_slices_on_one_node(job, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    whole = job.daemon(0, OFF)
    finish(start_ranks(job, whole, ref, "ref"), ref, "ref")
    today = whole.status()
    assert all("replica" not in r for r in today["ranks"]), "replica_snapshots = false still sliced"
    whole.stop()

    sliced = job.daemon(1, ON)
    first = start_ranks(job, sliced, run, "first", "--step-sleep", "0.3")
    wait_for(lambda: any(s >= 4 for s, _ in read_losses(run / "losses-rank1.txt")) or first[1].poll() is not None,
             120, "rank 1 to report step 4")
    assert first[1].poll() is None, (run / "first-rank1.log").read_text()
    mid = sliced.status()
    text = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--config", str(sliced.config_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
    assert "replica 1 of ranks [0, 1] (DistributedDataParallel): holds" in text, text
    (tmp_path / "status.txt").write_text(text)
    first[1].send_signal(signal.SIGKILL)
    first[1].wait()
    killed_after = max(s for s, _ in read_losses(run / "losses-rank1.txt"))
    try:
        assert first[0].wait(40) != 0, "rank 0 finished although its peer was killed"
    except subprocess.TimeoutExpired:
        first[0].kill()
        first[0].wait()
    assert killed_after < STEPS - 1, "the run ended before the kill: nothing left to resume"

    # what ftd decided, as `ftd status` shows it: each rank holds its half of the replicated bytes
    replica = {r["rank"]: r["replica"] for r in mid["ranks"]}
    assert sorted(replica) == [0, 1], mid
    for rank, info in replica.items():
        assert info["ranks"] == [0, 1] and info["pos"] == rank and info["source"] == "DistributedDataParallel"
    stream = replica[0]["replicated_bytes"]
    assert replica[0]["slice_bytes"] + replica[1]["slice_bytes"] == stream
    # the cut moves to the nearest row bound (dim 0) of the tensor it falls in: at most half its widest row
    assert abs(replica[0]["slice_bytes"] - stream / 2) <= 64 + 4 * 4 * 384 // 2
    # per-node shared memory: today's / R, plus each rank's own state (RNG...) and the 1 MiB rounding of buffers
    full = max(v["bytes"] for r in today["ranks"] for v in r["versions"])
    per_rank = max(v["bytes"] for r in mid["ranks"] for v in r["versions"]) - stream / 2
    bound = 1.05 * today["used"] / WORLD + 2 * WORLD * (per_rank + (1 << 20))
    assert mid["used"] <= bound, f"sliced node holds {mid['used']} bytes, today's {today['used']} (bound {bound:.0f})"
    assert mid["used"] < 0.6 * today["used"], (mid["used"], today["used"], full)

    second = start_ranks(job, sliced, run, "second")
    finish(second, run, "second")
    resumed = {}
    for rank in range(WORLD):
        log = (run / f"second-rank{rank}.log").read_text()
        m = RESUMING.search(log)
        assert m and int(m.group(1)) == rank and m.group(2) is not None, f"rank {rank} did not resume:\n{log}"
        resumed[rank] = int(m.group(2))
    assert len(set(resumed.values())) == 1, f"the ranks resumed after different steps: {resumed}"
    assert 0 <= resumed[0] <= killed_after
    for rank in range(WORLD):
        assert_bit_exact(run / f"losses-rank{rank}.txt", ref / f"losses-rank{rank}.txt", STEPS, f"rank {rank}")
    assert "Traceback" not in sliced.log()
