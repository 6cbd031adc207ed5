"""The trainer hook: ``ftd.Client``. See README for the five lines a trainer needs.

``snapshot()`` captures the state (``capture``: state_dict()s, RNG states; clones of what may change before the
next optimizer step) and hands the rest to a background copy job (``copier``), which asks the daemon for a buffer
(``session``), copies and checksums into it, and commits. Tensors owned by an optimizer only change inside
``optimizer.step()``, so a step pre-hook waits there, and only if their copy is still running. ``restore()`` loads
the newest version every rank of the node holds (the cluster's recoverable step in a cluster), verifying every
chunk's checksum (``restore``). Threads: the trainer thread calls ``snapshot``/``restore``/``wait``/``close`` and
runs the pre-step hook; one copier thread runs ``_process`` for one job at a time (``copier.Worker``).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import torch

from ftd.control.connection import Connection
from ftd.control.locate import find_daemon
from ftd.errors import DaemonUnavailable, FtdError, SerializationError
from ftd.shm.checksum import ChunkHasher
from ftd.shm.layout import Manifest
from ftd.trainer import at_exit
from ftd.trainer.capture import StateCapture, identity
from ftd.trainer.copier import SnapshotJob, Worker, add_copier_totals, copy_and_hash
from ftd.trainer.discovery import detect_rank_world, local_world, warn_about_launcher
from ftd.trainer.replicas import ReplicaPolicy
from ftd.trainer.reshard import restore_resharded
from ftd.trainer.restore import REPAIRING, restore_versions
from ftd.trainer.session import Busy, DaemonSession
from ftd.trainer.thread_usage import ThreadUsage
from ftd.util.lines import say

log = logging.getLogger(__name__)

BEGIN_GRACE_SECONDS = 0.05  # longest an optimizer step waits for the daemon to hand out a buffer
RESTORE_WAIT_SECONDS = 600.0  # longest restore() waits for a rebuilding cluster daemon
WAIT_REPORT_SECONDS = 10.0  # while restore() waits, a line this often with the reason
SLOW_BEGIN_SECONDS = 1.0  # a begin taking longer than this means the daemon is gone or stuck, not busy
RESUME_POLICIES = ("auto", "never", "must")
COPY_MODES = ("background", "foreground")


class Client:
    """Asynchronous in-memory snapshots of a training state, held by the node's ftd daemon.

    endpoint: the daemon's control endpoint; by default found from the environment (find_daemon:
      $FTD_ENDPOINT, $FTD_CONFIG, or the node rank torchrun or SLURM set), so a trainer started by
      torchrun, srun or `ftd agent` needs no arguments.
    rank, world_size: default torch.distributed's, else $RANK/$WORLD_SIZE, else 0/1.
    capture_rng: also snapshot and restore python, numpy, torch and CUDA RNG states.
    strict: the first snapshot() raises SerializationError, naming the key path, for a value ftd cannot
      store (later ones warn and go on: by then raising would end a run that may be days old, while at
      the first step it costs nothing and an unprotected run would cost everything).
    verbose: print one line to stderr per restore (job, step, from memory or disk, bytes, seconds),
      and every few seconds while a restore waits.
    copy: "background" (default; $FTD_COPY) copies during the next forward/backward, on cores the
      compute leaves idle (a GPU host); "foreground" copies inside snapshot() with the trainer thread
      and the copier together, for a host whose cores all compute (CPU training), where a background
      copy slows every compute thread (README "On a busy host"). Commit stays asynchronous either way.
    replicas: a process group replicating the state's modules and optimizers: each rank snapshots 1/R (replicas.py).
    """

    def __init__(self, endpoint: str | None = None, *, rank: int | None = None, world_size: int | None = None,
                 capture_rng: bool = True, timeout: float | None = None, strict: bool = True, verbose: bool = True,
                 copy: str | None = None, replicas: Any = None):
        self.copy = copy or os.environ.get("FTD_COPY") or "background"
        if self.copy not in COPY_MODES:
            raise ValueError(f"copy={self.copy!r} (from {'Client(copy=...)' if copy else '$FTD_COPY'}): use one of {COPY_MODES}")
        self.endpoint, config, self.found_by = find_daemon(endpoint)
        warn_about_launcher()
        detected = detect_rank_world()
        self.rank = detected[0] if rank is None else rank
        self.world_size = detected[1] if world_size is None else world_size
        self.capture_rng = capture_rng
        self.strict, self.verbose = strict, verbose
        self._conn = Connection(self.endpoint, config.request_timeout if timeout is None else timeout)
        self._session = DaemonSession(self._conn, self.rank, self.world_size, config.chunk_size)
        self._capture = StateCapture(capture_rng, self._install_hook)
        self._hooks: dict[int, Any] = {}
        self._side_stream = None
        self._chunk_delay = float(os.environ.get("FTD_DEBUG_COPY_DELAY", "0"))
        self._help = os.environ.get("FTD_DEBUG_NO_HELP") != "1"  # for benchmarks: the hook only waits
        self._failures = 0
        self._failed_since: int | None = None  # step of the first failure since the last commit
        self._last_failed = False  # the last snapshot() produced no job (its value could not be stored...)
        self._calls = 0
        self._begin_at: float | None = None  # when the copier asked the daemon for a buffer (None: not asking)
        self._daemon_lost = False
        self._hook_wait_unreported = 0.0  # pre-step waits not yet reported to the daemon (ftd status)
        self._warned_at = 0.0
        self._told_wait = False
        self._restored = False  # a restore got an answer from the daemon
        self._closed = False
        self.stats = {"snapshots": 0, "committed": 0, "failed": 0, "skipped_busy": 0, "skipped_setup": 0,
                      "skipped_protecting": 0, "snapshot_seconds": 0.0, "helped_chunks": 0, "help_cpu": 0.0,
                      "hook_wait_seconds": 0.0, "last_copy_seconds": None, "last_step": None, "replicas": None}
        self._capture.replicas = ReplicaPolicy(replicas, config.replica_snapshots, self.rank, self.stats,
                                                config.replica_min_bytes)
        self._hasher = ChunkHasher()
        self._worker = Worker(self._process)
        at_exit.track(self)

    # ---- public API ------------------------------------------------------------------------------
    def snapshot(self, step: int, state: dict) -> None:
        """Start an asynchronous snapshot of ``state`` at ``step``; returns at once. Never raises, except
        for a value ftd cannot store at the first snapshot of a ``strict`` client (see the class doc)."""
        t0 = time.perf_counter()
        self._calls += 1
        try:
            if self._closed:
                raise FtdError("client is closed")
            job = self._capture.capture(step, state)
            job.snapshot_seconds = time.perf_counter() - t0
            self.stats["snapshots"] += 1
            self._last_failed = False
            self._worker.submit(job)
        except SerializationError as e:
            self._last_failed = True
            if self.strict and self._calls == 1:
                raise SerializationError(f"{e}. (ftd refuses this at the first snapshot, so that the run does not "
                                         f"go on unprotected; Client(strict=False) warns instead)") from None
            self._note_failure(f"snapshot of step {step} skipped: {e}", step)
        except Exception as e:
            self._last_failed = True
            self._note_failure(f"snapshot of step {step} skipped: {e}", step)
        finally:
            self.stats["snapshot_seconds"] += time.perf_counter() - t0
        if self.copy == "foreground":  # copy now, two threads, while no compute thread competes (a hook wait)
            self._before_optimizer_step(None, None, None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the last snapshot is copied and committed (and the buffer of the next one is
        mapped, so the next snapshot finds the worker free); True only if the last snapshot() call's
        snapshot was committed."""
        if self._last_failed:
            return False
        job = self._worker.latest
        if job is None:
            return True
        job.done.wait(timeout)
        return job.done.is_set() and job.ok

    def restore(self, state: dict, *, resume: str = "auto", strict: bool = True) -> int | None:
        """Load the newest snapshot into ``state`` (in place: see ``ftd.trainer.restore``); return its
        step, or None when the trainer starts afresh.

        resume: "auto" restores the newest snapshot of a run that did not finish (a run whose every rank
          called ``finish()`` is over: a rerun starts afresh, and the old versions are dropped); "never"
          drops what the job holds and starts afresh; "must" restores or raises FtdError.
        strict: the snapshot's top-level keys must be the keys of ``state`` (FtdError naming those that
          differ); False restores the keys both have and adds the others as plain data. An empty dict
          receives every saved value as plain data.
        Raises DaemonUnavailable (saying how to start a daemon) if no daemon answers, and FtdError if
        the snapshot does not fit the live state (shapes that differ), or another live process holds
        this rank.
        """
        if resume not in RESUME_POLICIES:
            raise ValueError(f"resume={resume!r}: use one of {RESUME_POLICIES}")
        self.wait()
        started = time.monotonic()
        deadline = started + RESTORE_WAIT_SECONDS
        reported = started
        while True:
            try:
                reply = self._conn.call("restore", rank=self.rank, pid=os.getpid(), resume=resume,
                                        world=self.world_size, **local_world())
            except DaemonUnavailable as e:
                raise DaemonUnavailable(f"{e} (this trainer looked there because of {self.found_by})") from None
            self._restored = True
            if "wait" not in reply:
                if reply.get("fresh"):
                    self._say(f"ftd: rank {self.rank} of job {reply.get('job')!r} starts afresh: {reply['fresh']}")
                if reply.get("reshard"):  # a run at another world size: from the global checkpoint on disk
                    return restore_resharded(reply["reshard"], state, self.rank, self.world_size, self.capture_rng,
                                             strict=strict, verbose=self.verbose, job=reply.get("job", "?"))
                step = restore_versions(self._conn, reply, state, self.rank, self.capture_rng, strict=strict,
                                        verbose=self.verbose, world=self.world_size,
                                        arena_for=lambda name, shm: self._session.arena(name, shm, reserve=False))
                if step is not REPAIRING:
                    if step is None and resume == "must":
                        raise FtdError(f"resume='must', but job {reply.get('job')!r} holds no snapshot of rank "
                                       f"{self.rank} on node {reply.get('node_rank', 0)} ({self.endpoint}); was the "
                                       f"job name or the node the same as in the run to resume?")
                    if not reply.get("held_by") and not self._capture.replicas.may_slice(reply):  # set up its buffers
                        self._session.prepare(state, self.capture_rng)
                    return step
                reason = "the daemon repairs a corrupt chunk from its peers"
            else:
                reason = reply["wait"]
            now = time.monotonic()
            if now > deadline:
                raise FtdError(f"restore gave up after {RESTORE_WAIT_SECONDS:.0f} s: {reason}")
            if not self._told_wait or now - reported >= WAIT_REPORT_SECONDS:
                log.info("ftd: rank %d waits to restore: %s", self.rank, reason)
                self._say(f"ftd: rank {self.rank} waits to restore ({now - started:.0f} s): {reason}")
                self._told_wait, reported = True, now
            time.sleep(0.2)

    def finish(self, timeout: float = 30.0) -> None:
        """The run is over: finish the last snapshot, tell the daemon (a rerun of this job then starts
        afresh instead of restoring the final step), and release everything."""
        self.close(timeout, finished=True)

    def close(self, timeout: float = 30.0, *, finished: bool = False) -> None:
        """Finish the last snapshot (up to ``timeout`` seconds), then release everything; with
        ``finished``, also mark this rank's run as finished (see ``finish``)."""
        if self._closed:
            return
        self.wait(timeout)
        self._closed = True
        at_exit.untrack(self)
        self._worker.close(timeout)
        if finished:
            self._mark_finished()
        self._detach()
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._session.drop_arenas()
        self._hasher.close()
        self._conn.close()

    def _mark_finished(self) -> None:
        try:
            reply = self._session.call("finish")
        except FtdError as e:
            log.warning("ftd: could not mark rank %d's run finished (%s); a rerun will resume its last snapshot "
                        "unless it passes resume='never'", self.rank, e)
            return
        if self._last_failed or (self._worker.latest is not None and not self._worker.latest.ok):
            log.warning("ftd: rank %d finished, but its last snapshot was not committed: the finished run's last "
                        "version is step %s", self.rank, reply.get("step"))

    def _detach(self) -> None:
        """Tell the daemon this process holds the rank no more (its versions stay for a restart)."""
        if self._session.id is None and not self._restored:
            return  # never talked to a daemon: nothing to undo (and none to wait for)
        try:
            self._conn.call("detach", rank=self.rank, pid=os.getpid())
        except FtdError:
            pass  # the daemon is gone: nothing holds the rank there anyway

    def _say(self, line: str) -> None:
        say(line, sys.stderr) if self.verbose else None

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
                asking = self._begin_at  # the previous snapshot still waits for the daemon to answer
                if busy and asking is not None:
                    if time.monotonic() - asking > SLOW_BEGIN_SECONDS:
                        self._note_failure(f"snapshot of step {job.step} skipped: the daemon at {self.endpoint} has "
                                           f"not answered for {time.monotonic() - asking:.0f} s (stopped, restarting "
                                           "or stuck); snapshots resume once it answers", job.step)
                    else:
                        self.stats["skipped_busy"] += 1  # the daemon is slow to answer: not the step's fault
                elif busy:
                    self.stats["skipped_busy"] += 1
                    if self.stats["skipped_busy"] == 1:
                        log.warning("ftd: a snapshot takes longer than a training step, so some steps are not "
                                    "snapshotted (each newer snapshot supersedes an unstarted one); training is "
                                    "not slowed down. `ftd status` shows the copy time")
                elif job.layout.nbytes != self._session.ready_nbytes:
                    self.stats["skipped_setup"] += 1  # the daemon is still reserving this layout's buffers
                    log.info("ftd: snapshot of step %d skipped while the buffers for %d bytes are set up",
                             job.step, job.layout.nbytes)
                elif self._daemon_lost:
                    self._note_failure(f"snapshot of step {job.step} skipped: the daemon at {self.endpoint} does not "
                                       "answer (stopped or restarting); snapshots resume once it is back", job.step)
                else:
                    self._note_failure(f"snapshot of step {job.step} skipped: the daemon did not hand out a "
                                       "buffer before the next optimizer step", job.step)
                return
        if not job.released.is_set():
            if self._help:
                job.claimable.wait()  # the copier hands out its chunks a moment after the copy starts
            claims = job.claims
            if claims is not None and self._help:  # help: copy and hash what is left beside the copier, not idle
                before = ThreadUsage.now()
                self.stats["helped_chunks"] += claims.run(helping=True)
                self.stats["help_cpu"] += ThreadUsage.now().since(before).cpu
            job.released.wait()
        waited = time.perf_counter() - t0
        self.stats["hook_wait_seconds"] += waited
        self._hook_wait_unreported += waited
        job.capture_versions_at_step()
        if job.copied_event is not None:
            torch.cuda.current_stream().wait_event(job.copied_event)

    # ---- one snapshot: copier thread -------------------------------------------------------------
    def _process(self, job: SnapshotJob) -> None:
        self._begin_at = time.monotonic()
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
        finally:
            self._begin_at = None
        if not job.start_copy():
            return self._fail(job, "", abort=name)  # cancelled by the pre-step hook, which said so
        t0 = time.perf_counter()
        try:
            if any(t.is_cuda for t in job.sources):
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream()
                arena.pin()
            sums = copy_and_hash(job, arena.tensor, arena.view, self._session.chunk_size, self._side_stream,
                                 self._chunk_delay, self._hasher, reserve=arena.reserve)
            torn = job.torn_sources()
        except Exception as e:
            return self._fail(job, f"snapshot of step {job.step} failed while copying: {e}", abort=name)
        job.released.set()
        job.copy_seconds = time.perf_counter() - t0
        if torn:
            self._capture.learned_clone.update((job.origins or list(map(identity, job.sources)))[i] for i in torn)
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
        add_copier_totals(self.stats, job)
        self.stats["last_copy_seconds"] = job.copy_seconds
        self.stats["last_step"] = job.step
        if self._failures:
            log.warning("ftd: snapshots work again (step %d committed after %d failure(s))", job.step, self._failures)
            self._failures = 0
            self._failed_since = None
        self._session.prepare_next_arena(pin=any(t.is_cuda for t in job.sources))
        self._session.ready_nbytes = job.layout.nbytes
        job.finish(True)  # after preparing the next buffer: the worker is then free for the next job

    def _fail(self, job: SnapshotJob, message: str, abort: str | None = None) -> None:
        """End a job that produced no version: free its buffer, warn, then wake whoever waits on it."""
        job.claimable.set()
        job.released.set()
        if abort is not None:
            self._session.abort(abort, message or "cancelled")
        if message:
            self._note_failure(message, job.step)
        job.finish(False, message or "cancelled")

    def _note_failure(self, message: str, step: int | None = None) -> None:
        self._failures += 1
        self.stats["failed"] += 1
        if self._failed_since is None:
            self._failed_since = step
        self._warn(message)

    def _warn(self, message: str) -> None:
        """Warn at once, then at most every 30 s while failures go on, with their count; training
        continues either way (and ``wait()`` says whether the last snapshot was committed)."""
        now = time.monotonic()
        if self._failures <= 1 or now - self._warned_at > 30:
            since = "" if self._failed_since is None else f" since step {self._failed_since}"
            count = f"; {self._failures} snapshot(s) failed{since}, none committed since" if self._failures > 1 else ""
            log.warning("ftd: %s (training continues%s)", message, count)
            self._warned_at = now
