"""Where a thread's wall time went, from the kernel: on a core, waiting for one, or neither.

A copy that falls behind the step is either starved of cores (run-queue time: torch's intra-op
threads and other processes hold them), slowed by page faults (a buffer touched for the first time,
or reclaimed), or off the cores without wanting one (waiting for the GIL, for memory, for I/O).
``ThreadUsage.now()`` reads the calling thread's counters (``/proc/thread-self/schedstat`` and
``getrusage(RUSAGE_THREAD)``, a few microseconds) so the copier can say which, per snapshot.
Where the kernel does not provide them (not Linux), the fields are zero.
"""
from __future__ import annotations

import dataclasses
import resource
import time

_SCHEDSTAT = "/proc/thread-self/schedstat"


@dataclasses.dataclass(frozen=True)
class ThreadUsage:
    wall: float = 0.0          # seconds (perf_counter)
    cpu: float = 0.0           # seconds on a core
    runqueue: float = 0.0      # seconds runnable but waiting for a core
    minor_faults: int = 0      # page faults served without I/O (first touch of a shared-memory page, ...)
    major_faults: int = 0      # page faults that needed I/O

    @staticmethod
    def now() -> "ThreadUsage":
        wall = time.perf_counter()
        cpu = runqueue = 0.0
        try:
            with open(_SCHEDSTAT, "rb") as f:
                on_cpu_ns, wait_ns = f.read().split()[:2]
            cpu, runqueue = int(on_cpu_ns) / 1e9, int(wait_ns) / 1e9
        except (OSError, ValueError):
            cpu = time.thread_time()
        try:
            ru = resource.getrusage(resource.RUSAGE_THREAD)
            minor, major = ru.ru_minflt, ru.ru_majflt
        except (AttributeError, OSError):
            minor = major = 0
        return ThreadUsage(wall, cpu, runqueue, minor, major)

    def since(self, earlier: "ThreadUsage") -> "ThreadUsage":
        return ThreadUsage(self.wall - earlier.wall, self.cpu - earlier.cpu, self.runqueue - earlier.runqueue,
                           self.minor_faults - earlier.minor_faults, self.major_faults - earlier.major_faults)

    @property
    def off_cpu(self) -> float:
        """Seconds neither on a core nor waiting for one: blocked (the GIL, a lock, memory, I/O)."""
        return max(0.0, self.wall - self.cpu - self.runqueue)

    def as_phases(self, prefix: str) -> dict:
        return {f"{prefix}_wall": self.wall, f"{prefix}_cpu": self.cpu, f"{prefix}_runqueue": self.runqueue,
                f"{prefix}_off_cpu": self.off_cpu, f"{prefix}_minor_faults": self.minor_faults,
                f"{prefix}_major_faults": self.major_faults}
