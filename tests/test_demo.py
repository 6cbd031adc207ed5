"""`ftd demo` end to end: a bit-exact verdict, and nothing left behind (processes, shared memory, files)."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

DEMO = [sys.executable, "-m", "ftd.cli", "demo"]


def _start(*args: str) -> subprocess.Popen:
    # a session of its own, so the Ctrl-C test can signal the demo's whole process group like a terminal does
    return subprocess.Popen([*DEMO, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo cleans up on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"ftd demo did not finish within {timeout} s:\n{out}")
    return out


def _assert_nothing_left(out: str) -> None:
    job = re.search(r"node daemon for job '([\w-]+)'", out).group(1)
    workdir = re.search(r"^work dir: (\S+)", out, re.M).group(1)
    socket_dir = re.search(r"serving at ipc://(\S+)/[\w-]+/node0\.sock", out).group(1)
    assert not [p for p in os.listdir("/dev/shm") if job in p], "shared memory left behind"
    assert "removing leftover shared memory" not in out, "the daemon did not release its shared memory itself"
    assert not Path(workdir).exists() and not Path(socket_dir).exists(), "temporary directories left behind"
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if workdir in cmdline or job in cmdline:
            left.append(cmdline)
    assert not left, f"processes left behind: {left}"


@pytest.mark.timeout(180)
def test_demo_resumes_bit_exact_and_cleans_up():
    proc = _start("--steps", "30")
    out = _finish(proc, timeout=150)
    assert proc.returncode == 0, out
    assert "bit-exact: all 30 steps match the uninterrupted run" in out, out
    assert "will SIGKILL the trainer at step 20" in out
    assert re.search(r"resuming after step \d+", out), out
    _assert_nothing_left(out)


@pytest.mark.timeout(180)
def test_demo_cleans_up_on_ctrl_c():
    proc = _start("--steps", "200")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "trainer | step    3 " in line:  # the ftd run is under way: daemon, shared memory, trainer all live
            break
    else:
        pytest.fail("the demo ended before its ftd run started:\n" + "".join(lines))
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out = "".join(lines) + _finish(proc, timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted; cleaning up" in out
    _assert_nothing_left(out)


# ---- the verdict, without processes ------------------------------------------------------------------
def _losses(values: dict[int, float]) -> list[tuple[int, str]]:
    return [(step, value.hex()) for step, value in values.items()]


def test_verify_accepts_reruns_that_match():
    from ftd.demo import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    ok, verdict = verify(ref, ref[:2] + ref[1:], steps=3)
    assert ok and verdict.startswith("bit-exact: all 3 steps match") and "1 step ran twice" in verdict


def test_verify_rejects_a_rerun_off_by_one_ulp():
    from ftd.demo import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    rerun = (1, math.nextafter(0.5, 1.0).hex())
    ok, verdict = verify(ref, ref[:2] + [rerun] + ref[2:], steps=3)
    assert not ok and verdict.startswith("MISMATCH at step 1")


def test_verify_rejects_missing_steps_and_malformed_lines():
    from ftd.demo import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    ok, verdict = verify(ref, [ref[0], ref[2]], steps=3)
    assert not ok and "no loss for step(s) 1" in verdict
    ok, verdict = verify(ref, ref + [(-1, "garbage")], steps=3)
    assert not ok and "unexpected line" in verdict
