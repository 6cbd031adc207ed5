"""Replica-aware snapshots across nodes: 2 and 4 nodes x 1 DDP rank, 2 nodes x 2 local ranks (m = 1), each
rank's version holding only its 1/R of the replicated state, so every restore fetches the other node's
slices (and, with 2 local ranks, reads the local replica's from shared memory).

One run of the GPT example, interrupted twice: a worker SIGKILL (both ranks restart on their nodes),
then the loss of node 1 (daemon, trainer and shared memory; its daemon restarts empty and rebuilds its
image from parity). After each, both ranks restore the same step and every loss either rank wrote
equals an uninterrupted run's, bit for bit.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from ftd.util.procs import free_ports, wait_for

from support.clusters import ENV, LocalCluster
from support.losses import assert_bit_exact, read_losses
from support.soak import soak_marks

pytestmark = pytest.mark.timeout(600)

STEPS = 14
MODEL = ["--layers", "1", "--dim", "64", "--heads", "2", "--context", "16", "--batch", "4", "--steps", str(STEPS),
         "--pg-timeout", "20"]
RESUMED = re.compile(r"rank (\d+) pid \d+: resuming after step (\d+)")


NODES = 2  # set per test
WORLD = 2  # set per test: NODES * local ranks


@pytest.fixture
def make_cluster():
    made: list[LocalCluster] = []

    def make(nodes: int) -> LocalCluster:
        made.append(LocalCluster(nodes, 1, ("--replica-snapshots",)))
        return made[-1]

    yield make
    left = [name for c in made for name in c.close()]
    assert not left, f"shared memory left behind: {left}"


def start(c: LocalCluster, out, phase: str, *extra: str, ftd: bool = True) -> list[subprocess.Popen]:
    port = str(free_ports(1)[0])
    procs = []
    local = WORLD // NODES
    for rank in range(WORLD):
        env = dict(ENV, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % local),
                   LOCAL_WORLD_SIZE=str(local), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   FTD_ENDPOINT=c.endpoints[rank // local])
        with open(out / f"{phase}-rank{rank}.log", "ab") as log:
            procs.append(c._popen([sys.executable, "-m", "ftd.examples.gpt_trainer", "--out", str(out), *MODEL,
                                   *extra, *([] if ftd else ["--no-ftd"])], env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
    return procs


def reached(out, step: int) -> bool:
    return all(any(s >= step for s, _ in read_losses(out / f"losses-rank{r}.txt")) for r in range(WORLD))


def stop_all(procs) -> None:
    for p in procs:
        try:
            p.wait(40)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def resumed_steps(out, phase: str) -> dict[int, int]:
    got = {}
    for rank in range(WORLD):
        m = RESUMED.search((out / f"{phase}-rank{rank}.log").read_text())
        assert m, f"rank {rank} did not resume in {phase}:\n{(out / f'{phase}-rank{rank}.log').read_text()[-3000:]}"
        got[rank] = int(m.group(2))
    return got


@pytest.mark.parametrize("nodes,local", [pytest.param(2, 1, id="2x1", marks=soak_marks("the 2x2 and 4x1 cases")),
                                         pytest.param(2, 2, id="2x2"), pytest.param(4, 1, id="4x1")])
def test_ddp_across_nodes_restores_bit_exact_from_slices_after_worker_crash_and_node_loss(make_cluster, tmp_path,
                                                                                          nodes, local, monkeypatch):
    monkeypatch.setitem(globals(), "NODES", nodes)
    monkeypatch.setitem(globals(), "WORLD", nodes * local)
    c = make_cluster(nodes)
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    for p in start(c, ref, "ref", ftd=False):
        assert p.wait(180) == 0, (ref / "ref-rank0.log").read_text()

    first = start(c, run, "first", "--step-sleep", "0.4")
    wait_for(lambda: reached(run, 4) and min(c.recoverable()) >= 2, 120, "a recoverable step >= 2")
    st = c.status(0)
    info = next(r for r in st["ranks"] if r["rank"] == 0)["replica"]
    assert info["ranks"] == list(range(WORLD)) and info["pos"] == 0, info
    first[-1].send_signal(signal.SIGKILL)  # a worker crash: the other ranks fail in gloo
    stop_all(first)

    second = start(c, run, "second", "--step-sleep", "0.4")
    wait_for(lambda: all(p.poll() is None for p in second) and resumed_ok(run, "second"), 120, "both ranks to resume")
    after_crash = resumed_steps(run, "second")
    assert len(set(after_crash.values())) == 1, after_crash
    fetched = c.status(0)["replica_versions"]
    assert fetched["fetched_bytes"] > 0, "rank 0's restore did not fetch node 1's slices"
    assert fetched["prefetches_taken"] >= WORLD - local, f"node 0 did not fetch ahead what rank 0 restores: {fetched}"
    wait_for(lambda: min(c.recoverable()) > after_crash[0] + 1 or any(p.poll() is not None for p in second), 120,
             "a newer recoverable step")
    assert all(p.poll() is None for p in second), "a rank ended before the node loss"
    c.kill_node(1)  # node 1's daemon, its trainers and its shared memory
    stop_all(second)
    c.restart_daemon(1)
    r = c.recover(1)
    assert r.returncode == 0, r.stdout + r.stderr

    third = start(c, run, "third")
    for rank, p in enumerate(third):
        assert p.wait(240) == 0, (run / f"third-rank{rank}.log").read_text()[-3000:]
    after_loss = resumed_steps(run, "third")
    assert len(set(after_loss.values())) == 1 and after_loss[0] > after_crash[0], (after_crash, after_loss)

    for rank in range(WORLD):
        assert_bit_exact(run / f"losses-rank{rank}.txt", ref / f"losses-rank{rank}.txt", STEPS, f"rank {rank}")


def resumed_ok(out, phase: str) -> bool:
    return all(RESUMED.search((out / f"{phase}-rank{r}.log").read_text(errors="replace")) for r in range(WORLD))
