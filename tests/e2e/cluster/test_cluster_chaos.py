"""Chaos on a running cluster: at random moments, lose a whole node, a trainer, or a daemon alone.

A soak test, run with FTD_SOAK=1 (25 failures); CI runs scripts/chaos.py --quick instead
(tests/test_chaos.py), which covers these failures and more, through the node agents. Each failure
lands while every trainer trains and snapshots (so often mid-copy or mid-protection); then the
job restarts as torchrun would: every remaining trainer is killed, a lost node's daemon restarts
and rebuilds, and all trainers start again. Every restart must resume every rank after the same
step, and at the end every loss any trainer ever wrote must equal an uninterrupted run's.
"""
from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ftd.util.procs import wait_for

from support.clusters import LocalCluster, assert_matches_reference, reference_losses
from support.soak import SOAK, soak_only

FAILURES = 25 if SOAK else 4
STEPS_PER_LIFE = 30
FINAL_STEPS = STEPS_PER_LIFE * FAILURES + 40


@soak_only("the short chaos run, tests/e2e/local/test_chaos.py (scripts/chaos.py --quick); FTD_SOAK=1 runs this "
           "one with 25 failures")
@pytest.mark.timeout(1800 if SOAK else 300)
def test_random_failures_while_training_resume_bit_exact():
    seed = int(os.environ.get("FTD_CHAOS_SEED", os.getpid()))
    rng = random.Random(seed)
    c = LocalCluster(4, 1)
    try:
        with ThreadPoolExecutor(2) as pool:
            ref = dict(enumerate(pool.map(lambda n: reference_losses(c.dir, n, FINAL_STEPS), range(c.nodes))))
        kinds = {"node": 0, "trainer": 0, "daemon": 0}
        resumed_at = []
        goal = 0
        for failure in range(FAILURES):
            goal += STEPS_PER_LIFE
            marks = {n: len(c._trainer_out(n)) for n in range(c.nodes)}
            for n in range(c.nodes):
                c.start_trainer(n, goal, step_sleep=0.02)
            for n in range(c.nodes):  # every rank restored (or started) before the failure is injected
                wait_for(lambda: "resuming" in c._trainer_out(n)[marks[n]:] or "fresh" in c._trainer_out(n)[marks[n]:],
                         60, f"trainer {n} to start")
            starts = {c.resumed(n, since=marks[n]) for n in range(c.nodes)}
            assert len(starts) == 1, f"seed {seed}, failure {failure}: ranks resumed after {starts}"
            resumed_at.append(starts.pop())
            time.sleep(rng.uniform(0.1, 1.2))
            kind, victim = rng.choice(["node", "node", "trainer", "daemon"]), rng.randrange(c.nodes)
            kinds[kind] += 1
            if kind == "node":
                c.kill_node(victim)
            elif kind == "daemon":
                os.kill(c.status(victim)["pid"], signal.SIGKILL)
            c.kill_trainers()  # the job restarts: every other rank goes too
            if kind in ("node", "daemon"):
                wait_for(lambda: c.status(victim) is None, 10, f"node {victim}'s daemon to be gone")
                c.restart_daemon(victim)
                r = c.recover(victim)
                assert r.returncode == 0, f"seed {seed}: {r.stdout}{r.stderr}"
        resumed = c.run_trainers(FINAL_STEPS, step_sleep=0.0)
        assert len(set(resumed)) == 1, f"seed {seed}: final restart resumed after {resumed}"
        assert_matches_reference(c, ref, FINAL_STEPS)
        print(f"chaos seed {seed}: failures {kinds}, resumed after {resumed_at + resumed[:1]}")
    finally:
        left = c.close()
    assert not left, f"shared memory left behind: {left}"
