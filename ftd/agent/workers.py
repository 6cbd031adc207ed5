"""This node's training workers of one generation, each in a process group of its own."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from ftd.agent.plan import describe_exit
from ftd.agent.standby import Standby
from ftd.util.procs import signal_group, stop_process_group

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a worker


def log_path(log_dir: Path, rank: int) -> Path:
    """Rank ``rank``'s log, appended to by every generation (and by its standby)."""
    return log_dir / f"rank{rank}.log"


class WorkerGroup:
    """This node's workers of one generation, each in a process group of its own."""

    def __init__(self, command: list[str], envs: list[dict], log_dir: Path, generation: int, first_rank: int,
                 standbys: list[Standby | None] | None = None):
        """``standbys[i]``, where given and alive, becomes worker i; the others start ``command``."""
        self.procs: list[subprocess.Popen] = []
        self.ranks: list[int] = []
        self.warm = 0  # how many came from standbys
        standbys = standbys or [None] * len(envs)
        for i, env in enumerate(envs):
            rank = int(env.get("RANK", first_rank + i))
            with open(log_path(log_dir, rank), "ab") as log:
                log.write(f"=== ftd agent: generation {generation}, rank {rank} ===\n".encode())
                log.flush()
                proc = standbys[i].activate(env) if standbys[i] is not None else None
                self.warm += proc is not None
                if proc is None:
                    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            self.ranks.append(rank)

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
