"""The trainer hook: ``ftd.Client``. See README for the five lines a trainer needs.

snapshot() flattens the state (state_dict() of every Stateful value, plus RNG states), clones the
few tensors that may change before the next optimizer step (buffers such as BatchNorm statistics,
anything not owned by an optimizer), and hands the rest to a background copy job. Tensors owned by
an optimizer (parameters, moments) only change inside optimizer.step(), so a step pre-hook waits
there, and only if their copy is still running. restore() loads the newest complete version every
rank of the node holds, verifying every chunk's checksum on the way.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from . import rng, shm, treecodec
from .checksum import ChunkHasher, chunk_checksum
from .config import Config, load_config, node_rank_from_env
from .connection import Connection
from .copier import SnapshotJob, Worker, copy_and_hash
from .errors import DaemonUnavailable, FtdError, Refused, SerializationError
from .layout import Manifest, chunk_plan, plan_layout

log = logging.getLogger("ftd.client")

_SESSION_LOST = "unknown or outdated session"
BEGIN_GRACE_SECONDS = 0.05  # longest an optimizer step waits for the daemon to hand out a buffer
RESTORE_WAIT_SECONDS = 600.0  # longest restore() waits for a rebuilding cluster daemon
_REPAIRING = object()


class _Busy(Exception):
    """The daemon keeps both buffers for the cluster (recoverable + being protected): skip this snapshot."""


def _is_stateful(x: Any) -> bool:
    return callable(getattr(x, "state_dict", None)) and callable(getattr(x, "load_state_dict", None))


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.device)


def find_daemon(endpoint: str | None = None) -> tuple[str, Config, str]:
    """(endpoint, config, how it was found) of this process's node daemon. In order: the argument,
    $FTD_ENDPOINT, the node config named by $FTD_CONFIG, else the default config for job $FTD_JOB on
    the node whose rank $FTD_NODE_RANK, $GROUP_RANK (torchrun) or $SLURM_NODEID gives."""
    if os.environ.get("FTD_CONFIG"):
        config = load_config(os.environ["FTD_CONFIG"])
        found = f"the config $FTD_CONFIG={os.environ['FTD_CONFIG']}"
    else:
        config = load_config(None)
        source = node_rank_from_env()
        found = (f"job '{config.job}', node rank {config.node_rank} from "
                 f"{'$' + source[1] if source else 'the default (no $FTD_NODE_RANK, $GROUP_RANK or $SLURM_NODEID)'}")
    if endpoint:
        return endpoint, config, "the endpoint argument"
    if os.environ.get("FTD_ENDPOINT"):
        return os.environ["FTD_ENDPOINT"], config, "$FTD_ENDPOINT"
    return config.endpoint, config, found


def _detect_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _Arena:
    """A daemon buffer mapped into the trainer: uint8 tensor + memoryview over the same pages."""

    def __init__(self, path: Path, populate: bool = True):
        self.mapping = shm.Mapping(path, populate=populate)
        self.view = self.mapping.view()
        self.tensor = torch.frombuffer(self.view, dtype=torch.uint8) if self.mapping.size else torch.empty(0, dtype=torch.uint8)
        self.cuda_registered = False

    def pin(self) -> None:
        """Page-lock the arena so device-to-host copies run asynchronously at full speed."""
        if not self.cuda_registered and self.mapping.size:
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.mapping.size, 0)
            if int(err) != 0:
                raise FtdError(f"cudaHostRegister of {self.mapping.size} bytes failed with error {err}")
            self.cuda_registered = True

    def close(self) -> None:
        if self.cuda_registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        del self.tensor
        try:
            self.view.release()
        except (BufferError, ValueError):
            pass  # a tensor still views the arena; the mapping goes with it
        self.mapping.close()


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
        detected = _detect_rank_world()
        self.rank = detected[0] if rank is None else rank
        self.world_size = detected[1] if world_size is None else world_size
        self.capture_rng = capture_rng
        self._conn = Connection(self.endpoint, config.request_timeout if timeout is None else timeout)
        self._session: str | None = None
        self._shm_dir: Path | None = None
        self._chunk_size = config.chunk_size
        self._arenas: dict[str, _Arena] = {}
        self._next_buffer: str | None = None
        self._layout = None  # the last snapshot's arena layout, reused while tensors keep their shapes
        self._ready_nbytes = -1  # snapshot size whose buffers are allocated and mapped
        self._hooks: dict[int, Any] = {}
        self._learned_clone: set[tuple] = set()   # live tensors caught being mutated outside optimizer.step()
        self._side_stream = None
        self._chunk_delay = float(os.environ.get("FTD_DEBUG_COPY_DELAY", "0"))
        self._failures = 0
        self._daemon_lost = False
        self._hook_wait_unreported = 0.0  # pre-step waits not yet reported to the daemon (ftd status)
        self._warned_at = 0.0
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
            job = self._prepare(step, state)
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
                reply = self._conn.call("restore", rank=self.rank, **self._local_world())
            except DaemonUnavailable as e:
                raise DaemonUnavailable(f"{e} (this trainer looked there because of {self.found_by})") from None
            if "wait" not in reply:
                step = self._restore_from(reply, state)
                if step is not _REPAIRING:
                    return step
                reason = "the daemon repairs a corrupt chunk from its peers"
            else:
                reason = reply["wait"]
            if time.monotonic() > deadline:
                raise FtdError(f"restore gave up after {RESTORE_WAIT_SECONDS:.0f} s: {reason}")
            if not getattr(self, "_told_wait", False):
                log.info("ftd: rank %d waits to restore: %s", self.rank, reason)
                self._told_wait = True
            time.sleep(0.2)

    @staticmethod
    def _local_world() -> dict:
        """Ranks on this node ($LOCAL_WORLD_SIZE, set by torchrun), so the daemon knows when all of
        them committed a step; omitted when unknown (the daemon counts the ranks that registered)."""
        value = os.environ.get("LOCAL_WORLD_SIZE", "")
        return {"local_world": int(value)} if value.isdigit() and int(value) > 0 else {}

    def _restore_from(self, reply: dict, state: dict):
        shm_dir = Path(reply["shm_dir"])
        for version in reply["versions"]:
            step, name = version["step"], version["buffer"]
            manifest = Manifest.from_json(version["manifest"])
            try:
                arena = _Arena(shm_dir / Path(name).name, populate=False)  # read once: no need to pre-fault
            except FileNotFoundError:
                log.warning("ftd: snapshot of step %d vanished before it could be read; trying an older one", step)
                continue
            try:
                tensors = self._read_verified(arena, manifest, state, step)
                if tensors is None:
                    answer = self._conn.call("corrupt", rank=self.rank, buffer=name, step=step)
                    if answer.get("repairing"):
                        return _REPAIRING  # a cluster member rebuilds it from its peers: ask again
                    continue
                self._load(manifest, state, tensors)
                del tensors
            finally:
                _close_in_background(arena)
            origin = version.get("origin", "memory")
            if origin.startswith("disk"):  # the memory copies could not give a step: say so loudly
                log.warning("ftd: rank %d restored step %d from the version flushed to disk (%s)", self.rank, step,
                            origin.partition(":")[2] or "flush_dir")
            else:
                log.info("ftd: rank %d restored step %d", self.rank, step)
            return step
        return None

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
        self._drop_arenas()
        self._hasher.close()
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- snapshot: trainer thread ----------------------------------------------------------------
    def _prepare(self, step: int, state: dict) -> SnapshotJob:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise SerializationError("state must be a dict with string keys")
        owned: set[tuple] = set()
        captured: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, torch.optim.Optimizer):
                self._install_hook(value)
                owned.update(_optimizer_tensors(value))
            captured[key] = value.state_dict() if _is_stateful(value) else value
        tree = {"state": captured, "rng": rng.capture() if self.capture_rng else None}
        skeleton, tensors = treecodec.encode(tree)
        sources, versions = [], []
        for t in tensors:
            ident = _identity(t)
            if ident in owned and ident not in self._learned_clone:
                sources.append(t)
                versions.append(t._version)
            else:
                sources.append(t.clone())  # may change before the next optimizer step: capture it now
                versions.append(None)
        signature = tuple((treecodec.dtype_name(t.dtype), tuple(t.shape)) for t in tensors)
        if self._layout is None or self._layout.signature != signature:
            self._layout = plan_layout(signature)
        layout = self._layout
        job = SnapshotJob(step, skeleton, layout, sources, versions)
        if any(t.is_cuda for t in sources):
            job.ready_event = torch.cuda.Event()
            job.ready_event.record()
        return job

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
                elif job.layout.nbytes != self._ready_nbytes:
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

    # ---- snapshot: background thread -------------------------------------------------------------
    def _process(self, job: SnapshotJob) -> None:
        try:
            name, arena = self._begin(job.step, job.layout.nbytes)
        except _Busy as busy:
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
            sums = copy_and_hash(job, arena.tensor, arena.view, self._chunk_size, self._side_stream,
                                 self._chunk_delay, self._hasher)
            torn = job.torn_sources()
        except Exception as e:
            return self._fail(job, f"snapshot of step {job.step} failed while copying: {e}", abort=name)
        job.released.set()
        job.copy_seconds = time.perf_counter() - t0
        if torn:
            self._learned_clone.update(_identity(job.sources[i]) for i in torn)
            return self._fail(job, f"snapshot of step {job.step} discarded: {len(torn)} tensor(s) changed in place "
                                   "while being copied (outside optimizer.step()); from now on they are cloned at "
                                   "snapshot() time instead", abort=name)
        manifest = Manifest(job.layout, self._chunk_size, tuple(sums), job.skeleton)
        blocked = job.snapshot_seconds + self._hook_wait_unreported
        try:
            self._call_session("commit", buffer=name, step=job.step, manifest=manifest.to_json(),
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
        self._prepare_next_arena(pin=any(t.is_cuda for t in job.sources))
        self._ready_nbytes = job.layout.nbytes
        job.finish(True)  # after preparing the next buffer: the worker is then free for the next job

    def _fail(self, job: SnapshotJob, message: str, abort: str | None = None) -> None:
        """End a job that produced no version: free its buffer, warn, then wake whoever waits on it."""
        job.released.set()
        if abort is not None:
            self._abort(abort, message or "cancelled")
        if message:
            self._note_failure(message)
        job.finish(False, message or "cancelled")

    def _begin(self, step: int, nbytes: int) -> tuple[str, _Arena]:
        reply = self._call_session("begin", step=step, nbytes=nbytes)
        if "busy" in reply:
            raise _Busy(reply["busy"])
        name = reply["buffer"]
        self._next_buffer = reply.get("next")
        for stale in [n for n in self._arenas if n not in (name, self._next_buffer)]:
            self._arenas.pop(stale).close()  # a buffer the daemon replaced (the layout grew)
        arena = self._arena(name)
        if arena.mapping.size < nbytes:
            raise FtdError(f"daemon buffer {name} holds {arena.mapping.size} bytes, snapshot needs {nbytes}")
        return name, arena

    def _arena(self, name: str) -> _Arena:
        arena = self._arenas.get(name)
        if arena is None:
            arena = self._arenas[name] = _Arena(self._shm_dir / Path(name).name)
        return arena

    def _prepare_next_arena(self, pin: bool) -> None:
        """Map (and page-lock) the buffer the next snapshot will get, off the trainer's critical path."""
        if self._next_buffer and self._next_buffer not in self._arenas:
            try:
                arena = self._arena(self._next_buffer)
                if pin:
                    arena.pin()
            except Exception as e:  # the next begin will simply map it itself
                log.debug("ftd: could not prepare buffer %s: %s", self._next_buffer, e)

    def _call_session(self, mtype: str, **fields: Any) -> dict:
        """A request that needs a registered session; registers (again) if the daemon forgot us."""
        for attempt in (0, 1):
            if self._session is None:
                reply = self._conn.call("register", rank=self.rank, world=self.world_size, pid=os.getpid(),
                                        **self._local_world())
                self._session, self._shm_dir = reply["session"], Path(reply["shm_dir"])
                self._ready_nbytes = -1
                self._chunk_size = int(reply["chunk_size"])
                self._drop_arenas()
            try:
                return self._conn.call(mtype, session=self._session, **fields)
            except Refused as e:
                if _SESSION_LOST not in str(e) or attempt or mtype != "begin":
                    raise
                self._session = None
            except DaemonUnavailable:
                self._session = None
                raise
        raise AssertionError("unreachable")

    def _abort(self, name: str, reason: str) -> None:
        try:
            self._call_session("abort", buffer=name, reason=reason[:200])
        except FtdError:
            pass

    def _drop_arenas(self) -> None:
        for arena in self._arenas.values():
            arena.close()
        self._arenas.clear()

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

    # ---- restore -----------------------------------------------------------------------------------
    def _read_verified(self, arena: _Arena, manifest: Manifest, state: dict,
                       step: int) -> dict[int, torch.Tensor] | None:
        """Every tensor of a snapshot, out of shared memory, each chunk's checksum checked on the way.

        One pass: a chunk is hashed (which also brings it into cache), then its pieces are copied
        into fresh tensors. Tensors bound for an nn.Module stay views into the buffer, since
        Module.load_state_dict copies them into the existing parameters anyway. Returns None, after
        a warning, if a chunk fails its checksum.
        """
        layout = manifest.layout
        tree = manifest.tree
        if not isinstance(tree, dict) or not isinstance(tree.get("state"), dict):
            raise SerializationError("snapshot skeleton has no state")
        if arena.mapping.size < layout.nbytes:
            log.warning("ftd: snapshot buffer is smaller than its manifest says; discarding it")
            return None
        as_view: set[int] = set()
        for key, sub in tree["state"].items():
            if isinstance(state.get(key), torch.nn.Module):
                as_view |= treecodec.tensor_indices(sub)
        out: dict[int, torch.Tensor] = {}
        flat: dict[int, torch.Tensor] = {}
        for i, s in enumerate(layout.slots):
            dtype = treecodec.dtype_from_name(s.dtype)
            if i in as_view:
                out[i] = arena.tensor[s.offset:s.end].view(dtype).view(s.shape)
            else:
                out[i] = torch.empty(s.shape, dtype=dtype)
                if s.nbytes:
                    flat[i] = out[i].view(-1).view(torch.uint8)
        for c, ((lo, hi), pieces) in enumerate(chunk_plan(layout, manifest.chunk_size)):
            if chunk_checksum(arena.view[lo:hi]) != manifest.checksums[c]:
                log.warning("ftd: snapshot of step %d (rank %d) fails its checksum in chunk %d (bytes %d-%d); "
                            "discarding it and trying an older one", step, self.rank, c, lo, hi)
                return None
            for p in pieces:
                if p.slot in flat:
                    base = layout.slots[p.slot].offset
                    flat[p.slot][p.start:p.end].copy_(arena.tensor[base + p.start:base + p.end])
        return out

    def _load(self, manifest: Manifest, state: dict, tensors: dict[int, torch.Tensor]) -> None:
        def tensor_at(i: int) -> torch.Tensor:
            if i not in tensors:
                raise SerializationError(f"snapshot skeleton refers to tensor {i}, the layout has {len(tensors)}")
            return tensors[i]

        tree = manifest.tree
        for key, sub in tree["state"].items():
            target = state.get(key)
            if _is_stateful(target):
                target.load_state_dict(treecodec.decode(sub, tensor_at))
            else:
                state[key] = treecodec.decode(sub, tensor_at)
        if self.capture_rng and tree.get("rng") is not None:
            rng.restore(treecodec.decode(tree["rng"], tensor_at))


def _close_in_background(arena: _Arena) -> None:
    """Unmapping a large buffer takes tens of ms per GiB; the restored trainer need not wait for it."""
    threading.Thread(target=arena.close, name="ftd-unmap", daemon=True).start()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> set[tuple]:
    """Identities of the tensors only optimizer.step() changes: its parameters and their state."""
    owned = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            owned.add(_identity(p))
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    owned.add(_identity(v))
    return owned


