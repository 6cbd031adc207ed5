"""The daemon's side of the flush: runs the flush worker process and follows it, never blocking.

``Flusher`` keeps one ``ftd.durable.flush_worker`` process, sends it one flush at a time and follows
its JSON lines from the daemon's loop. While the worker copies a version out of shared memory the
catalog holds that version's buffers (a trainer that needs one meanwhile skips a snapshot; it never
waits); once ``copied`` comes they are released, and the writing to disk costs the trainers nothing
but the CPU and disk bandwidth a nice-19, idle-I/O process gets.

Call order (the daemon's loop, one thread):
  1. ``check_dir()`` and ``start_worker()`` once at start-up (torch is imported before any flush);
  2. ``offer(step)`` whenever a recoverable step is due (the policy's or the coordinator's word):
     it starts at once, or waits as the one pending flush (a newer offer supersedes it);
  3. ``copies_changed()`` after every begin, commit and abort (the worker pauses its writing while
     a trainer copies);
  4. ``tick()`` every loop turn: reads the worker's events, releases the held buffers at ``copied``,
     records ``done``/``failed`` and starts the pending flush;
  5. ``close()`` at shutdown.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftd.config import Config
from ftd.daemon.catalog import Catalog
from ftd.durable import ondisk
from ftd.durable.copygate import CopyGate
from ftd.durable.policy import FlushQueue
from ftd.shm import segments
from ftd.util.procs import ftd_env

log = logging.getLogger(__name__)
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
        self._discard_running = False          # the running flush belongs to a run that was dropped

    def check_dir(self) -> str | None:
        """Why flush_dir cannot take flushes (None: it can). Snapshots in memory go on either way."""
        d = ondisk.job_dir(self.config.flush_dir, self.config.job)
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
        env = ftd_env()
        if self.gate is None:
            self.gate = CopyGate(self.config.socket_path.with_suffix(".copying"))
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd.durable.flush_worker", "--gate", str(self.gate.path)],
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

    def forget_all(self) -> list[int]:
        """A new run starts: remove this node's flushed versions of the job (a flush still running is
        removed when it ends), so that no restore from disk can bring the previous run back."""
        self.queue.pending = None
        self._discard_running = self._busy
        ranks = list(self.catalog.ranks)
        removed = ondisk.remove_node_parts(self.config.flush_dir, self.config.job, self.config.node_rank, ranks)
        if removed:
            log.warning("a new run of job %r starts: removed this node's flushed versions of steps %s from %s",
                        self.config.job, removed, ondisk.job_dir(self.config.flush_dir, self.config.job))
        return removed

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
            segments.unlink(self._job_file)
            self._job_file = None
        seconds = time.monotonic() - self._started
        if self._discard_running:  # it wrote a version of the run that has just been dropped
            self._discard_running = False
            ondisk.remove_node_parts(self.config.flush_dir, self.config.job, self.config.node_rank,
                                     list(self.catalog.ranks))
            log.info("flush of step %s ended after a new run started: its files are removed", step)
            self._start(self.queue.finished())
            return
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
            segments.unlink(self._job_file)

    def status(self) -> dict:
        return {"dir": str(self.config.flush_dir), "every": self.config.flush_every,
                "interval": self.config.flush_interval, "keep": self.config.flush_keep,
                "running": self.queue.running if self._busy else None, "pending": self.queue.pending,
                "superseded": self.queue.superseded, "flushed": self.flushed, "failures": self.failures,
                "last": self.last, "recent": self.history[-10:], "on_disk": self.on_disk()}

    def on_disk(self) -> list[int]:
        return ondisk.flushed_steps(self.config.flush_dir, self.config.job, self.config.node_rank)
