"""The agreement check of replica-aware snapshots with two real gloo ranks: ranks that decide
differently whether to slice (another replica_snapshots setting, the "auto" size threshold on another
ftd version) still meet in the one collective, and none slices; replicas that hold different tensors
are refused by name."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftd.util.procs import free_ports

from support.jobs import ROOT

pytestmark = pytest.mark.timeout(120)

RANK = """
import os, sys, torch, torch.distributed as dist
from ftd.trainer.replicas import ReplicaMismatch, ReplicaSet, check_agreement
rank, want, width = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
dist.init_process_group("gloo", rank=rank, world_size=2)
rs = ReplicaSet((0, 1), rank, "test", dist.group.WORLD)
try:
    print("agreed", check_agreement(rs, [("float32", (width,))], ["state['model']['w']"], want), flush=True)
except ReplicaMismatch as e:
    print("mismatch", e, flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # (torch 2.13's gloo can abort in the interpreter's teardown: see ftd/examples/fsdp_trainer.py)
"""


def run_pair(wants: tuple[bool, bool], widths: tuple[int, int] = (4, 4)) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]))
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(int(wants[r])), str(widths[r])], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank is stuck in the agreement check") from None
        assert p.returncode == 0, text
        out.append(text)
    return out


def test_ranks_that_decide_differently_meet_in_the_check_and_none_slices():
    first, second = run_pair((True, False))
    assert "agreed False" in first and "agreed False" in second, (first, second)
    assert "disagrees on slicing (ranks [0] would, [1] would not" in first + second
    first, second = run_pair((True, True))
    assert "agreed True" in first and "agreed True" in second, (first, second)


def test_replicas_holding_other_tensors_are_refused_by_name():
    first, second = run_pair((True, True), widths=(4, 5))
    for text in (first, second):
        assert "mismatch" in text and "state['model']['w']" in text, text
