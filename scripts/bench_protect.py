#!/usr/bin/env python3
"""How fast does a cluster protect a snapshot with erasure coding, how fast does a lost node come back,
and how much memory does protection cost?

Run it as ``.venv/bin/python scripts/bench_protect.py`` (``--quick`` for a one-minute check).

For each configuration (N nodes, m parity; one group of g = N nodes, k = N - m data chunks per stripe):
(2,1), (4,1), (8,1), (4,2), (8,2) (``--quick``: (4,1), (4,2)), a local cluster is launched with
``ftd launch`` and, side by side in the same run:

1. Protection throughput. One ``ftd.Client`` per node snapshots ``{"w": S bytes of random float32}``
   (different per node) and waits for the commit; first step 0 (the first snapshot, which also makes
   the daemons reserve and the clients map both buffers of each rank), then step 1 once step 0 is
   recoverable everywhere (steady state: nothing left to set up; the next target after step 0 is 1).
   The round time runs from the last commit of the step (the daemons' own ``last_commit_at``, wall
   clock) to node 0 reporting the step recoverable (status polled every 5 ms); each node's
   ``stats.last_round_seconds`` (from its "protect" message to its parity being complete), the bytes
   it sent and the CPU time its daemon used are read too. Per-node protection rate = S / round time;
   aggregate = N * S / round time; per daemon CPU-second = S / (CPU s of one daemon in the round).
   Against: the raw encode of the same bytes for one node (S split into k chunks of c = ceil(S/k)
   bytes, ``Codec(k, m, kind).encode(chunks, out=...)`` into preallocated, touched buffers, as a parity
   holder encodes into its shared-memory segment) with the cluster's kind and with zfec RS, and a
   memcpy of S bytes (``dst.copy_(src)``, 1 torch thread), each best of 3 after one untimed run.
   Target: per-node protection >= 0.7x the raw zfec encode rate. Caveat printed with the figures:
   the N daemons (and their round: every node sends ~m*S, receives ~m*S, checksums both and encodes)
   share this machine's cores, so the per-node rate shrinks with N while the aggregate is what the
   machine delivers; on real nodes each daemon has its own cores (the per-CPU-second figure estimates
   that case, ignoring waits on peers).
2. Rebuild of a lost node. ``ftd kill-node --node-rank 1`` (daemon SIGKILLed, its shared memory
   deleted), then its daemon is restarted (``python -m ftd.cli daemon --config DIR/node-1.toml``);
   timed from that Popen to its status saying ``cluster.ready`` with the cluster's recoverable step
   (1) as its ``recoverable`` (and no rebuild running); the rebuild's own time (``cluster.rebuilds[-1]["seconds"]``),
   its phases and fetched bytes come from its status, the bytes node 1 received (against the ideal
   S * (1 + m/k)) from its ``cluster.traffic``. Twice each, interleaved (A B B A, best of each): with the
   survivors decoding (the default) and with ``rebuild_decoders = false`` (node 1 fetches k blocks per
   stripe, g * S bytes, and decodes itself: the path before), side by side. Against: ``torch.load(path, weights_only=True)`` of ``{"w": tensor}`` saved
   with ``torch.save`` on a real disk (``--disk-dir``, default /tmp; its filesystem is checked in
   /proc/mounts and printed), cold (fsync + POSIX_FADV_DONTNEED before each load) and warm, 3 each.
   Target: the rebuild at least as fast as the cold torch.load.
3. Memory per node for the recoverable version, from each node's status: (data_bytes + parity_bytes)
   / data_bytes against the ideal 1 + m/k (target: within 5%), and everything the node holds in
   /dev/shm (files ``ftd.<job>.n<N>.*``, allocated blocks) / S, which is about 2 + 2m/k because the
   daemon keeps two buffers per trainer rank (double buffering: one being written while the other
   holds the newest complete version) and two parity segments (the recoverable step's, and the one
   the next round writes into, reserved once and reused).

Default S: 256 MiB per node for N <= 4, 128 MiB for N = 8 (so the 8-node runs stay well under a
minute and 8 nodes x 2 buffers fit comfortably); ``--mib S`` sets it for all; ``--quick``: 16 MiB.

The clients run in one helper process (``--trainers-worker``, a trainer per node) rather than in the
benchmark process itself: ``ftd kill-node`` SIGKILLs every trainer pid registered with the node's
daemon, which would be this benchmark. The helper exits before the kill. (``Client.wait()`` is not
used as the commit time: it returns only after the client has also mapped and populated the next
buffer, hundreds of ms later at 256 MiB on the first snapshot.)

Every process and shared-memory file is removed at the end of each configuration, even on Ctrl-C or
an error: the launcher gets SIGINT (it stops its daemons, also the one restarted by hand), whatever
still has the cluster's directory in its command line is SIGKILLed, the job's /dev/shm files are
deleted and the directory removed. Results: ``bench-results/bench_protect-<timestamp>.json``.
Phases that allocate fresh memory (torch.load, the restarted daemon's segments) are preceded by an
untimed touch of as much memory (see ``prefault`` in benchutil.py; ``--no-prefault`` turns it off).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
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

sys.path.insert(0, str(REPO))
from ftd.cluster.erasure import Codec  # noqa: E402  (the repo's ftd, also when the venv has it installed elsewhere)
from ftd.cluster.protection import ALIGN  # noqa: E402
from ftd.cluster.stripes import chunk_bytes  # noqa: E402
from ftd.control.connection import Connection, status_or_none  # noqa: E402
from ftd.errors import FtdError  # noqa: E402
from ftd.util.procs import kill_everything_from, wait_for  # noqa: E402

MiB = 1 << 20
MB = 1e6
SHM = Path("/dev/shm")
CONFIGS = [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2)]
QUICK_CONFIGS = [(4, 1), (4, 2)]
POLL_INTERVAL = 0.005
LAUNCH_TIMEOUT = 60.0
ROUND_TIMEOUT = 150.0        # the coordinator abandons a round after 120 s (round_timeout)
REBUILD_TIMEOUT = 180.0
MEMORY_BUDGET = "4GiB"
TARGET_PROTECT_RATIO = 0.7   # per-node protection rate >= 0.7x the raw zfec encode rate
TARGET_MEMORY_DEVIATION = 0.05
LOG_PATTERN = re.compile(r"WARNING|ERROR|Traceback|rebuild|abandon|protect|refused|timed out|exited", re.I)


# ---- small helpers ------------------------------------------------------------------------------
def default_mib(nodes: int) -> int:
    return 256 if nodes <= 4 else 128


def random_state(nbytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(nbytes // 4, generator=g)


def shm_usage(job: str, node: int) -> tuple[int, int]:
    """(allocated bytes, files) of everything node ``node`` of ``job`` holds in /dev/shm."""
    prefix = f"ftd.{job}.n{node}."
    total = count = 0
    for p in SHM.iterdir():
        if p.name.startswith(prefix):
            try:
                total += p.stat().st_blocks * 512
                count += 1
            except FileNotFoundError:
                pass
    return total, count


def job_shm_files(job: str) -> list[Path]:
    return [p for p in SHM.iterdir() if p.name.startswith(f"ftd.{job}.")]


def log_excerpt(path: Path, limit: int = 40) -> list[str]:
    """The lines of a daemon log worth a look (warnings, errors, rounds, rebuilds), at most ``limit``."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if LOG_PATTERN.search(line)][-limit:]


# ---- side-by-side baselines ---------------------------------------------------------------------
def measure_encode(nbytes: int, k: int, m: int, kind: str, repeat: int) -> dict:
    """Best-of-``repeat`` seconds to encode one node's S bytes (k chunks of c) into m parity blocks."""
    c = chunk_bytes(nbytes, k, ALIGN)
    buf = np.zeros(k * c, np.uint8)
    buf[:nbytes] = random_state(nbytes, 7).numpy().view(np.uint8)
    chunks = [buf[i * c:(i + 1) * c] for i in range(k)]
    outs = [np.ones(c, np.uint8) for _ in range(m)]  # touched, as the holder's fallocated segment
    codec = Codec(k, m, kind)
    codec.encode(chunks, out=outs)  # untimed first run
    times = [timed(lambda: codec.encode(chunks, out=outs)) for _ in range(repeat)]
    return {"kind": kind, "k": k, "m": m, "c": c, "seconds": times, "best_s": min(times),
            "mb_s": nbytes / min(times) / MB}


def measure_memcpy(nbytes: int, repeat: int) -> dict:
    src = random_state(nbytes, 8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    times = [timed(lambda: dst.copy_(src)) for _ in range(repeat)]
    return {"seconds": times, "best_s": min(times), "mb_s": nbytes / min(times) / MB}


def measure_load(nbytes: int, disk_dir: Path, repeat: int, pre: bool) -> dict:
    """torch.save({"w": tensor}) + fsync once, then torch.load cold (evicted) and warm, ``repeat`` each."""
    path = disk_dir / f"state-{nbytes}.pt"
    state = {"w": random_state(nbytes, 9)}
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    save_s = time.perf_counter() - t0
    del state
    cold, warm = [], []
    try:
        for _ in range(repeat):
            evict_from_page_cache(path)
            prefault(nbytes if pre else 0)
            cold.append(timed(lambda: torch.load(path, weights_only=True)))
        torch.load(path, weights_only=True)  # into the page cache
        for _ in range(repeat):
            prefault(nbytes if pre else 0)
            warm.append(timed(lambda: torch.load(path, weights_only=True)))
    finally:
        path.unlink(missing_ok=True)
    return {"save_fsync_s": save_s, "cold_s": cold, "warm_s": warm,
            "cold_median_s": statistics.median(cold), "cold_best_s": min(cold),
            "warm_median_s": statistics.median(warm), "warm_best_s": min(warm)}


# ---- the trainers (a helper process) ------------------------------------------------------------
def trainers_worker(job: dict) -> int:
    """One client per node: build the states and say "ready"; on "snap STEP" snapshot STEP everywhere,
    wait for every client and report; on "exit" (or EOF) close the clients and leave."""
    import ftd
    torch.set_num_threads(1)
    nbytes = job["nbytes"]
    states = [{"w": random_state(nbytes, 1000 + n)} for n in range(len(job["endpoints"]))]
    clients = [ftd.Client(endpoint=ep, rank=0, world_size=1, capture_rng=False) for ep in job["endpoints"]]
    print(json.dumps({"ready": time.monotonic()}), flush=True)
    try:
        for line in sys.stdin:
            word = line.split()
            if not word or word[0] != "snap":
                break
            step = int(word[1])
            for state in states:
                state["w"].add_(1.0)  # a new step: new bytes
            t0, wall0 = time.monotonic(), time.time()
            for client, state in zip(clients, states):
                client.snapshot(step, state)
            oks, at = [], []
            for client in clients:
                oks.append(client.wait(timeout=job["timeout"]))
                at.append(time.monotonic())
            print(json.dumps({"step": step, "start": t0, "start_wall": wall0, "waited": max(at), "waited_at": at,
                              "ok": oks, "stats": [client.stats for client in clients]}), flush=True)
    finally:
        for client in clients:
            client.close(timeout=10)
    return 0


class RecoverableWatch(threading.Thread):
    """Polls a daemon's status every POLL_INTERVAL until ``pred(status)``; records when it first held."""

    def __init__(self, endpoint: str, pred: Callable[[dict], bool], timeout: float):
        super().__init__(name="bench-watch", daemon=True)
        self.endpoint, self.pred, self.timeout = endpoint, pred, timeout
        self.first_reply: float | None = None
        self.at: float | None = None
        self.at_wall: float | None = None
        self.status: dict | None = None
        self.last: dict | None = None
        self.error: str | None = None
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        conn = Connection(self.endpoint, timeout=3.0)
        deadline = self.t0 + self.timeout
        try:
            while not self._stop_event.is_set() and time.monotonic() < deadline:
                try:
                    st = conn.call("status")
                except FtdError:
                    time.sleep(POLL_INTERVAL)
                    continue
                now = time.monotonic()
                if self.first_reply is None:
                    self.first_reply = now
                self.last = st
                if self.pred(st):
                    self.at, self.at_wall, self.status = now, time.time(), st
                    return
                time.sleep(POLL_INTERVAL)
            if self.at is None and not self._stop_event.is_set():
                self.error = f"not reached within {self.timeout:.0f} s"
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop_event.set()


def status_of(endpoint: str, timeout: float = 5.0) -> dict | None:
    return status_or_none(endpoint, timeout)


def wait_until(fn: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """``fn()``'s first true value within ``timeout`` seconds, else None."""
    try:
        return wait_for(fn, timeout, "a condition", interval)
    except TimeoutError:
        return None


# ---- one configuration --------------------------------------------------------------------------
class Cluster:
    """``ftd launch`` in a subprocess, the trainers helper, a daemon restarted by hand; ``close()``
    removes every process and shared-memory file of the job, whatever happened."""

    def __init__(self, nodes: int, parity: int, nbytes: int, tag: str, group_size: int = 0):
        self.nodes, self.parity, self.nbytes = nodes, parity, nbytes
        self.group_size = group_size  # 0: one group of all nodes
        self.job = f"bp{os.getpid()}-{tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="bprot-", dir="/tmp"))
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
        for key in ("RANK", "WORLD_SIZE", "FTD_ENDPOINT", "FTD_JOB", "FTD_NODE_RANK"):
            self.env.pop(key, None)
        self.procs: list[subprocess.Popen] = []
        self.launcher: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.endpoints: list[str] = []
        self.daemons: dict[int, psutil.Process] = {}   # node rank -> its daemon, for CPU accounting

    def join_watch(self, watch: "RecoverableWatch") -> None:
        """Wait for a status watch; give up at once if the launcher (and so the cluster) is gone."""
        while watch.is_alive():
            watch.join(0.2)
            if self.launcher is not None and self.launcher.poll() is not None:
                watch.stop()
                raise RuntimeError(f"ftd launch exited (status {self.launcher.returncode}) during the measurement")

    def bench_cpu(self) -> float:
        """CPU seconds this benchmark and its trainers helper used so far."""
        t = os.times()
        total = t.user + t.system
        try:
            if self.worker is not None:
                w = psutil.Process(self.worker.pid).cpu_times()
                total += w.user + w.system
        except psutil.Error:
            pass
        return total

    def daemon_cpu(self) -> dict[int, tuple[float, float]]:
        """(user, system) CPU seconds each live daemon used so far."""
        out = {}
        for n, proc in self.daemons.items():
            try:
                t = proc.cpu_times()
                out[n] = (t.user, t.system)
            except psutil.Error:
                pass
        return out

    def _popen(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen(cmd, env=self.env, stdout=kw.pop("stdout", out), stderr=out,
                                 stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def launch(self) -> float:
        t0 = time.monotonic()
        self.launcher = self._popen([sys.executable, "-m", "ftd.cli", "launch", "--nodes", str(self.nodes),
                                     "--parity", str(self.parity), "--dir", str(self.dir), "--job", self.job,
                                     "--group-size", str(self.group_size), "--memory-budget", MEMORY_BUDGET],
                                    self.dir / "launch.out", cwd=REPO)
        ok = wait_until(lambda: (self.dir / "cluster.json").exists() or self.launcher.poll() is not None,
                        LAUNCH_TIMEOUT)
        if not ok or self.launcher.poll() is not None:
            raise RuntimeError(f"ftd launch failed:\n{(self.dir / 'launch.out').read_text(errors='replace')[-3000:]}")
        info = json.loads((self.dir / "cluster.json").read_text())
        self.endpoints = [m["endpoint"] for m in info["members"]]
        self.daemons = {m["node_rank"]: psutil.Process(m["pid"]) for m in info["members"]}
        ready = wait_until(lambda: all((st := status_of(ep, 2.0)) and st["cluster"]["ready"]
                                       for ep in self.endpoints), LAUNCH_TIMEOUT, 0.1)
        if not ready:
            raise RuntimeError("the daemons did not all become ready (start-up sync with their peers)")
        return time.monotonic() - t0

    def start_trainers(self, timeout: float) -> float:
        job = {"endpoints": self.endpoints, "nbytes": self.nbytes, "timeout": timeout}
        self.worker = self._popen([sys.executable, str(Path(__file__).resolve()), "--trainers-worker",
                                   json.dumps(job), "--cluster-dir", str(self.dir)], self.dir / "trainers.log",
                                  stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=REPO)
        return self._read_worker()["ready"]

    def _read_worker(self) -> dict:
        line = self.worker.stdout.readline()
        if not line:
            self.worker.wait(10)
            raise RuntimeError(f"the trainers helper exited ({self.worker.returncode}):\n"
                               f"{(self.dir / 'trainers.log').read_text(errors='replace')[-3000:]}")
        return json.loads(line)

    def tell_worker(self, word: str) -> None:
        self.worker.stdin.write(word.encode() + b"\n")
        self.worker.stdin.flush()

    def snapshot_all(self, step: int) -> dict:
        self.tell_worker(f"snap {step}")
        return self._read_worker()

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            try:
                self.tell_worker("exit")
                self.worker.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.worker.kill()
                self.worker.wait()

    def ftd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftd.cli", *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def restart_daemon(self, node: int) -> subprocess.Popen:
        # as the launcher starts its daemons: cwd = the cluster dir, this repo's ftd on PYTHONPATH
        proc = self._restart(node)
        self.daemons[node] = psutil.Process(proc.pid)
        return proc

    def _restart(self, node: int) -> subprocess.Popen:
        return self._popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(self.dir / f"node-{node}.toml")],
                           self.dir / f"node-{node}.restart.log", cwd=self.dir)

    def logs(self) -> dict[str, list[str]]:
        return {p.name: log_excerpt(p) for p in sorted(self.dir.glob("*.log")) + [self.dir / "launch.out"]
                if p.exists()}

    def close(self, keep_dir: bool = False) -> list[str]:
        """Stop everything of this cluster; returns what had to be cleaned up by force."""
        forced: list[str] = []
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            forced.append(f"trainers helper {self.worker.pid}")
        if self.launcher is not None and self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGINT)
            try:
                self.launcher.wait(40)
            except subprocess.TimeoutExpired:
                forced.append(f"launcher {self.launcher.pid} ignored SIGINT")
        forced += kill_everything_from(self.dir)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
        for path in job_shm_files(self.job):
            path.unlink(missing_ok=True)
            forced.append(f"/dev/shm/{path.name}")
        if keep_dir:
            print(f"   (cluster dir kept: {self.dir})")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return forced


def protect_round(cluster: "Cluster", step: int, cpu: CpuWatch) -> tuple[dict, list[dict]]:
    """Snapshot ``step`` on every node; time from the last commit (the daemons' own commit times, wall
    clock) to node 0 reporting ``step`` recoverable (status polled every POLL_INTERVAL)."""
    watch = RecoverableWatch(cluster.endpoints[0], lambda st: st["cluster"]["recoverable"] >= step, ROUND_TIMEOUT)
    before = [st["cluster"]["stats"] for st in (status_of(ep) for ep in cluster.endpoints)]
    cpu0, bench0 = cluster.daemon_cpu(), cluster.bench_cpu()
    cpu.reset()
    t_window = time.monotonic()
    watch.start()
    snap = cluster.snapshot_all(step)
    if not all(snap["ok"]):
        watch.stop()
        raise RuntimeError(f"a snapshot of step {step} was not committed: ok={snap['ok']}, "
                           f"failed={[s['failed'] for s in snap['stats']]}; see {cluster.dir}/trainers.log")
    cluster.join_watch(watch)
    busy = cpu.busy()
    cpu1, bench1 = cluster.daemon_cpu(), cluster.bench_cpu()
    window = time.monotonic() - t_window
    if watch.at is None:
        co = ((watch.last or {}).get("cluster") or {}).get("coordinator")
        raise RuntimeError(f"step {step} never became recoverable on node 0 ({watch.error}); coordinator: {co}")
    # every node learns "recoverable" from the coordinator's sync a moment later
    sts = wait_until(lambda: (s := [status_of(ep) for ep in cluster.endpoints]) and all(
        x and x["cluster"]["recoverable"] == step and x["cluster"]["round"] is None for x in s) and s, 30, 0.02)
    if not sts:
        raise RuntimeError(f"node 0 says step {step} is recoverable, but not every node agrees within 30 s")
    commits = [st["ranks"][0]["last_commit_at"] for st in sts]
    last_commit = max(commits)
    round_s = watch.at_wall - last_commit
    nbytes, nodes = cluster.nbytes, cluster.nodes
    return {
        "step": step, "round_s": round_s, "busy_cores": busy,
        "protect_node_mb_s": nbytes / round_s / MB, "protect_aggregate_mb_s": nodes * nbytes / round_s / MB,
        "snapshot_to_last_commit_s": last_commit - snap["start_wall"],
        "commit_spread_s": last_commit - min(commits),
        "client_wait_after_last_commit_s": (snap["waited"] - snap["start"]) - (last_commit - snap["start_wall"]),
        "copy_s": [x["last_copy_seconds"] for x in snap["stats"]],
        "last_round_s": [st["cluster"]["stats"]["last_round_seconds"] for st in sts],
        "bytes_sent": [st["cluster"]["stats"]["bytes_sent"] - b["bytes_sent"] for st, b in zip(sts, before)],
        "bytes_received": [st["cluster"]["stats"]["bytes_received"] - b["bytes_received"]
                           for st, b in zip(sts, before)],
        # CPU the daemons used from the snapshot() calls until the step was recoverable everywhere (for
        # step 0 this includes reserving each rank's two buffers at its first begin)
        "daemon_cpu_user_s": [cpu1[n][0] - cpu0[n][0] for n in sorted(cpu1)],
        "daemon_cpu_sys_s": [cpu1[n][1] - cpu0[n][1] for n in sorted(cpu1)],
        "window_s": window,
        "daemon_cores": sum(sum(cpu1[n]) - sum(cpu0[n]) for n in cpu1) / window,
        "bench_cores": (bench1 - bench0) / window,
        "other_cores": busy - (sum(sum(cpu1[n]) - sum(cpu0[n]) for n in cpu1) + bench1 - bench0) / window,
        "rounds_done": sts[0]["cluster"]["coordinator"]["rounds_done"],
        "rounds_abandoned": sts[0]["cluster"]["coordinator"]["rounds_abandoned"],
        "retargets": sts[0]["cluster"]["coordinator"]["retargets"],
    }, sts


def rebuild_node_1(cluster: "Cluster", cpu: CpuWatch, args: argparse.Namespace, nbytes: int, m: int, k: int,
                   last_step: int, direct: bool) -> dict:
    """``ftd kill-node`` node 1, restart its daemon, time its rebuild; with ``direct`` the daemon runs with
    ``rebuild_decoders = false`` (its config file says so while it starts: kill-node finds a daemon by it)."""
    kill = cluster.ftd("kill-node", "--dir", str(cluster.dir), "--node-rank", "1")
    if kill.returncode != 0:
        raise RuntimeError(f"ftd kill-node failed: {kill.stdout}{kill.stderr}")
    left = shm_usage(cluster.job, 1)
    if left[1]:
        raise RuntimeError(f"node 1 still holds {left[1]} shared-memory files after kill-node")
    prefault(0 if args.no_prefault else nbytes + nbytes * m // k)
    ep1 = cluster.endpoints[1]
    rebuilt = RecoverableWatch(ep1, lambda st: st["cluster"]["ready"] and st["cluster"]["recoverable"] == last_step
                               and st["cluster"]["rebuilding"] is None, REBUILD_TIMEOUT)
    cpu.reset()
    cpu0 = cluster.daemon_cpu()
    cpu0.pop(1, None)
    t0 = time.monotonic()
    rebuilt.t0 = t0
    config = cluster.dir / "node-1.toml"
    own = config.read_text()
    if direct:
        config.write_text(own + "\nrebuild_decoders = false\n")
    try:
        cluster.restart_daemon(1)
        rebuilt.start()
        cluster.join_watch(rebuilt)
    finally:
        config.write_text(own)
    busy = cpu.busy()
    cpu1 = cluster.daemon_cpu()
    if rebuilt.at is None:
        cl = (rebuilt.last or {}).get("cluster") or {}
        raise RuntimeError(f"node 1 did not come back with step {last_step} ({rebuilt.error}); last status: "
                           f"ready={cl.get('ready')} recoverable={cl.get('recoverable')} "
                           f"rebuilding={cl.get('rebuilding')} last_rebuild={cl.get('last_rebuild')}")
    cl = rebuilt.status["cluster"]
    last = cl["rebuilds"][-1] if cl["rebuilds"] else {}
    shm_bytes, shm_files = shm_usage(cluster.job, 1)
    out = {"mode": "direct" if direct else "survivors",
           "start_to_serving_s": rebuilt.first_reply - t0, "start_to_recoverable_s": rebuilt.at - t0,
           "own_s": last.get("seconds"), "fetched_bytes": last.get("fetched_bytes"),
           "rebuilt_data": last.get("rebuilt_data"), "rebuilt_parity": last.get("rebuilt_parity"),
           "bad_blocks": last.get("bad_blocks"), "lost_nodes": last.get("lost_nodes"),
           "all_rebuilds": cl["rebuilds"], "shm_bytes_after": shm_bytes, "shm_files_after": shm_files,
           "decoded_frames": last.get("decoded_frames"), "phases": last.get("phases") or {},
           # every byte node 1's daemon received since its start (its status, cluster.traffic)
           "received_bytes": cl["traffic"]["received"]["bytes"],
           "received_by_peer": cl["traffic"]["received"]["by_peer"], "ideal_bytes": nbytes * (1 + m / k),
           "busy_cores": busy,
           "cpu": {"restarted_user_s": cpu1[1][0], "restarted_sys_s": cpu1[1][1],
                   "peers_s": sum(sum(cpu1[n]) - sum(cpu0[n]) for n in cpu0 if n in cpu1)}}
    print(f"   node 1 rebuilt ({out['mode']}): {out['start_to_recoverable_s'] * 1e3:.0f} ms from daemon start "
          f"(rebuild itself {1e3 * (last.get('seconds') or float('nan')):.0f} ms, "
          f"{out['received_bytes'] / nbytes:.2f} S received)", flush=True)
    return out


def measure_config(nodes: int, m: int, nbytes: int, args: argparse.Namespace, disk_dir: Path) -> dict:
    k = nodes - m
    kind = "xor" if m == 1 else "rs"
    ideal = 1 + m / k
    r: dict = {"nodes": nodes, "m": m, "k": k, "kind": kind, "S": nbytes, "ideal_ratio": ideal}
    print(f"\n== N={nodes}, m={m}: one group, k={k} data + m={m} parity per stripe ({kind}), "
          f"S = {nbytes / MiB:g} MiB per node", flush=True)
    t_config = time.monotonic()
    cpu = CpuWatch()

    # side by side: raw encode, memcpy, torch.load (measured before the cluster runs, on an idle machine)
    torch.set_num_threads(1)
    r["encode"] = measure_encode(nbytes, k, m, kind, args.repeat)
    r["encode_rs"] = r["encode"] if kind == "rs" else measure_encode(nbytes, k, m, "rs", args.repeat)
    r["memcpy"] = measure_memcpy(nbytes, args.repeat)
    r["load"] = measure_load(nbytes, disk_dir, args.repeat, not args.no_prefault)
    r["baselines_other_cores"] = cpu.others()
    print(f"   baselines done ({time.monotonic() - t_config:.1f} s; other processes used "
          f"{r['baselines_other_cores']:.2f} cores)", flush=True)

    cluster = Cluster(nodes, m, nbytes, f"{nodes}x{m}")
    r["job"], r["dir"] = cluster.job, str(cluster.dir)
    forced: list[str] = []
    try:
        r["launch_s"] = cluster.launch()
        print(f"   cluster {cluster.job} up and ready in {r['launch_s']:.1f} s ({cluster.dir})", flush=True)

        # 1. protection rounds: step 0 (the first snapshot, as specified), then step 1 (steady state)
        cluster.start_trainers(ROUND_TIMEOUT)
        r["rounds"] = {}
        for step in (0, 1):
            r["rounds"][step], sts = protect_round(cluster, step, cpu)
            print(f"   step {step} recoverable {r['rounds'][step]['round_s'] * 1e3:.0f} ms after the last commit",
                  flush=True)
        last_step = 1
        per_node = []
        for n, st in enumerate(sts):
            cl = st["cluster"]
            v = next(v for v in cl["versions"] if v["step"] == cl["recoverable"])
            shm_bytes, shm_files = shm_usage(cluster.job, n)
            per_node.append({"node": n, "step": cl["recoverable"], "data_bytes": v["data_bytes"],
                             "parity_bytes": v["parity_bytes"],
                             "ratio": (v["data_bytes"] + v["parity_bytes"]) / v["data_bytes"],
                             "buffers_bytes": cl["data_bytes"], "shm_bytes": shm_bytes, "shm_files": shm_files,
                             "shm_over_S": shm_bytes / nbytes, "versions": cl["versions"]})
        r["per_node"] = per_node
        r["coordinator"] = sts[0]["cluster"]["coordinator"]

        # 2. lose node 1, restart its daemon, time the rebuild: the survivors decode (the default), and,
        # interleaved (A B B A), node 1 fetching k blocks per stripe and decoding itself (as before)
        cluster.stop_worker()  # kill-node SIGKILLs the trainers registered with node 1: not this process
        trials = {"survivors": [], "direct": []}
        for mode in ["survivors", "direct", "direct", "survivors"][:2 * args.rebuild_trials]:
            trials[mode].append(rebuild_node_1(cluster, cpu, args, nbytes, m, k, last_step, mode == "direct"))
        best = {mode: min(ts, key=lambda t: t["own_s"]) for mode, ts in trials.items() if ts}
        r["rebuild"] = best["survivors"]
        r["rebuild_cpu"] = r["rebuild"].pop("cpu")
        r["rebuild_busy_cores"] = r["rebuild"].pop("busy_cores")
        r["rebuild_trials"] = trials
        r["rebuild_direct"] = best.get("direct")
    except Exception as e:
        r["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {r['error']}", flush=True)
    finally:
        r["logs"] = cluster.logs() if cluster.dir.exists() else {}
        forced = cluster.close(keep_dir=args.keep_dir)
        r["forced_cleanup"] = forced
        r["elapsed_s"] = time.monotonic() - t_config
    return r


# ---- report -------------------------------------------------------------------------------------
def summarize(r: dict) -> dict:
    s: dict = {"name": f"N={r['nodes']} m={r['m']} (k={r['k']})", "S_mib": r["S"] / MiB, "rounds": {}}
    rs = r["encode_rs"]["mb_s"]
    for step, rd in r.get("rounds", {}).items():
        s["rounds"][step] = {"ratio_rs": rd["protect_node_mb_s"] / rs,
                             "ratio_kind": rd["protect_node_mb_s"] / r["encode"]["mb_s"],
                             "aggregate_ratio_rs_2cores": rd["protect_aggregate_mb_s"] / (2 * rs),
                             "node_mb_per_cpu_s": r["S"] / MB / statistics.mean(
                                 [u + y for u, y in zip(rd["daemon_cpu_user_s"], rd["daemon_cpu_sys_s"])]),
                             "ok": rd["protect_node_mb_s"] / rs >= TARGET_PROTECT_RATIO}
    for t in s["rounds"].values():
        t["cpu_ratio_rs"] = t["node_mb_per_cpu_s"] / rs
    if "rebuild" in r and r["rebuild"]["own_s"] is not None:
        cold = r["load"]["cold_median_s"]
        s["rebuild_speedup_own"] = cold / r["rebuild"]["own_s"]
        s["rebuild_speedup_e2e"] = cold / r["rebuild"]["start_to_recoverable_s"]
        s["rebuild_ok"] = r["rebuild"]["own_s"] <= cold
        s["rebuild_e2e_ok"] = r["rebuild"]["start_to_recoverable_s"] <= cold
    if "per_node" in r:
        devs = [abs(p["ratio"] / r["ideal_ratio"] - 1) for p in r["per_node"]]
        s["memory_worst_dev"] = max(devs)
        s["memory_ok"] = max(devs) <= TARGET_MEMORY_DEVIATION
    return s


def report_config(r: dict, s: dict, fs: str) -> str:
    mb = lambda x: f"{x:,.0f}"  # noqa: E731
    S = r["S"]
    cores = os.cpu_count()
    out = [f"N={r['nodes']}, m={r['m']}: k={r['k']}, code {r['kind']}, S = {S / MiB:g} MiB per node, "
           f"c = {r['encode']['c'] / MiB:.2f} MiB per chunk; job {r['job']}"]
    if "error" in r:
        out.append(f"  FAILED: {r['error']}")
    rounds = r.get("rounds", {})
    if rounds:
        out.append("  1. protection: round = from the last commit (daemon's clock) to node 0 reporting the step "
                   "recoverable (status polled every 5 ms)")
        steps = sorted(rounds)
        label = {0: "step 0 (first snapshot)", 1: "step 1 (steady state)"}
        rows = [["round ms"] + [ms(rounds[t]["round_s"]) for t in steps],
                ["per-node protection MB/s (S / round)"] + [mb(rounds[t]["protect_node_mb_s"]) for t in steps],
                [f"aggregate MB/s (N*S / round, {r['nodes']} daemons, {cores} cores)"]
                + [mb(rounds[t]["protect_aggregate_mb_s"]) for t in steps],
                [f"per-node / raw zfec RS (target >= {TARGET_PROTECT_RATIO}x)"]
                + [f"{s['rounds'][t]['ratio_rs']:.2f}x {verdict(s['rounds'][t]['ok'])}" for t in steps]]
        if r["kind"] != "rs":
            rows.append([f"per-node / raw {r['kind']}"] + [f"{s['rounds'][t]['ratio_kind']:.3f}x" for t in steps])
        rows += [[f"aggregate / ({cores} cores x raw zfec RS)"]
                 + [f"{s['rounds'][t]['aggregate_ratio_rs_2cores']:.2f}x" for t in steps],
                 ["per node last_round_seconds ms (min-max)"]
                 + [f"{ms(min(rounds[t]['last_round_s']))}-{ms(max(rounds[t]['last_round_s']))}" for t in steps],
                 ["MiB sent per node (mean)"] + [f"{statistics.mean(rounds[t]['bytes_sent']) / MiB:.0f}" for t in steps],
                 ["daemon CPU s per node, mean (user + sys)"]
                 + [f"{statistics.mean(rounds[t]['daemon_cpu_user_s']):.2f} + "
                    f"{statistics.mean(rounds[t]['daemon_cpu_sys_s']):.2f}" for t in steps],
                 ["cores used in the window: daemons / bench+trainers / others"]
                 + [f"{rounds[t]['daemon_cores']:.2f} / {rounds[t]['bench_cores']:.2f} / "
                    f"{max(0.0, rounds[t]['other_cores']):.2f}" for t in steps],
                 ["S per daemon CPU-second, MB/s (/ raw zfec RS)"]
                 + [f"{mb(s['rounds'][t]['node_mb_per_cpu_s'])} ({s['rounds'][t]['cpu_ratio_rs']:.2f}x)" for t in steps],
                 ["snapshot() to last commit ms (commit spread)"]
                 + [f"{ms(rounds[t]['snapshot_to_last_commit_s'])} ({ms(rounds[t]['commit_spread_s'])})" for t in steps],
                 ["machine busy, cores (of {})".format(cores)] + [f"{rounds[t]['busy_cores']:.2f}" for t in steps]]
        out.append("\n".join("     " + line for line in table([""] + [label.get(t, f"step {t}") for t in steps],
                                                               rows).splitlines()))
        out.append("     (CPU figures cover snapshot() until node 0 reports the step recoverable; step 0's include "
                   "each daemon reserving its rank's two buffers)")
        e, ers, mc = r["encode"], r["encode_rs"], r["memcpy"]
        out.append(f"     side by side, 1 core, best of {len(e['seconds'])}: raw encode {r['kind']} {mb(e['mb_s'])} MB/s "
                   f"({ms(e['best_s'])} ms)" + (f", raw zfec RS {mb(ers['mb_s'])} MB/s ({ms(ers['best_s'])} ms)"
                                                 if r["kind"] != "rs" else "")
                   + f", memcpy {mb(mc['mb_s'])} MB/s ({ms(mc['best_s'])} ms)")
    if "rebuild" in r:
        b, ld = r["rebuild"], r["load"]
        out.append(f"  2. rebuild of node 1 (kill-node, daemon restarted): "
                   f"{ms(b['start_to_recoverable_s'])} ms from daemon start to ready + recoverable "
                   f"(serving after {ms(b['start_to_serving_s'])} ms); the rebuild itself {ms(b['own_s'])} ms, "
                   f"{b['fetched_bytes'] / MiB:.0f} MiB fetched ({b['fetched_bytes'] / S:.2f} S), data rebuilt "
                   f"{b['rebuilt_data']}, parity rebuilt {b['rebuilt_parity']}")
        out.append(f"     bytes into node 1 (its daemon's traffic counters since its start): "
                   f"{b['received_bytes'] / MiB:.0f} MiB = {b['received_bytes'] / S:.3f} S, against S*(1+m/k) = "
                   f"{1 + r['m'] / r['k']:.3f} S and g*S = {r['nodes']} S before; {b['decoded_frames']} frames decoded "
                   f"by the survivors; by peer (MiB): "
                   + ", ".join(f"{p}: {v['bytes'] / MiB:.0f}" for p, v in sorted(b["received_by_peer"].items())))
        d = r.get("rebuild_direct")
        if d:
            out.append(f"     side by side, node 1 fetching k blocks per stripe and decoding itself (rebuild_decoders = "
                       f"false, the path before): the rebuild itself {ms(d['own_s'])} ms, {d['received_bytes'] / MiB:.0f} "
                       f"MiB = {d['received_bytes'] / S:.3f} S into node 1; phases, ms: "
                       + ", ".join(f"{k} {ms(v)}" for k, v in d["phases"].items())
                       + f"; CPU: node 1 {d['cpu']['restarted_user_s'] + d['cpu']['restarted_sys_s']:.2f} s, "
                       f"its peers {d['cpu']['peers_s']:.2f} s")
            out.append(f"     survivors decoding / node 1 decoding, rebuild time: {b['own_s'] / d['own_s']:.2f}x; bytes "
                       f"into node 1: {b['received_bytes'] / d['received_bytes']:.2f}x (best of "
                       f"{len(r['rebuild_trials']['survivors'])} each, interleaved)")
        out.append("     the rebuild's phases, ms: " + ", ".join(f"{k} {ms(v)}" for k, v in b["phases"].items())
                   + " (targets: reserving and first-touching the new segments, on a thread during frames)")
        if "rebuild_cpu" in r:
            c = r["rebuild_cpu"]
            out.append(f"     CPU: the restarted daemon {c['restarted_user_s']:.2f} s user + {c['restarted_sys_s']:.2f} s "
                       f"sys since its start, its peers {c['peers_s']:.2f} s; machine busy {r['rebuild_busy_cores']:.2f} "
                       f"of {cores} cores")
        out.append(f"     torch.load of the same state from disk ({fs}): cold median {ms(ld['cold_median_s'])} ms "
                   f"(best {ms(ld['cold_best_s'])}), warm median {ms(ld['warm_median_s'])} ms "
                   f"(best {ms(ld['warm_best_s'])}); torch.save + fsync {ms(ld['save_fsync_s'])} ms")
        out.append(f"     rebuild itself <= cold torch.load: {verdict(s['rebuild_ok'])} ({s['rebuild_speedup_own']:.2f}x); "
                   f"daemon start to recoverable <= cold torch.load: {verdict(s['rebuild_e2e_ok'])} "
                   f"({s['rebuild_speedup_e2e']:.2f}x)")
    if "per_node" in r:
        rows = [[f"{p['node']}", f"{p['data_bytes'] / MiB:.2f}", f"{p['parity_bytes'] / MiB:.2f}", f"{p['ratio']:.4f}",
                 f"{r['ideal_ratio']:.4f}", f"{100 * (p['ratio'] / r['ideal_ratio'] - 1):+.2f}%",
                 f"{p['shm_bytes'] / MiB:.1f}", f"{p['shm_over_S']:.3f}", f"{2 + 2 * r['m'] / r['k']:.3f}"]
                for p in r["per_node"]]
        out.append(f"  3. memory per node for the recoverable step {r['per_node'][0]['step']} (status versions; "
                   "/dev/shm = every file of the node, allocated blocks)")
        out.append("\n".join("     " + line for line in table(
            ["node", "data MiB", "parity MiB", "(d+p)/d", "1+m/k", "dev", "/dev/shm MiB", "shm/S", "2+2m/k"],
            rows).splitlines()))
        out.append(f"     target (d+p)/d within {100 * TARGET_MEMORY_DEVIATION:.0f}% of 1+m/k: "
                   f"{verdict(s['memory_ok'])} (worst {100 * s['memory_worst_dev']:.2f}%). shm/S is about 2+2m/k, "
                   f"not 1+m/k: the daemon keeps 2 buffers per trainer rank (double buffering) and 2 parity "
                   f"segments (the recoverable step's, and the next round's, reserved once and reused)")
        if "rebuild" in r:
            out.append(f"     node 1 after its rebuild: {r['rebuild']['shm_bytes_after'] / MiB:.1f} MiB in /dev/shm "
                       f"({r['rebuild']['shm_bytes_after'] / S:.3f} S; the rebuild restores one buffer, the second "
                       f"comes with the next snapshot)")
    if r.get("forced_cleanup"):
        out.append(f"  cleanup had to force: {r['forced_cleanup'][:6]}")
    return "\n".join(out)


def report_summary(results: list[dict], summaries: list[dict]) -> str:
    rows = []
    for r, s in zip(results, summaries):
        rd = r.get("rounds", {})
        node = "/".join(f"{rd[t]['protect_node_mb_s']:,.0f}" if t in rd else "n/a" for t in (0, 1))
        agg = "/".join(f"{rd[t]['protect_aggregate_mb_s']:,.0f}" if t in rd else "n/a" for t in (0, 1))
        ok = " / ".join(f"{verdict(s['rounds'][t]['ok'])} {s['rounds'][t]['ratio_rs']:.2f}x" if t in s["rounds"]
                        else "n/a" for t in (0, 1))
        cpu = (f"{s['rounds'][1]['node_mb_per_cpu_s']:,.0f} ({s['rounds'][1]['cpu_ratio_rs']:.2f}x)"
               if 1 in s["rounds"] else "n/a")
        rows.append([s["name"], f"{s['S_mib']:g}", node, agg, cpu,
                     f"{r['encode_rs']['mb_s']:,.0f}", f"{r['encode']['mb_s']:,.0f}", f"{r['memcpy']['mb_s']:,.0f}", ok,
                     (f"{ms(r['rebuild']['own_s'])} / {ms(r['rebuild']['start_to_recoverable_s'])}"
                      if "rebuild" in r else "n/a"),
                     f"{r['rebuild']['received_bytes'] / r['S']:.2f}" if "rebuild" in r else "n/a",
                     (f"{ms(r['rebuild_direct']['own_s'])} / {r['rebuild_direct']['received_bytes'] / r['S']:.2f}"
                      if r.get("rebuild_direct") else "n/a"),
                     f"{ms(r['load']['cold_median_s'])}",
                     f"{verdict(s.get('rebuild_ok'))} {s['rebuild_speedup_own']:.2f}x" if "rebuild_ok" in s else "n/a",
                     f"{verdict(s.get('memory_ok'))} {100 * s['memory_worst_dev']:.2f}%" if "memory_ok" in s else "n/a"])
    return ("Summary (MB/s = 1e6 bytes/s; protection figures: step 0 / step 1; rebuild: its own time / from "
            "daemon start, ms)\n" + table(
        ["config", "S MiB", "protect/node", "aggregate", "step 1 S/CPU-s (/RS)", "raw RS", "raw code", "memcpy", "per-node >= 0.7x RS",
         "rebuild ms", "into new node /S", "before: ms / into /S", "cold load ms", "rebuild <= cold (load/rebuild)", "mem within 5%"], rows))


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only (4,1) and (4,2), S = 16 MiB")
    p.add_argument("--mib", type=int, help="S, MiB per node (default 256 for N <= 4, 128 for N = 8; --quick 16)")
    p.add_argument("--configs", help="N x m pairs, e.g. '4x1,8x2' (default: all five, or the two of --quick)")
    p.add_argument("--out", default=str(REPO / "bench-results"), help="directory of the JSON results")
    p.add_argument("--disk-dir", default="/tmp", help="a directory on a real disk for the torch.save/load files")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each baseline (best/median of them)")
    p.add_argument("--rebuild-trials", type=int, default=2, choices=(1, 2),
                   help="rebuilds per mode (survivors decode / node 1 decodes), interleaved A B B A; best of them")
    p.add_argument("--no-prefault", action="store_true", help="do not touch fresh memory before allocating phases")
    p.add_argument("--keep-dir", action="store_true", help="keep each cluster's directory (configs, logs)")
    p.add_argument("--trainers-worker", help=argparse.SUPPRESS)  # internal: the clients' process
    p.add_argument("--cluster-dir", help=argparse.SUPPRESS)      # internal: marks the helper's cmdline
    args = p.parse_args(argv)
    if args.configs:
        try:
            args.configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
        except ValueError:
            p.error("--configs takes pairs like 4x1,8x2")
        if any(len(c) != 2 or not 1 <= c[1] < c[0] for c in args.configs):
            p.error("every config needs 1 <= m < N")
    else:
        args.configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trainers_worker:
        return trainers_worker(json.loads(args.trainers_worker))
    signal.signal(signal.SIGTERM, sigterm_to_exit)
    torch.set_num_threads(1)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    disk_root = Path(args.disk_dir).resolve()
    dev, fstype, mnt = mount_of(disk_root)
    fs = f"{fstype} on {dev} at {mnt}"
    if fstype in ("tmpfs", "ramfs", "devtmpfs"):
        print(f"warning: --disk-dir {disk_root} is on {fstype}, not a disk: the torch.load baseline is not "
              "a disk load", file=sys.stderr)
    revision = ftd_revision()
    sizes = {n: (16 if args.quick else args.mib or default_mib(n)) * MiB for n, _ in args.configs}
    if args.mib and args.quick:
        sizes = {n: args.mib * MiB for n in sizes}
    print(f"bench_protect: configs {', '.join(f'({n},{m})' for n, m in args.configs)}; S per node "
          + ", ".join(f"N={n}: {s / MiB:g} MiB" for n, s in sorted(sizes.items()))
          + f"; ftd {revision}; torch {torch.__version__}; {os.cpu_count()} cores; disk files in {disk_root} ({fs})",
          flush=True)
    idle = CpuWatch()
    time.sleep(1.0)
    if idle.others() > 0.2:
        print(f"note: other processes keep {idle.others():.2f} of {os.cpu_count()} cores busy; figures will be noisy",
              flush=True)
    disk_dir = Path(tempfile.mkdtemp(prefix="bench_protect.", dir=disk_root))
    results: list[dict] = []
    t_start = time.monotonic()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        for nodes, m in args.configs:
            need = sizes[nodes] * (nodes * (2 + 2 * m / (nodes - m)) + 4) + (1 << 30)
            if psutil.virtual_memory().available < need:
                print(f"skipping N={nodes} m={m}: needs about {need / (1 << 30):.1f} GiB of memory", flush=True)
                continue
            results.append(measure_config(nodes, m, sizes[nodes], args, disk_dir))
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    elapsed = time.monotonic() - t_start

    summaries = [summarize(r) for r in results]
    print()
    for r, s in zip(results, summaries):
        print(report_config(r, s, fs) + "\n")
    print(report_summary(results, summaries))
    print("\nS/CPU-s: S divided by the CPU seconds one daemon spent in the step-1 round (mean over nodes), "
          "i.e. the per-node rate if each daemon had a core to itself and never waited for its peers.")
    print(f"\nPer-node vs aggregate: the N daemons of a configuration all run on this machine's {os.cpu_count()} "
          "cores, so during a round each gets about cores/N of a core for its share (send ~m*S, receive ~m*S, "
          "checksum both, encode): the per-node rate falls with N while the aggregate N*S/round is what the "
          "machine as a whole protects. On a real cluster every daemon has a node to itself, and the per-node "
          "figure measured here is a lower bound for it. The raw encode and memcpy rates are 1 core.")
    print(f"\ncommand: {command}")
    print(f"elapsed: {elapsed:.0f} s; per configuration: "
          + ", ".join(f"N={r['nodes']} m={r['m']} {r['elapsed_s']:.0f} s" for r in results))
    print("other processes' CPU use during the baselines (cores): "
          + ", ".join(f"N={r['nodes']} m={r['m']} {r['baselines_other_cores']:.2f}" for r in results))
    out = Path(args.out) / f"bench_protect-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "ftd_revision": revision, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total, "disk": {"dir": str(disk_root), "device": dev, "fs": fstype,
                                                                "mount": mnt},
        "repeat": args.repeat, "threads": 1, "prefault": not args.no_prefault, "elapsed_s": elapsed,
        "results": [{**r, "summary": s} for r, s in zip(results, summaries)],
    }, indent=1, default=str))
    print(f"results: {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
