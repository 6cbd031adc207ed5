"""``ftd agent``: the per-node supervisor the scheduler starts (one per node, e.g. with ``srun``).

It makes the node's daemon and its training workers one unit a scheduler can run:
  1. starts the node's daemon (or uses one already serving, e.g. from systemd), and waits until the
     daemon has finished its start-up rebuild (``node_daemon``): on a replacement node that rebuilds
     the node's snapshots from its peers' memory *before* any worker starts, so they restore at once;
  2. starts the workers (``workers``), either directly (``--nproc-per-node P``: P copies of the command
     with the environment torchrun gives, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT..., plus
     FTD_CONFIG), or through a launcher (``--launcher``: the command is e.g. ``torchrun ...``);
  3. when a worker fails anywhere in the job, restarts the workers of every node together (a new
     *generation*, see ``jobstore``), at once after a generation that trained and with a growing
     backoff in a crash loop (``plan.RestartPolicy``), at most ``--max-restarts`` times, from warm
     standby processes that imported torch beforehand (``standby``); a daemon that dies alone is
     restarted and adopts its memory, while the workers keep running;
  4. when every node's workers exited 0, stops the daemon it started and exits 0.

Call order: ``Agent(options)`` checks them (ValueError), ``run()`` does the rest and returns the exit
status; SIGINT/SIGTERM stop it cleanly. Every step of a restart is marked in ``timeline.jsonl`` in the
log directory (``ftd.util.timeline``), with the workers' own marks, for the breakdown the demo prints.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import threading
import time
from pathlib import Path

from ftd.agent.jobstore import JobStore, MemoryKV, tcp_kv
from ftd.agent.node_daemon import NodeDaemon
from ftd.agent.plan import RestartPolicy, parse_host_port, say, worker_env
from ftd.agent.standby import StandbyPool
from ftd.agent.workers import WorkerGroup, log_path
from ftd.config import load_config
from ftd.errors import AgentFailed, JobStoreLost
from ftd.util.procs import free_ports
from ftd.util.timeline import ENV as TIMELINE_ENV
from ftd.util.timeline import mark

POLL = 0.05                   # seconds between checks of the workers
STORE_POLL = 0.05             # seconds between checks of the job's generation (a TCPStore read: ~0.1 ms)
REFILL_AFTER = 60.0           # seconds into a generation that commits nothing (a trainer without ftd) before
                              # its next standbys start: not while a replacement node is still on its way


class AgentStopped(Exception):
    """Internal: SIGINT/SIGTERM: stop the workers (and our daemon) and exit. Never reaches the user."""


class Agent:
    def __init__(self, args: argparse.Namespace):
        self.config_path = Path(args.config).absolute()
        self.config = load_config(self.config_path, node_rank=args.node_rank)
        self.node_rank = self.config.node_rank
        self.nnodes = args.nnodes or max(1, self.config.nodes)
        self.nproc = 1 if args.launcher else args.nproc_per_node
        self.command = args.command
        self.launcher = args.launcher
        self.policy = RestartPolicy(args.max_restarts, args.backoff, args.backoff_max, args.backoff_window)
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
        self._first_generation = True  # this agent's first workers: a start-up, not a restart
        self.timeline = self.log_dir / "timeline.jsonl"
        self.base_env = dict(os.environ, **{TIMELINE_ENV: str(self.timeline)})
        self.pool = StandbyPool(self.command, self.base_env,
                                [log_path(self.log_dir, self.node_rank * self.nproc + i) for i in range(self.nproc)],
                                enabled=not args.no_standby and not self.launcher)

    def _mark(self, event: str, generation: int, **fields) -> None:
        mark(event, self.timeline, node=self.node_rank, generation=generation, **fields)

    # ---- signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def stopping(self) -> bool:
        return self._stop_signal is not None

    def _check_stop(self) -> None:
        if self.stopping():
            raise AgentStopped()

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
            job.publish_port(generation, free_ports(1, host="")[0])
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
            env = dict(self.base_env, FTD_CONFIG=str(self.config_path), FTD_ENDPOINT=self.config.endpoint,
                       FTD_NODE_RANK=str(self.node_rank))
            # torchrun's elastic restarts hang without it in torch 2.13 (pytorch issue 135712); a user's
            # own setting wins
            env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
            envs = [env]
        else:
            envs = [worker_env(self.base_env, local_rank=i, **common) for i in range(self.nproc)]
        standbys = [self.pool.take(i) for i in range(len(envs))] if self.pool.enabled else None
        group = WorkerGroup(self.command, envs, self.log_dir, generation, self.node_rank * self.nproc, standbys)
        self._mark("spawned", generation, warm=group.warm)
        pids = " ".join(str(p.pid) for p in group.procs)
        what = "the launcher" if self.launcher else f"{self.nproc} worker(s), ranks {group.ranks[0]}-{group.ranks[-1]}"
        warm = f", {group.warm} from warm standbys" if group.warm else ""
        say(self.node_rank, f"generation {generation}: started {what} (pid {pids}{warm}); logs in {self.log_dir}")
        return group

    def _watch(self, job: JobStore, group: WorkerGroup, daemon: NodeDaemon, generation: int) -> str:
        """"done" when our workers all exited 0, "failed" when one of ours failed, "moved" when another node's did."""
        next_store, next_daemon = 0.0, time.monotonic() + 1.0
        started, started_wall = time.monotonic(), time.time()
        while True:
            if self.stopping():
                raise AgentStopped()
            failure = group.failure()
            if failure:
                self._mark("failure_seen", generation, what=failure)
                say(self.node_rank, f"generation {generation}: {failure}")
                job.end_generation(generation, f"node {self.node_rank}: {failure}")
                self._mark("generation_bumped", generation)
                return "failed"
            if group.all_done():
                return "done"
            now = time.monotonic()
            if now >= next_store:
                next_store = now + STORE_POLL
                if job.generation() != generation:
                    self._mark("failure_seen", generation, what="elsewhere")
                    say(self.node_rank, f"generation {generation} ended elsewhere ({job.why(generation)}); "
                                        "stopping this node's workers")
                    return "moved"
            if now >= next_daemon:
                next_daemon = now + 1.0
                daemon.ensure_running()
                # the next standbys import torch at once after the start-up, but after a restart only
                # once the generation trains: their imports must not slow the restart down
                if self.pool.needs_refill() and (self._first_generation or now - started >= REFILL_AFTER
                                                 or daemon.committed_since(started_wall)):
                    self.pool.refill()
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
        streak = 0  # failures in a row of generations that did not train (a crash loop)
        mark("agent_started", self.timeline, node=self.node_rank)
        try:
            self.pool.refill()  # the standbys import torch while the daemon starts (and rebuilds)
            if self.nnodes > 1 and not self.launcher:  # and so does this agent, for the job store's TCPStore
                threading.Thread(target=importlib.import_module, args=("torch.distributed",), daemon=True).start()
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
                    delay = self.policy.delay(streak)
                    loop = f" (failure {streak} in a row of a crash loop)" if delay else ""
                    say(self.node_rank, f"restart {generation} of at most {self.policy.max_restarts} "
                                        f"in {delay:.1f} s{loop} (after: {job.why(generation - 1)})")
                    self._sleep(delay)
                    self._mark("backoff_done", generation, seconds=delay)
                daemon.wait_ready(self._check_stop)
                self._mark("daemon_ready", generation)
                port = self._join(job, generation)
                if port is None:
                    continue
                self._mark("joined", generation)
                group = self._start_workers(generation, port)
                started, started_wall = time.monotonic(), time.time()
                outcome = self._watch(job, group, daemon, generation)
                self._first_generation = False
                if outcome == "done" and self._finish(job, generation):
                    say(self.node_rank, "the job finished on every node")
                    return 0
                group.stop()
                group = None
                self._mark("workers_stopped", generation)
                streak = self.policy.streak(streak, ran_seconds=time.monotonic() - started,
                                            progressed=daemon.committed_since(started_wall))
        except AgentStopped:
            say(self.node_rank, f"stopping on {signal.Signals(self._stop_signal).name}")
            return 128 + int(self._stop_signal)
        except (AgentFailed, JobStoreLost) as e:
            say(self.node_rank, f"giving up: {e}")
            return 1
        finally:
            if group is not None:
                group.stop()
            self.pool.close()
            if not self.keep_daemon:
                daemon.stop()
            for s, handler in old.items():
                signal.signal(s, handler)
