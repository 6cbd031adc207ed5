"""A job under torchrun's own elastic agent on simulated nodes of this machine, as users run it.

Per simulated node: one ``torchrun --nnodes N --rdzv-backend c10d`` agent, told apart from the others
by its ``--local-addr`` (127.0.0.X: c10d sorts agents by address and pid to give out ranks, so an
agent that joins later under another address can take any rank), with ``FTD_CONFIG`` naming its
node's daemon (``ftd launch`` or ``ftd daemon``, started apart, as on real hosts). The c10d store is
served apart (``ftd job-store``, as on a login host), so that any node may be lost. The workers'
lines ("rank R pid P: resuming after step S", "step N loss L", ftd's "restored step" lines) go to
the agent's log, which this module reads back.

torch 2.13's elastic restarts need ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (pytorch issue 135712:
without it the restarted workers' gloo mesh times out on keys left by the previous attempt); every
agent started here gets it.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftd.util.procs import free_ports, ftd_env, stop_process_group, wait_for

_START = re.compile(r"^(?:\[[^\]]*\]:?\s*)?rank (\d+) pid (\d+): (?:resuming after step (\d+)|starting fresh)", re.M)
_RESTORED = re.compile(r"ftd: rank (\d+) restored step (\d+) from ([^(]*?) \(job")
_STEP = re.compile(r"^(?:\[[^\]]*\]:?\s*)?step\s+(\d+)\s+loss", re.M)


class TorchrunNodes:
    """torchrun agents of one job (``nnodes`` at a time, ``nproc`` workers each) running ``trainer``
    (``-m module args...``), one per simulated node, in ``directory``."""

    def __init__(self, directory: Path, nnodes: int, trainer: list[str], *, nproc: int = 1,
                 max_restarts: int = 3, env: dict | None = None, rdzv_conf: str = ""):
        self.dir, self.nnodes, self.nproc, self.trainer = Path(directory), nnodes, nproc, trainer
        self.rdzv_conf = ",".join(filter(None, ("is_host=false", rdzv_conf)))  # c10d's --rdzv-conf
        self.max_restarts = max_restarts
        self.env = ftd_env(env)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FTD_ENDPOINT", "FTD_CONFIG", "GROUP_RANK"):
            self.env.pop(key, None)
        self.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        port = free_ports(1)[0]
        self.rdzv = f"127.0.0.1:{port}"
        self.store_log = self.dir / "rdzv-store.log"
        with open(self.store_log, "wb") as log:
            self.store = subprocess.Popen([sys.executable, "-m", "ftd.cli", "job-store", "--port", str(port),
                                           "--host", "127.0.0.1"], env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "serving" in self.store_log.read_text() or self.store.poll() is not None, 60,
                 "the rendezvous store")
        self.agents: dict[str, subprocess.Popen] = {}
        self.retired: list[subprocess.Popen] = []

    def log(self, name: str) -> Path:
        return self.dir / f"agent-{name}.log"

    def start(self, name: str, config: str | Path, addr: str) -> subprocess.Popen:
        """The agent of simulated node ``name``, its daemon's config ``config``, at address ``addr``."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nnodes), "--nproc-per-node",
               str(self.nproc), "--max-restarts", str(self.max_restarts), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", self.rdzv, "--rdzv-id", "ftd-job", "--rdzv-conf", self.rdzv_conf,
               "--local-addr", addr, "--monitor-interval", "0.2", *self.trainer]
        env = dict(self.env, FTD_CONFIG=str(config))
        with open(self.log(name), "ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.agents[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL node ``name``'s agent and its workers (what a host loss does to them)."""
        proc = self.agents.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.retired.append(proc)

    def worker_pid(self, rank: int) -> int | None:
        """The pid of the worker that holds ``rank`` now (from the newest start line of any agent's log)."""
        newest = None
        for name in self.agents:
            for m in _START.finditer(self._text(name)):
                if int(m.group(1)) == rank:
                    newest = int(m.group(2))
        return newest

    def starts(self) -> list[tuple[str, int, int | None]]:
        """(node, rank, step resumed after or None) of every worker start, in log order per node."""
        return [(name, int(m.group(1)), int(m.group(3)) if m.group(3) else None)
                for name in self._names() for m in _START.finditer(self._text(name))]

    def restores(self) -> list[tuple[str, int, int, str]]:
        """(node, rank, step, where from) of every ftd restore line."""
        return [(name, int(m.group(1)), int(m.group(2)), m.group(3))
                for name in self._names() for m in _RESTORED.finditer(self._text(name))]

    def last_step(self) -> int:
        steps = [int(m.group(1)) for name in self.agents for m in _STEP.finditer(self._text(name))]
        return max(steps, default=-1)

    def _names(self) -> list[str]:
        return sorted(p.name[len("agent-"):-len(".log")] for p in self.dir.glob("agent-*.log"))

    def _text(self, name: str) -> str:
        try:
            return self.log(name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float) -> dict[str, int]:
        """Wait until every agent exited; their exit statuses (TimeoutError naming the ones still running)."""
        deadline = time.monotonic() + timeout
        for name, proc in self.agents.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the agent of node {name} still runs after {timeout:g} s; the end of its log:\n"
                                   + "\n".join(self._text(name).splitlines()[-30:])) from None
        return {name: proc.returncode for name, proc in self.agents.items()}

    def close(self) -> None:
        for proc in list(self.agents.values()) + self.retired:
            stop_process_group(proc, grace=0 if proc.poll() is not None else 5.0)
        stop_process_group(self.store, grace=5.0)
