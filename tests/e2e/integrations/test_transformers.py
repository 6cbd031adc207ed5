"""Hugging Face Trainer with ``FtdTrainerCallback`` and ``train(resume_from_checkpoint=resume_from(trainer))``:
SIGKILLed mid-epoch and run again, it resumes through the Trainer's own resume logic and every loss
equals an uninterrupted run's bit for bit; the checkpoint folder in /dev/shm is gone afterwards.

The job (``ftd/examples/hf_trainer.py``): a 2-layer GPT-2 from a config (dropout on), AdamW with a
linear warm-up and decay, 12 steps per epoch, 3 epochs.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from support.frameworks import FrameworkJob, compare

MODULE = "ftd.examples.hf_trainer"
RESUMING = re.compile(r"rank 0: resuming from (\S+)")


@pytest.mark.timeout(120)
def test_killed_mid_epoch_resumes_bit_exact_through_the_trainers_resume(job, tmp_path):
    reference = FrameworkJob(job, None, MODULE, [])
    ftd_job = FrameworkJob(job, job.daemon(), MODULE, [])
    try:
        reference.run(tmp_path / "ref", "ref", "--resume", "none")
        run = tmp_path / "run"
        first = ftd_job.start(run, "first", "--resume", "ftd", "--step-sleep", "0.15")
        killed_after = ftd_job.kill_after(first, run, "first", 16)
        assert killed_after % 12 not in (0, 11), "the kill must land mid-epoch"
        log = ftd_job.run(run, "second", "--resume", "ftd")
    finally:
        reference.cleanup()
        ftd_job.cleanup()
    folder = RESUMING.search(log)
    assert folder and folder.group(1) != "None", log[-3000:]
    resumed_steps = int(folder.group(1).rsplit("-", 1)[1])  # checkpoint-<steps done>
    assert killed_after - 3 < resumed_steps <= killed_after + 1
    assert not Path(folder.group(1)).parent.exists(), "the checkpoint folder in /dev/shm outlived the resume"
    compare(run, tmp_path / "ref", 1)
