"""`ftd demo` end to end (its short mode): a worker crash and a node loss on a local cluster of
agents, a bit-exact verdict, a report and a plot, and nothing left behind (processes, shared memory,
files), also when interrupted. The 2 nodes x 2 ranks run is the torchrun-style case: several local
ranks share their node's daemon, and a lost node takes both with it."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from support.soak import soak_only

DEMO = [sys.executable, "-m", "ftd.cli", "demo", "--quick"]


def _start(*args: str) -> subprocess.Popen:
    # a session of its own, so the Ctrl-C test can signal the demo's whole process group like a terminal does
    return subprocess.Popen([*DEMO, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo cleans up on SIGTERM
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"ftd demo did not finish within {timeout} s:\n{out}")
    return out


def _assert_nothing_left(out: str) -> None:
    workdir = re.search(r"^work dir: (\S+)", out, re.M).group(1)
    job = re.search(r"job '([\w-]+)'", out)
    if job:
        assert not [p for p in os.listdir("/dev/shm") if job.group(1) in p], "shared memory left behind"
    assert not Path(workdir).exists(), "work dir left behind"
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if workdir in cmdline:
            left.append(cmdline)
    assert not left, f"processes left behind: {left}"


def _check_report(out: str, report_dir: Path, world: int) -> dict:
    report = json.loads((report_dir / "report.json").read_text())
    assert report["bit_exact"] and len(report["ranks"]) == world, out
    assert all(r["bit_exact"] for r in report["ranks"].values()), out
    crash, loss = report["failures"]
    for f in (crash, loss):
        assert f["resumed_after"] is not None and 0 <= f["steps_lost"] <= f["at_step"] + 1, f
    assert crash["resumed_after"] < loss["resumed_after"], "the node loss restored an older step than the crash"
    assert loss["rebuild"]["fetched_bytes"] > 0 and loss["rebuild"]["step"] == loss["resumed_after"]
    assert report["blocked_per_snapshot"]["snapshots"] > 0 and report["protection_lag"]["versions"] > 0
    assert (report_dir / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdict: PASS" in out
    return report


@pytest.mark.timeout(240)
def test_demo_survives_a_worker_crash_and_a_node_loss_bit_exact(tmp_path):
    proc = _start("--out", str(tmp_path))
    out = _finish(proc, timeout=200)
    assert proc.returncode == 0, out
    for rank in range(4):
        assert re.search(rf"rank {rank}: bit-exact: all 24 steps", out), out
    assert "SIGKILL the worker of node 1" in out and "losing node 2" in out, out
    assert len(re.findall(r"<<< every rank restored step \d+ from memory", out)) == 2, out
    report = _check_report(out, tmp_path, world=4)
    assert report["k"] == 3 and report["m"] == 1
    _assert_nothing_left(out)


@soak_only("the demo's main test covers its failures; test_cluster's mirrored pair covers two ranks per node")
@pytest.mark.timeout(240)
def test_two_nodes_of_two_local_ranks_lose_a_node_and_continue_bit_exact(tmp_path):
    proc = _start("--out", str(tmp_path), "--nodes", "2", "--nproc-per-node", "2")
    out = _finish(proc, timeout=200)
    assert proc.returncode == 0, out
    report = _check_report(out, tmp_path, world=4)
    assert report["ranks_per_node"] == 2 and report["nodes"] == 2
    assert re.search(r"killed agent, daemon \(pid \d+\) and worker\(s\) \(pid \d+ \d+\)", out), out
    _assert_nothing_left(out)


@pytest.mark.timeout(180)
def test_demo_cleans_up_on_ctrl_c(tmp_path):
    proc = _start("--out", str(tmp_path))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "training: DDP over gloo" in line:  # agents, daemons, workers and shared memory all live
            break
    else:
        pytest.fail("the demo ended before its ftd run started:\n" + "".join(lines))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out = "".join(lines) + _finish(proc, timeout=90)
    assert proc.returncode == 130, out
    assert "interrupted; stopping everything" in out and "no shared memory left" in out, out
    _assert_nothing_left(out)


def test_demo_refuses_failures_in_the_wrong_order():
    r = subprocess.run([*DEMO, "--crash-at", "20", "--lose-at", "10"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--crash-at (20) < --lose-at (10)" in r.stderr
