#!/usr/bin/env python3
"""How long does a snapshot block the trainer, and how fast does a restore come back?

Run it as ``.venv/bin/python scripts/bench_snapshot.py`` (``--quick`` for a two-minute check).

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

Targets printed as PASS/MISS: blocked time (overlapped) <= 5% of torch.save to /dev/shm; ftd copy
bandwidth >= 0.8x raw memcpy (same thread count); restore from the daemon >= 3x faster than a cold
torch.load from disk.

The benchmark starts its own daemon (``.venv/bin/ftd daemon`` with a private config, job name
``bench-<pid>``) for each size and always stops it with SIGTERM, so no shared-memory segment or
process outlives the run, even on Ctrl-C or an error. All torch work runs with
``torch.set_num_threads(1)`` (one core computes, the other copies), except the 2-thread memcpy.
Restores and loads run in fresh processes (a restarted trainer), and phases that allocate fresh
memory are preceded by an untimed touch of as much memory (see ``prefault``), because on this VM
the first touch of a page costs anything from 1 to 10 us depending on luck.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from typing import Any, Iterator

import psutil
import torch
import xxhash
from torch import nn

from benchutil import (REPO, CpuWatch, evict_from_page_cache, ftd_revision, mount_of, ms, prefault,
                       sigterm_to_exit, table, timed, verdict)  # scripts/benchutil.py

sys.path.insert(0, str(REPO))
import ftd  # noqa: E402  (the repo's ftd, also when the venv has it installed elsewhere)

MiB, GiB = 1 << 20, 1 << 30
N_LAYERS = 8                # nn.Linear(w, w) layers: 16 parameters, 32 moments, 16 step counters
WARMUP_STEPS = 2            # both daemon buffers allocated and mapped before anything is timed
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 15.0
TARGET_BLOCKED_FRACTION = 0.05
TARGET_COPY_RATIO = 0.8
TARGET_RESTORE_SPEEDUP = 3.0


# ---- small helpers ------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'64M', '256MiB', '1G', '2GiB' -> bytes (binary units)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


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


# ---- the training state -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """A model of N_LAYERS nn.Linear(width, width): params + 2 AdamW moments ~= the target bytes."""
    target_bytes: int
    width: int

    @classmethod
    def for_bytes(cls, nbytes: int) -> "Spec":
        params = nbytes / 3 / 4  # float32 elements of parameters
        width = max(64, round(math.sqrt(params / N_LAYERS) / 64) * 64)
        return cls(nbytes, width)


def build_model(spec: Spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model with zeroed (touched) parameters and a fresh AdamW without moments, as a restart builds them."""
    layers = [nn.utils.skip_init(nn.Linear, spec.width, spec.width) for _ in range(N_LAYERS)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def build_trained(spec: Spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after one AdamW step (moments exist), with fake gradients that stay for every later step."""
    model, optimizer = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [p.detach() for p in model.parameters()]
    for st in optimizer.state.values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return ts


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def compute_for(seconds: float, _mats: dict = {}) -> None:
    """The forward/backward stand-in: 1-thread matmuls on cache-resident matrices for ``seconds``."""
    if seconds <= 0:
        return
    if not _mats:
        _mats["a"], _mats["b"] = torch.randn(256, 256), torch.randn(256, 256)
    a, b = _mats["a"], _mats["b"]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(a, b)


# ---- the daemon ---------------------------------------------------------------------------------
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG: die with the bench
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Daemon:
    """An ``ftd daemon`` subprocess with its own job, runtime dir and config, stopped with SIGTERM."""

    def __init__(self, workdir: Path, budget: str):
        self.job = f"bench-{os.getpid()}"
        self.runtime_dir = workdir / "rt"
        self.config = workdir / "ftd.toml"
        self.log = workdir / "daemon.log"
        self.config.write_text(f'job = "{self.job}"\nruntime_dir = "{self.runtime_dir}"\n'
                               f'memory_budget = "{budget}"\nshm_dir = "/dev/shm"\n')
        self.socket = self.runtime_dir / self.job / "node0.sock"
        self.endpoint = f"ipc://{self.socket}"
        self.shm_prefix = f"ftd.{self.job}."
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = REPO / ".venv" / "bin" / "ftd"
        cmd = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(exe), "daemon", "--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ftd daemon did not start; its log:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (the daemon unlinks its segments), SIGKILL if it hangs, then sweep what is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"warning: ftd daemon {self.proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        leftovers = [p for p in Path("/dev/shm").iterdir() if p.name.startswith(self.shm_prefix)]
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            print(f"warning: removed {len(leftovers)} segment(s) the daemon left in /dev/shm", file=sys.stderr)

    def __enter__(self) -> "Daemon":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def client_for(daemon: Daemon) -> Iterator[Any]:
    client = ftd.Client(endpoint=daemon.endpoint, rank=0, world_size=1)
    try:
        yield client
    finally:
        client.close()


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
        del views, dst


def run_training(client: Any, model: nn.Module, optimizer: torch.optim.Optimizer, d: float, steps: int,
                 first_step: int) -> dict:
    """``steps`` simulated steps (compute D, AdamW step, snapshot); the blocked time of each snapshot.

    Snapshot i blocks the trainer inside snapshot() and in the pre-step hook of step i+1, so one more
    compute + optimizer step runs after the last snapshot to collect its hook wait.
    """
    state = {"model": model, "optim": optimizer}
    snap, hook, jobs = [], [], []
    skipped = skipped_snapshots(client)
    for i in range(steps + 1):
        step = first_step + i
        compute_for(d)
        waited = client.stats["hook_wait_seconds"]
        optimizer.step()
        if i:
            hook.append(client.stats["hook_wait_seconds"] - waited)
        if i < steps:
            snap.append(timed(lambda: client.snapshot(step, state)))
            jobs.append(submitted_job(client))
    client.wait()
    blocked = [s + h for s, h in zip(snap, hook)]
    return {"D_s": d, "blocked_s": blocked, "snapshot_call_s": snap, "hook_wait_s": hook,
            "skipped": skipped_snapshots(client) - skipped,
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


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """xxh3 over every state tensor's bytes, in a fixed order: equal digests, equal states."""
    h = xxhash.xxh3_64()
    for t in state_tensors(model, optimizer):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


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
    spec = Spec.for_bytes(nbytes)
    memwatch.reset()
    cpu = CpuWatch()
    model, optimizer = build_trained(spec)
    tensors = state_tensors(model, optimizer)
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
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
    p.add_argument("--json", default=str(REPO / "bench-results" / "bench_snapshot.json"), help="results file")
    p.add_argument("--disk-dir", default="/tmp", help="directory on a real disk for torch.save/dcp files")
    p.add_argument("--memory-budget", default="12GiB", help="the daemon's memory_budget")
    p.add_argument("--no-prefault", action="store_true",
                   help="do not touch fresh memory before allocating phases (see prefault() for why it does)")
    p.add_argument("--restore-worker", help=argparse.SUPPRESS)  # internal: one timed restore in a child
    args = p.parse_args(argv)
    args.sizes = [parse_size(s) for s in (args.sizes or ("64M,256M" if args.quick else "64M,256M,1G,2G")).split(",")]
    args.repeat = args.repeat or (3 if args.quick else 5)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
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
    print(f"bench_snapshot: sizes {', '.join(fmt_size(s) for s in args.sizes)}; {args.repeat} repetitions; "
          f"ftd {revision}; torch {torch.__version__}; disk files in {disk_root} ({fstype} on {dev})", flush=True)

    idle = CpuWatch()
    time.sleep(1.0)
    if idle.others() > 0.2:
        print(f"note: other processes keep {idle.others():.2f} of 2 cores busy; figures will be noisy", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bsnap.", dir="/tmp"))
    disk_dir = Path(tempfile.mkdtemp(prefix="bench_snapshot.", dir=disk_root))
    memwatch = MemoryWatch()
    results: list[dict] = []
    t_start = time.time()
    try:
        for nbytes in args.sizes:
            check_memory(nbytes)
            results.append(measure_size(nbytes, args, workdir, disk_dir, memwatch))
            free_memory()
    finally:
        memwatch.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(disk_dir, ignore_errors=True)
        Path(f"/dev/shm/bench_snapshot.{os.getpid()}.pt").unlink(missing_ok=True)

    summaries = [summarize(r) for r in results]
    text = report(results, summaries)
    print("\n" + text)
    print(f"\ncommand: {command}")
    print(f"elapsed: {time.time() - t_start:.0f} s; least memory available during a size: "
          + ", ".join(f"{r['size']} {r['min_available_bytes'] / GiB:.1f} GiB" for r in results))
    print("other processes' CPU use during a size (cores, of 2): "
          + ", ".join(f"{r['size']} {r['other_processes_cores']:.2f}" for r in results)
          + (" -- figures are noisy" if any(r["other_processes_cores"] > 0.2 for r in results) else ""))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "ftd_revision": revision, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total, "disk": {"dir": str(disk_root), "device": dev, "fs": fstype},
        "repeat": args.repeat, "threads": 1, "prefault": not args.no_prefault,
        "results": [{**r, "summary": s} for r, s in zip(results, summaries)],
    }, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
