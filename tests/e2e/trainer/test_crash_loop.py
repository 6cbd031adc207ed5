"""Real processes, real SIGKILLs: a trainer killed again and again (its copies slowed, so that the
trainer thread helps the copier and many kills land mid-copy), and a daemon killed under a trainer.

The crash loop is a soak test: CI runs its short mode (12 kills); FTD_SOAK=1 runs 100.
"""
import json
import os
import random
import signal
import subprocess
import time

import pytest
import zmq

from ftd.util.procs import wait_for

from support.losses import assert_bit_exact, read_losses
from support.soak import SOAK

TAIL = 30  # steps the crash loop's last life runs at least


def daemon_status(endpoint: str) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send(b'{"v":1,"type":"status"}')
    assert s.poll(5000), "daemon did not answer"
    reply = json.loads(s.recv())
    s.close()
    return reply


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The trainer's first stdout line: 'starting fresh' or 'resuming after step N'."""
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()
    assert time.monotonic() < deadline and line, "trainer printed nothing"
    return line


@pytest.mark.soak
@pytest.mark.timeout(900 if SOAK else 240)
def test_trainer_sigkilled_at_random_moments_resumes_bit_exact(job):
    kills = 100 if SOAK else 12
    steps = 600 if SOAK else 100
    rnd = random.Random(int(os.environ.get("FTD_SEED", "20261127")))
    ref = job.dir / "ref.txt"
    assert job.trainer(None, ref, steps).wait(120) == 0
    # small checksum chunks and a per-chunk pause make each copy last tens of ms, so that many kills
    # land in the middle of one, and others between copies
    d = job.daemon(extra='chunk_size = "64KiB"\n')
    env = job.env(d, FTD_DEBUG_COPY_DELAY="0.001")
    losses = job.dir / "run.txt"
    restored, mid_copy, killed = [], 0, 0
    stats = job.dir / "stats.json"
    cap = steps - TAIL
    while True:
        # the last life runs to the end, from TAIL steps before it at least, so that its --stats cover
        # steps whose copies the trainer thread helped with: the lives before it stop at `cap` (a life
        # can take 25 steps before its kill, and one that ended the run left the last none to take)
        last = killed == kills or max((s for s, _ in read_losses(losses)), default=-1) >= cap - 1
        p = job.trainer(d, losses, steps if last else cap, *(("--stats", str(stats)) if last else ()), env=env,
                        stdout=subprocess.PIPE)
        line = first_line(p, 60)
        if "resuming after step" in line:
            restored.append(int(line.split()[-1]))
        else:
            assert not restored, f"restart {killed} found nothing to restore: {line!r}"
        if last:
            assert p.wait(180) == 0, (job.dir / "run.txt.log").read_text()[-2000:]
            break
        time.sleep(rnd.uniform(0.0, 0.3))
        if p.poll() is not None:  # it reached `cap` first, and closed: the next life resumes after it
            assert p.returncode == 0, (job.dir / "run.txt.log").read_text()[-2000:]
            p.stdout.close()
            continue
        # asked just before the kill: once the daemon has seen the death it may already have let go of
        # the half-written buffer
        writing = any(r["writing"] for r in daemon_status(d.endpoint)["ranks"])
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        killed += 1
        mid_copy += writing
    assert killed >= kills // 2, f"only {killed} kills before the run neared its end"
    assert restored == sorted(restored), "a restart restored an older step than the one before it"
    assert len(restored) >= killed - 2, f"only {len(restored)} of {killed} restarts restored a snapshot"
    assert 3 <= mid_copy, f"only {mid_copy} of {killed} kills landed in the middle of a copy"
    assert_bit_exact(losses, ref, steps)
    # the slowed copies outlast a step, so the trainer thread copies chunks beside the copier (the
    # killed lives ran the same way, and every restore of theirs above was bit-exact)
    counters = json.loads(stats.read_text())
    print("last life's counters", {k: v for k, v in counters.items() if not isinstance(v, (dict, list))})
    assert counters["helped_chunks"] > 0, counters
    rerun = len(read_losses(losses)) - steps
    print(f"{killed} kills, {mid_copy} mid-copy, {len(restored)} restores, {rerun} steps re-run")


@pytest.mark.timeout(180)
def test_daemon_killed_under_a_running_trainer(job):
    steps = 120
    ref = job.dir / "ref.txt"
    assert job.trainer(None, ref, steps).wait(120) == 0
    d = job.daemon()
    losses = job.dir / "run.txt"
    p = job.trainer(d, losses, steps, "--step-sleep", "0.05")
    wait_for(lambda: len(read_losses(losses)) >= 15, 60, "the trainer to take 15 steps")
    d.kill()                                           # the daemon dies; the trainer must not
    killed_at = len(read_losses(losses))
    wait_for(lambda: len(read_losses(losses)) >= killed_at + 10, 60, "training to go on without a daemon")
    assert p.poll() is None
    d2 = job.daemon()                                 # a new daemon adopts what the old one held
    assert "adopted 1 version(s)" in d2.log() or "adopted 2 version(s)" in d2.log()
    # the trainer re-registers by itself and snapshots again
    wait_for(lambda: any(v["step"] > killed_at + 10 for r in daemon_status(d2.endpoint)["ranks"]
                         for v in r["versions"]), 30, "snapshots to resume with the new daemon")
    p.send_signal(signal.SIGKILL)                      # and a crash after that still restores
    p.wait()
    log = (job.dir / "run.txt.log").read_text()
    assert "training continues" in log and "snapshots work again" in log
    p2 = job.trainer(d2, losses, steps, stdout=subprocess.PIPE)
    line = first_line(p2, 60)
    assert "resuming after step" in line and int(line.split()[-1]) > killed_at + 10
    assert p2.wait(120) == 0
    assert_bit_exact(losses, ref, steps)
