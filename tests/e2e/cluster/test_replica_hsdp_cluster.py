"""Replica-aware snapshots of an HSDP job across nodes, as users lay it out: FSDP2 on a (replicate 2,
shard 2) mesh, the shard dimension within a node and the replicate dimension across the two nodes
(torchrun's own c10d agents, one per simulated node, ``--nproc-per-node 2``: ranks 0, 1 on node 0 and
2, 3 on node 1, so replica pairs [0, 2] and [1, 3] each span both nodes). Each rank snapshots half of
its shard's bytes into its own node's daemon; rank 3 is SIGKILLed, torchrun restarts every worker,
and each rank puts its shard together from its own slice and the one its replica's node holds
(fetched over the peer links, ahead of the restore: ``replica_prefetch``). Every loss is compared bit
for bit with an uninterrupted run's."""
from __future__ import annotations

import os
import re

import pytest

from ftd.local.torchrun_job import TorchrunNodes
from ftd.util.procs import wait_for

from support.clusters import LocalCluster
from support.losses import assert_bit_exact
from support.torchrun import SMALL, torchrun

pytestmark = pytest.mark.timeout(420)
LAST = 7  # SMALL trains steps 0..7


def test_hsdp_replicas_on_two_nodes_restore_from_each_others_slices_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    r = torchrun(4, ref, "--mesh", "hsdp", "--style", "stateful", "--no-ftd", env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    run, agents = tmp_path / "run", tmp_path / "agents"
    run.mkdir()
    agents.mkdir()
    c, job = LocalCluster(2, 1, ("--replica-snapshots",)), None
    try:
        job = TorchrunNodes(agents, 2, ["-m", "ftd.examples.fsdp_trainer", "--out", str(run), *SMALL, "--mesh",
                                        "hsdp", "--style", "stateful", "--crash-rank", "3", "--crash-at", "4",
                                        "--no-finish"], nproc=2, max_restarts=1)
        for node in range(2):
            job.start(f"n{node}", c.config(node), f"127.0.0.{node + 1}")
        codes = job.wait(300)
        text = "\n".join(job.log(f"n{n}").read_text(errors="replace") for n in range(2))
        (tmp_path / "agents.log").write_text(text)
        assert codes == {"n0": 0, "n1": 0}, text[-4000:]

        starts = job.starts()
        resumed = {rank: step for _, rank, step in starts if step is not None}
        assert sorted(resumed) == [0, 1, 2, 3] and len(set(resumed.values())) == 1, starts
        assert {(node, rank) for node, rank, _ in starts} == {("n0", 0), ("n0", 1), ("n1", 2), ("n1", 3)}, starts
        assert text.count("replicated state put together from 2 slices") == 4, text[-4000:]
        for rank in range(4):
            assert_bit_exact(run / f"losses-rank{rank}.txt", ref / f"losses-rank{rank}.txt", LAST + 1, f"rank {rank}")

        # each node holds one slice of every shard pair and fetched the other from its peer
        for node in range(2):
            st = wait_for(lambda: c.status(node), 10, f"node {node}'s status")
            replica = {r["rank"]: r["replica"] for r in st["ranks"]}
            assert sorted(replica) == [2 * node, 2 * node + 1], replica
            for rank, info in replica.items():
                assert info["source"] == "DTensor Replicate() on mesh dim 'replicate'", info
                assert info["ranks"] == [rank % 2, rank % 2 + 2], (rank, info)
            fetched = st["replica_versions"]
            assert fetched["fetched_bytes"] > 0 and fetched["prefetches_taken"] >= 1, (node, fetched)
        assert re.search(r"prefetching rank [23]'s slice", (c.dir / "node-0.log").read_text()), "node 0 fetched nothing ahead"
    finally:
        if job is not None:
            job.close()
        left = c.close()
    assert not left, f"shared memory left behind: {left}"
