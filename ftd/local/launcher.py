"""``ftd launch``: a whole ftd cluster on one machine, G node daemons until Ctrl-C.

Erasure coding across nodes is only believable if one can watch a node die and the others carry
on, so this makes that cheap to try on a laptop or a single CI machine: it writes one ordinary
config per node (``configs``), starts the G daemons, records them in ``DIR/cluster.json`` and stops
them all on Ctrl-C/SIGTERM. Each launch gets its own job name, so several clusters can share a
machine; ``ftd kill-node`` (``killnode``) loses one. The launcher never restarts a daemon by itself:
a dead node stays dead until a user restarts it, as on a real cluster.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from ftd.config import Config, ensure_private_dir
from ftd.errors import UsageError
from ftd.local.configs import CLUSTER_FILE, check_ports, config_path, log_path, shm_files, write_configs
from ftd.local.daemons import find_daemons
from ftd.util.files import write_atomic
from ftd.util.procs import free_ports, ftd_env, log_tail, own_process, stop_processes

PROG = "ftd"
READY_MARK = "serving at"
READY_TIMEOUT = 30.0     # seconds for every daemon to print READY_MARK
STOP_TIMEOUT = 15.0      # seconds a daemon gets after SIGTERM before SIGKILL


def _refuse_running_cluster(directory: Path) -> None:
    try:
        old = json.loads((directory / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return
    pid = old.get("launcher_pid") if isinstance(old, dict) else None
    proc = own_process(pid)
    try:
        launcher = proc is not None and pid != os.getpid() and "launch" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        launcher = False
    if launcher:
        raise UsageError(f"{directory} already holds a running cluster (job {old.get('job')!r}, launcher pid {pid}); "
                         f"stop it with Ctrl-C or `kill {pid}`, or choose another --dir")


class _StopSignals:
    """SIGINT/SIGTERM set a flag instead of killing the launcher; a second one means "hurry".

    The handler only counts: taking a lock in a signal handler could deadlock the main thread.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        if self.count == 2:
            print(f"{PROG} launch: second signal, killing the daemons now", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def stopping(self) -> bool:
        return self.count >= 1

    def hurry(self) -> bool:
        return self.count >= 2


def start_daemon(directory: Path, rank: int) -> subprocess.Popen:
    """One `ftd daemon` subprocess, in the launcher's process group so that Ctrl-C reaches both."""
    with open(log_path(directory, rank), "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config",
                                 str(config_path(directory, rank))],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=ftd_env(), cwd=directory)


def _is_ready(directory: Path, rank: int) -> bool:
    try:
        return READY_MARK in log_path(directory, rank).read_text(errors="replace")
    except OSError:
        return False


def wait_ready(directory: Path, procs: list[subprocess.Popen], signals: _StopSignals,
               timeout: float = READY_TIMEOUT) -> str | None:
    """Wait until every daemon serves; returns None, or why not (after printing the culprit's log)."""
    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        if signals.stopping:
            return "interrupted while the daemons were starting"
        for rank in sorted(pending):
            if _is_ready(directory, rank):
                pending.discard(rank)
            elif procs[rank].poll() is not None:
                log = log_path(directory, rank)
                print(f"{PROG} launch: the daemon of node {rank} exited with status {procs[rank].returncode} "
                      f"before serving; the end of {log}:\n{log_tail(log)}", file=sys.stderr)
                return f"node {rank} failed to start"
        if pending and time.monotonic() >= deadline:
            rank = min(pending)
            log = log_path(directory, rank)
            print(f"{PROG} launch: the daemon of node {rank} did not print {READY_MARK!r} within {timeout:g} s; "
                  f"the end of {log}:\n{log_tail(log)}", file=sys.stderr)
            return f"node {rank} did not start in time"
        time.sleep(0.05)
    return None


def cluster_record(job: str, nodes: int, parity: int, directory: Path,
                   configs: list[Config], procs: list[subprocess.Popen]) -> dict:
    """What cluster.json holds; group_size is the effective one (never 0)."""
    return {
        "job": job, "nodes": nodes, "parity": parity, "group_size": configs[0].group_size, "dir": str(directory),
        "launcher_pid": os.getpid(),
        "members": [{"node_rank": c.node_rank, "endpoint": c.endpoint, "peer_endpoint": c.peer_endpoint,
                     "pid": p.pid, "config": str(config_path(directory, c.node_rank)),
                     "log": str(log_path(directory, c.node_rank))} for c, p in zip(configs, procs)],
    }


def _print_usage(cluster: dict, directory: Path) -> None:
    print(f"{PROG} launch: job {cluster['job']!r}: {cluster['nodes']} nodes, parity {cluster['parity']}, "
          f"group size {cluster['group_size']}, in {directory}")
    for m in cluster["members"]:
        print(f"  node {m['node_rank']}: pid {m['pid']:<8} {m['endpoint']}  (peers: {m['peer_endpoint']})")
    first = cluster["members"][0]
    print(f"trainers of node N: FTD_ENDPOINT=<endpoint of node N> python train.py   "
          f"(e.g. FTD_ENDPOINT={first['endpoint']})")
    print(f"lose a node:        {PROG} kill-node --dir {directory} --node-rank N")
    print(f"restart one:        {PROG} daemon --config {directory}/node-N.toml   (logs: {directory}/node-N.log)")
    print("stop the cluster:   Ctrl-C (or SIGTERM to this launcher)", flush=True)


def _watch(procs: list[subprocess.Popen], signals: _StopSignals) -> None:
    """Until a stop signal: report daemons that die (and do not restart them)."""
    reported: set[int] = set()
    while not signals.stopping:
        time.sleep(0.1)
        for rank, proc in enumerate(procs):
            if rank not in reported and proc.poll() is not None:
                reported.add(rank)
                print(f"{PROG} launch: node {rank} (pid {proc.pid}) exited with status {proc.returncode}; "
                      "not restarting it (restart it by hand with its config if you want it back)", flush=True)


def shutdown(directory: Path, configs: list[Config], procs: list[subprocess.Popen],
             hurry=lambda: False) -> None:
    """Stop our daemons and those restarted by hand with a config of DIR; remove what the cluster left."""
    pids = {p.pid for p in procs if p.poll() is None}
    pids |= set(find_daemons([config_path(directory, c.node_rank) for c in configs]))
    if pids:
        print(f"{PROG} launch: stopping {len(pids)} daemon(s): {' '.join(map(str, sorted(pids)))}", flush=True)
    terminated, killed = stop_processes(sorted(pids), timeout=STOP_TIMEOUT, children=procs, hurry=hurry)
    if killed:
        print(f"{PROG} launch: daemon(s) {' '.join(map(str, killed))} ignored SIGTERM and were killed", flush=True)
    (directory / CLUSTER_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory / "run", ignore_errors=True)
    left = [path for c in configs for path in shm_files(c)]
    for path in left:  # of nodes that died without releasing them; no daemon can adopt them any more
        path.unlink(missing_ok=True)
    if left:
        print(f"{PROG} launch: removed {len(left)} shared-memory file(s) left by dead nodes", flush=True)
    print(f"{PROG} launch: cluster stopped; configs and logs kept in {directory}", flush=True)


def launch(nodes: int, parity: int, directory: Path, *, job: str | None = None, group_size: int = 0,
           memory_budget: str = "2GiB", base_port: int | None = None, extra: dict | None = None) -> int:
    """Run a local cluster of ``nodes`` daemons until SIGINT/SIGTERM; returns the exit status."""
    directory = Path(directory).expanduser().absolute()
    job = job or f"local-{secrets.token_hex(4)}"
    try:
        if nodes < 1:
            raise UsageError(f"--nodes must be at least 1, got {nodes}")
        ensure_private_dir(directory)
        _refuse_running_cluster(directory)
        ports = check_ports(base_port, nodes) if base_port is not None else free_ports(nodes)
        configs = write_configs(nodes, parity, directory, job=job, group_size=group_size,
                                memory_budget=memory_budget, ports=ports, extra=dict(extra or {}))
    except (UsageError, PermissionError) as e:
        print(f"{PROG} launch: {e}", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    with _StopSignals() as signals:
        try:
            for config in configs:
                procs.append(start_daemon(directory, config.node_rank))
            failure = wait_ready(directory, procs, signals)
            if failure is not None:
                print(f"{PROG} launch: {failure}; stopping the cluster", file=sys.stderr)
                return 1
            cluster = cluster_record(job, nodes, parity, directory, configs, procs)
            write_atomic(directory / CLUSTER_FILE, json.dumps(cluster, indent=2) + "\n")
            _print_usage(cluster, directory)
            _watch(procs, signals)
            return 0
        finally:
            shutdown(directory, configs, procs, hurry=signals.hurry)
