"""The copy engine: moves one snapshot's tensors into a shared-memory arena, off the trainer thread.

``copy_and_hash`` walks the arena chunk by chunk: CPU tensors are copied piece by piece into the
chunk and the chunk is hashed right after, while it is still in cache; CUDA tensors are copied
whole on a side stream into the (pinned) arena and their chunks hashed once the copy event fires.
``Worker`` runs snapshot jobs on one background thread with a single pending slot: a newer
snapshot supersedes one that has not started, so nothing queues without bound.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable

import torch

from ftd.shm.checksum import ChunkHasher, chunk_checksum
from ftd.shm.layout import Layout, chunk_plan
from ftd.trainer.statecodec import dtype_from_name

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SnapshotJob:
    step: int
    skeleton: Any
    layout: Layout
    sources: list[torch.Tensor]            # live tensors (optimizer-owned) or private clones
    versions: list[int | None]             # version counter of each live source at snapshot(); None for clones
    snapshot_seconds: float = 0.0          # time the trainer spent inside snapshot()
    ready_event: Any = None                # CUDA event on the trainer's stream at snapshot()
    copied_event: Any = None               # CUDA event after the side-stream copies
    started: threading.Event = dataclasses.field(default_factory=threading.Event)   # copy of live tensors began
    released: threading.Event = dataclasses.field(default_factory=threading.Event)  # live tensors may change
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    versions_at_step: list[int] | None = None  # captured by the optimizer pre-step hook
    cancelled: bool = False
    ok: bool = False
    error: str | None = None
    copy_seconds: float | None = None
    phases: dict = dataclasses.field(default_factory=dict)  # seconds per phase of the copy, for diagnosis

    def finish(self, ok: bool, error: str | None = None) -> None:
        self.ok, self.error = ok, error
        self.started.set()
        self.released.set()
        self.done.set()

    def start_copy(self) -> bool:
        """Called by the worker once it holds a buffer; False if the job was cancelled meanwhile."""
        with self.lock:
            if self.cancelled:
                return False
            self.started.set()
            return True

    def cancel_if_not_started(self) -> bool:
        """Called before an optimizer step: a copy that has not begun must not begin on changing tensors."""
        with self.lock:
            if self.started.is_set():
                return False
            self.cancelled = True
            return True

    def torn_sources(self) -> list[int]:
        """Live sources mutated in place between snapshot() and the end of their copy."""
        with self.lock:
            observed = self.versions_at_step or [s._version for s in self.sources]
        return [i for i, v in enumerate(self.versions) if v is not None and observed[i] != v]

    def capture_versions_at_step(self) -> None:
        with self.lock:
            if self.versions_at_step is None:
                self.versions_at_step = [s._version for s in self.sources]


def slot_view(arena: torch.Tensor, layout: Layout, i: int) -> torch.Tensor:
    s = layout.slots[i]
    return arena[s.offset:s.end].view(dtype_from_name(s.dtype)).view(s.shape)


def copy_and_hash(job: SnapshotJob, arena: torch.Tensor, mv: memoryview, chunk_size: int,
                  side_stream: Any = None, chunk_delay: float = 0.0, hasher: ChunkHasher | None = None,
                  reserve: Callable[[int], None] | None = None) -> list[int]:
    """Copy ``job.sources`` into ``arena`` (uint8 tensor over ``mv``); return per-chunk checksums.
    ``reserve(end)``: called before bytes below ``end`` are written (the arena's memory is reserved
    in the background, and a copy that catches up reserves what it writes next itself).

    Order: issue the CUDA copies on the side stream, an event after each tensor; copy the CPU
    tensors chunk by chunk, hashing each chunk right away unless it also holds CUDA data; set
    ``job.released`` (the optimizer may go on: the pre-step hook orders it after the CUDA copies on
    the GPU); then hash the chunks that held CUDA data, each as soon as its tensors have arrived
    (on ``hasher``'s threads: a GPU host's copy engine outruns one core's xxh3).
    """
    layout, sources = job.layout, job.sources
    t0 = time.perf_counter()
    cuda_idx = [i for i, t in enumerate(sources) if t.is_cuda and layout.slots[i].nbytes]
    copied: dict[int, Any] = {}  # CUDA slot -> event recorded after its copy, to hash while later ones copy
    if cuda_idx:
        with torch.cuda.stream(side_stream):
            if job.ready_event is not None:
                side_stream.wait_event(job.ready_event)
            for i in cuda_idx:
                slot_view(arena, layout, i).copy_(sources[i], non_blocking=True)
                copied[i] = torch.cuda.Event()
                copied[i].record(side_stream)
            job.copied_event = copied[cuda_idx[-1]]
    t1 = time.perf_counter()
    flat = [t.reshape(-1).view(torch.uint8) if not t.is_cuda and t.is_contiguous() and t.numel() else None
            for t in sources]
    plan = chunk_plan(layout, chunk_size)
    sums: list = [None] * len(plan)  # per chunk: checksum, pending hash, or None until its CUDA data lands
    for c, ((lo, hi), pieces) in enumerate(plan):
        holds_cuda = False
        if reserve is not None:
            reserve(max([hi] + [layout.slots[p.slot].end for p in pieces if p.start == 0]))
        for p in pieces:
            src = sources[p.slot]
            if src.is_cuda:
                holds_cuda = True
            elif flat[p.slot] is None:
                if p.start == 0:  # non-contiguous: copied whole where it starts
                    slot_view(arena, layout, p.slot).copy_(src)
            else:
                base = layout.slots[p.slot].offset
                arena[base + p.start:base + p.end].copy_(flat[p.slot][p.start:p.end])
        if not holds_cuda:  # hash now, while the chunk is in cache (or on the pool, while the next copies)
            sums[c] = hasher.submit(mv[lo:hi]) if hasher else chunk_checksum(mv[lo:hi])
        if chunk_delay:
            time.sleep(chunk_delay)  # fault-injection knob for tests: widens the copy window
    job.released.set()
    t2 = time.perf_counter()
    waited = 0.0
    for c, ((lo, hi), pieces) in enumerate(plan):
        if sums[c] is None:
            w = time.perf_counter()
            copied[max(p.slot for p in pieces if p.slot in copied)].synchronize()
            waited += time.perf_counter() - w
            sums[c] = hasher.submit(mv[lo:hi]) if hasher else chunk_checksum(mv[lo:hi])
    sums = [ChunkHasher.result(v) for v in sums]
    job.phases = {"issue_cuda": t1 - t0, "cpu_copy_and_hash": t2 - t1, "cuda_wait": waited,
                  "cuda_hash": time.perf_counter() - t2 - waited}
    return sums


class Worker:
    """One background thread running snapshot jobs, newest wins."""

    def __init__(self, process: Callable[[SnapshotJob], None]):
        self._process = process
        self._cond = threading.Condition()
        self._pending: SnapshotJob | None = None
        self._running: SnapshotJob | None = None
        self.latest: SnapshotJob | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ftd-copier", daemon=True)
        self._thread.start()

    def submit(self, job: SnapshotJob) -> None:
        with self._cond:
            if self._pending is not None:
                self._pending.finish(False, f"superseded by step {job.step} before its copy started")
            self._pending = job
            self.latest = job
            self._cond.notify()

    def busy_with_another(self, job: SnapshotJob) -> bool:
        """True while an older job still occupies the thread, so ``job`` cannot start yet."""
        with self._cond:
            return self._running is not None and self._running is not job

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._running = job
            try:
                self._process(job)
            except BaseException as e:  # a failed snapshot must never take the trainer down
                log.warning("ftd: snapshot of step %d failed: %s", job.step, e)
                job.finish(False, str(e))
            finally:
                if not job.done.is_set():
                    job.finish(False, "snapshot job ended without a result")
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
