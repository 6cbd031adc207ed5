#!/usr/bin/env python3
"""How long does a snapshot block the trainer, and how fast does a restore come back?

Run it as ``.venv/bin/python scripts/bench_snapshot.py`` (``--quick`` for a two-minute check;
``--only-flush`` for the flush section alone, about a minute, half of that with ``--quick``).

The training state is an nn.Module (a stack of big nn.Linear layers, a few dozen tensors) plus its
AdamW optimizer, so parameters are about 1/3 of the bytes and the two moment tensors the other 2/3.
For every state size, side by side in one run, each figure the median of several repetitions:

1. ftd, trainer-blocked time per snapshot: time inside ``client.snapshot()`` plus the wait in the
   optimizer pre-step hook before the next ``optimizer.step()``. The training loop is simulated:
   compute for D seconds (1-thread torch matmuls standing in for forward/backward), a real AdamW
   step, then ``client.snapshot(step, state)``. Two regimes: D = 2x the 1-thread raw memcpy time of
   the state (the copy can hide behind compute), and D = 0 (back-to-back steps: the hook waits for all
   of it). Two untimed snapshots first create and map the daemon's two buffers.
2. Synchronous ``torch.save`` of the whole state dict to /dev/shm and to a real disk (+ fsync): what a
   plain synchronous checkpoint blocks the trainer for.
3. ``torch.distributed.checkpoint.async_save`` of the same state: blocked time = the call itself
   (its future is awaited, untimed, before the next one).
4. Raw memcpy: ``dst.copy_(src)`` of every state tensor into one preallocated buffer; the ceiling for
   any copy. Measured with 1 torch thread (the setting the trainer, and so ftd's copier, runs under)
   and with 2 (the whole machine).
5. ftd background copy bandwidth: bytes / ``client.stats["last_copy_seconds"]`` (copy + checksum of
   one snapshot, with the trainer idle), and its ratio to raw memcpy.
6. Restore: ``client.restore(state)`` from the running daemon into a freshly built model and optimizer,
   against ``torch.load`` + ``load_state_dict`` from disk with a cold page cache (the file evicted with
   POSIX_FADV_DONTNEED after fsync) and with a warm one.

7. The durable tier (the flush section; ``--flush-sizes``, default 256M, 64M with ``--quick``;
   ``--no-flush`` skips it, ``--only-flush`` runs it alone). The overlapped training loop of 1. (D =
   2x the 1-thread memcpy time, which is also the comparison's regime: the copy hides behind compute,
   so any slowdown the flush causes shows up as blocked time) runs against a daemon without a
   ``flush_dir`` ("off") and one flushing to ``--disk-dir`` ("on": ``flush_every`` = ``--flush-every``
   (5), ``flush_interval`` = 0, ``flush_keep`` = 2), in ``--flush-rounds`` (2) rounds ordered off, on,
   on, off, ..., a fresh daemon each run, so that drift cancels; figures are the medians over all
   runs of a mode, with each run's median printed too. The first run of a size makes ``--flush-steps``
   (40) steps, or more, until ``--flush-seconds`` (12, 6 with ``--quick``) have passed; every later
   run makes as many steps as it did: at small sizes a step takes a few ms and one flush far longer,
   so 40 steps would see one flush. Whenever a flush
   takes longer than ``flush_every`` steps (always here) the daemon flushes back to back, the newest
   due version superseding a waiting one: the flush is busy for the whole loop, the worst case for
   the trainer. Reported per mode: trainer-blocked ms per snapshot (as in 1.; median, mean, max, and
   the median over committed snapshots only, since a skipped one costs the trainer almost nothing),
   the client's background copy time, the run's wall time and the median time of ``optimizer.step()``
   itself (without the hook's wait: blocked time does not show a trainer slowed by competing for the
   cores and memory bandwidth, a slower step does), snapshots committed and skipped (the client's counters:
   ``skipped_busy``, its worker still busy with the previous one; ``skipped_protecting``, the daemon
   answered "busy", which for a standalone daemon means both buffers are held, the newest version
   and the one a flush is copying out; ``failed``), and flushes done, failed and superseded. The
   warm-up version (the first recoverable step, flushed at once) is flushed before the loop starts
   and is not counted; after the loop the benchmark waits until no flush runs or waits (status
   ``flush.running``/``pending`` None), then snapshots one more version with the trainer idle and
   waits for its flush ("idle" flush), before stopping the daemon.
   Flush bandwidth, per flush from the daemon's ``status`` ``flush.recent``: "flush write" =
   ``file_bytes / write_seconds``; "end-to-end" = ``bytes`` (the version's arena) / ``seconds`` (the
   whole flush as the daemon saw it: copy-out, writing, the replies). It is compared to a raw
   sequential write, measured in the same run once the flushing daemon stopped: as many bytes as a
   flush wrote (``file_bytes``), 8 MiB ``os.write`` blocks to a new file in the same directory, fsync
   of the file and the directory; the file is then evicted from the page cache and deleted. The
   ratio flush/raw therefore charges the flush with everything its write phase does besides
   writing: checksumming its private copy, serializing with ``dcp.save`` (which fsyncs), *twice* for
   rank 0 (the top-level DCP for a plain ``dcp.load`` and ``rank-0/`` for ftd's own loader, so for one
   rank ``file_bytes`` is about 2x the state), reading rank 0 back and checking it bit for bit,
   checksumming every file for the manifest, and pruning versions beyond ``flush_keep``. It runs at
   nice 19 and in the idle I/O class, in 1 MiB system calls, and pauses between them while a
   trainer's copy runs (``ftd/copygate.py``), so under training (the loop's flushes) it gets whatever
   CPU and memory bandwidth the trainer and its copy leave, and it yields to *any* other process: the "idle" flush (trainer
   idle) is the figure to set against the raw write. "state/raw" = ``bytes / write_seconds`` against
   raw: how much slower than one plain write of the state the state becomes durable. Copy-out =
   ``copy_seconds``, the worker's copy (and check) of the version out of shared memory at normal
   priority, during which the daemon keeps the version's buffer from the trainer; the hold lasts a
   little longer (until the daemon's loop reads the worker's "copied" line).
   Restore from disk: the idle flush's version loaded back by ftd's own loader (``ondisk.load_rank``:
   the tensors' zip records read without unpickling, every chunk checked) into preallocated memory,
   with its files evicted from the page cache (cold) and again warm, against a raw sequential read of
   the same rank files, cold.

Targets printed as PASS/MISS: blocked time (overlapped) <= 5% of torch.save to /dev/shm; ftd copy
bandwidth >= 0.8x raw memcpy (same thread count); restore from the daemon >= 3x faster than a cold
torch.load from disk.

The benchmark starts its own daemon (``.venv/bin/ftd daemon`` with a private config, job name
``bench-<pid>``) for each size (and each flush-section run) and always stops it with SIGTERM, so no
shared-memory segment or process (its flush worker included) outlives the run, even on Ctrl-C or an
error; flushed versions and the raw-write files go to a temporary directory under ``--disk-dir``,
removed at the end. All torch work runs with
``torch.set_num_threads(1)`` (one core computes, the other copies), except the 2-thread memcpy.
Restores and loads run in fresh processes (a restarted trainer), and phases that allocate fresh
memory are preceded by an untimed touch of as much memory (see ``prefault``), because on this VM
the first touch of a page costs anything from 1 to 10 us depending on luck.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import torch
from benchstate import (  # scripts/benchstate.py
    N_LAYERS,
    Daemon,
    GiB,
    MiB,
    Spec,
    build_model,
    client_for,
    compute_for,
    fmt_size,
    full_state_dict,
    median,
    parse_size,
    state_digest,
    trained_state,
)
from benchutil import (
    REPO,
    CpuWatch,
    evict_from_page_cache,
    ftd_revision,
    mount_of,
    ms,
    prefault,
    sigterm_to_exit,  # scripts/benchutil.py
    table,
    timed,
    verdict,
)
from torch import nn

import ftd  # (benchstate put the repo's ftd first on sys.path)

WARMUP_STEPS = 2            # both daemon buffers allocated and mapped before anything is timed
TARGET_BLOCKED_FRACTION = 0.05
TARGET_COPY_RATIO = 0.8
TARGET_RESTORE_SPEEDUP = 3.0


# ---- small helpers ------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``xs``, nearest rank; nan if empty."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(q * len(ys)) - 1))]


def free_memory() -> None:
    gc.collect()


class MemoryWatch:
    """Samples available memory in the background; ``low`` is the least seen since the last reset."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.low = interval, psutil.virtual_memory().available
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memwatch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.low = min(self.low, psutil.virtual_memory().available)

    def reset(self) -> None:
        self.low = psutil.virtual_memory().available

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---- measurements -------------------------------------------------------------------------------
def measure_memcpy(tensors: list[torch.Tensor], repeat: int, threads: int) -> list[float]:
    """Seconds to copy every tensor into a preallocated (already touched) flat buffer."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    dst = torch.empty(total, dtype=torch.uint8)
    views, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        views.append((dst[off:off + n].view(t.dtype).view(t.shape), t))
        off += n

    def copy_all() -> None:
        for d, s in views:
            d.copy_(s)

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        copy_all()  # first touch of dst
        return [timed(copy_all) for _ in range(repeat)]
    finally:
        torch.set_num_threads(saved)
        views.clear()  # (the closure holds the list: free the copies it names)
        del dst


def run_training(client: Any, model: nn.Module, optimizer: torch.optim.Optimizer, d: float, steps: int,
                 first_step: int, min_seconds: float = 0.0) -> dict:
    """``steps`` simulated steps (compute D, AdamW step, snapshot), or more until ``min_seconds`` have
    passed; the blocked time of each snapshot.

    Snapshot i blocks the trainer inside snapshot() and in the pre-step hook of step i+1, so one more
    compute + optimizer step runs after the last snapshot to collect its hook wait.
    """
    state = {"model": model, "optim": optimizer}
    snap, hook, jobs, adam = [], [], [], []
    skipped = skipped_snapshots(client)
    until = time.perf_counter() + min_seconds
    i = 0
    while True:
        step = first_step + i
        compute_for(d)
        waited = client.stats["hook_wait_seconds"]
        t0 = time.perf_counter()
        optimizer.step()
        adam.append(time.perf_counter() - t0 - (client.stats["hook_wait_seconds"] - waited))  # the step itself
        if i:
            hook.append(client.stats["hook_wait_seconds"] - waited)
        if i >= steps and time.perf_counter() >= until:
            break
        snap.append(timed(lambda: client.snapshot(step, state)))
        jobs.append(submitted_job(client))
        i += 1
    client.wait()
    blocked = [s + h for s, h in zip(snap, hook)]
    return {"D_s": d, "blocked_s": blocked, "snapshot_call_s": snap, "hook_wait_s": hook,
            "skipped": skipped_snapshots(client) - skipped,
            "committed": [None if j is None else bool(j.ok) for j in jobs], "optimizer_step_s": adam,
            "copy_during_loop_s": [j.copy_seconds for j in jobs if j is not None and j.copy_seconds is not None]}


def skipped_snapshots(client: Any) -> int:
    """Snapshots that produced no version: failed, or skipped because the previous one was still busy."""
    return client.stats["failed"] + client.stats.get("skipped_busy", 0)


def submitted_job(client: Any) -> Any:
    """The job snapshot() just queued (an ftd internal: only used for the copy time of every snapshot
    of the loop, which client.stats keeps for the last one alone); None if the internals changed."""
    job = getattr(getattr(client, "_worker", None), "latest", None)
    return job if hasattr(job, "copy_seconds") else None


def warm_up(client: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """Snapshot and wait (no optimizer step meanwhile), until both daemon buffers exist and are mapped.

    The first snapshots of a state size wait for the daemon to create a buffer, which takes seconds
    at GiB sizes; with a step right after, the pre-step hook would skip them (see the report).
    """
    t0 = time.perf_counter()
    for step in range(WARMUP_STEPS):
        client.snapshot(step, {"model": model, "optim": optimizer})
        if not client.wait(300):
            raise RuntimeError(f"warm-up snapshot {step} was not committed: {client.stats}")
    return time.perf_counter() - t0


def measure_ftd_copy(client: Any, model: nn.Module, optimizer: torch.optim.Optimizer, repeat: int,
                     first_step: int) -> list[float]:
    """Background copy + checksum time of one snapshot with the trainer idle (waits for each commit)."""
    state = {"model": model, "optim": optimizer}
    out = []
    for i in range(repeat):
        client.snapshot(first_step + i, state)
        if not client.wait(60):
            raise RuntimeError(f"ftd snapshot of step {first_step + i} was not committed: {client.stats}")
        out.append(client.stats["last_copy_seconds"])
    return out


def run_restore_worker(job: dict, repeat: int, expect_digest: str) -> list[float]:
    """Run ``repeat`` restores, each in a fresh process (a restarted trainer); check what they loaded.

    Fresh processes, because in one process malloc hands the second restore the pages the first one
    already touched, and first-touch page faults are a large part of a real restore's cost.
    """
    out = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, __file__, "--restore-worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"restore worker {job['kind']} failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        if result["digest"] != expect_digest:
            raise RuntimeError(f"restore worker {job['kind']} loaded a state that differs from the saved one")
        if job["kind"] == "ftd" and result["step"] != job["expect_step"]:
            raise RuntimeError(f"ftd restored step {result['step']}, expected {job['expect_step']}")
        out.append(result["seconds"])
    return out


def restore_worker(job: dict) -> int:
    """Child process: build a fresh model + optimizer, time one restore into it, print JSON."""
    torch.set_num_threads(1)
    model, optimizer = build_model(Spec(0, job["width"]))
    state = {"model": model, "optim": optimizer}
    step = None
    prefault(job["prefault"])
    if job["kind"] == "ftd":
        client = ftd.Client(endpoint=job["endpoint"], rank=0, world_size=1)
        t0 = time.perf_counter()
        step = client.restore(state)
        seconds = time.perf_counter() - t0
        client.close()
    else:
        path = Path(job["path"])
        if job["kind"] == "load_cold":
            evict_from_page_cache(path)
        t0 = time.perf_counter()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
        optimizer.load_state_dict(sd["optim"])
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "step": step, "digest": state_digest(model, optimizer)}))
    return 0


def measure_ftd(spec: Spec, model: nn.Module, optimizer: torch.optim.Optimizer, d_overlap: float,
                args: argparse.Namespace, workdir: Path, prefault_bytes: int) -> dict:
    with Daemon(workdir, args.memory_budget) as daemon:
        with client_for(daemon) as client:
            warmup_s = warm_up(client, model, optimizer)
            overlapped = run_training(client, model, optimizer, d_overlap, args.repeat, first_step=100)
            worst = run_training(client, model, optimizer, 0.0, args.repeat, first_step=200)
            copy = measure_ftd_copy(client, model, optimizer, args.repeat, first_step=300)
            stats = dict(client.stats)
        if stats["failed"] or stats.get("skipped_busy"):
            print(f"   warning: ftd snapshots failed: {stats['failed']}, skipped while busy: "
                  f"{stats.get('skipped_busy', 0)}", flush=True)
        digest = state_digest(model, optimizer)  # == the last snapshot: no step ran after it
        job = {"kind": "ftd", "width": spec.width, "endpoint": daemon.endpoint, "expect_step": 300 + args.repeat - 1,
               "prefault": prefault_bytes}
        restore = run_restore_worker(job, args.repeat, digest)
    return {"overlapped": overlapped, "worst": worst, "copy_s": copy, "restore_s": restore, "client_stats": stats,
            "warmup_s": warmup_s}


def measure_torch_save(sd: dict, path: Path, repeat: int, prefault_bytes: int) -> list[float]:
    """Synchronous torch.save (+ fsync) of the state dict to a new file, as a blocking checkpoint does."""
    out = []
    for _ in range(repeat):
        path.unlink(missing_ok=True)
        prefault(prefault_bytes)

        def save() -> None:
            with open(path, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        out.append(timed(save))
    return out


def measure_dcp_async(sd: dict, root: Path, repeat: int, prefault_bytes: int) -> dict:
    """Blocked time of dcp.async_save (the call, plus staging if it returns a staging future)."""
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError as e:
        return {"error": f"torch.distributed.checkpoint unavailable: {e}"}
    blocked, total = [], []
    try:
        for i in range(repeat):
            ckpt = root / f"dcp{i}"
            prefault(prefault_bytes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                res = dcp.async_save(sd, checkpoint_id=str(ckpt), no_dist=True)
                staging = getattr(res, "staging_completion", None)
                if staging is not None:
                    staging.result()
                blocked.append(time.perf_counter() - t0)
                (getattr(res, "upload_completion", None) or res).result()
                total.append(time.perf_counter() - t0)
            shutil.rmtree(ckpt, ignore_errors=True)
    except Exception as e:  # report, never abort the benchmark over a peer's API
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    return {"blocked_s": blocked, "total_s": total}


def measure_size(nbytes: int, args: argparse.Namespace, workdir: Path, disk_dir: Path, memwatch: MemoryWatch) -> dict:
    memwatch.reset()
    cpu = CpuWatch()
    spec, model, optimizer, tensors, state_bytes = trained_state(nbytes)
    print(f"\n== {fmt_size(nbytes)}: {N_LAYERS} x Linear({spec.width}, {spec.width}), {len(tensors)} tensors, "
          f"{state_bytes / MiB:.0f} MiB", flush=True)
    r: dict = {"size": fmt_size(nbytes), "target_bytes": nbytes, "state_bytes": state_bytes,
               "tensors": len(tensors), "width": spec.width}

    r["memcpy_1t_s"] = measure_memcpy(tensors, args.repeat, threads=1)
    r["memcpy_2t_s"] = measure_memcpy(tensors, args.repeat, threads=2)
    del tensors
    d = 2 * median(r["memcpy_1t_s"])
    pre = 0 if args.no_prefault else state_bytes + state_bytes // 8
    progress("memcpy", cpu)

    r["ftd"] = measure_ftd(spec, model, optimizer, d, args, workdir, pre)
    free_memory()
    progress("ftd", cpu)

    sd = full_state_dict(model, optimizer)
    shm_file = Path("/dev/shm") / f"bench_snapshot.{os.getpid()}.pt"
    disk_file = disk_dir / "state.pt"
    try:
        r["save_shm_s"] = measure_torch_save(sd, shm_file, args.repeat, pre)
    finally:
        shm_file.unlink(missing_ok=True)
    r["save_disk_s"] = measure_torch_save(sd, disk_file, args.repeat, pre)
    progress("torch.save", cpu)
    digest = state_digest(model, optimizer)
    for kind in ("load_cold", "load_warm"):
        job = {"kind": kind, "width": spec.width, "path": str(disk_file), "prefault": pre}
        r[f"{kind}_s"] = run_restore_worker(job, args.repeat, digest)
    disk_file.unlink(missing_ok=True)
    progress("torch.load", cpu)
    r["dcp"] = measure_dcp_async(sd, disk_dir, args.repeat, pre)
    progress("dcp", cpu)

    del sd, model, optimizer
    free_memory()
    r["min_available_bytes"] = memwatch.low
    r["other_processes_cores"] = cpu.others()
    return r


# ---- the durable tier: flush to disk ----------------------------------------------------------------
FIRST_LOOP_STEP = 100       # the flush runs' training loop snapshots steps 100, 101, ...
FLUSH_KEEP = 2
FLUSH_DRAIN_TIMEOUT = 240.0
RAW_WRITES_PER_RUN = 2
WRITE_BLOCK = 8 * MiB
CLIENT_COUNTERS = ("snapshots", "committed", "failed", "skipped_busy", "skipped_setup", "skipped_protecting")


def flush_config(flush_dir: Path, every: int) -> str:
    return (f'flush_dir = "{flush_dir}"\nflush_every = {every}\nflush_interval = 0\n'
            f'flush_keep = {FLUSH_KEEP}\n')


def wait_flush_idle(daemon: Daemon, timeout: float, ended_at_least: int | None = None) -> dict:
    """Poll the daemon's status until no flush runs or waits (and, if given, at least that many
    flushes ended, done or failed); its ``flush`` dict."""
    deadline = time.monotonic() + timeout
    while True:
        fl = daemon.status()["flush"]
        idle = fl["running"] is None and fl["pending"] is None
        if idle and (ended_at_least is None or fl["flushed"] + fl["failures"] >= ended_at_least):
            return fl
        if time.monotonic() > deadline:
            raise RuntimeError(f"the flush did not finish within {timeout:.0f} s: running {fl['running']}, "
                               f"pending {fl['pending']}, last {fl['last']}")
        time.sleep(0.05)


def flush_log_lines(daemon: Daemon, limit: int = 40) -> list[str]:
    """The daemon log's lines about flushes (its last ``limit``), kept in the results for diagnosis."""
    try:
        lines = [ln for ln in daemon.log.read_text(errors="replace").splitlines() if "flush" in ln.lower()]
    except OSError:
        return []
    return lines[-limit:]


def run_flush_mode(flush_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, d: float,
                   steps: int, min_seconds: float, args: argparse.Namespace, workdir: Path) -> dict:
    """One run of the flush section: a fresh daemon (with ``flush_dir``, or without any flush), the
    overlapped training loop against it, then (flush on) the drain and one flush with the trainer idle."""
    extra = flush_config(flush_dir, args.flush_every) if flush_dir is not None else ""
    state = {"model": model, "optim": optimizer}
    out: dict = {"flush": flush_dir is not None}
    with Daemon(workdir, args.memory_budget, extra) as daemon:
        with client_for(daemon) as client:
            out["warmup_s"] = warm_up(client, model, optimizer)
            if flush_dir is not None:  # the first recoverable step (warm-up step 0) is flushed at once: not in the loop
                before = wait_flush_idle(daemon, FLUSH_DRAIN_TIMEOUT, ended_at_least=1)
            c0 = dict(client.stats)
            t0 = time.perf_counter()
            out["loop"] = run_training(client, model, optimizer, d, steps, FIRST_LOOP_STEP, min_seconds)
            out["loop_s"] = time.perf_counter() - t0
            out["client"] = {k: client.stats.get(k, 0) - c0.get(k, 0) for k in CLIENT_COUNTERS}
            if flush_dir is not None:
                t1 = time.perf_counter()
                drained = wait_flush_idle(daemon, FLUSH_DRAIN_TIMEOUT)
                out["drain_s"] = time.perf_counter() - t1
                out["flushed"] = drained["flushed"] - before["flushed"]
                out["flush_failures"] = drained["failures"] - before["failures"]
                out["superseded"] = drained["superseded"] - before["superseded"]
                out["flushes"] = [e for e in drained["recent"] if e.get("step", -1) >= FIRST_LOOP_STEP]
                # One more version, flushed with the trainer idle: the write path alone, for the raw comparison.
                idle_step = FIRST_LOOP_STEP + len(out["loop"]["blocked_s"]) - 1 + args.flush_every
                client.snapshot(idle_step, state)
                if not client.wait(120):
                    raise RuntimeError(f"snapshot of step {idle_step} was not committed: {client.stats}")
                after = wait_flush_idle(daemon, FLUSH_DRAIN_TIMEOUT,
                                        ended_at_least=drained["flushed"] + drained["failures"] + 1)
                last = after["last"] or {}
                out["idle_flush"] = last if last.get("ok") and last.get("step") == idle_step else None
                if out["idle_flush"] is None:
                    out["idle_flush_error"] = str(last)[:500]
                else:
                    out["disk_load"] = measure_disk_load(Path(out["idle_flush"]["dir"]), args.repeat)
                out["flush_failures_total"] = after["failures"]
                out["on_disk"] = after["on_disk"]
                job_dir = flush_dir / daemon.job
                out["disk_entries"] = sorted(p.name for p in job_dir.iterdir()) if job_dir.is_dir() else []
                out["daemon_flush_log"] = flush_log_lines(daemon)
    return out


def measure_disk_load(version: Path, repeat: int) -> dict:
    """The restore from disk: seconds for ftd's loader (``ondisk.load_rank``: zip records read
    without unpickling, every chunk checked) to load every rank of a flushed version into memory,
    with the version's files evicted from the page cache (cold) and again warm, against a raw
    sequential read of the same ranks' files (cold)."""
    from ftd.durable import ondisk
    node = ondisk.read_node_manifest(version, 0)
    entries = node["restore"]
    rank_files = [version / name for name in node["files"] if name.startswith("rank-")]
    dests = {r: bytearray(e["manifest"]["nbytes"]) for r, e in entries.items()}
    for d in dests.values():
        d[::4096] = bytes(len(d[::4096]))  # touch every page: the load's time, not first-touch faults

    def load() -> None:
        for r, e in entries.items():
            ondisk.load_rank(version / e["dir"], e, memoryview(dests[r]))

    def raw_read() -> None:
        buf = bytearray(WRITE_BLOCK)
        for path in rank_files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

    out: dict = {"bytes": sum(len(d) for d in dests.values()),
                 "file_bytes": sum(p.stat().st_size for p in rank_files), "cold_s": [], "warm_s": [], "raw_cold_s": []}
    for _ in range(repeat):
        for path in version.rglob("*"):
            if path.is_file():
                evict_from_page_cache(path)
        out["cold_s"].append(timed(load))
        out["warm_s"].append(timed(load))
        for path in rank_files:
            evict_from_page_cache(path)
        out["raw_cold_s"].append(timed(raw_read))
    return out


def measure_raw_write(directory: Path, nbytes: int, repeat: int) -> list[float]:
    """Seconds to write ``nbytes`` sequentially (8 MiB blocks) to a new file in ``directory`` and
    fsync it (and the directory); each file is then evicted from the page cache and deleted."""
    block = memoryview(os.urandom(WRITE_BLOCK))
    path = directory / f"raw-write.{os.getpid()}.bin"
    out = []
    for _ in range(repeat):
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, block[:min(left, WRITE_BLOCK)])
            os.fsync(fd)
        finally:
            os.close(fd)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        out.append(time.perf_counter() - t0)
        evict_from_page_cache(path)
        path.unlink()
    return out


def measure_flush(nbytes: int, args: argparse.Namespace, workdir: Path, disk_dir: Path, memwatch: MemoryWatch) -> dict:
    """The flush section for one state size: training with the flush off and on (alternating), the
    flush bandwidth against a raw write of as many bytes to the same directory."""
    memwatch.reset()
    cpu = CpuWatch()
    spec, model, optimizer, tensors, state_bytes = trained_state(nbytes)
    print(f"\n== flush, {fmt_size(nbytes)}: {N_LAYERS} x Linear({spec.width}, {spec.width}), {state_bytes / MiB:.0f} MiB; "
          f"flush_every {args.flush_every}, {args.flush_rounds} round(s) of an off and an on run", flush=True)
    r: dict = {"size": fmt_size(nbytes), "target_bytes": nbytes, "state_bytes": state_bytes, "width": spec.width,
               "flush_every": args.flush_every, "flush_keep": FLUSH_KEEP}
    r["memcpy_1t_s"] = measure_memcpy(tensors, args.repeat, threads=1)
    del tensors
    d = 2 * median(r["memcpy_1t_s"])
    r["D_s"] = d
    print(f"   D {d * 1e3:.1f} ms", flush=True)
    runs: list[dict] = []
    steps, min_seconds = args.flush_steps, args.flush_seconds  # the first run sets the steps of all
    flush_root = Path(tempfile.mkdtemp(prefix="flush.", dir=disk_dir))
    try:
        for rnd in range(args.flush_rounds):
            for mode in (("off", "on") if rnd % 2 == 0 else ("on", "off")):  # off, on, on, off, ...: drift cancels
                flush_dir = flush_root / f"run{rnd}" if mode == "on" else None
                run_cpu = CpuWatch()
                run = run_flush_mode(flush_dir, model, optimizer, d, steps, min_seconds, args,
                                     workdir / f"flush{rnd}-{mode}")
                steps, min_seconds = len(run["loop"]["blocked_s"]), 0.0
                r["steps"] = steps
                run["round"], run["other_processes_cores"] = rnd, run_cpu.others()  # the daemon is reaped: not counted
                free_memory()
                if flush_dir is not None:
                    sizes = [e["file_bytes"] for e in run["flushes"] + [run["idle_flush"] or {}] if "file_bytes" in e]
                    if sizes:  # as many bytes as one flush wrote, to the same directory, the daemon gone
                        run["raw_bytes"] = int(median(sizes))
                        run["raw_write_s"] = measure_raw_write(flush_dir, run["raw_bytes"], RAW_WRITES_PER_RUN)
                    shutil.rmtree(flush_dir, ignore_errors=True)
                runs.append(run)
                c = run["client"]
                extra = (f", {run['flushed']} flushes done, {run['flush_failures']} failed, drain "
                         f"{run['drain_s']:.1f} s" if run["flush"] else "")
                print(f"   round {rnd} flush {mode}: {steps} steps in {run['loop_s']:.1f} s, blocked median "
                      f"{median(run['loop']['blocked_s']) * 1e3:.1f} ms, "
                      f"{c['committed']}/{c['snapshots']} committed{extra}; other processes used "
                      f"{run['other_processes_cores']:.2f} cores", flush=True)
                if run["flush"] and (run["flush_failures"] or run["idle_flush"] is None):
                    print("   warning: flush failures; the daemon's log says:\n      "
                          + "\n      ".join(run["daemon_flush_log"][-5:]), flush=True)
    finally:
        shutil.rmtree(flush_root, ignore_errors=True)
    progress("flush", cpu)
    del model, optimizer
    free_memory()
    r["runs"] = runs
    r["min_available_bytes"] = memwatch.low
    r["other_processes_cores"] = cpu.others()
    return r


# ---- results ------------------------------------------------------------------------------------
def summarize(r: dict) -> dict:
    """Medians and the derived ratios of one size's raw samples (seconds, GB/s)."""
    b = r["state_bytes"]
    f = r["ftd"]
    s = {
        "D_ms": f["overlapped"]["D_s"] * 1e3,
        "blocked_overlap_ms": median(f["overlapped"]["blocked_s"]) * 1e3,
        "blocked_worst_ms": median(f["worst"]["blocked_s"]) * 1e3,
        "skipped": f"{f['overlapped']['skipped']}/{f['worst']['skipped']}",
        "warmup_ms": f["warmup_s"] * 1e3,
        "snapshot_call_ms": median(f["overlapped"]["snapshot_call_s"]) * 1e3,
        "save_shm_ms": median(r["save_shm_s"]) * 1e3,
        "save_disk_ms": median(r["save_disk_s"]) * 1e3,
        "dcp_blocked_ms": median(r["dcp"]["blocked_s"]) * 1e3 if "blocked_s" in r["dcp"] else None,
        "dcp_total_ms": median(r["dcp"]["total_s"]) * 1e3 if "total_s" in r["dcp"] else None,
        "dcp_error": r["dcp"].get("error"),
        "memcpy_1t_gbs": b / median(r["memcpy_1t_s"]) / 1e9,
        "memcpy_2t_gbs": b / median(r["memcpy_2t_s"]) / 1e9,
        "ftd_copy_ms": median(f["copy_s"]) * 1e3,
        "ftd_copy_gbs": b / median(f["copy_s"]) / 1e9,
        "ftd_copy_under_compute_gbs": (b / median(f["overlapped"]["copy_during_loop_s"]) / 1e9
                                       if f["overlapped"]["copy_during_loop_s"] else None),
        "restore_ftd_ms": median(f["restore_s"]) * 1e3,
        "load_cold_ms": median(r["load_cold_s"]) * 1e3,
        "load_warm_ms": median(r["load_warm_s"]) * 1e3,
    }
    s["blocked_fraction_of_save_shm"] = s["blocked_overlap_ms"] / s["save_shm_ms"]
    s["copy_ratio_1t"] = s["ftd_copy_gbs"] / s["memcpy_1t_gbs"]
    s["copy_ratio_2t"] = s["ftd_copy_gbs"] / s["memcpy_2t_gbs"]
    s["restore_speedup_cold"] = s["load_cold_ms"] / s["restore_ftd_ms"]
    s["restore_speedup_warm"] = s["load_warm_ms"] / s["restore_ftd_ms"]
    s["targets"] = {
        "blocked_overlap<=5%_save_shm": s["blocked_fraction_of_save_shm"] <= TARGET_BLOCKED_FRACTION,
        "copy>=0.8x_memcpy_1t": s["copy_ratio_1t"] >= TARGET_COPY_RATIO,
        "restore>=3x_load_cold": s["restore_speedup_cold"] >= TARGET_RESTORE_SPEEDUP,
    }
    return s


def summarize_flush(r: dict) -> dict:
    """Medians and ratios of one flush-section size (ms, MB/s with MB = 1e6 bytes)."""
    off = [x for x in r["runs"] if not x["flush"]]
    on = [x for x in r["runs"] if x["flush"]]

    def pooled(runs: list[dict], key: str = "blocked_s", committed_only: bool = False) -> list[float]:
        out = []
        for x in runs:
            loop = x["loop"]
            out += [b for b, c in zip(loop[key], loop["committed"]) if c or not committed_only]
        return out

    def count(runs: list[dict], key: str) -> int:
        return sum(x["client"][key] for x in runs)

    def mbs(pairs: list[tuple[float, float]]) -> float | None:  # median of per-flush bytes / seconds
        rates = [b / s for b, s in pairs if s and s > 0]
        return median(rates) / 1e6 if rates else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    loop_flushes = [e for x in on for e in x["flushes"]]
    idle_flushes = [x["idle_flush"] for x in on if x["idle_flush"]]
    raw = [x["raw_bytes"] / t for x in on if "raw_write_s" in x for t in x["raw_write_s"]]
    off_b, on_b = pooled(off), pooled(on)
    s = {
        "D_ms": r["D_s"] * 1e3,
        "runs": f"{len(off)}+{len(on)}",
        "blocked_off_ms": median(off_b) * 1e3,
        "blocked_on_ms": median(on_b) * 1e3,
        "blocked_on_committed_ms": median(pooled(on, committed_only=True)) * 1e3,
        "blocked_off_mean_ms": statistics.fmean(off_b) * 1e3 if off_b else float("nan"),
        "blocked_on_mean_ms": statistics.fmean(on_b) * 1e3 if on_b else float("nan"),
        "blocked_off_p90_ms": percentile(off_b, 0.9) * 1e3,
        "blocked_on_p90_ms": percentile(on_b, 0.9) * 1e3,
        "blocked_off_max_ms": max(off_b, default=float("nan")) * 1e3,
        "blocked_on_max_ms": max(on_b, default=float("nan")) * 1e3,
        "blocked_off_run_medians_ms": [median(x["loop"]["blocked_s"]) * 1e3 for x in off],
        "blocked_on_run_medians_ms": [median(x["loop"]["blocked_s"]) * 1e3 for x in on],
        "ftd_copy_off_ms": median([c for x in off for c in x["loop"]["copy_during_loop_s"]]) * 1e3,
        "ftd_copy_on_ms": median([c for x in on for c in x["loop"]["copy_during_loop_s"]]) * 1e3,
        "snapshots_off": count(off, "snapshots"), "committed_off": count(off, "committed"),
        "snapshots_on": count(on, "snapshots"), "committed_on": count(on, "committed"),
        # skipped: the client's worker still busy with the previous snapshot / the daemon answered busy
        # (standalone: both buffers held, the newest one and one a flush copies out) / failed
        "skipped_off": "/".join(str(count(off, k)) for k in ("skipped_busy", "skipped_protecting", "failed")),
        "skipped_on": "/".join(str(count(on, k)) for k in ("skipped_busy", "skipped_protecting", "failed")),
        "flushes_done": sum(x["flushed"] for x in on),
        "flushes_failed": sum(x["flush_failures"] for x in on),
        "flushes_failed_total": sum(x["flush_failures_total"] for x in on),
        "flushes_superseded": sum(x["superseded"] for x in on),
        "idle_flushes_ok": f"{len(idle_flushes)}/{len(on)}",
        "loop_off_s": median([x["loop_s"] for x in off]),
        "loop_on_s": median([x["loop_s"] for x in on]),
        "adam_off_ms": median([a for x in off for a in x["loop"]["optimizer_step_s"]]) * 1e3,
        "adam_on_ms": median([a for x in on for a in x["loop"]["optimizer_step_s"]]) * 1e3,
        "drain_s": median([x["drain_s"] for x in on]),
        "state_mib": r["state_bytes"] / MiB,
        "arena_mib": median([e["bytes"] for e in loop_flushes + idle_flushes]) / MiB if loop_flushes + idle_flushes else None,
        "file_mib": median([e["file_bytes"] for e in loop_flushes + idle_flushes]) / MiB if loop_flushes + idle_flushes else None,
        "copy_out_ms": median([e["copy_seconds"] for e in loop_flushes]) * 1e3 if loop_flushes else None,
        "copy_out_idle_ms": median([e["copy_seconds"] for e in idle_flushes]) * 1e3 if idle_flushes else None,
        "copy_out_max_ms": max(e["copy_seconds"] for e in loop_flushes) * 1e3 if loop_flushes else None,
        "write_s": median([e["write_seconds"] for e in loop_flushes]) if loop_flushes else None,
        "write_idle_s": median([e["write_seconds"] for e in idle_flushes]) if idle_flushes else None,
        "write_mbs": mbs([(e["file_bytes"], e["write_seconds"]) for e in loop_flushes]),
        "e2e_mbs": mbs([(e["bytes"], e["seconds"]) for e in loop_flushes]),
        "write_idle_mbs": mbs([(e["file_bytes"], e["write_seconds"]) for e in idle_flushes]),
        "e2e_idle_mbs": mbs([(e["bytes"], e["seconds"]) for e in idle_flushes]),
        "state_idle_mbs": mbs([(e["bytes"], e["write_seconds"]) for e in idle_flushes]),
        "raw_mbs": median(raw) / 1e6 if raw else None,
        "raw_mib": median([x["raw_bytes"] for x in on if "raw_bytes" in x]) / MiB if any("raw_bytes" in x for x in on) else None,
    }
    s["blocked_on_off_ratio"] = s["blocked_on_ms"] / s["blocked_off_ms"] if s["blocked_off_ms"] else None
    s["blocked_mean_on_off_ratio"] = (s["blocked_on_mean_ms"] / s["blocked_off_mean_ms"]
                                      if s["blocked_off_mean_ms"] else None)
    s["loop_on_off_ratio"] = s["loop_on_s"] / s["loop_off_s"] if s["loop_off_s"] else None
    s["adam_on_off_ratio"] = s["adam_on_ms"] / s["adam_off_ms"] if s["adam_off_ms"] else None
    s["write_raw_ratio"] = ratio(s["write_mbs"], s["raw_mbs"])
    s["write_idle_raw_ratio"] = ratio(s["write_idle_mbs"], s["raw_mbs"])
    s["state_idle_raw_ratio"] = ratio(s["state_idle_mbs"], s["raw_mbs"])
    s["e2e_idle_raw_ratio"] = ratio(s["e2e_idle_mbs"], s["raw_mbs"])
    loads = [x["disk_load"] for x in on if x.get("disk_load")]
    if loads:
        cold = median([t for x in loads for t in x["cold_s"]])
        warm = median([t for x in loads for t in x["warm_s"]])
        raw_cold = median([t for x in loads for t in x["raw_cold_s"]])
        s["disk_load"] = {"state_mib": loads[0]["bytes"] / MiB, "file_mib": loads[0]["file_bytes"] / MiB,
                          "cold_s": cold, "warm_s": warm, "raw_cold_s": raw_cold,
                          "cold_mbs": loads[0]["file_bytes"] / cold / 1e6, "raw_cold_mbs": loads[0]["file_bytes"] / raw_cold / 1e6,
                          "cold_raw_ratio": raw_cold / cold}
    else:
        s["disk_load"] = None
    return s


def report_flush(results: list[dict], summaries: list[dict]) -> str:
    sizes = [r["size"] for r in results]

    def f(x: float | None, fmt: str = ".0f") -> str:
        return "n/a" if x is None else format(x, fmt)

    def ms_of(s: dict, key: str) -> str:
        return ms(None if s[key] is None else s[key] / 1e3)

    def ratio(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}x"

    first = results[0] if results else {}
    parts = [f"Flush to disk: trainer blocked per snapshot, flush off vs on (ms; {first.get('steps')} overlapped steps "
             f"per run, flush_every {first.get('flush_every')}, flush_interval 0, flush_keep {first.get('flush_keep')})",
             table(["size", "runs off+on", "D ms", "off", "on", "on/off", "on, committed only", "mean off", "mean on",
                    "on/off", "p90 off", "p90 on", "max off", "max on", "ftd copy ms off", "ftd copy ms on",
                    "run medians off | on"],
                   [[z, s["runs"], ms_of(s, "D_ms"), ms_of(s, "blocked_off_ms"), ms_of(s, "blocked_on_ms"),
                     ratio(s["blocked_on_off_ratio"]), ms_of(s, "blocked_on_committed_ms"),
                     ms_of(s, "blocked_off_mean_ms"), ms_of(s, "blocked_on_mean_ms"),
                     ratio(s["blocked_mean_on_off_ratio"]), ms_of(s, "blocked_off_p90_ms"),
                     ms_of(s, "blocked_on_p90_ms"), ms_of(s, "blocked_off_max_ms"),
                     ms_of(s, "blocked_on_max_ms"), ms_of(s, "ftd_copy_off_ms"), ms_of(s, "ftd_copy_on_ms"),
                     " ".join(f"{x:.1f}" for x in s["blocked_off_run_medians_ms"]) + " | "
                     + " ".join(f"{x:.1f}" for x in s["blocked_on_run_medians_ms"])]
                    for z, s in zip(sizes, summaries)]),
             "",
             "Flush to disk: snapshots and flushes (all runs; skipped = client busy/daemon busy (flush hold)/failed), "
             "and the training loop's pace (median run; AdamW step ms: optimizer.step() without the hook's wait)",
             table(["size", "committed off", "skipped off", "committed on", "skipped on", "flushes done",
                    "failed", "superseded", "idle flush ok", "drain s", "loop s off", "loop s on", "on/off",
                    "AdamW ms off", "AdamW ms on", "on/off"],
                   [[z, f"{s['committed_off']}/{s['snapshots_off']}", s["skipped_off"],
                     f"{s['committed_on']}/{s['snapshots_on']}", s["skipped_on"], str(s["flushes_done"]),
                     str(s["flushes_failed_total"]), str(s["flushes_superseded"]), s["idle_flushes_ok"],
                     f"{s['drain_s']:.1f}", f"{s['loop_off_s']:.1f}", f"{s['loop_on_s']:.1f}",
                     ratio(s["loop_on_off_ratio"]), ms_of(s, "adam_off_ms"), ms_of(s, "adam_on_ms"),
                     ratio(s["adam_on_off_ratio"])]
                    for z, s in zip(sizes, summaries)]),
             "",
             "Flush bandwidth (MB/s = 1e6 B/s, median per flush) against a raw sequential write + fsync of as many "
             "bytes as a flush wrote",
             table(["size", "state MiB", "file MiB", "copy-out ms", "(max)", "(idle)", "write s", "(idle)",
                    "flush write", "(idle)", "end-to-end", "(idle)", "raw write", "flush/raw", "(idle)",
                    "state/raw idle"],
                   [[z, f(s["state_mib"]), f(s["file_mib"]), ms_of(s, "copy_out_ms"), ms_of(s, "copy_out_max_ms"),
                     ms_of(s, "copy_out_idle_ms"),
                     f(s["write_s"], ".2f"), f(s["write_idle_s"], ".2f"), f(s["write_mbs"]), f(s["write_idle_mbs"]),
                     f(s["e2e_mbs"]), f(s["e2e_idle_mbs"]), f(s["raw_mbs"]), ratio(s["write_raw_ratio"]),
                     ratio(s["write_idle_raw_ratio"]), ratio(s["state_idle_raw_ratio"])]
                    for z, s in zip(sizes, summaries)]),
             "  flush write = file bytes / write_seconds (DCP of rank 0 twice, fsyncs, read-back verify, file "
             "checksums, prune); end-to-end = state (arena) bytes / the daemon's whole flush time;",
             "  (idle) = the one flush per run made after the loop, trainer idle; state/raw idle = arena bytes per "
             "write second against raw: how much slower the state gets to disk than one raw write of it.",
             "",
             "Restore from disk: ftd's loader (zip records read without unpickling, every chunk checked) loading the "
             "idle flush's ranks, against a raw sequential read of the same files (median)",
             table(["size", "state MiB", "rank files MiB", "load cold s", "load warm s", "raw read cold s",
                    "load cold MB/s", "raw read MB/s", "load/raw"],
                   [[z, f(d["state_mib"]), f(d["file_mib"]), f(d["cold_s"], ".3f"), f(d["warm_s"], ".3f"),
                     f(d["raw_cold_s"], ".3f"), f(d["cold_mbs"]), f(d["raw_cold_mbs"]), ratio(d["cold_raw_ratio"])]
                    for z, s in zip(sizes, summaries) if (d := s.get("disk_load"))])]
    return "\n".join(parts)


def progress(phase: str, cpu: CpuWatch) -> None:
    print(f"   {phase} done ({time.strftime('%H:%M:%S')}, {psutil.virtual_memory().available / GiB:.1f} GiB "
          f"available, other processes used {cpu.others():.2f} cores)", flush=True)


def report(results: list[dict], summaries: list[dict]) -> str:
    sizes = [r["size"] for r in results]

    def ms_of(s: dict, key: str) -> str:  # the summaries keep milliseconds, ms() takes seconds
        return ms(None if s[key] is None else s[key] / 1e3)

    parts = ["Trainer blocked per checkpoint (ms, median)",
             table(["size", "D ms", "ftd overlap", "ftd D=0", "(in snapshot())", "(skipped)", "torch.save shm",
                    "torch.save disk", "dcp async_save", "(dcp until written)"],
                   [[z, ms_of(s, "D_ms"), ms_of(s, "blocked_overlap_ms"), ms_of(s, "blocked_worst_ms"),
                     ms_of(s, "snapshot_call_ms"), s["skipped"], ms_of(s, "save_shm_ms"), ms_of(s, "save_disk_ms"),
                     ms_of(s, "dcp_blocked_ms"), ms_of(s, "dcp_total_ms")] for z, s in zip(sizes, summaries)]),
             "",
             "Copy bandwidth (GB/s, median)",
             table(["size", "memcpy 1 thr", "memcpy 2 thr", "ftd copy ms", "ftd copy", "ftd/memcpy 1t",
                    "ftd/memcpy 2t", "ftd copy in overlapped loop", "first 2 snapshots ms"],
                   [[z, f"{s['memcpy_1t_gbs']:.2f}", f"{s['memcpy_2t_gbs']:.2f}", ms_of(s, "ftd_copy_ms"),
                     f"{s['ftd_copy_gbs']:.2f}", f"{s['copy_ratio_1t']:.2f}", f"{s['copy_ratio_2t']:.2f}",
                     "n/a" if s["ftd_copy_under_compute_gbs"] is None else f"{s['ftd_copy_under_compute_gbs']:.2f}",
                     ms_of(s, "warmup_ms")]
                    for z, s in zip(sizes, summaries)]),
             "",
             "Restore into a fresh model + optimizer (ms, median)",
             table(["size", "ftd restore", "torch.load cold", "torch.load warm", "cold/ftd", "warm/ftd"],
                   [[z, ms_of(s, "restore_ftd_ms"), ms_of(s, "load_cold_ms"), ms_of(s, "load_warm_ms"),
                     f"{s['restore_speedup_cold']:.1f}x", f"{s['restore_speedup_warm']:.1f}x"]
                    for z, s in zip(sizes, summaries)]),
             "",
             "Targets",
             table(["size", "blocked <= 5% save shm", "ftd copy >= 0.8x memcpy (1 thr)", "restore >= 3x cold load"],
                   [[z, f"{verdict(s['targets']['blocked_overlap<=5%_save_shm'])} "
                        f"({100 * s['blocked_fraction_of_save_shm']:.2f}%)",
                     f"{verdict(s['targets']['copy>=0.8x_memcpy_1t'])} ({s['copy_ratio_1t']:.2f}x)",
                     f"{verdict(s['targets']['restore>=3x_load_cold'])} ({s['restore_speedup_cold']:.1f}x)"]
                    for z, s in zip(sizes, summaries)])]
    errors = [f"dcp async_save at {z}: n/a ({s['dcp_error']})" for z, s in zip(sizes, summaries) if s["dcp_error"]]
    return "\n".join(parts + errors)


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help="state sizes, comma-separated (default 64M,256M,1G,2G)")
    p.add_argument("--repeat", type=int, default=None, help="repetitions per figure (default 5, --quick 3)")
    p.add_argument("--quick", action="store_true", help="sizes 64M,256M and 3 repetitions (under ~2 minutes)")
    p.add_argument("--json", default=None, help="results file (default bench-results/bench_snapshot.json, "
                   "with --only-flush bench-results/bench_snapshot_flush.json)")
    p.add_argument("--disk-dir", default="/tmp", help="directory on a real disk for torch.save/dcp files and the flush")
    p.add_argument("--flush-sizes", default=None, help="state sizes of the flush section (default 256M, --quick 64M)")
    p.add_argument("--no-flush", action="store_true", help="skip the flush section")
    p.add_argument("--only-flush", action="store_true", help="run the flush section alone")
    p.add_argument("--flush-steps", type=int, default=40,
                   help="overlapped training steps per flush run, at least (default 40)")
    p.add_argument("--flush-seconds", type=float, default=None,
                   help="the first flush run of a size goes on until this long has passed, and the later "
                   "ones make as many steps (default 12, --quick 6)")
    p.add_argument("--flush-every", type=int, default=5, help="the flushing daemon's flush_every (default 5)")
    p.add_argument("--flush-rounds", type=int, default=2,
                   help="rounds of one flush-off and one flush-on run, in alternating order (default 2)")
    p.add_argument("--memory-budget", default="12GiB", help="the daemon's memory_budget")
    p.add_argument("--no-prefault", action="store_true",
                   help="do not touch fresh memory before allocating phases (see prefault() for why it does)")
    p.add_argument("--restore-worker", help=argparse.SUPPRESS)  # internal: one timed restore in a child
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in (args.sizes or ("64M,256M" if args.quick else "64M,256M,1G,2G")).split(",")]
    args.repeat = args.repeat or (3 if args.quick else 5)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    args.flush_sizes = [parse_size(s) for s in (args.flush_sizes or ("64M" if args.quick else "256M")).split(",")]
    if args.no_flush and args.only_flush:
        p.error("--no-flush and --only-flush exclude each other")
    if args.flush_seconds is None:
        args.flush_seconds = 6.0 if args.quick else 12.0
    if args.flush_steps < 1 or args.flush_every < 1 or args.flush_rounds < 1:
        p.error("--flush-steps, --flush-every and --flush-rounds must be >= 1")
    if args.json is None:
        name = "bench_snapshot_flush.json" if args.only_flush else "bench_snapshot.json"
        args.json = str(REPO / "bench-results" / name)
    return args


def check_memory(nbytes: int) -> None:
    """Peak use is about 5x the state (state + grads + 2 daemon buffers + restored copy); refuse early."""
    need = 5 * nbytes + GiB
    avail = psutil.virtual_memory().available
    if avail < need:
        raise RuntimeError(f"{fmt_size(nbytes)} needs about {need / GiB:.1f} GiB of memory, "
                           f"only {avail / GiB:.1f} GiB is available")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.restore_worker:
        return restore_worker(json.loads(args.restore_worker))
    signal.signal(signal.SIGTERM, sigterm_to_exit)
    torch.set_num_threads(1)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    disk_root = Path(args.disk_dir)
    dev, fstype, _ = mount_of(disk_root.resolve())
    if fstype in ("tmpfs", "ramfs"):
        print(f"warning: --disk-dir {disk_root} is on {fstype}, not a disk", file=sys.stderr)
    revision = ftd_revision()
    sizes = "none" if args.only_flush else ", ".join(fmt_size(s) for s in args.sizes)
    flush_sizes = "none" if args.no_flush else ", ".join(fmt_size(s) for s in args.flush_sizes)
    print(f"bench_snapshot: sizes {sizes}; flush sizes {flush_sizes}; {args.repeat} repetitions; "
          f"ftd {revision}; torch {torch.__version__}; disk files in {disk_root} ({fstype} on {dev})", flush=True)

    idle = CpuWatch()
    time.sleep(1.0)
    if idle.others() > 0.2:
        print(f"note: other processes keep {idle.others():.2f} of 2 cores busy; figures will be noisy", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bsnap.", dir="/tmp"))
    disk_dir = Path(tempfile.mkdtemp(prefix="bench_snapshot.", dir=disk_root))
    memwatch = MemoryWatch()
    results: list[dict] = []
    flush_results: list[dict] = []
    t_start = time.time()
    try:
        for nbytes in [] if args.only_flush else args.sizes:
            check_memory(nbytes)
            results.append(measure_size(nbytes, args, workdir, disk_dir, memwatch))
            free_memory()
        for nbytes in [] if args.no_flush else args.flush_sizes:
            check_memory(nbytes)
            flush_results.append(measure_flush(nbytes, args, workdir, disk_dir, memwatch))
            free_memory()
    finally:
        memwatch.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(disk_dir, ignore_errors=True)
        Path(f"/dev/shm/bench_snapshot.{os.getpid()}.pt").unlink(missing_ok=True)

    summaries = [summarize(r) for r in results]
    flush_summaries = [summarize_flush(r) for r in flush_results]
    texts = ([report(results, summaries)] if results else []) + ([report_flush(flush_results, flush_summaries)]
                                                                  if flush_results else [])
    print("\n" + "\n\n".join(texts))
    print(f"\ncommand: {command}")
    every = [r for r in results] + [{**r, "size": f"flush {r['size']}"} for r in flush_results]
    print(f"elapsed: {time.time() - t_start:.0f} s; least memory available during a size: "
          + ", ".join(f"{r['size']} {r['min_available_bytes'] / GiB:.1f} GiB" for r in every))
    print("other processes' CPU use during a size (cores, of 2): "
          + ", ".join(f"{r['size']} {r['other_processes_cores']:.2f}" for r in every)
          + (" -- figures are noisy" if any(r["other_processes_cores"] > 0.2 for r in every) else ""))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "ftd_revision": revision, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total, "disk": {"dir": str(disk_root), "device": dev, "fs": fstype},
        "repeat": args.repeat, "threads": 1, "prefault": not args.no_prefault,
        "results": [{**r, "summary": s} for r, s in zip(results, summaries)],
        "flush": [{**r, "summary": s} for r, s in zip(flush_results, flush_summaries)],
    }, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
