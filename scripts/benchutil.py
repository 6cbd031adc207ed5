"""Helpers shared by the benchmark scripts (``bench_snapshot.py``, ``bench_protect.py``, ``bench_fsdp.py``...).

They time phases, check the disk their files land on, prefault memory before allocating phases, evict
files from the page cache, watch what else keeps the machine's cores busy, run a private ftd daemon,
and print the same kind of tables; one copy of that code here keeps them measuring and reporting alike. Not a package module:
the scripts run as ``python scripts/bench_X.py``, which puts ``scripts/`` on ``sys.path``, and import it
as ``benchutil``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's ftd, not the one the virtual environment installed
    sys.path.insert(0, str(REPO))

from ftd.util.procs import ftd_env, log_tail, stop_process_group, wait_for  # noqa: E402


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took (perf_counter)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def mount_of(path: Path) -> tuple[str, str, str]:
    """(device, filesystem type, mount point) of the mount holding ``path`` (give it resolved)."""
    best = ("?", "?", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[2]):  # >=: of mounts stacked on one point, the last is visible
                best = (dev, fstype, mnt)
    return best


def prefault(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory and free it again, just before a timed phase that allocates
    (0: do nothing, which is what the scripts' ``--no-prefault`` passes).

    This machine is a VM whose balloon reports free pages back to the host (virtio-balloon free page
    reporting): touching a page the host took back costs ~10 us (0.4 GB/s) instead of ~1.3 us
    (3 GB/s), and which pages a phase gets is luck, so figures dominated by first touch (restore,
    torch.load, torch.save to /dev/shm, DCP staging, a restarted daemon's segments) swing by up to 8x.
    Pages freed a moment ago are handed out first and are still backed, so touching as much as the
    phase will allocate right before it makes those phases behave as on bare metal. ``--no-prefault``
    shows the raw VM behaviour.
    """
    if nbytes > 0:
        scratch = torch.empty(nbytes, dtype=torch.uint8)
        scratch.fill_(0)
        del scratch


def evict_from_page_cache(path: Path) -> None:
    """fsync ``path`` and drop it from the page cache (POSIX_FADV_DONTNEED): the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class CpuWatch:
    """Cores kept busy since the last reset. ``others()``: the machine's busy CPU time minus this
    process's and its finished children's, i.e. what other processes used; on a machine this small
    another job running alongside makes every figure noisy, and this says when that happened.
    ``busy()``: all busy CPU time, for phases whose work runs in processes that are not this one's
    children (a cluster's daemons are children of ``ftd launch``), where ``others()`` would count it."""

    def __init__(self):
        self.reset()

    @staticmethod
    def _busy() -> float:
        c = psutil.cpu_times()
        return sum(c) - c.idle - getattr(c, "iowait", 0.0) - getattr(c, "guest", 0.0) - getattr(c, "guest_nice", 0.0)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def reset(self) -> None:
        self._t0, self._busy0, self._own0 = time.monotonic(), self._busy(), self._own()

    def busy(self) -> float:
        return (self._busy() - self._busy0) / max(time.monotonic() - self._t0, 1e-9)

    def others(self) -> float:
        wall = max(time.monotonic() - self._t0, 1e-9)
        return max(0.0, (self._busy() - self._busy0 - (self._own() - self._own0)) / wall)


def ftd_revision() -> str:
    """The commit the benchmarked ftd comes from, '+dirty' if ftd/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ftd"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def private_daemon(prefix: str, budget: str = "8GiB", shm_dir: Path | None = None) -> Iterator[str]:
    """An `ftd daemon` of a job of its own (its own runtime directory; its segments in ``shm_dir`` if
    given), yielding its endpoint. However the block ends (an error, Ctrl-C), the daemon is stopped
    and its segments and files are removed."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    job = f"bench{uuid.uuid4().hex[:8]}"
    config = work / "daemon.toml"
    shm = f'shm_dir = "{shm_dir}"\n' if shm_dir else ""
    config.write_text(f'job = "{job}"\nruntime_dir = "{work}/rt"\n{shm}memory_budget = "{budget}"\n'
                      'memory_reserve = "256MiB"\n')
    log_path = work / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(config)], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO, env=ftd_env(), start_new_session=True)
    try:
        wait_for(lambda: daemon.poll() is not None or "serving at" in log_path.read_text(), 30, "the daemon to serve")
        if daemon.poll() is not None:
            raise RuntimeError(f"the benchmark's ftd daemon exited ({daemon.returncode}):\n{log_tail(log_path)}")
        yield f"ipc://{work}/rt/{job}/node0.sock"
    finally:
        stop_process_group(daemon, 30)
        for segment in Path(shm_dir or "/dev/shm").glob(f"ftd.{job}.*"):
            segment.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


# glibc's heap trimming and mmap threshold off: freed memory is reused, not returned to the OS and
# faulted in again every step (which, on this VM, made a trainer without ftd's threads the slow one).
MALLOC_KEEP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 32), "MALLOC_MMAP_THRESHOLD_": str(1 << 32)}


def sigterm_to_exit(signum: int, frame: Any) -> None:
    """A SIGTERM handler: exit through SystemExit, so every finally block runs (daemons and clusters
    stopped, temporary and shared-memory files removed)."""
    raise SystemExit(128 + signum)


# ---- report -------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under ``headers`` and a dashed rule (just those two lines if no rows)."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def ms(seconds: float | None) -> str:
    """``seconds`` shown in milliseconds: one decimal under 100 ms, none from there; None: 'n/a'."""
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f}" if seconds >= 0.1 else f"{seconds * 1e3:.1f}"


def verdict(ok: bool | None) -> str:
    """A target's outcome: PASS, MISS, or n/a (None: not measured)."""
    return "n/a" if ok is None else "PASS" if ok else "MISS"
