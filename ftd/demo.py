"""``ftd demo``: kill a trainer mid-run and watch it resume, bit-exact, from the daemon's memory.

What it does, on one machine:
  1. starts a node daemon (``ftd daemon``) with a private job name, socket directory and config;
  2. runs the tiny example trainer once without ftd, never interrupted: the reference losses;
  3. runs it again with ftd, SIGKILLs it part-way, shows what the daemon holds, restarts it
     (it restores from the daemon and says where it resumes) and lets it finish;
  4. checks that every loss of the ftd run, including the steps re-run after the crash, equals the
     reference loss of that step bit for bit (``float.hex()`` strings, not a tolerance).
Whatever happens (an error, Ctrl-C, SIGTERM) it stops the trainers and the daemon, which releases
its shared memory, and removes its temporary files. Exit status 0 only if the run was bit-exact.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import Config
from .connection import Connection
from .errors import FtdError

STEP_SLEEP = 0.03                 # seconds per step added to the trainer, so the run is watchable
DAEMON_START_TIMEOUT = 30.0       # seconds to wait for the daemon's socket
DAEMON_STOP_TIMEOUT = 10.0        # seconds between SIGTERM and SIGKILL of the daemon
TRAINER_TIMEOUT = 120.0           # seconds one trainer run may take before the demo gives up
INDENT = "      "

_STEP_LINE = re.compile(r"^step\s+(\d+)\s")
_RESUME_LINE = re.compile(r"resuming after step (\d+)")


class DemoError(Exception):
    """Something kept the demo from running; the message says what."""


@dataclass
class Demo:
    """Paths, names and processes of one demo run (everything cleanup needs)."""
    steps: int
    workdir: Path
    keep_workdir: bool
    runtime_dir: Path
    job: str = field(default_factory=lambda: f"demo-{os.getpid()}-{secrets.token_hex(2)}")
    daemon: subprocess.Popen | None = None
    trainer: subprocess.Popen | None = None
    conn: Connection | None = None

    @property
    def config_file(self) -> Path:
        return self.workdir / "ftd.toml"

    @property
    def daemon_log(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def ref_losses(self) -> Path:
        return self.workdir / "ref-losses.txt"

    @property
    def ftd_losses(self) -> Path:
        return self.workdir / "ftd-losses.txt"

    @property
    def config(self) -> Config:
        """The daemon's config (also written to config_file): socket path and endpoint derive from it."""
        return Config(job=self.job, runtime_dir=self.runtime_dir, memory_budget=256 << 20, memory_reserve=128 << 20)

    @property
    def socket_path(self) -> Path:
        return self.config.socket_path

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    @property
    def shm_prefix(self) -> str:
        return f"ftd.{self.job}."


def _say(text: str = "") -> None:
    print(text, flush=True)


# ---- the daemon -----------------------------------------------------------------------------------
def _write_config(demo: Demo) -> None:
    demo.config_file.write_text(
        "# written by `ftd demo`; every key is explained in configs/local.toml\n"
        f'job = "{demo.job}"\n'
        f'runtime_dir = "{demo.runtime_dir}"\n'
        'shm_dir = "/dev/shm"\n'
        f'memory_budget = {demo.config.memory_budget}\n'
        f'memory_reserve = {demo.config.memory_reserve}\n')


def _start_daemon(demo: Demo) -> None:
    _write_config(demo)
    _say(f"{INDENT}$ ftd daemon --config {demo.config_file}")
    with open(demo.daemon_log, "wb") as log:
        demo.daemon = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(demo.config_file)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    demo.conn = Connection(demo.endpoint, timeout=5.0)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        if demo.daemon.poll() is not None:
            raise DemoError(f"the daemon exited with status {demo.daemon.returncode}:\n{_tail(demo.daemon_log)}")
        try:
            demo.conn.call("ping")
            break
        except FtdError:
            if time.monotonic() > deadline:
                raise DemoError(f"the daemon did not open {demo.socket_path} within {DAEMON_START_TIMEOUT:g} s")
            time.sleep(0.05)
    _say(f"{INDENT}daemon pid {demo.daemon.pid} serving at {demo.endpoint}")


def _show_daemon_status(demo: Demo) -> None:
    _say(f"{INDENT}what the daemon holds now:")
    _say(f"{INDENT}$ ftd status --endpoint {demo.endpoint}")
    out = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--endpoint", demo.endpoint],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    for line in (out.stdout + out.stderr).splitlines():
        _say(f"{INDENT}  daemon | {line}")


@dataclass
class SnapshotTimes:
    """Per-snapshot timings as the daemon reports them, sampled while the trainer runs."""
    seen: dict = field(default_factory=dict)   # commit time -> (trainer blocked s, copy s)

    def sample(self, conn: Connection) -> None:
        try:
            ranks = conn.call("status")["ranks"]
        except FtdError:
            return
        for r in ranks:
            if r["last_commit_at"] is not None and r["last_blocked_seconds"] is not None:
                self.seen[r["last_commit_at"]] = (r["last_blocked_seconds"], r["last_copy_seconds"])

    def summary(self) -> str:
        if not self.seen:
            return "no snapshot timings reported"
        blocked = statistics.median(b for b, _ in self.seen.values())
        copies = [c for _, c in self.seen.values() if c is not None]
        copy = f", background copy {statistics.median(copies) * 1000:.2f} ms" if copies else ""
        return f"trainer blocked in snapshot() {blocked * 1000:.2f} ms{copy} (medians of {len(self.seen)} snapshots)"


# ---- the trainer ----------------------------------------------------------------------------------
def _trainer_cmd(demo: Demo, losses: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ftd.examples.tiny_trainer", "--steps", str(demo.steps),
            "--losses", str(losses), *extra]


def _run_reference(demo: Demo) -> float:
    """The uninterrupted run without ftd; returns how long it took to print its first line (start-up cost)."""
    t0 = time.monotonic()
    startup: list[float] = []
    _stream(demo, _trainer_cmd(demo, demo.ref_losses, "--no-ftd"), os.environ.copy(),
            lambda line: startup or startup.append(time.monotonic() - t0), echo=False)
    if demo.trainer.returncode != 0:
        raise DemoError(f"the reference run failed with status {demo.trainer.returncode}")
    _say(f"{INDENT}done in {time.monotonic() - t0:.1f} s; losses in {demo.ref_losses.name}")
    return startup[0] if startup else float("nan")


def _stream(demo: Demo, cmd: list[str], env: dict, on_line: Callable[[str], object], echo: bool = True) -> None:
    """Run a trainer, echo its output with a prefix and pass each line to ``on_line``; wait for its end."""
    demo.trainer = proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True, bufsize=1)
    timed_out = threading.Event()

    def give_up() -> None:
        timed_out.set()
        proc.kill()

    watchdog = threading.Timer(TRAINER_TIMEOUT, give_up)
    watchdog.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if echo:
                _say(f"{INDENT}  trainer | {line}")
            on_line(line)
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    if timed_out.is_set():
        raise DemoError(f"the trainer did not finish within {TRAINER_TIMEOUT:g} s")


def _ftd_env(demo: Demo) -> dict:
    env = os.environ.copy()
    env["FTD_ENDPOINT"] = demo.endpoint
    return env


def _run_until_killed(demo: Demo, kill_at: int, times: SnapshotTimes) -> float:
    """First ftd run: SIGKILL the trainer once it reports step ``kill_at``; returns the time of the kill."""
    killed_at: list[float] = []

    def on_line(line: str) -> None:
        times.sample(demo.conn)
        m = _STEP_LINE.match(line)
        if m and int(m.group(1)) >= kill_at and not killed_at:
            demo.trainer.send_signal(signal.SIGKILL)
            killed_at.append(time.monotonic())
            _say(f"{INDENT}>>> SIGKILL trainer pid {demo.trainer.pid} after it reported step {m.group(1)}")

    _stream(demo, _trainer_cmd(demo, demo.ftd_losses, "--step-sleep", str(STEP_SLEEP)), _ftd_env(demo), on_line)
    if not killed_at:
        raise DemoError(f"the trainer ended (status {demo.trainer.returncode}) before step {kill_at}")
    return killed_at[0]


def _run_resumed(demo: Demo, times: SnapshotTimes) -> tuple[int | None, float]:
    """Restarted trainer: returns (the step it resumed after, the time it said so)."""
    resumed: list[tuple[int, float]] = []

    def on_line(line: str) -> None:
        times.sample(demo.conn)
        m = _RESUME_LINE.search(line)
        if m and not resumed:
            resumed.append((int(m.group(1)), time.monotonic()))

    _stream(demo, _trainer_cmd(demo, demo.ftd_losses, "--step-sleep", str(STEP_SLEEP)), _ftd_env(demo), on_line)
    if demo.trainer.returncode != 0:
        raise DemoError(f"the restarted trainer failed with status {demo.trainer.returncode}")
    return resumed[0] if resumed else (None, float("nan"))


# ---- verification ---------------------------------------------------------------------------------
def _read_losses(path: Path) -> list[tuple[int, str]]:
    """Lines of ``step float.hex()``; a malformed line becomes (step or -1, the raw text)."""
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1]))
        else:
            rows.append((-1, line))
    return rows


def verify(reference: list[tuple[int, str]], resumed: list[tuple[int, str]], steps: int) -> tuple[bool, str]:
    """Compare the ftd run's losses, line by line, with the reference losses. Returns (bit-exact, verdict)."""
    ref = dict(reference)
    if sorted(ref) != list(range(steps)) or len(reference) != steps:
        return False, f"the reference run did not write exactly one loss for each of steps 0..{steps - 1}"
    for step, value in resumed:
        if step not in ref:
            return False, f"unexpected line in the ftd run's losses: {value!r}"
        if ref[step] != value:
            return False, (f"MISMATCH at step {step}: ftd run {value} ({_decimal(value)}), "
                           f"uninterrupted run {ref[step]} ({_decimal(ref[step])})")
    missing = sorted(set(range(steps)) - {s for s, _ in resumed})
    if missing:
        return False, f"the ftd run has no loss for step(s) {', '.join(map(str, missing[:10]))}"
    twice = len(resumed) - steps
    return True, (f"bit-exact: all {steps} steps match the uninterrupted run"
                  + (f" ({_plural(twice, 'step')} ran twice, identical both times)" if twice else ""))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _decimal(hex_value: str) -> str:
    try:
        return repr(float.fromhex(hex_value))
    except ValueError:
        return "unreadable"


# ---- cleanup --------------------------------------------------------------------------------------
def _leftover_segments(demo: Demo) -> list[Path]:
    return sorted(p for p in Path("/dev/shm").glob(demo.shm_prefix + "*"))


def _stop_trainer(demo: Demo) -> None:
    proc = demo.trainer
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _stop_daemon(demo: Demo) -> None:
    """SIGTERM the daemon (it unlinks its shared memory); SIGKILL and unlink ourselves if it hangs."""
    proc = demo.daemon
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _say(f"{INDENT}the daemon did not stop within {DAEMON_STOP_TIMEOUT:g} s; killing it")
            proc.kill()
            proc.wait()
    for path in _leftover_segments(demo):
        _say(f"{INDENT}removing leftover shared memory {path}")
        path.unlink(missing_ok=True)


def _cleanup(demo: Demo) -> None:
    _stop_trainer(demo)
    if demo.conn is not None:
        demo.conn.close()
        demo.conn = None
    _stop_daemon(demo)
    shutil.rmtree(demo.runtime_dir, ignore_errors=True)
    if not demo.keep_workdir:
        shutil.rmtree(demo.workdir, ignore_errors=True)
    if demo.daemon is not None:
        left = _leftover_segments(demo)
        _say("cleanup: daemon stopped; " + (f"{len(left)} shared-memory file(s) could not be removed"
                                             if left else f"no /dev/shm/{demo.shm_prefix}* left")
             + ("" if demo.keep_workdir else "; temporary files removed"))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- the demo -------------------------------------------------------------------------------------
def _run(demo: Demo) -> int:
    kill_at = demo.steps * 2 // 3
    _say("ftd demo: a trainer is SIGKILLed mid-run and resumes from the ftd daemon's memory.")
    _say(f"work dir: {demo.workdir}" + ("" if demo.keep_workdir else "  (temporary; use --dir DIR to keep it)"))
    _say()
    _say(f"[1/4] starting the node daemon for job {demo.job!r}")
    _start_daemon(demo)

    _say(f"[2/4] reference run: {demo.steps} steps without ftd, never interrupted")
    startup = _run_reference(demo)

    _say(f"[3/4] the same run with ftd; will SIGKILL the trainer at step {kill_at}")
    times = SnapshotTimes()
    killed_at = _run_until_killed(demo, kill_at, times)
    last_done = max(s for s, _ in _read_losses(demo.ftd_losses))
    _show_daemon_status(demo)
    _say(f"{INDENT}restarting the trainer; it restores the newest snapshot from the daemon")
    resumed_after, resumed_at = _run_resumed(demo, times)
    if resumed_after is None:
        raise DemoError("the restarted trainer did not resume from a snapshot (it started fresh)")

    _say("[4/4] comparing every loss of the ftd run with the uninterrupted run (float.hex(), bit for bit)")
    ok, verdict = verify(_read_losses(demo.ref_losses), _read_losses(demo.ftd_losses), demo.steps)
    _say(f"{INDENT}{verdict}")

    _say()
    _say("summary")
    lost = last_done - resumed_after
    _say(f"  steps lost to the crash: {lost} (the killed trainer had finished step {last_done}, the newest "
         f"snapshot in the daemon was step {resumed_after}, so {_plural(lost, 'step')} ran again)")
    _say(f"  kill -> trainer resumed: {resumed_at - killed_at:.2f} s (new process, torch import, restore, and the "
         f"status query above; just starting the trainer took {startup:.2f} s in the reference run)")
    _say(f"  per snapshot: {times.summary()}")
    files = f"{demo.config_file.name}, {demo.daemon_log.name}, {demo.ref_losses.name}, {demo.ftd_losses.name}"
    _say(f"  files: {files} in {demo.workdir}"
         + ("" if demo.keep_workdir else " (removed now; run `ftd demo --dir DIR` to keep them)"))
    _say(f"  verdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _make_demo(steps: int, workdir: str | None) -> Demo:
    if workdir is None:
        path, keep = Path(tempfile.mkdtemp(prefix="ftd-demo-work-")), False
    else:
        path, keep = Path(workdir).resolve(), True
        path.mkdir(parents=True, exist_ok=True)
    runtime_dir = Path(tempfile.mkdtemp(prefix="ftd-demo-", dir="/tmp"))  # short: unix socket paths max ~107 chars
    demo = Demo(steps, path, keep, runtime_dir)
    for old in (demo.ref_losses, demo.ftd_losses):
        old.unlink(missing_ok=True)  # the trainer appends to them
    return demo


def _raise_on_sigterm(signum: int, frame: object) -> None:
    _say("\nftd demo: terminated; cleaning up")
    raise SystemExit(128 + signum)


def main(steps: int = 60, workdir: str | None = None) -> int:
    """Run the demo; returns 0 if the resumed run was bit-exact, 1 if not, 2 on bad arguments or errors."""
    if steps < 4:
        print("ftd demo: --steps must be at least 4", file=sys.stderr)
        return 2
    try:
        demo = _make_demo(steps, workdir)
    except OSError as e:
        print(f"ftd demo: cannot create the work directory: {e}", file=sys.stderr)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so cleanup runs on SIGTERM too
    try:
        return _run(demo)
    except DemoError as e:
        _say(f"ftd demo failed: {e}")
        return 2
    except KeyboardInterrupt:
        _say("\nftd demo: interrupted; cleaning up")
        return 130
    finally:
        if in_main_thread:  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _cleanup(demo)
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_sigint)
                signal.signal(signal.SIGTERM, previous_sigterm)
