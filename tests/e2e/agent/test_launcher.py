"""`ftd agent --launcher -- torchrun ...`: torchrun starts the workers, the agent keeps the daemon, and a
crashed rank's restart by torchrun's own agent resumes every rank at the same step."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from support.jobs import ROOT, SHM

pytestmark = pytest.mark.timeout(200)
TRAINER = ["-m", "ftd.examples.fsdp_trainer", "--dim", "32", "--layers", "2", "--steps", "8", "--mesh", "fsdp",
           "--crash-rank", "1", "--crash-at", "4"]




def test_torchrun_under_the_agent_restarts_a_crashed_rank_and_every_rank_resumes_one_step(node_config):
    config, job = node_config
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "RANK",
                                                             "WORLD_SIZE", "FTD_CONFIG", "FTD_ENDPOINT")}
    env["PYTHONPATH"] = str(ROOT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "1", *TRAINER, "--out", str(config.parent / "out")]
    r = subprocess.run([sys.executable, "-m", "ftd.cli", "agent", "--config", str(config), "--log-dir",
                        str(config.parent / "logs"), "--launcher", "--", *torchrun],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    log = (config.parent / "logs" / "rank0.log").read_text(errors="replace")
    assert r.returncode == 0, r.stdout[-2000:] + log[-4000:]
    resumed = re.findall(r"rank (\d) pid \d+: resuming after step (\d+)", log)
    assert sorted(resumed) == [("0", "4"), ("1", "4")], log[-4000:]   # torchrun's restart, from ftd's memory
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in log, "the agent set it for torchrun: no warning due"
    assert "stopped the daemon" in r.stdout and not list(SHM.glob(f"ftd.{job}.*"))
