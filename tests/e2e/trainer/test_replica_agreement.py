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


def test_a_node_set_to_false_meets_a_node_set_to_true_and_the_job_trains_whole(job, tmp_path):
    """Two DDP ranks, each on a standalone daemon of its own: node 0 says replica_snapshots = true, node
    1 false. Rank 1 still looks for the replicas and takes part in the first snapshot's check (before,
    it did not, and rank 0 waited in the all-gather while rank 1 went on to the next all-reduce): both
    train to the end, neither slices, and the log says why."""
    out = tmp_path / "run"
    out.mkdir()
    on, off = job.daemon(0, "replica_snapshots = true\n"), job.daemon(1, "replica_snapshots = false\n")
    port = str(free_ports(1)[0])
    procs = []
    for rank, daemon in enumerate((on, off)):
        env = job.env(daemon, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(out / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "ftd.examples.gpt_trainer", "--out", str(out),
                                           "--layers", "1", "--dim", "32", "--heads", "2", "--context", "16",
                                           "--batch", "2", "--steps", "4", "--pg-timeout", "30"],
                                          env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        job.procs.append(procs[-1])
    for rank, p in enumerate(procs):
        assert p.wait(90) == 0, (out / f"rank{rank}.log").read_text()[-3000:]
    text = "".join((out / f"rank{rank}.log").read_text() for rank in range(2))
    assert "disagrees on slicing (ranks [0] would, [1] would not" in text, text[-3000:]
    for daemon in (on, off):
        ranks = daemon.status()["ranks"]
        assert ranks and all("replica" not in r for r in ranks), ranks
