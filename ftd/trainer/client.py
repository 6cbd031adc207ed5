"""The trainer hook: ``ftd.Client``. See README for the five lines a trainer needs.

``snapshot()`` captures the state (``capture``: state_dict()s, RNG states; clones of what may change
before the next optimizer step) and hands the rest to a background copy job (``copier``), which asks
the daemon for a buffer (``session``), copies and checksums into it, and commits. Tensors owned by an
optimizer only change inside ``optimizer.step()``, so a step pre-hook waits there, and only if their
copy is still running. ``restore()`` loads the newest version every rank of the node holds (the
cluster's recoverable step in a cluster), verifying every chunk's checksum (``restore``).

Threads: the trainer thread calls ``snapshot``/``restore``/``wait``/``close`` and runs the pre-step
hook; one copier thread runs ``_process`` for one job at a time (``copier.Worker``).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from ftd.control.connection import Connection
from ftd.errors import DaemonUnavailable, FtdError
from ftd.shm.checksum import ChunkHasher
from ftd.shm.layout import Manifest
from ftd.trainer.capture import StateCapture, identity
from ftd.trainer.copier import SnapshotJob, Worker, copy_and_hash
from ftd.trainer.discovery import detect_rank_world, find_daemon, local_world
from ftd.trainer.restore import REPAIRING, restore_versions
from ftd.trainer.session import Busy, DaemonSession

log = logging.getLogger(__name__)

BEGIN_GRACE_SECONDS = 0.05  # longest an optimizer step waits for the daemon to hand out a buffer
RESTORE_WAIT_SECONDS = 600.0  # longest restore() waits for a rebuilding cluster daemon


class Client:
    """Asynchronous in-memory snapshots of a training state, held by the node's ftd daemon.

    endpoint: the daemon's control endpoint; by default found from the environment (find_daemon:
      $FTD_ENDPOINT, $FTD_CONFIG, or the node rank torchrun or SLURM set), so a trainer started by
      torchrun, srun or `ftd agent` needs no arguments.
    rank, world_size: default torch.distributed's, else $RANK/$WORLD_SIZE, else 0/1.
    capture_rng: also snapshot and restore python, numpy, torch and CUDA RNG states.
    """

    def __init__(self, endpoint: str | None = None, *, rank: int | None = None, world_size: int | None = None,
                 capture_rng: bool = True, timeout: float | None = None):
        self.endpoint, config, self.found_by = find_daemon(endpoint)
        detected = detect_rank_world()
        self.rank = detected[0] if rank is None else rank
        self.world_size = detected[1] if world_size is None else world_size
        self.capture_rng = capture_rng
        self._conn = Connection(self.endpoint, config.request_timeout if timeout is None else timeout)
        self._session = DaemonSession(self._conn, self.rank, self.world_size, config.chunk_size)
        self._capture = StateCapture(capture_rng, self._install_hook)
        self._hooks: dict[int, Any] = {}
        self._side_stream = None
        self._chunk_delay = float(os.environ.get("FTD_DEBUG_COPY_DELAY", "0"))
        self._failures = 0
        self._daemon_lost = False
        self._hook_wait_unreported = 0.0  # pre-step waits not yet reported to the daemon (ftd status)
        self._warned_at = 0.0
        self._told_wait = False
        self._closed = False
        self.stats = {"snapshots": 0, "committed": 0, "failed": 0, "skipped_busy": 0, "skipped_setup": 0,
                      "skipped_protecting": 0,
                      "snapshot_seconds": 0.0,
                      "hook_wait_seconds": 0.0, "last_copy_seconds": None, "last_step": None}
        self._hasher = ChunkHasher()
        self._worker = Worker(self._process)

    # ---- public API ------------------------------------------------------------------------------
    def snapshot(self, step: int, state: dict) -> None:
        """Start an asynchronous snapshot of ``state`` at ``step``; returns at once. Never raises."""
        t0 = time.perf_counter()
        try:
            if self._closed:
                raise FtdError("client is closed")
            job = self._capture.capture(step, state)
            job.snapshot_seconds = time.perf_counter() - t0
            self.stats["snapshots"] += 1
            self._worker.submit(job)
        except Exception as e:
            self._note_failure(f"snapshot of step {step} skipped: {e}")
        finally:
            self.stats["snapshot_seconds"] += time.perf_counter() - t0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the last snapshot is copied and committed (and the buffer of the next one is
        mapped, so the next snapshot finds the worker free); True if it was committed."""
        job = self._worker.latest
        if job is None:
            return True
        job.done.wait(timeout)
        return job.done.is_set() and job.ok

    def restore(self, state: dict) -> int | None:
        """Load the newest complete snapshot into ``state`` in place; return its step, or None if there is none.

        Raises DaemonUnavailable (saying how to start a daemon) if no daemon answers.
        """
        self.wait()
        deadline = time.monotonic() + RESTORE_WAIT_SECONDS
        while True:
            try:
                reply = self._conn.call("restore", rank=self.rank, **local_world())
            except DaemonUnavailable as e:
                raise DaemonUnavailable(f"{e} (this trainer looked there because of {self.found_by})") from None
            if "wait" not in reply:
                step = restore_versions(self._conn, reply, state, self.rank, self.capture_rng)
                if step is not REPAIRING:
                    return step
                reason = "the daemon repairs a corrupt chunk from its peers"
            else:
                reason = reply["wait"]
            if time.monotonic() > deadline:
                raise FtdError(f"restore gave up after {RESTORE_WAIT_SECONDS:.0f} s: {reason}")
            if not self._told_wait:
                log.info("ftd: rank %d waits to restore: %s", self.rank, reason)
                self._told_wait = True
            time.sleep(0.2)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the last snapshot (up to ``timeout`` seconds), then release everything."""
        if self._closed:
            return
        self.wait(timeout)
        self._closed = True
        self._worker.close(timeout)
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._session.drop_arenas()
        self._hasher.close()
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the optimizer's pre-step hook: trainer thread -------------------------------------------
    def _install_hook(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) not in self._hooks:
            self._hooks[id(optimizer)] = optimizer.register_step_pre_hook(self._before_optimizer_step)

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        job = self._worker.latest
        if job is None or job.done.is_set():
            return
        t0 = time.perf_counter()
        if not job.started.is_set():
            # Its copy has not begun: the previous snapshot is still being checksummed and committed
            # (snapshots take longer than a step), or the daemon is slow or gone. Skip it rather than
            # stall training; a daemon that is merely slow to hand out a buffer gets a short grace.
            busy = self._worker.busy_with_another(job)
            if not busy and not self._daemon_lost:
                job.started.wait(BEGIN_GRACE_SECONDS)
            if job.cancel_if_not_started():
                self.stats["hook_wait_seconds"] += time.perf_counter() - t0
                if busy:
                    self.stats["skipped_busy"] += 1
                    if self.stats["skipped_busy"] == 1:
                        log.warning("ftd: a snapshot takes longer than a training step, so some steps are not "
                                    "snapshotted (each newer snapshot supersedes an unstarted one); training is "
                                    "not slowed down. `ftd status` shows the copy time")
                elif job.layout.nbytes != self._session.ready_nbytes:
                    self.stats["skipped_setup"] += 1  # the daemon is still reserving this layout's buffers
                    log.info("ftd: snapshot of step %d skipped while the buffers for %d bytes are set up",
                             job.step, job.layout.nbytes)
                else:
                    self._note_failure(f"snapshot of step {job.step} skipped: the daemon did not hand out a "
                                       "buffer before the next optimizer step")
                return
        if not job.released.is_set():
            job.released.wait()
        waited = time.perf_counter() - t0
        self.stats["hook_wait_seconds"] += waited
        self._hook_wait_unreported += waited
        job.capture_versions_at_step()
        if job.copied_event is not None:
            torch.cuda.current_stream().wait_event(job.copied_event)

    # ---- one snapshot: copier thread -------------------------------------------------------------
    def _process(self, job: SnapshotJob) -> None:
        try:
            name, arena = self._session.begin(job.step, job.layout.nbytes)
        except Busy as busy:
            # both buffers hold versions the daemon still needs (the cluster protects an older step, or
            # a flush copies one out to disk): expected, and never waited for
            self.stats["skipped_protecting"] += 1
            job.released.set()
            job.finish(False, f"skipped: {busy}" if str(busy) else "skipped while the daemon still needs both buffers")
            return
        except Exception as e:
            self._daemon_lost = isinstance(e, DaemonUnavailable)
            return self._fail(job, f"snapshot of step {job.step} skipped: {e}")
        if not job.start_copy():
            return self._fail(job, "", abort=name)  # cancelled by the pre-step hook, which said so
        t0 = time.perf_counter()
        try:
            if any(t.is_cuda for t in job.sources):
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream()
                arena.pin()
            sums = copy_and_hash(job, arena.tensor, arena.view, self._session.chunk_size, self._side_stream,
                                 self._chunk_delay, self._hasher)
            torn = job.torn_sources()
        except Exception as e:
            return self._fail(job, f"snapshot of step {job.step} failed while copying: {e}", abort=name)
        job.released.set()
        job.copy_seconds = time.perf_counter() - t0
        if torn:
            self._capture.learned_clone.update(identity(job.sources[i]) for i in torn)
            return self._fail(job, f"snapshot of step {job.step} discarded: {len(torn)} tensor(s) changed in place "
                                   "while being copied (outside optimizer.step()); from now on they are cloned at "
                                   "snapshot() time instead", abort=name)
        manifest = Manifest(job.layout, self._session.chunk_size, tuple(sums), job.skeleton)
        blocked = job.snapshot_seconds + self._hook_wait_unreported
        try:
            self._session.call("commit", buffer=name, step=job.step, manifest=manifest.to_json(),
                               copy_seconds=job.copy_seconds, blocked_seconds=blocked)
        except Exception as e:
            return self._fail(job, f"snapshot of step {job.step} could not be committed: {e}")
        self._hook_wait_unreported = 0.0
        self._daemon_lost = False
        self.stats["committed"] += 1
        self.stats["last_copy_seconds"] = job.copy_seconds
        self.stats["last_step"] = job.step
        if self._failures:
            log.warning("ftd: snapshots work again (step %d committed after %d failure(s))", job.step, self._failures)
            self._failures = 0
        self._session.prepare_next_arena(pin=any(t.is_cuda for t in job.sources))
        self._session.ready_nbytes = job.layout.nbytes
        job.finish(True)  # after preparing the next buffer: the worker is then free for the next job

    def _fail(self, job: SnapshotJob, message: str, abort: str | None = None) -> None:
        """End a job that produced no version: free its buffer, warn, then wake whoever waits on it."""
        job.released.set()
        if abort is not None:
            self._session.abort(abort, message or "cancelled")
        if message:
            self._note_failure(message)
        job.finish(False, message or "cancelled")

    def _note_failure(self, message: str) -> None:
        self._failures += 1
        self.stats["failed"] += 1
        self._warn(message)

    def _warn(self, message: str) -> None:
        """Warn at once, then at most every 30 s while failures go on; training continues either way."""
        now = time.monotonic()
        if self._failures <= 1 or now - self._warned_at > 30:
            log.warning("ftd: %s (training continues)", message)
            self._warned_at = now
