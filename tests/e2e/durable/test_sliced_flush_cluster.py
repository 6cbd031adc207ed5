"""The flush of replica-aware snapshots across nodes: 2 nodes x 1 DDP rank (m = 1), each node flushing
its rank's slice into a shared directory; then both nodes are lost at once (more than m: parity
cannot help), the cluster restores from disk, each rank fetches the other node's slice of the step
loaded from disk, and every loss equals an uninterrupted run's, bit for bit."""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from ftd.durable import ondisk
from ftd.util.procs import free_ports, wait_for

from support.clusters import ENV, LocalCluster
from support.losses import read_losses

pytestmark = pytest.mark.timeout(600)
STEPS, WORLD = 12, 2
MODEL = ["--layers", "1", "--dim", "64", "--heads", "2", "--context", "16", "--batch", "4", "--steps", str(STEPS),
         "--pg-timeout", "20"]
RESUMED = re.compile(r"rank (\d+) pid \d+: resuming after step (\d+)")


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(2, 1, ("--replica-snapshots", "--flush-dir", str(tmp_path / "flush"), "--flush-every", "2",
                            "--flush-interval", "0", "--flush-keep", "3"))
    yield c
    left = c.close()
    assert not left, f"shared memory left behind: {left}"


def start(c: LocalCluster, out, phase: str, *extra: str, ftd: bool = True) -> list[subprocess.Popen]:
    port = str(free_ports(1)[0])
    procs = []
    for rank in range(WORLD):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, FTD_ENDPOINT=c.endpoints[rank])
        with open(out / f"{phase}-rank{rank}.log", "ab") as log:
            procs.append(c._popen([sys.executable, "-m", "ftd.examples.gpt_trainer", "--out", str(out), *MODEL,
                                   *extra, *([] if ftd else ["--no-ftd"])], env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
    return procs


def flushed_by_both(c: LocalCluster, root) -> list[int]:
    sts = [c.status(n) for n in range(c.nodes)]
    if any(s is None or s["flush"]["running"] is not None for s in sts):
        return []
    return sorted(set(ondisk.flushed_steps(root, c.job, 0)) & set(ondisk.flushed_steps(root, c.job, 1)), reverse=True)


def test_two_nodes_lost_restore_sliced_ranks_from_disk_bit_exact(cluster, tmp_path):
    c, root = cluster, tmp_path / "flush"
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    for p in start(c, ref, "ref", ftd=False):
        assert p.wait(180) == 0, (ref / "ref-rank0.log").read_text()

    first = start(c, run, "first", "--step-sleep", "0.4")
    on_disk = wait_for(lambda: (s := flushed_by_both(c, root)) and s[0] >= 2 and s, 180, "both nodes to flush a step")
    for p in first:
        p.send_signal(signal.SIGKILL)
        p.wait()
    on_disk = wait_for(lambda: flushed_by_both(c, root), 60, "the flushes to finish")
    assert next(r for r in c.status(0)["ranks"] if r["rank"] == 0)["replica"]["ranks"] == [0, 1]
    assert on_disk[0] < STEPS - 1, "the run ended before the kill"
    c.lose_and_restart([0, 1])  # every daemon afresh: only the disk holds the state

    second = start(c, run, "second")
    for rank, p in enumerate(second):
        assert p.wait(240) == 0, (run / f"second-rank{rank}.log").read_text()[-3000:]
    for rank in range(WORLD):
        log = (run / f"second-rank{rank}.log").read_text()
        m = RESUMED.search(log)
        assert m and int(m.group(2)) == on_disk[0], f"rank {rank} resumed {m and m.group(2)}, flushed {on_disk}"
        assert (f"rank {rank} restored step {on_disk[0]} from the version flushed to disk" in log
                and "replicated state put together from 2 slices" in log), log[-3000:]
        expected = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        assert sorted(expected) == list(range(STEPS))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(range(STEPS)), f"rank {rank} did not reach every step"
        for step, value in got:
            assert value == expected[step], f"rank {rank} step {step}: loss {value} differs from the reference's"
    assert c.status(0)["cluster"]["coordinator"]["disk_restores"], "the cluster did not restore from disk"
