"""What each way of keeping snapshots costs and buys on N nodes: ftd, F-way replication, disk only. Pure.

Per failure, the job restarts (``restart_s``), restores its state and re-runs the steps since the version
it restores. From memory (``survival``): the cluster's recoverable version, whose age depends on how long
a protection round takes; else from the newest checkpoint on shared storage (ftd's own flush, or the
checkpoints a replicated or disk-only job writes every ``disk_every_s``), whose age and load time grow
with N because every node writes and reads through the same file system. Effective training time ratio
(ETTR) = (1 - overhead) / (1 + failures per second x mean time lost per failure).

A protection round: every node sends and receives m x S (replication: (F - 1) x S) through its share of
the network, encodes its parity (XOR for m = 1, Reed-Solomon otherwise), and node 0's coordinator spends
the CPU ``Coordination`` says; its figures are measured (``scripts/bench_scale.py``): messages per node and
cycle, the re-sends every second of a longer round, and the coordinator's CPU per cycle and per re-send,
which today grow with N^2 (the ``protect`` message carries every node's size, and is encoded once per
node). When a re-send takes node 0 more than the re-send interval, its loop cannot keep up: the round
never completes and the model says *saturated*.
"""
from __future__ import annotations

import dataclasses
import math

from ftd.scale.failures import HOST, PROCESS, RACK, FailureMix
from ftd.scale.survival import Placement, closed_form

GiB = 1 << 30
FTD, REPLICAS, DISK = "ftd", "replicas", "disk"


@dataclasses.dataclass(frozen=True)
class Coordination:
    """Measured coordination costs. Defaults: ``scripts/bench_scale.py`` on the 2-core development VM
    (README, "At scale"); ``measured.coordination_from_bench`` reads a fresh report."""
    messages_per_node: float = 7.0          # per cycle, a node other than node 0, rounds shorter than a re-send
    resend_messages_per_node_s: float = 2.0  # each second of a longer round: protect again, alive again
    resend_interval_s: float = 1.0          # Coordinator.resend
    node_bytes: tuple[float, float] = (619.0, 12.0)      # a + b N coordination bytes per node and cycle
    protect_bytes_per_node: float = 12.0    # the protect message: about 12 bytes per node in the cluster
    latency_s: float = 0.05                 # a round's floor (commit -> recoverable, 32 MiB, 2 local nodes)
    data_overhead: float = 1.0001           # bytes a node sends per version / (m S): headers and padding
    # node 0's CPU seconds: cycle = a N^2/g + b N^2 + c N (state machine) + d N^2 + e N (JSON);
    # one re-send = f N^2 + h N
    cycle_cpu: tuple[float, float, float, float, float] = (5.8e-6, 0.0, 0.0, 2.3e-7, 0.0)
    resend_cpu: tuple[float, float] = (2.1e-7, 0.0)
    small_message_s: float = 1.0e-5         # node 0's CPU for one small message (handler, decode)
    cpu_speedup: float = 1.0                # node 0's core against the one that measured the above
    linear: bool = False                    # an O(N) coordinator: every message costs a small one's CPU

    def as_linear(self) -> "Coordination":
        """What a coordinator without today's N^2 costs would spend: ``protect`` carrying only the group's
        sizes, ``done`` counted per group, each message the CPU of a small one."""
        return dataclasses.replace(self, linear=True, node_bytes=(self.node_bytes[0], 0.0), protect_bytes_per_node=0.0)

    def cycle_cpu_s(self, nodes: int, g: int) -> float:
        if self.linear:
            return self.small_message_s * self.messages_per_node * (nodes - 1) / self.cpu_speedup
        a, b, c, d, e = self.cycle_cpu
        n2 = nodes * nodes
        return max(0.0, a * n2 / g + b * n2 + c * nodes + d * n2 + e * nodes) / self.cpu_speedup

    def resend_cpu_s(self, nodes: int) -> float:
        if self.linear:
            return self.small_message_s * self.resend_messages_per_node_s * (nodes - 1) / self.cpu_speedup
        f, h = self.resend_cpu
        return max(0.0, f * nodes * nodes + h * nodes) / self.cpu_speedup


@dataclasses.dataclass(frozen=True)
class Workload:
    """The job and its machines. Sizes in bytes, rates in bytes per second, times in seconds."""
    state_bytes: float = 50 * GiB           # S: one node's snapshot
    step_s: float = 6.0
    net_bytes_per_s: float = 12.5e9         # each way, per node, for snapshot traffic (100 Gb/s)
    rs_bytes_per_s: float = 1.0e9           # zfec Reed-Solomon encode per core at m = 2 (halves as m doubles)
    xor_bytes_per_s: float = 13.0e9         # XOR parity per core (m = 1)
    encode_cores: int = 4
    copy_bytes_per_s: float = 25.0e9        # host memory -> the node's GPUs (a restore from local memory)
    restart_s: float = 300.0                # failure -> training again, restore not included
    storage_bytes_per_s: float = 2.0e12     # the shared file system, the whole cluster (writes and reads)
    disk_every_s: float = 1800.0            # checkpoints (disk-only, replication) or ftd's flushes to disk
    stage_bytes_per_s: float = 25.0e9       # device -> host staging of a disk checkpoint (training waits)
    ftd_overhead: float = 0.008             # training slowdown from a snapshot every step (scripts/gpu_check.py)
    window_s: float | None = None           # None: restart + rebuild + one round
    coordination: Coordination = Coordination()


@dataclasses.dataclass(frozen=True)
class Strategy:
    """ftd with k + m, F-way replication (k = 1, m = F - 1), or disk checkpoints only."""
    kind: str
    k: int = 1
    m: int = 0
    strided: bool = False

    @property
    def name(self) -> str:
        place = "rack-strided" if self.strided else "consecutive"
        if self.kind == FTD:
            return f"ftd {self.k}+{self.m} {place}"
        if self.kind == REPLICAS:
            return f"replicas F={self.m + 1} {place}"
        return "disk only"


@dataclasses.dataclass
class Outcome:
    strategy: str
    nodes: int
    error: str | None = None
    saturated: bool = False
    failures_per_day: float = 0.0
    p_memory: float = 0.0                   # a failure is recoverable from memory
    p_by_kind: dict = dataclasses.field(default_factory=dict)
    round_s: float = 0.0                    # protection round (memory) or checkpoint write (disk)
    steps_lost_per_failure: float = 0.0
    steps_lost_per_day: float = 0.0
    hours_lost_per_day: float = 0.0
    needs_disk_per_day: float = 0.0         # failures that memory cannot cover
    p_day_from_memory: float = 0.0          # a day in which every failure restores from memory
    ettr: float | None = None
    memory_per_node: float = 0.0            # held for the newest protected version: data + redundancy
    memory_per_node_buffered: float = 0.0   # with double buffering (what /dev/shm holds)
    net_per_node: float = 0.0               # bytes a node sends (and receives) per protected version
    coordination_messages_per_node: float = 0.0
    coordination_bytes_per_node: float = 0.0
    coordinator_cpu_s: float = 0.0          # node 0's CPU per round
    coordinator_bytes: float = 0.0          # node 0 sends per round


def _disk(work: Workload, nodes: int) -> tuple[float, float, float]:
    """(seconds to write or read one checkpoint of every node, mean age of the newest one at a failure, interval)."""
    io = nodes * work.state_bytes / work.storage_bytes_per_s
    every = max(work.disk_every_s, io)
    return io, every / 2 + io, every


def _steps_behind(round_s: float, step_s: float) -> float:
    """Mean completed steps past the newest recoverable version at a random moment, rounds back to back,
    each pinning the next step committed (every n-th step protected, n = ceil(round / step))."""
    n = max(1, math.ceil(round_s / step_s - 1e-9))
    return (n - 1) / 2 + round_s / step_s


def evaluate(strategy: Strategy, nodes: int, mix: FailureMix, work: Workload, rack_nodes: int = 1) -> Outcome:
    out = Outcome(strategy.name, nodes)
    S, per_hour = work.state_bytes, mix.per_hour(nodes)
    out.failures_per_day = 24 * per_hour
    io_s, disk_age_s, disk_every = _disk(work, nodes)
    from_disk_s = work.restart_s + io_s + disk_age_s
    if strategy.kind == DISK:
        out.round_s, out.steps_lost_per_failure = io_s, disk_age_s / work.step_s
        out.needs_disk_per_day = out.failures_per_day
        out.ettr = (1 - S / work.stage_bytes_per_s / disk_every) / (1 + per_hour * from_disk_s / 3600)
        out.memory_per_node = out.memory_per_node_buffered = S
        out.net_per_node = S
        _per_day(out, work)
        return out
    try:
        placement = Placement(nodes, strategy.k, strategy.m, rack_nodes, strategy.strided)
    except ValueError as e:
        out.error = str(e)
        return out
    k, m, g, co = strategy.k, strategy.m, strategy.k + strategy.m, work.coordination
    out.net_per_node = m * S * co.data_overhead
    if strategy.kind == FTD:
        encode_s = S / (work.xor_bytes_per_s if m == 1 else work.rs_bytes_per_s * 2 / m) / work.encode_cores
        _protection_round(out, co, nodes, g, max(out.net_per_node / work.net_bytes_per_s, encode_s))
    else:  # copies, exchanged inside each replica set: no encoding, no central coordinator
        out.round_s = out.net_per_node / work.net_bytes_per_s + co.latency_s
    out.memory_per_node = S * (1 + m / k)
    out.memory_per_node_buffered = 2 * out.memory_per_node
    if out.saturated:
        return out
    rebuild_s = (g if strategy.kind == FTD else 1) * S / work.net_bytes_per_s + S / work.copy_bytes_per_s
    window = work.window_s if work.window_s is not None else work.restart_s + rebuild_s + out.round_s
    q = -math.expm1(-mix.host_loss_per_node_hour() * window / 3600)
    p = closed_form(placement, mix, q)
    out.p_by_kind, out.p_memory = {kind: p[kind] for kind in (PROCESS, HOST, RACK)}, p["any"]
    memory_age_s = _steps_behind(out.round_s, work.step_s) * work.step_s
    restore = {PROCESS: S / work.copy_bytes_per_s, HOST: rebuild_s, RACK: rebuild_s}
    lost_s = steps = 0.0
    for kind, share in mix.shares.items():
        pk = p[kind]
        lost_s += share * (pk * (work.restart_s + restore[kind] + memory_age_s) + (1 - pk) * from_disk_s)
        steps += share * (pk * memory_age_s + (1 - pk) * disk_age_s) / work.step_s
    out.steps_lost_per_failure = steps
    out.needs_disk_per_day = out.failures_per_day * (1 - p["any"])
    out.ettr = (1 - work.ftd_overhead) / (1 + per_hour * lost_s / 3600)
    _per_day(out, work)
    return out


def _protection_round(out: Outcome, co: Coordination, nodes: int, g: int, data_s: float) -> None:
    """ftd's round: the data, then node 0's CPU; past one re-send interval node 0 also re-sends ``protect``
    to every node not done, each second, which slows whatever it still has to do (its own share of the data
    included) by 1 / (1 - load), or stops it (saturated)."""
    out.coordinator_cpu_s = co.cycle_cpu_s(nodes, g)
    busy = data_s + co.latency_s + out.coordinator_cpu_s
    load = co.resend_cpu_s(nodes) / co.resend_interval_s  # node 0's share of each second spent re-sending
    if busy <= co.resend_interval_s:
        out.round_s = busy
    elif load < 1:
        out.round_s = co.resend_interval_s + (busy - co.resend_interval_s) / (1 - load)
    else:
        out.saturated, out.round_s = True, math.inf
    resends = 0.0 if out.round_s <= co.resend_interval_s else out.round_s / co.resend_interval_s
    out.coordination_messages_per_node = co.messages_per_node + co.resend_messages_per_node_s * (
        out.round_s if resends else 0.0)
    a, b = co.node_bytes
    out.coordination_bytes_per_node = a + b * nodes + resends * co.protect_bytes_per_node * nodes
    out.coordinator_bytes = (nodes - 1) * out.coordination_bytes_per_node


def _per_day(out: Outcome, work: Workload) -> None:
    out.steps_lost_per_day = out.steps_lost_per_failure * out.failures_per_day
    out.hours_lost_per_day = 24 * (1 - out.ettr) if out.ettr is not None else math.inf
    out.p_day_from_memory = math.exp(-out.needs_disk_per_day)
