"""Runs that end and runs that start on a cluster: a rerun of a finished run starts afresh on every node
(memory and flushed versions), and a node that once could not be rebuilt stops being refused once the
cluster is whole again."""
from __future__ import annotations

import signal
import tempfile
from pathlib import Path

import psutil
import pytest

from ftd.local.daemons import find_daemons
from ftd.util.procs import wait_for

from support.clusters import LocalCluster
from support.jobs import SHM

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def flush_dir():
    with tempfile.TemporaryDirectory(prefix="ftdr-", dir="/tmp") as d:
        yield Path(d)


def test_a_rerun_of_a_finished_run_starts_afresh_on_every_node_and_drops_its_flushed_versions(flush_dir):
    c = LocalCluster(3, 1, extra_args=("--flush-dir", str(flush_dir), "--flush-every", "2"), distinct_ranks=True)
    try:
        assert c.run_trainers(8, extra=("--finish",)) == [None, None, None]
        wait_for(lambda: all((c.status(n) or {}).get("cluster", {}).get("run_finished") for n in range(3)), 30,
                 "every node to learn that the run finished")
        job_dir = flush_dir / c.job
        wait_for(lambda: len(list(job_dir.glob("step-*/ftd-export-node*.json"))) == 3, 60,
                 "a version flushed by every node")
        old = {p: p.stat().st_mtime_ns for p in job_dir.glob("step-*/ftd-export-node*.json")}
        epoch = c.status(0)["cluster"]["epoch"]
        assert c.run_trainers(8) == [None, None, None]                # a rerun: fresh everywhere, from step 0
        st = [c.status(n)["cluster"] for n in range(3)]
        assert all(s["epoch"] == epoch + 1 and not s["run_finished"] for s in st)
        out = "".join(c._trainer_out(n) for n in range(3))
        assert "previous run finished" in out
        log = "".join((c.dir / f"node-{n}.log").read_text() for n in range(3))
        assert log.count("dropped the previous run") == 3 and "removed this node's flushed versions of steps" in log
        assert not [p for p, t in old.items() if p.exists() and p.stat().st_mtime_ns == t]  # none of the old run
        step = c.settled(timeout=60)
        assert step >= 0                                              # the new run is protected again
        assert c.run_trainers(12) == [step, step, step]               # and a rerun now resumes it
    finally:
        c.close()


def test_a_node_that_could_not_be_rebuilt_is_not_refused_once_the_cluster_is_whole(tmp_path):
    """Nodes 1 and 2 of a 3-node cluster (m = 1) go down at once, 2 with its memory intact (a daemon
    crash), 1 with everything (a node loss). Node 1 comes back first and cannot be rebuilt, and says so;
    then node 2 comes back, adopts its memory, and node 1 rebuilds. Node 0 heard "lost" meanwhile: it
    used to refuse restores ("group 0 lost 2 nodes") until `ftd recover`."""
    c = LocalCluster(3, 1)
    try:
        assert c.run_trainers(6) == [None, None, None]
        step = c.settled()
        daemon2 = list(find_daemons([Path(c.config(2))]))
        c.kill_node(1)
        for pid in daemon2:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        wait_for(lambda: c.status(2) is None, 10, "node 2's daemon to be gone")
        assert [p for p in SHM.iterdir() if p.name.startswith(f"ftd.{c.job}.n2.")]   # its memory stays
        c.restart_daemon(1)
        wait_for(lambda: (c.status(1)["cluster"].get("last_rebuild") or {}).get("ok") is False, 60,
                 "node 1's rebuild to fail while node 2 is away")
        wait_for(lambda: c.status(0)["cluster"]["lost_error"], 20, "node 0 to hear that node 1 is lost")
        c.restart_daemon(2)
        wait_for(lambda: c.status(1)["cluster"]["recoverable"] == step, 90, "node 1 to rebuild")
        wait_for(lambda: not c.status(0)["cluster"]["lost_error"], 20, "node 0 to drop the stale loss")
        assert c.run_trainers(10) == [step, step, step]
    finally:
        c.close()
