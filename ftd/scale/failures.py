"""How often a large training job is interrupted, and what each interruption takes with it. Pure.

The defaults are the published figures of Llama 3 405B's pretraining (Meta, "The Llama 3 Herd of
Models", 2024, table 5): 419 unexpected interruptions in 54 days on 16,384 GPUs (8 per host), about
2e-5 per GPU-hour, each attributed to one component. What matters to ftd is what an interruption
takes away:

- ``process``: the trainers die, the host and its memory stay (a software bug, an NCCL watchdog
  timeout, silent data corruption, a dependency): every daemon still holds its snapshots.
- ``host``: one host leaves the job with its memory (a GPU, its HBM or SRAM, a NIC, SSD, PSU, CPU,
  DRAM, chassis or board, unplanned host maintenance). A GPU fault leaves the host's DRAM intact, but
  the host is drained and replaced, and ftd cannot yet read a drained host's daemon from its
  replacement (no membership changes), so for ftd its memory is lost.
- ``rack``: every host of a rack at once (a top-of-rack switch). The paper counts network switch and
  cable failures together (35); which share took a whole rack is not published, ``switch_share``
  (default one half) says it; the rest are a cable or port, one host.
"""
from __future__ import annotations

import dataclasses

PROCESS, HOST, RACK = "process", "host", "rack"
NETWORK = "network"  # switch or cable: split into RACK and HOST by switch_share

#: (component, interruptions, what it takes) from Llama 3's table of the 419 unexpected interruptions
LLAMA3_INTERRUPTIONS: tuple[tuple[str, int, str], ...] = (
    ("faulty GPU", 148, HOST), ("GPU HBM3 memory", 72, HOST), ("software bug", 54, PROCESS),
    ("network switch/cable", 35, NETWORK), ("host maintenance", 32, HOST), ("GPU SRAM memory", 19, HOST),
    ("GPU system processor", 17, HOST), ("NIC", 7, HOST), ("NCCL watchdog timeouts", 7, PROCESS),
    ("silent data corruption", 6, PROCESS), ("GPU thermal interface + sensor", 6, HOST), ("SSD", 3, HOST),
    ("power supply", 3, HOST), ("server chassis", 2, HOST), ("IO expansion board", 2, HOST),
    ("dependency", 2, PROCESS), ("CPU", 2, HOST), ("system memory", 2, HOST),
)
LLAMA3_DAYS, LLAMA3_GPUS, LLAMA3_GPUS_PER_HOST = 54, 16384, 8


@dataclasses.dataclass(frozen=True)
class FailureMix:
    """Interruptions per node-hour and the share of each kind (``process``, ``host``, ``rack``; they sum to 1)."""
    per_node_hour: float
    shares: dict[str, float]

    def __post_init__(self) -> None:
        if self.per_node_hour < 0:
            raise ValueError(f"a failure rate cannot be negative, got {self.per_node_hour}")
        if set(self.shares) != {PROCESS, HOST, RACK} or any(v < 0 for v in self.shares.values()) \
                or abs(sum(self.shares.values()) - 1) > 1e-9:
            raise ValueError(f"shares must give process, host and rack, each >= 0, summing to 1; got {self.shares}")

    def per_hour(self, nodes: int) -> float:
        """Interruptions of a job on ``nodes`` nodes per hour (every one stops the whole job)."""
        return self.per_node_hour * nodes

    def host_loss_per_node_hour(self) -> float:
        """Rate at which one given node is lost on its own (the ``host`` kind)."""
        return self.per_node_hour * self.shares[HOST]


def published(*, interruptions: int | None = None, days: float = LLAMA3_DAYS, gpus: int = LLAMA3_GPUS,
              gpus_per_node: int = LLAMA3_GPUS_PER_HOST, switch_share: float = 0.5) -> FailureMix:
    """The mix of Llama 3's table (``interruptions`` rescales its total, keeping the kinds' shares), for
    nodes of ``gpus_per_node`` GPUs; ``switch_share`` of the network failures take a whole rack."""
    if not 0 <= switch_share <= 1:
        raise ValueError(f"switch_share must be within 0..1, got {switch_share}")
    counts = {PROCESS: 0.0, HOST: 0.0, RACK: 0.0}
    for _, n, kind in LLAMA3_INTERRUPTIONS:
        if kind == NETWORK:
            counts[RACK] += n * switch_share
            counts[HOST] += n * (1 - switch_share)
        else:
            counts[kind] += n
    total = sum(counts.values())
    per_gpu_hour = (total if interruptions is None else interruptions) / (days * 24 * gpus)
    return FailureMix(per_gpu_hour * gpus_per_node, {k: v / total for k, v in counts.items()})
