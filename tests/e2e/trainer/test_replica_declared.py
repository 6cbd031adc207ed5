"""Replica-aware snapshots declared by hand (``Client(replicas=group)``), and the mistakes that must be
named: replicas that disagree on the replicated tensors, a restore while a replica's slice is missing,
and a replica's slice that fails its checksums.
Real processes: 2 gloo ranks of tests/support/replica_trainer.py against real daemons."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.shm import segments
from ftd.util.procs import free_ports, wait_for

from support.disk import flip_byte
from support.jobs import ROOT, SHM
from support.losses import read_losses

pytestmark = pytest.mark.timeout(300)

TRAINER = str(ROOT / "tests" / "support" / "replica_trainer.py")
ON = "replica_snapshots = true\n"


def start(job, daemons, out: Path, phase: str, *extra: str) -> list[subprocess.Popen]:
    port = str(free_ports(1)[0])
    procs = []
    for rank in range(2):
        env = job.env(daemons[rank % len(daemons)], RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(3 - len(daemons)), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(out / f"{phase}-rank{rank}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, TRAINER, "--out", str(out), *extra], env=env, cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT)
        job.procs.append(p)
        procs.append(p)
    return procs


def text(out: Path, phase: str, rank: int) -> str:
    return (out / f"{phase}-rank{rank}.log").read_text(errors="replace")


def crash_after(out: Path, procs, step: int) -> None:
    """SIGKILL rank 1 once both committed ``step``; rank 0 then fails in gloo (or is killed)."""
    wait_for(lambda: all(f"step {step}: snapshot committed" in text(out, "first", r) for r in range(2))
             or any(p.poll() is not None for p in procs), 60, f"both ranks to commit step {step}")
    assert all(p.poll() is None for p in procs), text(out, "first", 0) + text(out, "first", 1)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:
        procs[0].wait(40)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        procs[0].wait()


def test_replicas_declared_by_hand_restore_bit_exact(job, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    for p in start(job, [job.daemon(0)], ref, "ref", "--by-hand"):
        assert p.wait(120) == 0
    first = start(job, [job.daemon(1)], run, "first", "--by-hand", "--step-sleep", "0.5")
    crash_after(run, first, 3)
    second = start(job, [job.daemons[-1]], run, "second", "--by-hand")
    for rank, p in enumerate(second):
        assert p.wait(120) == 0, text(run, "second", rank)
        log = text(run, "second", rank)
        assert "resuming after step" in log, log
        assert "replicated state put together from 2 slices" in log, log
        assert '"sliced": true, "source": "replicas="' in log, log
    for rank in range(2):
        expected = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(expected), f"rank {rank} did not reach every step"
        assert all(v == expected[s] for s, v in got), f"rank {rank}: a loss differs from the uninterrupted run's"


def test_replicas_that_disagree_are_named_and_training_goes_on(job, tmp_path):
    """Declared by hand (DDP itself refuses replicas whose parameters differ in shape)."""
    for p in start(job, [job.daemon(0, ON)], tmp_path, "first", "--by-hand", "--mismatch", "--steps", "3"):
        assert p.wait(120) == 0, "a failed replica check must not end training"
    for rank in range(2):
        log = text(tmp_path, "first", rank)
        assert "disagrees on replicated tensor" in log and "state['model']" in log, log
        assert "snapshot committed" not in log, log


def test_restore_while_a_replicas_slice_is_missing_is_refused_by_name(job, tmp_path):
    # two standalone daemons, one per rank: neither holds the other rank's slice (no cluster to fetch it from)
    daemons = [job.daemon(0, ON), job.daemon(1, ON)]
    first = start(job, daemons, tmp_path, "first", "--step-sleep", "0.5")
    crash_after(tmp_path, first, 2)
    second = start(job, daemons, tmp_path, "second")
    for rank, p in enumerate(second):
        assert p.wait(60) != 0, text(tmp_path, "second", rank)
        log = text(tmp_path, "second", rank)
        other = 1 - rank
        assert f"rank {other}'s version of step" in log and "a slice of the replicated state is missing" in log, log


def test_a_corrupt_slice_is_named_and_every_replica_restores_the_step_before_bit_exact(job, tmp_path):
    """One standalone daemon, 2 ranks by hand: a byte of rank 1's newest version flipped while no trainer
    runs. That step cannot be put together, so both ranks resume the one before, saying why."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    d = job.daemon(0)
    for p in start(job, [d], ref, "ref", "--by-hand"):
        assert p.wait(120) == 0
    d = job.daemon(1)
    crash_after(run, start(job, [d], run, "first", "--by-hand", "--step-sleep", "0.5"), 3)
    versions = [p for p in SHM.iterdir() if p.name.startswith(f"ftd.{job.name}.n1.r") and not p.name.endswith((".meta", ".tmp"))
                and (segments.read_meta(p) or {}).get("rank") == 1]
    newest = max(versions, key=lambda p: segments.read_meta(p)["step"])
    step = segments.read_meta(newest)["step"]
    flip_byte(newest, 200)  # a byte inside the layout (every byte of it is checksummed)
    second = start(job, [d], run, "second", "--by-hand")
    for rank, p in enumerate(second):
        assert p.wait(120) == 0, text(run, "second", rank)
    logs = [text(run, "second", rank) for rank in range(2)]
    for rank in range(2):
        assert f"rank {rank}: resuming after step {step - 1}" in logs[rank], logs[rank]
    # whichever rank checks rank 1's version first names it and has it dropped; the other is then not
    # offered that step at all
    named = [f"rank 1's version of step {step} (its slice of the replicated state) fails its checksums" in logs[1],
             f"rank 1's version of step {step} (a replica's slice) fails its checksums" in logs[0]]
    assert any(named), logs
    for rank in range(2):
        expected = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(expected), f"rank {rank} did not reach every step"
        assert all(v == expected[s] for s, v in got), f"rank {rank}: a loss differs from the uninterrupted run's"
