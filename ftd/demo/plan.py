"""What the demo runs and when it breaks things; how it prints."""
from __future__ import annotations

import dataclasses

from ftd.errors import DemoError

RUN_TIMEOUT = 600.0        # seconds the whole ftd run may take before the demo gives up
REFERENCE_TIMEOUT = 300.0
REPLACEMENT_DELAY = 1.0    # seconds between losing a node and its replacement arriving
INDENT = "      "


@dataclasses.dataclass
class Plan:
    """What the demo runs and when it breaks things."""
    nodes: int = 4
    parity: int = 1
    nproc: int = 1               # workers (ranks) per node
    steps: int = 80
    crash_at: int = 25           # step after which the worker of crash_node is SIGKILLed
    crash_node: int = 1
    lose_at: int = 55            # step after which node lose_node is lost entirely
    lose_node: int = 2
    model: tuple[str, ...] = ("--layers", "2", "--dim", "128", "--heads", "4", "--context", "64", "--batch", "16",
                              "--lr", "1e-3")
    step_sleep: float = 0.0
    allreduce: str = "ordered"   # the trainer's DDP gradient averaging (ftd/ddp.py); "ring" is DDP's default
    standby: bool = True         # the agents restart workers from warm standbys (ftd/agent/standby.py)
    replica_snapshots: bool | None = None  # the node configs' replica_snapshots (None: "auto", on in a cluster)

    @classmethod
    def quick(cls) -> "Plan":
        """The short mode the tests run: a tiny model and fewer steps, same failures. Its steps take
        ~10 ms, so each sleeps 50 ms more: the failures must land while the job still trains."""
        return cls(steps=24, crash_at=7, lose_at=15, step_sleep=0.05,
                   model=("--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch", "4"))

    @property
    def world(self) -> int:
        return self.nodes * self.nproc

    def check(self) -> None:
        if self.nodes < max(2, self.parity + 1) or self.nproc < 1:
            raise DemoError(f"{self.nodes} nodes with parity {self.parity}: need at least 2 nodes and parity + 1")
        if not 1 <= self.crash_at < self.lose_at < self.steps - 2:
            raise DemoError(f"need 1 <= --crash-at ({self.crash_at}) < --lose-at ({self.lose_at}) < "
                            f"--steps - 2 ({self.steps - 2})")
        self.crash_node = min(self.crash_node, self.nodes - 1)
        self.lose_node = min(self.lose_node, self.nodes - 1)  # never node 0: it hosts the agents' job store


def say(text: str = "") -> None:
    print(text, flush=True)
