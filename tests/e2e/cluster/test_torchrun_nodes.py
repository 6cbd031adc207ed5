"""ftd under torchrun's own elastic agent, as users run it: one ``torchrun --rdzv-backend c10d`` agent per
simulated node (told apart by ``--local-addr``), each node's daemon from ``ftd launch``, a DDP job over
gloo snapshotted every step, every loss compared bit for bit (``float.hex()``) with an uninterrupted run.

c10d gives out ranks in the sorted order of the agents' addresses, so when a lost node's replacement
joins under another address (its agent's, and its daemon's peer endpoint: FTD_PEER_ENDPOINT, or an
``ftd spare`` that waited for a node to be lost), ranks land on other nodes than the ones holding their snapshots: each
such rank's version is fetched from the node that holds it, and every rank restores the same step.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftd.local.torchrun_job import TorchrunNodes
from ftd.util.procs import free_ports, wait_for

from support.clusters import ENV, LocalCluster
from support.jobs import ROOT
from support.losses import read_losses
from support.soak import soak_only

pytestmark = pytest.mark.timeout(300)
STEPS = 24
TRAINER = ["-m", "ftd.examples.gpt_trainer", "--layers", "1", "--dim", "32", "--heads", "2", "--context", "16",
           "--batch", "4", "--steps", str(STEPS), "--pg-timeout", "30"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of the same 3-rank job without ftd, never interrupted."""
    out = tmp_path_factory.mktemp("ref")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--standalone", *TRAINER,
           "--no-ftd", "--out", str(out)]
    r = subprocess.run(cmd, env=dict(ENV, PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    return {rank: dict(read_losses(out / f"losses-rank{rank}.txt")) for rank in range(3)}


def check_bit_exact(out, reference, ranks=3):
    for rank in range(ranks):
        got = read_losses(out / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(range(STEPS)), f"rank {rank} did not run every step"
        bad = [s for s, v in got if v != reference[rank][s]]
        assert not bad, f"rank {rank} differs from the uninterrupted run at steps {bad}"


def recoverable(cluster) -> int:
    return min((s for s in cluster.recoverable() if s is not None), default=-1)


def start_and_crash_a_worker(cluster, job) -> tuple[int, int]:
    """Start the three agents, SIGKILL a worker (torchrun restarts every worker, each restores on its own
    node), train on; return (the step resumed after the crash, a recoverable step to lose a node at)."""
    for node in range(3):
        job.start(f"n{node}", cluster.config(node), f"127.0.0.{node + 1}")
    wait_for(lambda: recoverable(cluster) >= 3, 150, "a recoverable step past 3")
    os.kill(job.worker_pid(1), 9)
    wait_for(lambda: len([s for s in job.starts() if s[2] is not None]) >= 3, 120, "the restart after the crash")
    crash_step = job.starts()[-1][2]
    wait_for(lambda: recoverable(cluster) >= crash_step + 6, 150, "a recoverable step 6 past the crash")
    return crash_step, recoverable(cluster)


def check_restarts(job, crash_step: int, loss_step: int) -> None:
    """Two restarts of every rank: each at one step for all ranks, the second past the node loss."""
    restarts = [s for s in job.starts() if s[2] is not None]
    assert len(restarts) == 6, restarts
    by_step = {}
    for node, rank, step in restarts:
        by_step.setdefault(step, set()).add(rank)
    assert by_step == {crash_step: {0, 1, 2}, max(by_step): {0, 1, 2}} and max(by_step) >= loss_step, restarts


def test_ranks_that_c10d_moves_to_other_nodes_restore_from_the_nodes_that_hold_them(tmp_path, reference):
    cluster = LocalCluster(3, 1)
    out = tmp_path / "out"
    job = TorchrunNodes(tmp_path, 3, [*TRAINER, "--step-sleep", "0.15", "--out", str(out)])
    new = f"tcp://127.0.0.4:{free_ports(1, '127.0.0.4')[0]}"
    try:
        crash_step, loss_step = start_and_crash_a_worker(cluster, job)
        # node 1 is lost; its replacement joins under another address (its daemon's peer endpoint too), so
        # c10d sorts its agent last
        job.kill("n1")
        cluster.kill_node(1)
        cluster.restart_daemon(1, endpoint=new, timeout=90)  # admitted, then rebuilds node 1's snapshot (rank 1)
        assert [cluster.status(n)["cluster"]["membership"]["members"][1]["endpoint"] for n in range(3)] == [new] * 3
        job.start("n1-new", cluster.config(1), "127.0.0.4")
        codes = job.wait(200)
        assert set(codes.values()) == {0}, codes
        check_bit_exact(out, reference)
        check_restarts(job, crash_step, loss_step)
        moved = [r for r in job.restores() if "fetched from node" in r[3]]
        assert {(node, rank) for node, rank, _, _ in moved} == {("n1-new", 2), ("n2", 1)}, job.restores()
        st = cluster.status(2)["cluster"]
        assert st["hosted_ranks"] == [1] and st["moves"]["fetched"][0]["from"] == 1, st["moves"]
        assert cluster.status(1)["cluster"]["hosted_ranks"] == [2]
        shown = cluster.ftd("status", "--config", cluster.config(2)).stdout
        assert "ranks trained here: [1]" in shown and "fetched rank 1's step" in shown, shown
        fetched = st["moves"]["fetched"] + cluster.status(1)["cluster"]["moves"]["fetched"]
        assert sorted((f["rank"], f["from"]) for f in fetched) == [(1, 1), (2, 2)], fetched
        print("moved ranks (rank, from node, bytes, seconds):",  # the figures README quotes (pytest -s)
              [(f["rank"], f["from"], f["bytes"], f["seconds"]) for f in fetched],
              "restores:", job.restores())
        # the moved ranks are protected where they train now: node 2, which holds rank 1 since the move,
        # is lost and rebuilt from its peers' parity of the last step
        final = cluster.settled()
        assert final == STEPS - 1, final
        cluster.kill_node(2)
        cluster.restart_daemon(2)  # ready once its rebuild is over
        st = cluster.status(2)
        assert [(r["rank"], [v["step"] for v in r["versions"]]) for r in st["ranks"]] == [(1, [final])], st["ranks"]
        assert st["cluster"]["recoverable"] == final
    finally:
        try:
            job.close()
        finally:  # the daemons go even if stopping the agents failed (a timeout fired inside it)
            left = cluster.close()
    assert not left, left


@soak_only("test_ranks_that_c10d_moves_to_other_nodes_restore_from_the_nodes_that_hold_them (ranks moved and "
           "fetched after a rebuild), test_membership's spare, test_coordinator_takeover")
def test_the_coordinators_node_lost_and_a_waiting_spare_takes_its_place(tmp_path, reference):
    """Node 0 (the coordinator's) is lost: node 1 takes over, admits the `ftd spare` that waited from the
    start at 127.0.0.4 to rank 0, and the spare rebuilds node 0. c10d sorts the spare's agent last, so
    every rank lands on another node than its snapshot's: rank 0's own holder is the lost node, its
    version is fetched once the spare has rebuilt it."""
    cluster = LocalCluster(3, 1)
    out = tmp_path / "out"
    job = TorchrunNodes(tmp_path, 3, [*TRAINER, "--step-sleep", "0.15", "--out", str(out)])
    new = f"tcp://127.0.0.4:{free_ports(1, '127.0.0.4')[0]}"
    try:
        cluster._popen([sys.executable, "-m", "ftd.cli", "spare", "--config", cluster.config(0), "--peer-endpoint",
                        new, "--name", "spare-0"], stdout=open(tmp_path / "spare.log", "wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: cluster.status(0)["cluster"]["membership"]["spares"] == {"spare-0": new}, 60,
                 "the spare to offer itself")
        crash_step, loss_step = start_and_crash_a_worker(cluster, job)
        job.kill("n0")
        cluster.kill_node(0)
        wait_for(lambda: cluster.ping(0), 150, "the spare to become node 0 and rebuild it")
        assert "admitted as node 0" in (tmp_path / "spare.log").read_text()
        members = [cluster.status(n)["cluster"]["membership"]["members"][0] for n in range(3)]
        assert [(m["endpoint"], m["identity"]) for m in members] == [(new, "spare-0")] * 3, members
        assert cluster.status(1)["cluster"]["coordination"]["term"] > 0  # node 1 took over
        job.start("n0-spare", cluster.config(0), "127.0.0.4")
        codes = job.wait(200)
        assert set(codes.values()) == {0}, codes
        check_bit_exact(out, reference)
        check_restarts(job, crash_step, loss_step)
        moved = {(node, rank) for node, rank, _, where in job.restores() if "fetched from node" in where}
        assert moved == {("n1", 0), ("n2", 1), ("n0-spare", 2)}, job.restores()
    finally:
        try:
            job.close()
        finally:  # the daemons go even if stopping the agents failed (a timeout fired inside it)
            left = cluster.close()
    assert not left, left
