"""A job of ``ftd agent``s on this machine: one agent per simulated node, and what it takes to lose one.

The demo and the chaos script run the same thing a scheduler would: per node, an agent that runs the
node's daemon and workers, all on localhost with their own ports, sockets and shared-memory
namespace. This module starts them, follows the workers' logs and the daemons' status, loses
nodes the way a real loss does, and stops everything, whatever state it is in.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ftd.agent.plan import worker_env
from ftd.control.connection import status_or_none
from ftd.local.configs import CLUSTER_FILE, config_path, write_configs
from ftd.local.killnode import kill_node
from ftd.util.procs import free_ports, kill_everything_from, log_tail, stop_process_group

STATUS_EVERY = 0.5         # seconds between status polls of the daemons
AGENT_ARGS = ("--max-restarts", "3", "--backoff", "0.5", "--join-timeout", "120")

_STEP = re.compile(r"^step\s+(\d+)\s+loss\s+(\S+)")
_START = re.compile(r"^rank (\d+) pid (\d+): (?:resuming after step (\d+)|starting fresh)")
_GENERATION = re.compile(r"^=== ftd agent: generation (\d+)")


# ---- following the workers' logs -----------------------------------------------------------------
class RankLog:
    """What one rank's log (written by its agent, appended across generations) has said so far."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.generation = -1
        self.pid: int | None = None
        self.last_step = -1
        self.last_loss: str | None = None
        self.resumed: dict[int, int | None] = {}   # generation -> step resumed after (None: fresh)
        self.reached: dict[int, int] = {}          # generation -> last step it finished
        self.points: list[tuple[int, int, float]] = []  # (generation, step, loss as printed), for the plot

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data.decode(errors="replace")).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if m := _GENERATION.match(line):
                self.generation, self.pid = int(m.group(1)), None
            elif m := _START.match(line):
                self.pid = int(m.group(2))
                self.resumed[self.generation] = int(m.group(3)) if m.group(3) else None
            elif m := _STEP.match(line):
                self.last_step, self.last_loss = int(m.group(1)), m.group(2)
                self.reached[self.generation] = self.last_step
                self.points.append((self.generation, self.last_step, float(self.last_loss)))


# ---- the simulated cluster ------------------------------------------------------------------------
def common_resume(logs: list[RankLog]) -> int:
    """The step every rank resumed after in its current generation; ValueError if they differ or
    any started afresh (then the restart would not be bit-exact)."""
    steps = {log.resumed.get(log.generation) for log in logs}
    if len(steps) != 1 or None in steps:
        raise ValueError(f"the ranks resumed after different steps or started fresh: {sorted(steps, key=str)}")
    return steps.pop()


def reached(logs: list[RankLog], generation: int) -> int:
    """The furthest step any rank finished in ``generation`` (-1 if none)."""
    return max(log.reached.get(generation, -1) for log in logs)


class AgentCluster:
    """Configs for ``nodes`` nodes in ``workdir``, one agent per node running ``trainer`` on ``nproc`` ranks."""

    def __init__(self, nodes: int, parity: int, nproc: int, workdir: Path, trainer: list[str], *,
                 job_prefix: str = "job", memory_budget: str = "1GiB", config: dict | None = None,
                 external_store: bool = False,
                 agent_args: tuple[str, ...] = AGENT_ARGS):
        self.nodes, self.parity, self.nproc, self.dir, self.trainer = nodes, parity, nproc, workdir, trainer
        self.agent_args = agent_args
        self.job = f"{job_prefix}-{secrets.token_hex(3)}"
        ports = free_ports(nodes + 1)
        self.configs = write_configs(nodes, parity, workdir, job=self.job, group_size=0, memory_budget=memory_budget,
                                     ports=ports[:-1], extra={"round_timeout": 30.0, **(config or {})})
        self.rdzv = f"127.0.0.1:{ports[-1]}"
        self.store = None
        if external_store:  # served by this process, so that any node, node 0 included, may be lost
            from ftd.agent.jobstore import tcp_kv
            self.store = tcp_kv("127.0.0.1", ports[-1], host_it=True, timeout=60)
            self.agent_args = (*agent_args, "--rdzv-external")
        record = {"job": self.job, "nodes": nodes, "parity": parity, "launcher_pid": os.getpid(),
                  "members": [{"node_rank": c.node_rank, "endpoint": c.endpoint, "pid": None,
                               "config": str(config_path(workdir, c.node_rank))} for c in self.configs]}
        (workdir / CLUSTER_FILE).write_text(json.dumps(record, indent=2))  # what `ftd kill-node` reads
        self.agents: dict[int, subprocess.Popen] = {}
        self.retired: list[subprocess.Popen] = []

    def agent_cmd(self, node: int) -> list[str]:
        return [sys.executable, "-m", "ftd.cli", "agent", "--config", str(config_path(self.dir, node)),
                "--rdzv-endpoint", self.rdzv, "--nproc-per-node", str(self.nproc), *self.agent_args,
                "--log-dir", str(self.log_dir(node)), "--", *self.trainer]

    def log_dir(self, node: int) -> Path:
        return self.dir / f"node{node}"

    def rank_log(self, rank: int) -> Path:
        return self.log_dir(rank // self.nproc) / f"rank{rank}.log"

    def start_agent(self, node: int) -> subprocess.Popen:
        out = open(self.dir / f"agent{node}.out", "ab")
        proc = subprocess.Popen(self.agent_cmd(node), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group: Ctrl-C reaches the caller, which stops it
        out.close()
        self.agents[node] = proc
        return proc

    def lose(self, node: int, pids: list[int | None]) -> int:
        """Node loss: SIGKILL its agent and ``pids`` (its worker, its daemon) at once, then whatever else
        `ftd kill-node` finds of the node, and delete its shared memory. Returns the files deleted."""
        agent = self.agents.pop(node)
        os.killpg(agent.pid, signal.SIGKILL)
        for pid in pids:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        agent.wait()
        self.retired.append(agent)
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            kill_node(self.dir, node)
        return sum(1 for line in out.getvalue().splitlines() if line.strip().startswith("deleted /dev/shm"))

    def agent_failure(self, finished_ok: bool = False) -> str | None:
        """Why the job cannot go on, if an agent exited (with an error, or at all unless ``finished_ok``):
        its exit status and the end of its output; None while every agent runs."""
        for n, p in self.agents.items():
            code = p.poll()
            if code is not None and not (finished_ok and code == 0):
                tail = log_tail(self.dir / f"agent{n}.out", 15, indent="      ", missing="(no output)")
                return f"the agent of node {n} exited with status {code}:\n{tail}"
        return None

    def endpoint(self, node: int) -> str:
        return self.configs[node].endpoint

    def shm_left(self) -> list[Path]:
        return sorted(Path("/dev/shm").glob(f"ftd.{self.job}.*"))

    def stop(self) -> None:
        """SIGTERM every agent (they stop their workers and daemons); then make sure nothing is left."""
        live = [p for p in self.agents.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in live:
            stop_process_group(p, grace=20.0)
        for p in list(self.agents.values()) + self.retired:
            if p.poll() is None:
                stop_process_group(p, grace=0)
        kill_everything_from(self.dir)  # daemons and workers of agents that were SIGKILLed
        for path in self.shm_left():
            path.unlink(missing_ok=True)


class DaemonWatch(threading.Thread):
    """Polls every daemon's status in the background (a busy daemon must not slow the demo's reactions)."""

    def __init__(self, cluster: AgentCluster):
        super().__init__(daemon=True, name="daemon-watch")
        self.cluster = cluster
        self.status: dict[int, dict] = {}            # node -> latest status
        self.lags: dict[tuple[int, int], dict] = {}  # (node, daemon pid) -> protection_lag counters
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(STATUS_EVERY):
            for n in range(self.cluster.nodes):
                st = status_or_none(self.cluster.endpoint(n), timeout=1.0)
                if st is not None and st.get("cluster"):
                    self.status[n] = st
                    self.lags[(n, st["pid"])] = st["cluster"]["stats"]["protection_lag"]

    def recoverable(self) -> str:
        steps = {st["cluster"]["recoverable"] for st in list(self.status.values())}
        if len(steps) != 1:
            return "protecting..."
        step = steps.pop()
        return "nothing protected yet" if step < 0 else f"recoverable step {step} on every node"


def start_reference(nodes: int, nproc: int, trainer: list[str], out: Path) -> list[subprocess.Popen]:
    """Start the job without ftd or agents (the uninterrupted reference): every rank at once, with
    torchrun's environment, each logging to OUT/rank<R>.log."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_ports(1)[0]
    procs = []
    for rank in range(nodes * nproc):
        env = worker_env(os.environ, node_rank=rank // nproc, local_rank=rank % nproc, nproc=nproc, nnodes=nodes,
                         master_addr="127.0.0.1", master_port=port, generation=0, max_restarts=0,
                         config_path="", endpoint="")
        for key in ("FTD_CONFIG", "FTD_ENDPOINT"):
            env.pop(key)
        with open(out / f"rank{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(trainer, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs
