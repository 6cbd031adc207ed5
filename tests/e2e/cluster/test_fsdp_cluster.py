"""A 4-node cluster (parity 1) whose ranks are FSDP2 shards, one rank per node: node 2 is lost
(daemon, trainer and shared memory), the other ranks fail in their next collective, every rank is
started again, node 2's new daemon rebuilds rank 2's shards from its peers' memory, and every loss
equals an uninterrupted run's, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftd.util.procs import free_ports, wait_for

from support.clusters import ENV, LocalCluster
from support.losses import read_losses
from support.torchrun import torchrun

pytestmark = pytest.mark.timeout(300)
NODES, STEPS = 4, 14
SIZE = ("--dim", "32", "--layers", "2", "--steps", str(STEPS))


def start_ranks(cluster: LocalCluster, out, *extra: str) -> list[subprocess.Popen]:
    """Rank n on node n: one process per node, as a launcher on each host would start it."""
    port = free_ports(1)[0]
    procs = []
    for rank in range(NODES):
        env = dict(ENV, FTD_ENDPOINT=cluster.endpoints[rank], MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(rank), WORLD_SIZE=str(NODES), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        log = open(out / f"rank{rank}.log", "ab")
        procs.append(cluster._popen([sys.executable, "-m", "ftd.examples.fsdp_trainer", "--out", str(out), *SIZE,
                                     "--no-finish", *extra], env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_a_lost_node_of_an_fsdp_job_is_rebuilt_from_its_peers_and_resumes_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    r = torchrun(NODES, ref, "--no-ftd", env=dict(os.environ), small=SIZE)
    assert r.returncode == 0, r.stderr[-3000:]
    cluster = LocalCluster(NODES, 1)
    try:
        run = tmp_path / "run"
        run.mkdir()
        first = start_ranks(cluster, run, "--step-sleep", "0.3")
        wait_for(lambda: (cluster.recoverable()[0] or -1) >= 5, 120, "a recoverable step past 5")
        cluster.kill_node(2)
        for p in first:
            p.wait(90)  # the others fail in their next collective (their peer is gone)
        cluster.restart_daemon(2)  # empty: rebuilds rank 2 from the peers' data and parity
        recoverable = cluster.settled()
        second = start_ranks(cluster, run)
        assert [p.wait(120) for p in second] == [0] * NODES, (run / "rank0.log").read_text()[-3000:]
        logs = [(run / f"rank{n}.log").read_text() for n in range(NODES)]
        resumed = {line.rsplit(" ", 1)[1] for text in logs for line in text.splitlines() if "resuming after" in line}
        assert resumed == {str(recoverable)}, resumed
        assert "restored step" in logs[2] and "from memory" in logs[2]
        rebuilt = (cluster.dir / "node-2.restart.log").read_text()
        assert f"rebuild of step {recoverable} done" in rebuilt, rebuilt[-2000:]
        for rank in range(NODES):
            want = dict(read_losses(ref / f"losses-rank{rank}.txt"))
            got = read_losses(run / f"losses-rank{rank}.txt")
            assert {s for s, _ in got} == set(range(STEPS)), rank
            assert all(value == want[step] for step, value in got), f"rank {rank} differs from the uninterrupted run"
    finally:
        left = cluster.close()
    assert not left, left
