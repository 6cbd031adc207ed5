"""The flush worker: writes versions of a node's ranks from shared memory to disk, in the background.

The daemon starts one per node when a ``flush_dir`` is configured (``python -m ftd.flushwriter``),
so torch is imported before the first flush, and sends it one line per flush: the path of a JSON
job file. It answers JSON lines on stdout: ``copied`` once every rank's buffer is copied out and
checked (the daemon then lets the trainers reuse those buffers, so this part runs at normal
priority and takes only a memory copy), then ``done`` or ``failed`` once the version is on disk.
The writing runs on a thread with nice 19 and the idle I/O class (both are per thread on Linux),
in 1 MiB system calls, and pauses between them while a trainer's copy runs (``copygate``), so the
trainers and the daemon keep the CPU, memory bandwidth and disk they need. A process, not a thread of the
daemon: DCP's writer holds the GIL for long stretches.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

from ftd.durable import dcp_writer, ondisk
from ftd.durable.copygate import GateWatcher
from ftd.shm.layout import Manifest


def lower_this_thread() -> None:
    """nice 19 and the idle I/O class for the calling thread."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        pass
    try:
        psutil.Process(tid).ionice(psutil.IOPRIO_CLASS_IDLE)
    except (psutil.Error, AttributeError, OSError, ValueError):
        pass


def die_with_parent() -> None:
    """A flush whose daemon is gone serves nobody: SIGTERM when the parent dies (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


_kept: dict[int, bytearray] = {}  # rank -> the buffer of its last copy: reused, so a copy-out faults no pages


def copy_out(job: dict) -> list:
    """(rank, world, checked private copy, manifest) of every rank of the job's version."""
    shm_dir = Path(job["shm_dir"])
    copies = []
    for r in job["ranks"]:
        manifest = Manifest.from_json(r["manifest"])
        data = ondisk.read_buffer(shm_dir / Path(r["name"]).name, manifest, into=_kept.get(r["rank"]))
        _kept[r["rank"]] = data
        copies.append((r["rank"], r["world"], data, manifest))
    for rank in set(_kept) - {r["rank"] for r in job["ranks"]}:
        del _kept[rank]
    return copies


def write(job: dict, copies: list) -> dict:
    root, step = Path(job["flush_dir"]), job["step"]
    nbytes = sum(len(c[2]) for c in copies)
    t0 = time.monotonic()

    def one_at_a_time():  # hand each copy over, so it is freed once written
        while copies:
            yield copies.pop(0)

    out = ondisk.step_dir(root, job["job"], step)
    manifest = dcp_writer.write_version(out, step, one_at_a_time(), job=job["job"], node_rank=job["node_rank"],
                                     nodes=job["nodes"])
    written = sum((out / name).stat().st_size for name in manifest["files"])
    pruned = ondisk.prune(root, job["job"], job["node_rank"], job["keep"], [r["rank"] for r in job["ranks"]],
                           newest=step, nodes=job["nodes"])
    return {"step": step, "bytes": nbytes, "file_bytes": written, "write_seconds": time.monotonic() - t0,
            "pruned": pruned, "dir": str(out)}


class LowPriorityThread:
    """One thread, nice 19 and idle I/O, that runs what it is given and hands back the outcome."""

    def __init__(self) -> None:
        self._work: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="ftd-flush-write", daemon=True).start()

    def _loop(self) -> None:
        lower_this_thread()
        while True:
            fn = self._work.get()
            try:
                self._done.put((True, fn()))
            except Exception as e:
                self._done.put((False, e))

    def run(self, fn):
        self._work.put(fn)
        ok, value = self._done.get()
        if not ok:
            raise value
        return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    gate = GateWatcher(Path(argv[argv.index("--gate") + 1]) if "--gate" in argv else None)
    ondisk.between_slices = gate.wait  # the writing yields to the trainers' copies
    writer = LowPriorityThread()
    emit(event="ready")
    for line in sys.stdin:
        try:
            job = json.loads(Path(line.strip()).read_text())
            t0 = time.monotonic()
            copies = copy_out(job)
            emit(event="copied", step=job["step"], seconds=time.monotonic() - t0)
            paused = gate.paused
            result = writer.run(lambda: write(job, copies))
            result["paused_seconds"] = gate.paused - paused
        except Exception as e:  # reported to the daemon, which logs it and goes on
            emit(event="failed", error=f"{type(e).__name__}: {e}"[:1000])
            continue
        emit(event="done", copy_seconds=time.monotonic() - t0 - result["write_seconds"], **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
