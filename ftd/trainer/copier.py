"""The copy engine: moves one snapshot's tensors into a shared-memory arena, off the trainer thread.

``copy_and_hash`` walks the arena chunk by chunk: CPU tensors are copied piece by piece into the
chunk and the chunk is hashed right after, while it is still in cache; CUDA tensors are copied
whole on a side stream into the (pinned) arena and their chunks hashed once the copy event fires.
The chunks are handed out one at a time (``ChunkClaims``), so a second thread can take some: the
trainer thread, when ``optimizer.step()`` reaches the pre-step hook before the copy of the live
tensors is done, copies and hashes the chunks that are left alongside the copier instead of
waiting idle (on a busy host the copier is starved by the trainer's own compute threads; the
memcpy and xxh3 release the GIL, so two threads copy twice as fast).
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
from ftd.trainer.thread_usage import ThreadUsage

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
    claims: "ChunkClaims | None" = None        # the chunks of the copy under way, for a helping thread
    claimable: threading.Event = dataclasses.field(default_factory=threading.Event)  # claims set, or no copy
    cancelled: bool = False
    ok: bool = False
    error: str | None = None
    copy_seconds: float | None = None
    phases: dict = dataclasses.field(default_factory=dict)  # seconds per phase of the copy, for diagnosis
    origins: list[tuple] | None = None     # identity of each source's base tensor (replica slices are byte views)

    def finish(self, ok: bool, error: str | None = None) -> None:
        self.ok, self.error = ok, error
        self.started.set()
        self.claimable.set()
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


class ChunkClaims:
    """The chunks of one copy, handed out one at a time to whichever thread asks: the copier, and the
    trainer thread while it would otherwise wait for it. ``all_done`` is set once every chunk is
    copied (and, where it holds no CUDA data, hashed or queued for hashing)."""

    def __init__(self, chunks: int, work: Callable[[int], None]):
        self._work, self._count = work, chunks
        self._next, self._left = 0, chunks
        self._lock = threading.Lock()
        self.all_done = threading.Event()
        self.helped = 0                   # chunks a helping thread did
        self.error: BaseException | None = None
        if not chunks:
            self.all_done.set()

    def run(self, helping: bool = False) -> int:
        """Take and do chunks until none is left; return how many this call did."""
        done = 0
        while True:
            with self._lock:
                if self._next >= self._count or self.error is not None:
                    return done
                c, self._next = self._next, self._next + 1
            try:
                self._work(c)
            except BaseException as e:  # the copier reports it; the trainer thread must not raise here
                self.error = self.error or e
            done += 1
            with self._lock:
                self._left -= 1
                if helping:
                    self.helped += 1
                if self._left == 0 or self.error is not None:
                    self.all_done.set()


def copy_and_hash(job: SnapshotJob, arena: torch.Tensor, mv: memoryview, chunk_size: int,
                  side_stream: Any = None, chunk_delay: float = 0.0, hasher: ChunkHasher | None = None,
                  reserve: Callable[[int], None] | None = None) -> list[int]:
    """Copy ``job.sources`` into ``arena`` (uint8 tensor over ``mv``); return per-chunk checksums.
    ``reserve(end)``: called before bytes below ``end`` are written (the arena's memory is reserved
    in the background, and a copy that catches up reserves what it writes next itself).

    Order: issue the CUDA copies on the side stream, an event after each tensor; copy the CPU
    tensors that are not contiguous whole; then copy the contiguous CPU tensors chunk by chunk
    (``job.claims``: a helping thread may take chunks too), hashing each chunk right away unless it
    also holds CUDA data; set ``job.released`` (the optimizer may go on: the pre-step hook orders it
    after the CUDA copies on the GPU); then hash the chunks that held CUDA data, each as soon as its
    tensors have arrived (on ``hasher``'s threads: a GPU host's copy engine outruns one core's xxh3).
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
    for i, src in enumerate(sources):  # first, so that no chunk is hashed before a strided tensor in it lands
        if flat[i] is None and not src.is_cuda and layout.slots[i].nbytes:
            slot_view(arena, layout, i).copy_(src)
    plan = chunk_plan(layout, chunk_size)
    sums: list = [None] * len(plan)  # per chunk: checksum, pending hash, or None until its CUDA data lands

    def copy_chunk(c: int) -> None:
        (lo, hi), pieces = plan[c]
        holds_cuda = False
        if reserve is not None:
            reserve(max([hi] + [layout.slots[p.slot].end for p in pieces if p.start == 0]))
        for p in pieces:
            if sources[p.slot].is_cuda:
                holds_cuda = True
            elif flat[p.slot] is not None:
                base = layout.slots[p.slot].offset
                arena[base + p.start:base + p.end].copy_(flat[p.slot][p.start:p.end])
        if not holds_cuda:  # hash now, while the chunk is in cache (or on the pool, while the next copies)
            sums[c] = hasher.submit(mv[lo:hi]) if hasher else chunk_checksum(mv[lo:hi])
        if chunk_delay:
            time.sleep(chunk_delay)  # fault-injection knob for tests: widens the copy window

    claims = ChunkClaims(len(plan), copy_chunk)
    job.claims = claims
    job.claimable.set()
    before = ThreadUsage.now()
    claims.run()
    copier = ThreadUsage.now().since(before)  # this thread's part: on a core, waiting for one, faults
    claims.all_done.wait()  # a helping thread may still be finishing its last chunk
    if claims.error is not None:
        raise claims.error
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
                  "cuda_hash": time.perf_counter() - t2 - waited, "helped_chunks": claims.helped,
                  **copier.as_phases("copier")}
    return sums


#: the copier's per-snapshot figures that ``Client.stats`` sums over committed snapshots (why a copy
#: fell behind the step: ``scripts/bench_busy_host.py`` prints them)
COPIER_TOTALS = ("copier_wall", "copier_cpu", "copier_runqueue", "copier_off_cpu", "copier_minor_faults",
                 "copier_major_faults")


def add_copier_totals(stats: dict, job: SnapshotJob) -> None:
    for key in COPIER_TOTALS:
        stats[key] = stats.get(key, 0) + job.phases.get(key, 0)


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
