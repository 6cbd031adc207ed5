"""`ftd agent` as a process: bounded restarts with backoff, its daemon, and bad input.
(The demo tests run agents through a worker crash and a node loss.)"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftd.util.procs import wait_for

from support.jobs import ROOT, SHM

pytestmark = pytest.mark.timeout(90)
AGENT = [sys.executable, "-m", "ftd.cli", "agent"]




def _agent(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT, "--config", str(config), "--log-dir", str(config.parent / "logs"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_a_failing_worker_is_restarted_at_once_then_with_backoff_then_given_up(node_config):
    config, job = node_config
    t0 = time.monotonic()
    r = _agent(config, "--max-restarts", "2", "--backoff", "0.3", "--nproc-per-node", "2", "--",
               sys.executable, "-c", "import os, sys; print('rank', os.environ['RANK'], os.environ['FTD_CONFIG']); "
                                     "sys.exit(3 if os.environ['RANK'] == '1' else 0)")
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    starts = re.findall(r"generation (\d): started 2 worker\(s\), ranks 0-1", r.stdout)
    assert starts == ["0", "1", "2"], r.stdout
    # the first restart is immediate; the second in a row of generations that trained nothing backs off
    assert "restart 1 of at most 2 in 0.0 s (after" in r.stdout, r.stdout
    assert "restart 2 of at most 2 in 0.3 s (failure 2 in a row of a crash loop)" in r.stdout, r.stdout
    assert "not restarting again: 3 failures, more than --max-restarts 2" in r.stdout
    assert "worker rank 1" in r.stdout and "exited with status 3" in r.stdout
    assert "from warm standbys" not in r.stdout, "`python -c` is not a module or script: it must start plainly"
    assert elapsed >= 0.3, "the backoff was not waited"
    assert "stopped the daemon" in r.stdout and not list(SHM.glob(f"ftd.{job}.*"))
    log = (config.parent / "logs" / "rank1.log").read_text()
    assert log.count(f"rank 1 {config}") == 3 and "=== ftd agent: generation 2, rank 1 ===" in log


def _procs_naming(directory: Path) -> list[str]:
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(directory) in cmdline and p.pid != os.getpid() and "pytest" not in cmdline:
            found.append(f"{p.pid} {cmdline[:120]}")
    return found


@pytest.mark.parametrize("standby", [True, False], ids=["standby", "no-standby"])
def test_workers_start_from_warm_standbys_and_sigterm_stops_everything(node_config, standby):
    import signal

    from ftd.util import timeline
    config, job = node_config
    logs = config.parent / "logs"
    script = config.parent / "train.py"
    script.write_text("import os, time\nprint('worker', os.environ['RANK'], 'pid', os.getpid(), flush=True)\n"
                      "time.sleep(120)\n")
    agent = subprocess.Popen([*AGENT, "--config", str(config), "--log-dir", str(logs), "--nproc-per-node", "2",
                              *([] if standby else ["--no-standby"]), "--", sys.executable, str(script)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        def both_running():
            return all("worker" in (logs / f"rank{r}.log").read_text() for r in (0, 1)
                       if (logs / f"rank{r}.log").exists()) and len(list(logs.glob("rank*.log"))) == 2
        wait_for(both_running, 60, "both workers to run")
        ready = lambda: sum(e["event"] == "standby_ready" for e in timeline.read(logs / "timeline.jsonl"))  # noqa: E731
        if standby:  # generation 0 ran on the first two standbys; two more wait for the next generation
            wait_for(lambda: ready() >= 4, 60, "the next standbys to import torch")
            assert len(_procs_naming(config.parent)) >= 5, _procs_naming(config.parent)  # agent, 2 workers, 2 standbys
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 128 + signal.SIGTERM, out
    assert ("2 from warm standbys" in out) == standby, out
    assert "stopping on SIGTERM" in out and "stopped the daemon" in out, out
    if not standby:
        assert ready() == 0, "--no-standby started standbys"
    wait_for(lambda: not _procs_naming(config.parent), 10, "every worker and standby to be gone")
    assert not list(SHM.glob(f"ftd.{job}.*"))


def test_workers_that_succeed_end_the_job_and_a_running_daemon_is_kept(node_config):
    config, job = node_config
    daemon = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        socket = config.parent / "run" / job / "node0.sock"
        deadline = time.monotonic() + 30
        while not socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = _agent(config, "--keep-daemon", "--", sys.executable, "-c", "print('hello')")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "using the daemon already serving" in r.stdout and "the job finished on every node" in r.stdout
        assert daemon.poll() is None, "the agent stopped a daemon it did not start"
    finally:
        daemon.terminate()
        daemon.wait(30)


def test_agent_bad_input_says_what_to_do(node_config):
    config, _ = node_config
    r = _agent(config)
    assert r.returncode == 2 and "give the training command after --" in r.stderr
    r = _agent(config, "--nnodes", "2", "--", "true")
    assert r.returncode == 2 and "2 nodes need --rdzv-endpoint HOST:PORT" in r.stderr
    r = _agent(config, "--nnodes", "2", "--rdzv-endpoint", "node0", "--", "true")
    assert r.returncode == 2 and "must be HOST:PORT" in r.stderr
    r = subprocess.run([*AGENT, "--config", str(config.parent / "missing.toml"), "--", "true"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_job_store_serves_the_agents_apart_from_node_0():
    import signal

    from ftd.agent.jobstore import JobStore, tcp_kv
    proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "job-store", "--port", "0", "--host", "127.0.0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"on 127\.0\.0\.1:(\d+);", line).group(1))
        assert "--rdzv-external" in line
        store = JobStore(tcp_kv("127.0.0.1", port, host_it=False, timeout=10), 2)
        assert store.generation() == 0 and store.end_generation(0, "node 0 lost") == 1
        assert JobStore(tcp_kv("127.0.0.1", port, host_it=False, timeout=10), 2).why(0) == "node 0 lost"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
