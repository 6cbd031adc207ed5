"""PyTorch Lightning with ``Trainer(callbacks=[FtdCallback()])``: SIGKILLed mid-epoch and run again,
the job resumes after the last snapshot and every loss, and every batch it trains on, equals an
uninterrupted run's bit for bit; on one CPU process and with the ddp strategy over 2 processes.

The job (``ftd/examples/lightning_trainer.py``): dropout, AdamW, a per-step StepLR, a shuffled
DataLoader of 15 batches per epoch (8 per rank with 2 ranks), 3 epochs.
"""
from __future__ import annotations

import re

import pytest

from support.frameworks import FrameworkJob, compare

MODULE = "ftd.examples.lightning_trainer"
RESTORED = re.compile(r"rank (\d+): restored step (\d+)")


@pytest.fixture
def frameworks(job):
    made: list[FrameworkJob] = []

    def make(daemon, args):
        f = FrameworkJob(job, daemon, MODULE, args)
        made.append(f)
        return f
    yield make
    for f in made:
        f.cleanup()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("devices, kill_at, per_epoch", [(1, 20, 15), (2, 10, 8)], ids=["one-process", "ddp-2"])
def test_killed_mid_epoch_resumes_bit_exact(job, frameworks, tmp_path, devices, kill_at, per_epoch):
    args = ["--devices", str(devices)]
    reference = frameworks(None, args)
    reference.run(tmp_path / "ref", "ref", "--resume", "none")

    ftd_job = frameworks(job.daemon(), args)
    run = tmp_path / "run"
    first = ftd_job.start(run, "first", "--resume", "ftd", "--step-sleep", "0.15")
    killed_after = ftd_job.kill_after(first, run, "first", kill_at)
    assert killed_after % per_epoch not in (0, per_epoch - 1), "the kill must land mid-epoch"

    log = ftd_job.run(run, "second", "--resume", "ftd")
    restored = {int(r): int(s) for r, s in RESTORED.findall(log)}
    assert sorted(restored) == list(range(devices)), log[-3000:]
    step = restored[0]
    assert len(set(restored.values())) == 1, f"the ranks resumed after different steps: {restored}"
    assert killed_after - 3 <= step <= killed_after and (step + 1) % per_epoch, \
        f"resumed after step {step}, killed after step {killed_after}: not the mid-epoch resume this test wants"
    compare(run, tmp_path / "ref", devices, "batches")   # the same data, in the same order
    compare(run, tmp_path / "ref", devices, "losses")    # and the same losses, bit for bit
