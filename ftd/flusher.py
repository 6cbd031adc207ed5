"""The daemon's side of the durable tier: runs the flush process, and loads flushed versions back.

``Flusher`` keeps one ``ftd.flushwriter`` worker process, sends it one flush at a time and follows
its JSON lines from the daemon's loop (never blocking it). While the process copies a version out of shared memory the
catalog holds that version's buffers (a trainer that needs one meanwhile skips a snapshot; it
never waits); once ``copied`` comes they are released, and the writing to disk costs the trainers
nothing but the CPU and disk bandwidth a nice-19, idle-I/O process gets.

``DiskLoad`` loads this node's part of a flushed version into new shared-memory segments on a
thread, checking every chunk (``durable.load_rank``), and writes their sidecars, so the daemon
adopts them like versions rebuilt from the peers.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from . import durable, shm
from .catalog import CAPACITY_QUANTUM, Catalog
from .config import Config
from .copygate import CopyGate
from .flushpolicy import FlushQueue
from .units import round_up

log = logging.getLogger("ftd.flush")
KILL_GRACE = 5.0


class Flusher:
    def __init__(self, config: Config, catalog: Catalog):
        self.config, self.catalog = config, catalog
        self.queue = FlushQueue()
        self.proc: subprocess.Popen | None = None
        self._busy = False                     # a job was sent and has not ended
        self._job_file: Path | None = None
        self._out = b""
        self._started = 0.0
        self.flushed = 0
        self.failures = 0
        self.last: dict | None = None          # the last flush's outcome
        self.history: list[dict] = []          # the last few successful flushes (benchmarks read them)
        self.gate: CopyGate | None = None      # tells the worker when trainers copy (it pauses its writing)

    def check_dir(self) -> str | None:
        """Why flush_dir cannot take flushes (None: it can). Snapshots in memory go on either way."""
        d = durable.job_dir(self.config.flush_dir, self.config.job)
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{self.config.node_rank}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            return f"flush_dir {self.config.flush_dir} cannot be written ({e}); flushes will fail until it can"
        return None

    def start_worker(self) -> None:
        """Start the flush worker now, so torch is imported before the first flush."""
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        if self.gate is None:
            self.gate = CopyGate(self.config.socket_path.with_suffix(".copying"))
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd.flushwriter", "--gate", str(self.gate.path)],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        fl = fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETFL, fl | os.O_NONBLOCK)
        self._out = b""

    @property
    def busy(self) -> bool:
        return self._busy or self.queue.pending is not None

    def copies_changed(self) -> None:
        """A trainer began or ended a copy: until when should the flush's writing pause?"""
        if self.gate is None:
            return
        writing = [r for r in self.catalog.ranks.values() if any(b.state == "writing" for b in r.buffers)]
        if not writing:
            self.gate.copying_until(0.0)
            return
        # a copy takes about as long as the rank's last one; twice that, and the flush goes on even if
        # the trainer died in the middle of it
        expect = max((r.last_copy_seconds or 0.5) for r in writing)
        self.gate.copying_until(time.time() + 2 * expect + 0.05)

    def offer(self, step: int) -> None:
        """Recoverable ``step`` is due for a flush: start it now, or keep it as the next one."""
        start = self.queue.offer(step)
        if start is not None:
            self._start(start)

    def _start(self, step: int | None) -> None:
        while step is not None:
            ranks = self.catalog.hold_for_flush(step)
            if ranks:
                break
            log.info("flush of step %d skipped: this node no longer holds it", step)
            step = self.queue.finished()
        if step is None:
            return
        cfg = self.config
        job = {"step": step, "job": cfg.job, "node_rank": cfg.node_rank, "nodes": max(1, cfg.nodes),
               "shm_dir": str(cfg.shm_dir), "flush_dir": str(cfg.flush_dir), "keep": cfg.flush_keep, "ranks": ranks}
        fd, name = tempfile.mkstemp(prefix="flush-", suffix=".json", dir=cfg.socket_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(job, f)
        self._job_file = Path(name)
        if self.proc is None or self.proc.poll() is not None:
            self._reap()
            self.start_worker()
        try:
            self.proc.stdin.write(name.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as e:  # the worker died just now: the next tick reports the failure
            log.warning("flush worker unreachable: %s", e)
        self._busy, self._started = True, time.monotonic()
        log.info("flush of step %d to %s started", step, cfg.flush_dir)

    def tick(self) -> None:
        """Follow the running flush (call every loop turn; never blocks)."""
        if self.proc is None:
            return
        for msg in self._read_lines():
            if msg.get("event") == "copied":
                self.catalog.release_flush_hold()  # the trainers may reuse those buffers now
            elif msg.get("event") in ("done", "failed") and self._busy:
                self._finish(msg)
        if self._busy and self.proc.poll() is not None:
            self._finish({"event": "failed", "error": f"the flush worker exited with status {self.proc.returncode}"})
            self._reap()

    def _finish(self, reply: dict) -> None:
        step = self.queue.running
        self._busy = False
        self.catalog.release_flush_hold()
        if self._job_file:
            shm.unlink(self._job_file)
            self._job_file = None
        seconds = time.monotonic() - self._started
        if reply["event"] == "done":
            self.flushed += 1
            self.last = {"ok": True, "seconds": seconds, "at": time.time(),
                         **{k: v for k, v in reply.items() if k != "event"}}
            self.history = (self.history + [self.last])[-20:]
            log.info("flushed step %d: %.1f MiB in %.2f s (%.0f MiB/s writing) to %s", step, reply["bytes"] / 2**20,
                     seconds, reply["file_bytes"] / 2**20 / max(reply["write_seconds"], 1e-9), reply["dir"])
        else:
            self.failures += 1
            self.last = {"ok": False, "step": step, "error": reply.get("error", ""), "at": time.time()}
            log.error("flush of step %s failed: %s", step, reply.get("error"))
        self._start(self.queue.finished())

    def _read_lines(self) -> list[dict]:
        try:
            while chunk := self.proc.stdout.read(65536):
                self._out += chunk
        except (BlockingIOError, TypeError):
            pass  # nothing more for now (TypeError: read() of a non-blocking pipe may return None)
        msgs = []
        while b"\n" in self._out:
            line, self._out = self._out.split(b"\n", 1)
            try:
                msgs.append(json.loads(line))
            except ValueError:
                continue
        return msgs

    def _reap(self) -> None:
        if self.proc is None:
            return
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self._reap()
        if self.gate is not None:
            self.gate.close()
            self.gate = None
        self.catalog.release_flush_hold()
        if self._job_file:
            shm.unlink(self._job_file)

    def status(self) -> dict:
        return {"dir": str(self.config.flush_dir), "every": self.config.flush_every,
                "interval": self.config.flush_interval, "keep": self.config.flush_keep,
                "running": self.queue.running if self._busy else None, "pending": self.queue.pending,
                "superseded": self.queue.superseded, "flushed": self.flushed, "failures": self.failures,
                "last": self.last, "recent": self.history[-10:], "on_disk": self.on_disk()}

    def on_disk(self) -> list[int]:
        return durable.flushed_steps(self.config.flush_dir, self.config.job, self.config.node_rank)


def load_flushed(config: Config, step: int, segment_name: Callable[[int], str]) -> list[dict]:
    """Load this node's part of flushed ``step`` into new segments; returns their records
    (rank, world, name, capacity, manifest) for the catalog. CorruptVersion if it does not check out."""
    out = durable.step_dir(config.flush_dir, config.job, step)
    node = durable.read_node_manifest(out, config.node_rank)
    if node.get("step") != step or node.get("job") != config.job:
        raise durable.CorruptVersion(f"{out}: its manifest is of job {node.get('job')!r} step {node.get('step')}")
    records, created = [], []
    try:
        for key, entry in sorted(node["restore"].items()):
            if not key.isdigit() or not isinstance(entry, dict) or entry.get("dir") != f"rank-{int(key)}":
                raise durable.CorruptVersion(f"{out}: its manifest's entry for rank {key!r:.20} is malformed")
            rank, world = int(key), entry.get("world")
            if not (isinstance(world, int) and 0 <= rank < world):
                raise durable.CorruptVersion(f"{out}: rank {rank} of world {world!r:.20}")
            nbytes = (entry.get("manifest") or {}).get("nbytes")
            if not isinstance(nbytes, int) or not 0 <= nbytes <= config.memory_budget:
                raise durable.CorruptVersion(f"{out}: rank {rank}'s size {nbytes!r:.20} is beyond the memory budget")
            name = segment_name(rank)
            path = config.shm_dir / name
            capacity = round_up(max(nbytes, 1), CAPACITY_QUANTUM)
            shm.create(path, capacity)
            created.append(path)
            mapping = shm.Mapping(path, populate=False)
            try:
                durable.load_rank(out / entry["dir"], entry, mapping.view())
            finally:
                mapping.close()
            shm.write_meta(path, {"rank": rank, "world": world, "step": step, "seq": 0, "committed_at": None,
                                  "manifest": entry["manifest"]})
            records.append({"rank": rank, "world": world, "name": name, "capacity": capacity,
                            "manifest": entry["manifest"]})
    except BaseException:
        for p in created:
            shm.drop_meta(p)
            shm.unlink(p)
        raise
    return records


class DiskLoad:
    """``load_flushed`` on a thread; ``result()`` from the daemon's loop once it is done."""

    def __init__(self, config: Config, step: int, segment_name: Callable[[int], str]):
        self.step = step
        self._shm_dir = config.shm_dir
        self._done: queue.Queue = queue.Queue()
        self.origin = f"disk:{durable.step_dir(config.flush_dir, config.job, step)}"

        def work() -> None:
            t0 = time.monotonic()
            try:
                self._done.put(("ok", load_flushed(config, step, segment_name), time.monotonic() - t0))
            except Exception as e:
                self._done.put(("error", e, time.monotonic() - t0))

        self.thread = threading.Thread(target=work, name="ftd-disk-load", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """The daemon stops: wait for the thread, and remove whatever it loaded."""
        self.thread.join(60)
        done = self.result()
        if done and done[0]:
            for r in done[1]:
                path = Path(self._shm_dir) / r["name"]
                shm.drop_meta(path)
                shm.unlink(path)

    def result(self):
        """None while loading; else (ok, records or the error, seconds)."""
        try:
            kind, value, seconds = self._done.get_nowait()
        except queue.Empty:
            return None
        return kind == "ok", value, seconds
