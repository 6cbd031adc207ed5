"""A test's private ftd job: daemons as real processes (or as threads of the test process), and
trainers as real processes.

Every daemon gets its own job name, so its control socket and its shared-memory segments
(/dev/shm/ftd.<job>.*) are private to the test; ``cleanup`` kills whatever the test left running and
deletes that job's segments (the fixtures in conftest.py call it even when the test failed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from ftd.util.procs import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
SHM = Path("/dev/shm")


def leftovers(job: str) -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"ftd.{job}."))


class DaemonProcess:
    """One `ftd daemon` subprocess of a test's job."""

    def __init__(self, cluster: "LocalJob", node_rank: int, extra: str):
        self.job = cluster
        self.node_rank = node_rank
        self.config_path = cluster.dir / f"node{node_rank}.toml"
        self.config_path.write_text(
            f'job = "{cluster.name}"\nnode_rank = {node_rank}\nruntime_dir = "{cluster.runtime}"\n'
            f'memory_budget = "2GiB"\nmemory_reserve = "64MiB"\nrequest_timeout = 3.0\n{extra}')
        self.socket = cluster.runtime / cluster.name / f"node{node_rank}.sock"
        self.endpoint = f"ipc://{self.socket}"
        self.log_path = cluster.dir / f"daemon{node_rank}-{len(cluster.daemons)}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "DaemonProcess":
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        if wait:
            wait_for(lambda: "serving at" in self.log()[self._log_from:] or self.proc.poll() is not None, 15,
                     "the daemon to serve")
            assert self.proc.poll() is None, f"daemon exited: {self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else 0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def status(self) -> dict:
        """What ``ftd status --json`` says of this daemon."""
        out = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--json", "--config", str(self.config_path)],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


class LocalJob:
    """A test's private ftd job: a work dir, a short runtime dir, daemons and trainers."""

    def __init__(self, tmp_path: Path):
        self.name = f"t{uuid.uuid4().hex[:10]}"
        self.dir = tmp_path
        self.runtime = Path(tempfile.mkdtemp(prefix="ftdt-", dir="/tmp"))
        self.daemons: list[DaemonProcess] = []
        self.procs: list[subprocess.Popen] = []

    def daemon(self, node_rank: int = 0, extra: str = "", start: bool = True) -> DaemonProcess:
        d = DaemonProcess(self, node_rank, extra)
        self.daemons.append(d)
        return d.start() if start else d

    def env(self, daemon: DaemonProcess, **more: str) -> dict:
        env = dict(os.environ, FTD_ENDPOINT=daemon.endpoint, PYTHONPATH=str(ROOT))
        env.pop("RANK", None)
        env.pop("WORLD_SIZE", None)
        env.update(more)
        return env

    def trainer(self, daemon: DaemonProcess | None, losses: Path, steps: int, *args: str,
                env: dict | None = None, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        """A tiny_trainer process; its stderr (ftd's warnings) goes to <losses>.log."""
        cmd = [sys.executable, "-m", "ftd.examples.tiny_trainer", "--steps", str(steps), "--losses", str(losses), *args]
        if daemon is None:
            cmd.append("--no-ftd")
        with open(f"{losses}.log", "ab") as err:
            p = subprocess.Popen(cmd, env=env or (self.env(daemon) if daemon else dict(os.environ)), cwd=ROOT,
                                 stdout=stdout, stderr=err, text=True)
        self.procs.append(p)
        return p

    def cleanup(self) -> list[str]:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in self.daemons:
            d.stop()
        left = leftovers(self.name)
        for name in left:
            (SHM / name).unlink(missing_ok=True)
        for child in sorted(self.runtime.rglob("*"), reverse=True):
            child.unlink() if not child.is_dir() else child.rmdir()
        self.runtime.rmdir()
        return left


class ThreadDaemon:
    """A daemon served from a thread of the test process: fast, for client-level tests."""

    def __init__(self, config):
        from ftd.daemon.server import Daemon
        self.config = config
        self.daemon = Daemon(config)
        self.daemon.start()
        self.thread = threading.Thread(target=self.daemon.serve, daemon=True)
        self.thread.start()
        self.endpoint = config.endpoint
        self.stopped = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.daemon.request_stop()
        self.thread.join(10)
        self.daemon.close()


def start_gpt_ranks(job, daemon, out: Path, phase: str, world: int, *args: str) -> list:
    """``world`` gpt_trainer processes on ``daemon``'s node with the environment torchrun would give them
    (``args``: the model's and the run's options); output to out/<phase>-rank<R>.log. The job's cleanup
    kills whatever still runs at teardown."""
    import subprocess
    import sys

    from ftd.util.procs import free_ports
    port = str(free_ports(1)[0])
    procs = []
    for rank in range(world):
        env = job.env(daemon, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(out / f"{phase}-rank{rank}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "ftd.examples.gpt_trainer", "--out", str(out), *args],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        job.procs.append(p)
        procs.append(p)
    return procs
