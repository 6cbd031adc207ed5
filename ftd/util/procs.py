"""The process toolkit: free ports, liveness, signals, stop-and-wait, log tails, the environment for
``python -m ftd...`` children.

One copy for the launcher, the agent, the demo, the chaos script, the benchmarks and the tests, so
they all agree on what "alive" means (a zombie is dead) and on how a process is stopped (SIGTERM,
a grace period, SIGKILL, then reaped).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil

KILL_TIMEOUT = 10.0  # seconds a SIGKILLed process may take to disappear


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def own_process(pid) -> psutil.Process | None:
    """The live process ``pid`` if it belongs to this user, else None."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid() or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc


def signal_all(pids: Iterable[int], sig: int) -> list[int]:
    """Send ``sig`` to every pid of this user still alive; returns those signalled."""
    sent = []
    for pid in pids:
        proc = own_process(pid)
        if proc is None:
            continue
        try:
            proc.send_signal(sig)
            sent.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sent


def wait_gone(pids: Iterable[int], timeout: float, children: Iterable[subprocess.Popen] = (),
              hurry: Callable[[], bool] = lambda: False) -> list[int]:
    """Wait until no pid is alive (reaping our own ``children`` meanwhile); returns those still alive."""
    pids, children = list(pids), list(children)
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            child.poll()
        left = [pid for pid in pids if own_process(pid) is not None]
        if not left or time.monotonic() >= deadline or hurry():
            return left
        time.sleep(0.05)


def stop_processes(pids: Iterable[int], *, timeout: float, children: Iterable[subprocess.Popen] = (),
                   hurry: Callable[[], bool] = lambda: False) -> tuple[list[int], list[int]]:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns (terminated, killed)."""
    children = list(children)
    terminated = signal_all(pids, signal.SIGTERM)
    stubborn = wait_gone(terminated, timeout, children, hurry)
    killed = signal_all(stubborn, signal.SIGKILL)
    wait_gone(killed, KILL_TIMEOUT, children)
    return terminated, killed


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads (started with ``start_new_session=True``)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace`` seconds, reap ``proc``."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc, signal.SIGKILL)  # children of a leader that exited (or ignored SIGTERM)
    proc.wait()


def kill_everything_from(directory: Path) -> list[str]:
    """SIGKILL every process of this user whose command line names ``directory`` (a cluster's
    launcher, daemons, trainers started with its configs), except the caller; wait until they are
    gone. For tests and benchmarks cleaning up after themselves, even after a failure. Returns what
    was killed, one line each."""
    victims, killed = [], []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and proc.info["uids"].real == os.getuid() and str(directory) in cmdline:
                proc.kill()
                victims.append(proc)
                killed.append(f"pid {proc.pid} ({cmdline[:80]})")
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pass
    psutil.wait_procs(victims, timeout=KILL_TIMEOUT)
    return killed


def log_tail(path: Path, lines: int = 20, indent: str = "    ", missing: str = "(no log)") -> str:
    """The last ``lines`` lines of a log file, each indented, for an error message."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return indent + missing
    return "\n".join(indent + line for line in text.splitlines()[-lines:]) or indent + "(empty log)"


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true (and return that); TimeoutError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def ftd_env(base: dict | None = None) -> dict:
    """``base`` (default: this environment) with PYTHONPATH starting at the directory that holds this
    ``ftd`` package, so that ``python -m ftd.cli ...`` in a child runs this very ftd."""
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
