"""Pure decisions of the node agent: the restart policy, the workers' environment, exit descriptions.

Kept apart from ``supervisor`` (processes, sockets) so they can be tested without starting anything;
``say`` is how every part of the agent reports, one prefixed line each.
"""
from __future__ import annotations

import dataclasses
import signal

from ftd.util import lines


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """Bounded restarts; a backoff only for a crash loop, counted per job (a generation is one restart).

    Generation 0 is the first start; generation g > 0 follows the g-th failure anywhere in the job.
    A failure after a generation that trained (it committed a snapshot, or ran ``window`` seconds) is
    restarted at once: waiting would only add to the time lost. Failures in a row of generations that
    did neither are a crash loop: the second waits ``backoff`` seconds, each next one twice as long.
    """
    max_restarts: int = 3
    backoff: float = 1.0        # seconds before the second restart in a row of a crash loop; doubles after
    backoff_max: float = 30.0
    window: float = 30.0        # seconds a generation must run (without a snapshot) to count as healthy

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff < 0 or self.backoff_max < 0 or self.window < 0:
            raise ValueError("backoff, backoff_max and the backoff window must be >= 0 seconds")

    def exhausted(self, generation: int) -> bool:
        return generation > self.max_restarts

    def streak(self, previous: int, *, ran_seconds: float, progressed: bool) -> int:
        """Failures in a row of a crash loop, after one more failure of a generation that ran
        ``ran_seconds`` and did (not) commit a snapshot: 1 when it was healthy (the loop is broken)."""
        return 1 if progressed or ran_seconds >= self.window else previous + 1

    def delay(self, streak: int) -> float:
        """Seconds before the restart that follows the ``streak``-th failure in a row (0: none yet)."""
        if streak <= 1:
            return 0.0
        return min(self.backoff * 2 ** (streak - 2), self.backoff_max)


def worker_env(base: dict, *, node_rank: int, local_rank: int, nproc: int, nnodes: int, master_addr: str,
               master_port: int, generation: int, max_restarts: int, config_path: str, endpoint: str) -> dict:
    """The environment torchrun would give a worker, plus where its node's ftd daemon is."""
    rank = node_rank * nproc + local_rank
    env = dict(base)
    env.update({
        "RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": str(node_rank), "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nnodes * nproc),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(generation), "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "FTD_NODE_RANK": str(node_rank), "FTD_CONFIG": config_path, "FTD_ENDPOINT": endpoint,
    })
    return env


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} {text!r} must be HOST:PORT with a port in 1-65535, e.g. node0:29400")
    return host.strip("[]"), int(port)


PROG = "ftd agent"


def say(node_rank: int, message: str) -> None:
    lines.say(f"{PROG}[node {node_rank}]: {message}")
