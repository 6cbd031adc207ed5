"""The coordinator's node lost, between rounds and in the middle of one, with real daemons (4 nodes, m = 1,
one tiny_trainer per node snapshotting every step, peer_timeout 5 s).

Node 1 (the lowest live rank) takes over in term 1 within about peer_timeout, with the cluster's
recoverable step rebuilt from the nodes' reports (never the step of the round in flight). Node 0's
daemon, restarted empty, rebuilds from its peers, learns the term and follows; protection goes on
under node 1, every trainer resumes the step node 1 declared, and every loss any trainer wrote equals
an uninterrupted run's bit for bit; exactly one node coordinates.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftd.util.procs import wait_for

from support.clusters import ENV, LocalCluster, assert_matches_reference, reference_losses
from support.soak import soak_only

NODES, PEER_TIMEOUT = 4, 5.0
STEPS = 60


def coordination(c: LocalCluster) -> list[dict | None]:
    return [(c.status(n) or {}).get("cluster", {}).get("coordination") for n in range(c.nodes)]


def wait_for_takeover(c: LocalCluster, lost: int, since: float) -> float:
    """Seconds from ``since`` until node 1 coordinates term 1, past its gathering, and every live node follows."""
    def taken():
        co = (c.status(1) or {}).get("cluster", {}).get("coordinator")
        views = [v for n, v in enumerate(coordination(c)) if n != lost]
        return (co and co["term"] == 1 and co["gathering"] is None
                and all(v and v["term"] == 1 and v["node"] == 1 for v in views))
    wait_for(taken, 8 * PEER_TIMEOUT, "node 1 to take over as the coordinator in term 1")
    return time.monotonic() - since


def rejoin(c: LocalCluster, recoverable: int) -> None:
    """Node 0's daemon starts again, empty: it rebuilds ``recoverable`` from its peers and follows term 1."""
    c.restart_daemon(0)
    r = c.recover(0)
    assert r.returncode == 0 and f"holds step {recoverable}" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: (coordination(c)[0] or {}).get("term") == 1, 10, "node 0 to follow term 1")
    views = coordination(c)
    assert [v["here"] for v in views] == [False, True, False, False], views  # exactly one coordinator
    assert {v["node"] for v in views} == {1}
    # node 0's own coordinator of term 0 (it started one, as node 0 does) was refused and stood down
    assert sum(v["stale_refused"] for v in views) >= 1, views


def finish(c: LocalCluster, ref, resumed_at: int, label: str, took: float) -> None:
    """Every trainer restarts (as torchrun would) and resumes ``resumed_at``; the next recoverable step
    comes under node 1; prints the figures README quotes."""
    started = time.monotonic()
    trainers = c.start_trainers(STEPS)
    wait_for(lambda: c.status(1)["cluster"]["coordinator"]["recoverable"] > resumed_at, 120,
             "a step newer than the one resumed to become recoverable under node 1")
    protected = time.monotonic() - started
    assert c.wait_trainers(trainers) == [resumed_at] * NODES
    assert_matches_reference(c, ref, STEPS)
    after = c.settled()
    co = c.status(1)["cluster"]["coordinator"]
    assert after > resumed_at and co["term"] == 1 and co["recoverable"] == after
    assert c.status(0)["cluster"]["coordinator"] is None
    table = c.ftd("status", "--dir", str(c.dir))
    assert table.returncode == 0 and "coordinator: node 1, term 1" in table.stdout, table.stdout
    for n, says in ((1, "coordinator: node 1, term 1 (this node)"), (0, "coordinator: node 1, term 1, heard")):
        text = c.ftd("status", "--config", c.config(n))
        assert text.returncode == 0 and says in text.stdout, text.stdout + text.stderr
    assert "coordinating: " in c.ftd("status", "--config", c.config(1)).stdout
    print(f"\n[figure] {label}: node 1 coordinated {took:.1f} s after node 0 was lost (peer_timeout "
          f"{PEER_TIMEOUT:g} s); with node 0 back, the trainers restarted: a newer step recoverable "
          f"{protected:.1f} s after they started")


def references(c: LocalCluster):
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(range(c.nodes), pool.map(lambda n: reference_losses(c.dir, n, STEPS), range(c.nodes))))


@soak_only("test_the_coordinators_node_lost_in_the_middle_of_a_round (the takeover, and the round it finds)")
@pytest.mark.timeout(240)
def test_the_coordinators_node_lost_between_rounds():
    c = LocalCluster(NODES, 1, ("--peer-timeout", str(PEER_TIMEOUT)))
    try:
        ref = references(c)
        assert c.run_trainers(20, step_sleep=0.02) == [None] * NODES
        first = c.settled()
        assert first >= 0 and coordination(c)[0]["here"]
        lost_at = time.monotonic()
        c.kill_node(0)
        took = wait_for_takeover(c, 0, lost_at)
        assert took < 3 * PEER_TIMEOUT, f"the takeover took {took:.1f} s"
        assert c.status(1)["cluster"]["coordinator"]["recoverable"] == first
        rejoin(c, first)
        finish(c, ref, first, "between rounds", took)
    finally:
        left = c.close()
    assert not left, f"shared memory left behind: {left}"


@pytest.mark.timeout(240)
def test_the_coordinators_node_lost_in_the_middle_of_a_round(monkeypatch):
    monkeypatch.setitem(ENV, "FTD_DEBUG_PROTECT_DELAY", "2")  # every round stays open 2 s before sending
    c = LocalCluster(NODES, 1, ("--peer-timeout", str(PEER_TIMEOUT)))
    try:
        ref = references(c)
        assert c.run_trainers(8, step_sleep=0.01) == [None] * NODES
        first = c.settled(timeout=90)
        for n in range(NODES):
            c.start_trainer(n, 400, step_sleep=0.02)
        in_round = c.round_in_flight(first)
        lost_at = time.monotonic()
        c.kill_node(0)        # its trainer and daemon die mid-round
        c.kill_trainers()     # the job's other ranks are restarted too, as torchrun would
        took = wait_for_takeover(c, 0, lost_at)
        assert took < 3 * PEER_TIMEOUT, f"the takeover took {took:.1f} s"
        before = c.status(1)["cluster"]["coordinator"]["recoverable"]
        assert first <= before < in_round, "the round in flight must not become recoverable without node 0"
        assert c.recoverable()[1:] == [before] * (NODES - 1)
        rejoin(c, before)
        finish(c, ref, before, "in the middle of a round", took)
    finally:
        left = c.close()
    assert not left, f"shared memory left behind: {left}"
