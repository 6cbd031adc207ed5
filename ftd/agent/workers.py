"""This node's training workers of one generation, each in a process group of its own."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from ftd.agent.plan import describe_exit
from ftd.util.procs import signal_group, stop_process_group

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a worker


class WorkerGroup:
    """This node's workers of one generation, each in a process group of its own."""

    def __init__(self, command: list[str], envs: list[dict], log_dir: Path, generation: int, first_rank: int):
        self.procs: list[subprocess.Popen] = []
        self.ranks: list[int] = []
        for i, env in enumerate(envs):
            rank = int(env.get("RANK", first_rank + i))
            log = open(log_dir / f"rank{rank}.log", "ab")
            log.write(f"=== ftd agent: generation {generation}, rank {rank} ===\n".encode())
            log.flush()
            self.procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
            self.ranks.append(rank)
            log.close()

    def failure(self) -> str | None:
        for rank, proc in zip(self.ranks, self.procs):
            code = proc.poll()
            if code not in (None, 0):
                return f"worker rank {rank} (pid {proc.pid}) {describe_exit(code)}"
        return None

    def all_done(self) -> bool:
        return all(proc.poll() == 0 for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        for proc in self.procs:
            stop_process_group(proc, grace=STOP_GRACE)
