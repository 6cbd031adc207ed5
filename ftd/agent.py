"""``ftd agent``: the per-node supervisor the scheduler starts (one per node, e.g. with ``srun``).

It makes the node's daemon and its training workers one unit a scheduler can run:
  1. starts the node's daemon (or uses one already serving, e.g. from systemd), and waits until the
     daemon has finished its start-up rebuild: on a replacement node that rebuilds the node's
     snapshots from its peers' memory *before* any worker starts, so the workers restore at once;
  2. starts the workers, either directly (``--nproc-per-node P``: P copies of the command with the
     environment torchrun gives, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT..., plus FTD_CONFIG),
     or through a launcher (``--launcher``: the command is e.g. ``torchrun ...`` and starts them);
  3. when a worker fails anywhere in the job, restarts the workers of every node together (a new
     *generation*, see jobstore.py), after a backoff, at most ``--max-restarts`` times; a daemon that
     dies alone is restarted and adopts its memory, while the workers keep running;
  4. when every node's workers exited 0, stops the daemon it started and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .agentplan import RestartPolicy, describe_exit, parse_host_port, worker_env
from .config import Config, load_config
from .connection import status_or_none
from .jobstore import JobStore, JobStoreLost, MemoryKV, tcp_kv

PROG = "ftd agent"
DAEMON_START_TIMEOUT = 60.0   # seconds for a started daemon to answer
READY_TIMEOUT = 900.0         # seconds for the daemon's start-up rebuild before the workers start
STOP_GRACE = 5.0              # seconds between SIGTERM and SIGKILL of a worker (or of our daemon)
POLL = 0.05                   # seconds between checks of the workers
STORE_POLL = 0.2              # seconds between checks of the job's generation


class AgentStopped(Exception):
    """SIGINT/SIGTERM: stop the workers (and our daemon) and exit."""


class AgentFailed(Exception):
    """The job cannot go on from this node; the message says why and what to do."""


def say(node_rank: int, message: str) -> None:
    print(f"{PROG}[node {node_rank}]: {message}", flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)  # children of a worker that exited (or ignored SIGTERM)
    proc.wait()


class NodeDaemon:
    """The node's ftd daemon: started by the agent if none answers, restarted if it dies."""

    def __init__(self, config_path: Path, config: Config, log_dir: Path, node_rank: int):
        self.config_path, self.config, self.log_dir, self.node_rank = config_path, config, log_dir, node_rank
        self.proc: subprocess.Popen | None = None
        self.external = False  # a daemon someone else runs (systemd): used, never restarted or stopped

    def status(self) -> dict | None:
        return status_or_none(self.config.endpoint, timeout=2.0)

    def ensure_running(self) -> None:
        if self.external or (self.proc is not None and self.proc.poll() is None):
            return
        if self.proc is not None:
            say(self.node_rank, f"the daemon (pid {self.proc.pid}) {describe_exit(self.proc.returncode)}; "
                                "restarting it (it adopts the snapshots in shared memory)")
            self.proc = None
        elif self.status() is not None:
            say(self.node_rank, f"using the daemon already serving at {self.config.endpoint} (its keeper restarts it)")
            self.external = True
            return
        log = open(self.log_dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while self.status() is None:
            if self.proc.poll() is not None:
                raise AgentFailed(f"the daemon {describe_exit(self.proc.returncode)} at start; "
                                  f"see {self.log_dir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise AgentFailed(f"the daemon did not answer within {DAEMON_START_TIMEOUT:g} s; "
                                  f"see {self.log_dir / 'daemon.log'}")
            time.sleep(0.1)
        say(self.node_rank, f"started the daemon (pid {self.proc.pid}) at {self.config.endpoint}")

    def wait_ready(self, stopping) -> dict:
        """Until the daemon's start-up sync/rebuild is over; returns its status and reports the rebuild."""
        deadline = time.monotonic() + READY_TIMEOUT
        told = False
        while True:
            if stopping():
                raise AgentStopped()
            self.ensure_running()
            st = self.status()
            cluster = (st or {}).get("cluster")
            if st is not None and (cluster is None or (cluster["ready"] and not cluster["rebuilding"]
                                                       and not cluster.get("disk_wait"))):
                break
            if not told and cluster is not None:
                say(self.node_rank, "waiting for the daemon to sync with its peers (a replacement node rebuilds "
                                    "its snapshots now, or the cluster restores from disk)")
                told = True
            if time.monotonic() > deadline:
                raise AgentFailed(f"the daemon was not ready within {READY_TIMEOUT:g} s")
            time.sleep(0.1)
        rebuilt = (cluster or {}).get("last_rebuild")
        if told and rebuilt and rebuilt.get("ok") and rebuilt.get("fetched_bytes"):
            say(self.node_rank, f"rebuilt this node's snapshots of step {rebuilt.get('step')} from its peers' memory "
                                f"in {rebuilt.get('seconds', 0):.2f} s ({rebuilt.get('fetched_bytes', 0) / 2**20:.1f} MiB fetched)")
        if cluster and cluster.get("lost_error"):
            say(self.node_rank, f"the memory copies cannot restore this job: {cluster['lost_error']}")
        return st

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=15.0)
            say(self.node_rank, "stopped the daemon")
            self.proc = None


class WorkerGroup:
    """This node's workers of one generation, each in a process group of its own."""

    def __init__(self, command: list[str], envs: list[dict], log_dir: Path, generation: int, first_rank: int):
        self.procs: list[subprocess.Popen] = []
        self.ranks: list[int] = []
        for i, env in enumerate(envs):
            rank = int(env.get("RANK", first_rank + i))
            log = open(log_dir / f"rank{rank}.log", "ab")
            log.write(f"=== ftd agent: generation {generation}, rank {rank} ===\n".encode())
            log.flush()
            self.procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))
            self.ranks.append(rank)
            log.close()

    def failure(self) -> str | None:
        for rank, proc in zip(self.ranks, self.procs):
            code = proc.poll()
            if code not in (None, 0):
                return f"worker rank {rank} (pid {proc.pid}) {describe_exit(code)}"
        return None

    def all_done(self) -> bool:
        return all(proc.poll() == 0 for proc in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for proc in self.procs:
            stop_process_group(proc)


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.config_path = Path(args.config).absolute()
        self.config = load_config(self.config_path, node_rank=args.node_rank)
        self.node_rank = self.config.node_rank
        self.nnodes = args.nnodes or max(1, self.config.nodes)
        self.nproc = 1 if args.launcher else args.nproc_per_node
        self.command = args.command
        self.launcher = args.launcher
        self.policy = RestartPolicy(args.max_restarts, args.backoff, args.backoff_max)
        self.join_timeout = args.join_timeout
        self.log_dir = Path(args.log_dir or f"ftd-agent-logs/node{self.node_rank}").absolute()
        self.keep_daemon = args.keep_daemon
        self.rdzv = args.rdzv_endpoint
        self.hosts_store = self.node_rank == 0 and not args.rdzv_external
        if self.nnodes > 1 and not self.launcher and not self.rdzv:
            raise ValueError(f"{self.nnodes} nodes need --rdzv-endpoint HOST:PORT: node 0's host and a free port "
                             "where node 0's agent serves the job's store (e.g. $MASTER_ADDR:29400 under SLURM)")
        if self.rdzv:
            parse_host_port(self.rdzv, "--rdzv-endpoint")
        if self.nproc < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc}")
        self._stop_signal: int | None = None

    # ---- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def stopping(self) -> bool:
        return self._stop_signal is not None

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.stopping():
                raise AgentStopped()
            time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    # ---- the job store ---------------------------------------------------------------------------
    def _open_store(self) -> JobStore:
        if self.nnodes == 1 or self.launcher:
            return JobStore(MemoryKV(), 1)
        host, port = parse_host_port(self.rdzv, "--rdzv-endpoint")
        return JobStore(tcp_kv(host, port, host_it=self.hosts_store, timeout=self.join_timeout), self.nnodes)

    def _join(self, job: JobStore, generation: int) -> int | None:
        """Join ``generation``; the MASTER_PORT once every agent did, None if the job moved on meanwhile."""
        if not job.join(generation):
            say(self.node_rank, f"generation {generation} is already running without this node; "
                                "asking every node to restart together")
            job.end_generation(generation, f"node {self.node_rank} joined the job")
            return None
        deadline = time.monotonic() + self.join_timeout
        told = False
        while not job.all_joined(generation):
            if job.generation() != generation:
                return None
            if time.monotonic() > deadline:
                raise AgentFailed(f"not every node joined generation {generation} within {self.join_timeout:g} s "
                                  "(--join-timeout); is an agent missing?")
            if not told:
                say(self.node_rank, f"waiting for every node to join generation {generation}")
                told = True
            self._sleep(STORE_POLL)
        if self.node_rank == 0:
            job.publish_port(generation, _free_port())
        while (port := job.port(generation)) is None:
            if job.generation() != generation:
                return None
            self._sleep(STORE_POLL / 4)
        return port

    # ---- one generation --------------------------------------------------------------------------
    def _start_workers(self, generation: int, port: int) -> WorkerGroup:
        master = parse_host_port(self.rdzv, "--rdzv-endpoint")[0] if self.rdzv else "127.0.0.1"
        common = dict(node_rank=self.node_rank, nproc=self.nproc, nnodes=self.nnodes, master_addr=master,
                      master_port=port, generation=generation, max_restarts=self.policy.max_restarts,
                      config_path=str(self.config_path), endpoint=self.config.endpoint)
        if self.launcher:
            env = dict(os.environ, FTD_CONFIG=str(self.config_path), FTD_ENDPOINT=self.config.endpoint,
                       FTD_NODE_RANK=str(self.node_rank))
            envs = [env]
        else:
            envs = [worker_env(os.environ, local_rank=i, **common) for i in range(self.nproc)]
        group = WorkerGroup(self.command, envs, self.log_dir, generation, self.node_rank * self.nproc)
        pids = " ".join(str(p.pid) for p in group.procs)
        what = "the launcher" if self.launcher else f"{self.nproc} worker(s), ranks {group.ranks[0]}-{group.ranks[-1]}"
        say(self.node_rank, f"generation {generation}: started {what} (pid {pids}); logs in {self.log_dir}")
        return group

    def _watch(self, job: JobStore, group: WorkerGroup, daemon: NodeDaemon, generation: int) -> str:
        """"done" when our workers all exited 0, "failed" when one of ours failed, "moved" when another node's did."""
        next_store, next_daemon = 0.0, time.monotonic() + 1.0
        while True:
            if self.stopping():
                raise AgentStopped()
            failure = group.failure()
            if failure:
                say(self.node_rank, f"generation {generation}: {failure}")
                job.end_generation(generation, f"node {self.node_rank}: {failure}")
                return "failed"
            if group.all_done():
                return "done"
            now = time.monotonic()
            if now >= next_store:
                next_store = now + STORE_POLL
                if job.generation() != generation:
                    say(self.node_rank, f"generation {generation} ended elsewhere ({job.why(generation)}); "
                                        "stopping this node's workers")
                    return "moved"
            if now >= next_daemon:
                next_daemon = now + 1.0
                daemon.ensure_running()
            time.sleep(POLL)

    def _finish(self, job: JobStore, generation: int) -> bool:
        """After our workers succeeded: True once every node's did, False if the job restarts instead."""
        job.finish(generation)
        say(self.node_rank, f"generation {generation}: this node's workers finished")
        while not job.all_finished(generation):
            if job.generation() != generation:
                return False
            self._sleep(STORE_POLL)
        job.leave(generation)
        if self.hosts_store and self.nnodes > 1:  # the store lives in this process: keep it up for the others
            deadline = time.monotonic() + 10.0
            while not job.all_left(generation) and time.monotonic() < deadline:
                time.sleep(STORE_POLL / 2)
        return True

    # ---- the whole run ---------------------------------------------------------------------------
    def run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        daemon = NodeDaemon(self.config_path, self.config, self.log_dir, self.node_rank)
        group: WorkerGroup | None = None
        try:
            daemon.ensure_running()
            job = self._open_store()
            while True:
                generation = job.generation()
                gave_up = job.given_up()
                if gave_up:
                    raise AgentFailed(f"the job gave up: {gave_up}")
                if self.policy.exhausted(generation):
                    why = (f"{generation} failures, more than --max-restarts {self.policy.max_restarts}; "
                           f"the last: {job.why(generation - 1)}")
                    job.give_up(why)
                    raise AgentFailed(f"not restarting again: {why}")
                if generation > 0:
                    delay = self.policy.delay(generation)
                    say(self.node_rank, f"restart {generation} of at most {self.policy.max_restarts} "
                                        f"in {delay:.1f} s (after: {job.why(generation - 1)})")
                    self._sleep(delay)
                daemon.wait_ready(self.stopping)
                port = self._join(job, generation)
                if port is None:
                    continue
                group = self._start_workers(generation, port)
                outcome = self._watch(job, group, daemon, generation)
                if outcome == "done" and self._finish(job, generation):
                    say(self.node_rank, "the job finished on every node")
                    return 0
                group.stop()
                group = None
        except AgentStopped:
            say(self.node_rank, f"stopping on {signal.Signals(self._stop_signal).name}")
            return 128 + int(self._stop_signal)
        except (AgentFailed, JobStoreLost) as e:
            say(self.node_rank, f"giving up: {e}")
            return 1
        finally:
            if group is not None:
                group.stop()
            if not self.keep_daemon:
                daemon.stop()
            for s, handler in old.items():
                signal.signal(s, handler)


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "agent", help="per-node supervisor: runs the node's daemon and the training workers, restarts them",
        description="Run this node's ftd daemon and training workers; restart the workers of every node "
                    "together after a failure. Example (node N of 4, 2 GPUs each): ftd agent --config node.toml "
                    "--nproc-per-node 2 --rdzv-endpoint node0:29400 -- python train.py")
    p.add_argument("--config", required=True, help="this node's ftd config (peers, parity, ...)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: the config's, else $FTD_NODE_RANK, "
                                                 "$GROUP_RANK or $SLURM_NODEID)")
    p.add_argument("--nnodes", type=int, default=0, help="nodes in the job (default: the config's peers, else 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="P", help="workers on this node (default 1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where node 0's agent serves the job's store (needed with several nodes)")
    p.add_argument("--rdzv-external", action="store_true",
                   help="the store at --rdzv-endpoint is served elsewhere (`ftd job-store`), not by node 0's agent, "
                        "so that node 0 may be lost too")
    p.add_argument("--launcher", action="store_true",
                   help="COMMAND starts the workers itself (e.g. torchrun ...): run it once per node, restart it if it fails")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of the job's workers before giving up (default 3)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first restart, doubled each time (default 1)")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest wait before a restart (default 30 s)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for every node to (re)join, e.g. for a replacement node (default 600)")
    p.add_argument("--log-dir", help="worker and daemon logs (default ./ftd-agent-logs/node<N>)")
    p.add_argument("--keep-daemon", action="store_true", help="leave the daemon running when the agent exits")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    p.set_defaults(func=_agent_cmd)

    p = subparsers.add_parser("job-store", help="serve the agents' restart store apart from node 0 (with --rdzv-external)")
    p.add_argument("--port", type=int, required=True, help="TCP port to serve on (0: any free port, printed)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")
    p.set_defaults(func=_job_store_cmd)


def serve_job_store(port: int, host: str = "0.0.0.0") -> int:
    """``ftd job-store``: serve the agents' store until SIGINT/SIGTERM (run it where no node is lost,
    e.g. on the login or scheduler host, and give the agents --rdzv-external)."""
    kv = tcp_kv(host, port, host_it=True, timeout=60)
    print(f"ftd job-store: serving the agents' job store on {host}:{kv.port}; agents: --rdzv-endpoint "
          f"{socket.gethostname()}:{kv.port} --rdzv-external", flush=True)
    stop = []
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, _frame: stop.append(signum))
    while not stop:
        time.sleep(0.2)
    return 0


def _job_store_cmd(args: argparse.Namespace) -> int:
    try:
        return serve_job_store(args.port, args.host)
    except JobStoreLost as e:
        print(f"ftd job-store: {e}", file=sys.stderr)
        return 1


def _agent_cmd(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        print(f"{PROG}: give the training command after --, e.g. ftd agent --config node.toml -- python train.py",
              file=sys.stderr)
        return 2
    try:
        agent = Agent(args)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return agent.run()
