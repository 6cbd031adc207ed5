"""The durable tier of a cluster: every node flushes the same recoverable steps to a shared
directory; when more than m nodes of the group are lost, and when every daemon starts afresh, every
rank restores the newest step flushed by all nodes and goes on bit-exact; a flushed copy that fails
its checksums on one node makes the whole cluster take the step before it."""
from __future__ import annotations

import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftd.durable import ondisk
from ftd.util.procs import wait_for

from support.clusters import LocalCluster, assert_matches_reference, reference_losses
from support.disk import flip_tensor_byte

STEPS = 40


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(3, 1, ("--flush-dir", str(tmp_path / "flush"), "--flush-every", "4", "--flush-interval", "0",
                            "--flush-keep", "3"), distinct_ranks=True)
    yield c
    keep = tmp_path / "cluster-logs"  # the cluster's own directory goes with close()
    keep.mkdir()
    for log in [*c.dir.glob("*.log"), *c.dir.glob("*.out")]:
        shutil.copy(log, keep / log.name)
    left = c.close()
    assert not left, f"shared memory left behind: {left}"


def flushed_by_all(c: LocalCluster, root) -> list[int]:
    """Steps every node flushed completely, newest first, once no flush runs anywhere."""
    sts = [c.status(n) for n in range(c.nodes)]
    if any(s is None or s["flush"]["running"] is not None or s["flush"]["pending"] is not None for s in sts):
        return []
    common = set.intersection(*(set(ondisk.flushed_steps(root, c.job, n)) for n in range(c.nodes)))
    return sorted(common, reverse=True)


@pytest.mark.timeout(600)
def test_more_than_m_losses_and_a_cold_restart_restore_from_disk(cluster, tmp_path):
    c, root = cluster, tmp_path / "flush"
    with ThreadPoolExecutor(c.nodes) as pool:  # the uninterrupted runs, side by side
        ref = dict(zip(range(c.nodes), pool.map(lambda n: reference_losses(c.dir, n, STEPS), range(c.nodes))))
    assert c.run_trainers(14, step_sleep=0.02) == [None] * 3
    c.settled()
    on_disk = wait_for(lambda: flushed_by_all(c, root), 60, "every node to flush a common step")

    # m + 1 = 2 nodes of the group lost: parity cannot rebuild them; every rank takes the disk's step
    c.lose_and_restart([1, 2])
    resumed = c.run_trainers(30, step_sleep=0.05, timeout=240)  # (the restore from disk waits for every node)
    assert resumed == [on_disk[0]] * 3, f"resumed after {resumed}, flushed by all: {on_disk}"
    assert "from the version flushed to disk" in (c.dir / "trainer0.out").read_text()
    # one restore from disk, one new epoch: the rebuilds that failed before it do not count as losses after it
    epoch = c.status(0)["cluster"]["epoch"]
    assert epoch == 1 and len(c.status(0)["cluster"]["coordinator"]["disk_restores"]) == 1
    recoverable = c.settled()
    assert recoverable >= resumed[0] + 4, (f"protection did not go on after the restore from disk: {recoverable}; "
                                           f"{[c.status(n)['cluster'] for n in range(c.nodes)]}"
                                           f"{[c.status(n)['ranks'] for n in range(c.nodes)]}")
    on_disk = wait_for(lambda: (s := flushed_by_all(c, root)) and s[0] > resumed[0] and s, 60,
                       "a flush after the restore from disk")

    # a daemon that dies alone after the restore from disk adopts its memory and joins the new epoch:
    # no second trip to the disk
    os.kill(c.status(2)["pid"], signal.SIGKILL)
    wait_for(lambda: c.status(2) is None, 10, "node 2's daemon to die")
    c.restart_daemon(2)
    st = wait_for(lambda: (s := c.status(2)) and s["cluster"]["epoch"] == epoch and s, 30,
                  f"node 2 to join epoch {epoch}")
    assert st["cluster"]["recoverable"] == recoverable and not st["cluster"]["disk_wait"]
    assert len(c.status(0)["cluster"]["coordinator"]["disk_restores"]) == 1

    # every daemon starts afresh (a power cut); the newest flushed copy of node 1 is corrupt
    flip_tensor_byte(ondisk.step_dir(root, c.job, on_disk[0]), node=1, rank=1)
    c.lose_and_restart([0, 1, 2])
    resumed = c.run_trainers(STEPS, step_sleep=0.02, timeout=240)
    assert resumed == [on_disk[1]] * 3, f"resumed after {resumed}, flushed by all: {on_disk}"
    assert f"flushed step {on_disk[0]} cannot be used" in (c.dir / "node-1.restart.log").read_text()
    assert c.status(0)["cluster"]["coordinator"]["disk_restores"][-1]["step"] == on_disk[1]
    assert_matches_reference(c, ref, STEPS)
