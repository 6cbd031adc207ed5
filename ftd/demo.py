"""``ftd demo``: a 4-node cluster on this machine loses a worker, then a whole node, and trains on bit-exact.

What it does:
  1. an uninterrupted reference run of the job (DDP over gloo, one rank per node, no ftd);
  2. the same job under ftd: one ``ftd agent`` per simulated node (each runs its node's daemon and
     its worker), erasure coding k = 3, m = 1 across the nodes, a snapshot every step;
  3. at steps announced up front, SIGKILLs one worker (the agents restart every worker, which all
     restore the same step from their daemons), then loses a whole node: its agent, daemon, worker
     and shared memory; a replacement agent rebuilds the node's snapshots from the 3 survivors and
     the job goes on;
  4. checks that every loss every rank wrote (re-runs included) equals the reference bit for bit,
     times a synchronous torch.save + torch.load of the same state, and writes a JSON report and a
     PNG plot.
Whatever happens (an error, Ctrl-C, SIGTERM), every process it started is stopped and every
shared-memory segment of its job removed. Exit status 0 only if the run was bit-exact.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import demoreport
from .agent import stop_process_group
from .connection import status_or_none
from .launch import config_path, kill_everything_from
from .localjob import AgentCluster, DaemonWatch, RankLog, common_resume, reached, start_reference

RUN_TIMEOUT = 600.0        # seconds the whole ftd run may take before the demo gives up
REFERENCE_TIMEOUT = 300.0
REPLACEMENT_DELAY = 1.0    # seconds between losing a node and its replacement arriving
INDENT = "      "


class DemoError(Exception):
    """Something kept the demo from running; the message says what."""


@dataclasses.dataclass
class Plan:
    """What the demo runs and when it breaks things."""
    nodes: int = 4
    parity: int = 1
    nproc: int = 1               # workers (ranks) per node
    steps: int = 80
    crash_at: int = 25           # step after which the worker of crash_node is SIGKILLed
    crash_node: int = 1
    lose_at: int = 55            # step after which node lose_node is lost entirely
    lose_node: int = 2
    model: tuple[str, ...] = ("--layers", "2", "--dim", "128", "--heads", "4", "--context", "64", "--batch", "16",
                              "--lr", "1e-3")
    step_sleep: float = 0.0
    allreduce: str = "ordered"   # the trainer's DDP gradient averaging (ftd/ddp.py); "ring" is DDP's default

    @classmethod
    def quick(cls) -> "Plan":
        """The short mode the tests run: a tiny model and fewer steps, same failures. Its steps take
        ~10 ms, so each sleeps 50 ms more: the failures must land while the job still trains."""
        return cls(steps=24, crash_at=7, lose_at=15, step_sleep=0.05,
                   model=("--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch", "4"))

    @property
    def world(self) -> int:
        return self.nodes * self.nproc

    def check(self) -> None:
        if self.nodes < max(2, self.parity + 1) or self.nproc < 1:
            raise DemoError(f"{self.nodes} nodes with parity {self.parity}: need at least 2 nodes and parity + 1")
        if not 1 <= self.crash_at < self.lose_at < self.steps - 2:
            raise DemoError(f"need 1 <= --crash-at ({self.crash_at}) < --lose-at ({self.lose_at}) < "
                            f"--steps - 2 ({self.steps - 2})")
        self.crash_node = min(self.crash_node, self.nodes - 1)
        self.lose_node = min(self.lose_node, self.nodes - 1)  # never node 0: it hosts the agents' job store


def say(text: str = "") -> None:
    print(text, flush=True)


# ---- the demo run -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Demo:
    plan: Plan
    workdir: Path
    out: Path
    keep: bool
    reference: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    cluster: AgentCluster | None = None

    def trainer(self, out_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ftd.examples.gpt_trainer", "--steps", str(self.plan.steps),
                "--out", str(out_dir), *self.plan.model, "--step-sleep", str(self.plan.step_sleep),
                "--allreduce", self.plan.allreduce, *extra]


def run_reference(demo: Demo) -> float:
    """The job without ftd, never interrupted: ranks started directly with torchrun's environment."""
    plan, ref = demo.plan, demo.workdir / "reference"
    t0 = time.monotonic()
    demo.reference = start_reference(plan.nodes, plan.nproc, demo.trainer(ref, "--no-ftd"), ref)
    watch = RankLog(ref / "rank0.log")
    shown = -1
    while any(p.poll() is None for p in demo.reference):
        watch.poll()
        if watch.last_step >= shown + 20:
            shown = watch.last_step
            say(f"{INDENT}reference step {shown:3d}  loss {watch.last_loss}")
        if time.monotonic() - t0 > REFERENCE_TIMEOUT:
            raise DemoError(f"the reference run did not finish within {REFERENCE_TIMEOUT:g} s")
        time.sleep(0.1)
    bad = [(r, p.returncode) for r, p in enumerate(demo.reference) if p.returncode != 0]
    if bad:
        rank = bad[0][0]
        raise DemoError(f"reference rank {rank} exited with status {bad[0][1]}:\n"
                        + _tail(ref / f"rank{rank}.log"))
    seconds = time.monotonic() - t0
    say(f"{INDENT}done: {plan.steps} steps in {seconds:.1f} s")
    return seconds


class Run:
    """The ftd run: follows logs and daemons, injects the failures, records what happened."""

    def __init__(self, demo: Demo):
        self.demo, self.plan = demo, demo.plan
        self.cluster = demo.cluster
        self.logs = [RankLog(self.cluster.rank_log(r)) for r in range(self.plan.world)]
        self.daemons = DaemonWatch(self.cluster)
        self.failures: list[dict] = []
        self._shown = -1

    def poll(self) -> None:
        for log in self.logs:
            log.poll()
        lead = self.logs[0]
        if lead.last_step >= self._shown + 10:
            self._shown = lead.last_step
            say(f"{INDENT}step {lead.last_step:3d}  loss {lead.last_loss}   {self.daemons.recoverable()}")

    def wait(self, what: str, predicate, deadline: float, agents_may_finish: bool = False) -> None:
        while not predicate():
            failure = self.cluster.agent_failure(finished_ok=agents_may_finish)
            if failure:
                raise DemoError(f"while waiting for {what}, {failure}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            self.poll()
            time.sleep(0.05)

    def wait_resumed(self, after_generation: int, failure: dict, deadline: float) -> None:
        """Until every rank printed its start line in a generation newer than ``after_generation``."""
        def resumed():
            return all(log.generation > after_generation and log.generation in log.resumed for log in self.logs)
        self.wait("the workers to restart", resumed, deadline)
        try:
            failure["resumed_after"] = common_resume(self.logs)
        except ValueError as e:
            raise DemoError(str(e)) from None
        # the furthest any rank got before the failure: everything after the restored step is re-run
        failure["at_step"] = reached(self.logs, failure["failed_generation"])
        failure["steps_lost"] = failure["at_step"] - failure["resumed_after"]
        failure["seconds_to_resume"] = time.monotonic() - failure["t"]
        failure["generation"] = self.logs[0].generation
        say(f"{INDENT}<<< every rank restored step {failure['resumed_after']} from memory and goes on "
            f"({demoreport.plural(failure['steps_lost'], 'step')} re-run, {failure['seconds_to_resume']:.1f} s "
            "after the failure)")

    def crash_worker(self) -> dict:
        node = self.plan.crash_node
        log = self.logs[node * self.plan.nproc]
        try:
            os.kill(log.pid, signal.SIGKILL)
        except ProcessLookupError:
            raise DemoError(f"the worker of node {node} (pid {log.pid}) had already exited; give the job more --steps")
        failure = {"what": f"worker crash (rank {node * self.plan.nproc}, SIGKILL)", "node": node, "t": time.monotonic(), "pid": log.pid,
                   "failed_generation": log.generation}
        say(f"{INDENT}>>> SIGKILL the worker of node {node} (pid {log.pid}) after step {log.last_step}")
        return failure

    def node_logs(self, node: int) -> list[RankLog]:
        return self.logs[node * self.plan.nproc:(node + 1) * self.plan.nproc]

    def lose_node(self) -> dict:
        node = self.plan.lose_node
        if self.cluster.agents[node].poll() is not None:
            raise DemoError(f"the job finished before node {node} could be lost; give it more --steps")
        daemon = self.daemons.status.pop(node, {}).get("pid")
        workers = [log.pid for log in self.node_logs(node)]
        failure = {"what": f"loss of node {node} (agent, daemon, workers, shared memory)", "node": node,
                   "t": time.monotonic(), "failed_generation": self.node_logs(node)[0].generation}
        say(f"{INDENT}>>> losing node {node} after step {self.node_logs(node)[0].last_step}: SIGKILL its agent, "
            "daemon and workers, delete its shared memory")
        deleted = self.cluster.lose(node, [*workers, daemon])
        say(f"{INDENT}    killed agent, daemon (pid {daemon}) and worker(s) (pid {' '.join(map(str, workers))}); "
            f"deleted {deleted} shared-memory files of the node")
        return failure

    def replace_node(self, failure: dict, deadline: float) -> None:
        node = self.plan.lose_node
        time.sleep(REPLACEMENT_DELAY)
        self.cluster.start_agent(node)
        say(f"{INDENT}    a replacement node {node} starts: its agent starts an empty daemon, which rebuilds "
            "the node's snapshots from its peers before the worker starts")

        def rebuilt():
            st = status_or_none(self.cluster.endpoint(node), timeout=1.0)
            last = (st or {}).get("cluster", {}).get("last_rebuild") if st else None
            return last if last and last.get("ok") and st["cluster"]["rebuilding"] is None else None
        self.wait("the replacement node's rebuild", rebuilt, deadline)
        r = rebuilt()
        failure["rebuild"] = {"step": r["step"], "seconds": r["seconds"], "fetched_bytes": r["fetched_bytes"]}
        say(f"{INDENT}    node {node} rebuilt step {r['step']} in {1000 * r['seconds']:.0f} ms "
            f"({r['fetched_bytes'] / 2**20:.2f} MiB fetched from its peers)")

    def run(self) -> None:
        plan, cluster = self.plan, self.cluster
        deadline = time.monotonic() + RUN_TIMEOUT
        self.daemons.start()
        for n in range(plan.nodes):
            cluster.start_agent(n)
        say(f"{INDENT}agents started: {' '.join(f'node{n}=pid {p.pid}' for n, p in cluster.agents.items())}")
        self.wait("the workers to start", lambda: all(log.pid for log in self.logs), deadline)
        say(f"{INDENT}training: DDP over gloo, {plan.world} ranks, a snapshot every step")

        crashing = self.logs[plan.crash_node * plan.nproc]
        self.wait(f"step {plan.crash_at}", lambda: crashing.last_step >= plan.crash_at, deadline)
        crash = self.crash_worker()
        self.wait_resumed(crash["failed_generation"], crash, deadline)
        self.failures.append(crash)

        self.wait(f"step {plan.lose_at}",
                  lambda: self.node_logs(plan.lose_node)[0].last_step >= plan.lose_at, deadline)
        loss = self.lose_node()
        self.replace_node(loss, deadline)
        self.wait_resumed(loss["failed_generation"], loss, deadline)
        self.failures.append(loss)

        self.wait("the end of training", lambda: all(p.poll() is not None for p in cluster.agents.values()),
                  deadline, agents_may_finish=True)
        failure = cluster.agent_failure(finished_ok=True)
        if failure:
            raise DemoError(f"at the end of training, {failure}")
        for log in self.logs:
            log.poll()
        say(f"{INDENT}every node finished step {plan.steps - 1}; the agents stopped their daemons")


# ---- verification and report ------------------------------------------------------------------------
def verify_all(demo: Demo) -> tuple[bool, list[str], dict]:
    ok, lines, per_rank = True, [], {}
    for rank in range(demo.plan.world):
        ref = demoreport.read_losses(demo.workdir / "reference" / f"losses-rank{rank}.txt")
        run = demoreport.read_losses(demo.workdir / "run" / f"losses-rank{rank}.txt")
        good, verdict, twice = demoreport.verify(ref, run, demo.plan.steps)
        ok &= good
        per_rank[rank] = {"bit_exact": good, "verdict": verdict, "steps_run_twice": twice}
        lines.append(f"{INDENT}rank {rank}: {verdict}" + (f" ({twice} re-run steps identical both times)" if twice else ""))
    return ok, lines, per_rank


def save_load_baseline(demo: Demo) -> dict:
    """A synchronous torch.save + torch.load of the same state (model, AdamW moments, scheduler)."""
    import torch
    from .examples import gpt_trainer
    args = gpt_trainer.parse_args(list(demo.plan.model))
    torch.manual_seed(args.seed)
    model, optimizer, scheduler = gpt_trainer.build(args)
    model(torch.zeros(1, args.context, dtype=torch.long)).sum().backward()
    optimizer.step()  # creates the optimizer's moments, as in training
    state = {"model": model, "optim": optimizer, "sched": scheduler}
    save_s, load_s = gpt_trainer.save_load_seconds(state, demo.workdir)
    return {"save_seconds": save_s, "load_seconds": load_s}


def _read_stats(demo: Demo) -> list[dict]:
    stats = []
    for rank in range(demo.plan.world):
        with contextlib.suppress(OSError, ValueError):
            stats.append(json.loads((demo.workdir / "run" / f"stats-rank{rank}.json").read_text()))
    return stats


def write_plot(demo: Demo, report: dict, rank0: RankLog, path: Path) -> str | None:
    """Loss per step of rank 0: the reference, each generation of the ftd job, the failures.
    Returns why there is no plot, or None."""
    try:
        import logging
        import matplotlib
        matplotlib.use("Agg")
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ftd[demo]'); no plot"
    ref = demoreport.read_losses(demo.workdir / "reference" / "losses-rank0.txt")
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.plot([s for s, _ in ref], [float.fromhex(v) for _, v in ref], color="0.55", lw=3.5, alpha=0.6,
            label="uninterrupted reference")
    for generation in sorted({g for g, _, _ in rank0.points}):
        points = [(s, v) for g, s, v in rank0.points if g == generation]
        start = rank0.resumed.get(generation)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=2.5, lw=1,
                label="ftd run: start" if start is None else f"ftd run: restart {generation}, resumed after step {start}")
    for f in report["failures"]:
        ax.axvline(f["at_step"] + 0.5, color="crimson", ls="--", lw=1)
        ax.annotate(f["what"].split(" (")[0], (f["at_step"] + 0.5, 0.97), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="crimson")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (rank 0)")
    verdict = "bit-exact" if report["bit_exact"] else "NOT bit-exact"
    ax.set_title(f"ftd demo: {report['nodes']} nodes, k={report['k']} m={report['m']}; every rank {verdict} "
                 "with the uninterrupted run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(INDENT + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"{INDENT}(no log at {path})"


def _run(demo: Demo) -> int:
    plan = demo.plan
    per_node = "" if plan.nproc == 1 else f" x {plan.nproc} ranks"
    say(f"ftd demo: a {plan.nodes}-node{per_node} cluster on this machine (erasure coding k={plan.nodes - plan.parity}, "
        f"m={plan.parity}) trains a small GPT with DDP over gloo, a snapshot every step.")
    say(f"  at step {plan.crash_at}: a worker of node {plan.crash_node} (rank {plan.crash_node * plan.nproc}) "
        "is SIGKILLed")
    say(f"  at step {plan.lose_at}: node {plan.lose_node} is lost entirely (agent, daemon, workers, shared memory), "
        "and a replacement node joins")
    say(f"work dir: {demo.workdir}" + ("" if demo.keep else "  (removed at the end; --keep keeps it)"))
    say()
    say(f"[1/4] reference: the same job without ftd, never interrupted ({plan.steps} steps)")
    reference_seconds = run_reference(demo)

    say("[2/4] the job under ftd: one `ftd agent` per node starts the node's daemon and its worker")
    demo.cluster = AgentCluster(plan.nodes, plan.parity, plan.nproc, demo.workdir, demo.trainer(demo.workdir / "run"),
                                job_prefix="demo")
    say(f"{INDENT}job {demo.cluster.job!r}: node configs, logs and sockets in {demo.workdir}")
    say(f"{INDENT}$ ftd agent --config {config_path(demo.workdir, 0)} --rdzv-endpoint {demo.cluster.rdzv} "
        f"-- python -m ftd.examples.gpt_trainer ...   (and nodes 1-{plan.nodes - 1})")
    t0 = time.monotonic()
    run = Run(demo)
    try:
        run.run()
    finally:
        run.daemons.halt.set()
    run_seconds = time.monotonic() - t0

    say("[3/4] every loss of every rank, re-runs included, against the reference (float.hex(), bit for bit)")
    ok, lines, per_rank = verify_all(demo)
    for line in lines:
        say(line)
    say("[4/4] for comparison: a synchronous torch.save + torch.load of the same state")
    baseline = save_load_baseline(demo)
    stats = _read_stats(demo)
    report = {
        "job": demo.cluster.job, "nodes": plan.nodes, "ranks_per_node": plan.nproc, "k": plan.nodes - plan.parity, "m": plan.parity, "steps": plan.steps,
        "model": list(plan.model), "bit_exact": ok, "ranks": per_rank,
        "failures": [{k: v for k, v in f.items() if k != "t"} for f in run.failures],
        "steps_lost": sum(f["steps_lost"] for f in run.failures),
        "blocked_per_snapshot": demoreport.blocked_per_snapshot(stats),
        "protection_lag": demoreport.protection_lag(list(run.daemons.lags.values())),
        "torch_save_load": baseline,
        "state_bytes": max((s.get("state_bytes", 0) for s in stats), default=0),
        "params": max((s.get("params", 0) for s in stats), default=0),
        "seconds": {"reference": reference_seconds, "ftd_run": run_seconds},
    }
    demo.out.mkdir(parents=True, exist_ok=True)
    report_path, plot_path = demo.out / "report.json", demo.out / "losses.png"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    no_plot = write_plot(demo, report, run.logs[0], plot_path)
    say()
    say("summary")
    for line in demoreport.summary_lines(report):
        say(line)
    say(f"  steps lost in all: {report['steps_lost']}; every rank {'bit-exact' if ok else 'NOT bit-exact'} "
        f"with the uninterrupted run")
    say(f"  report: {report_path}")
    say(f"  plot:   {plot_path}" if no_plot is None else f"  plot:   {no_plot}")
    say(f"  verdict: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _cleanup(demo: Demo) -> None:
    for p in demo.reference:
        if p.poll() is None:
            stop_process_group(p, grace=0)
    job = demo.cluster.job if demo.cluster else None
    if demo.cluster is not None:
        demo.cluster.stop()
    kill_everything_from(demo.workdir)
    left = sorted(Path("/dev/shm").glob(f"ftd.{job}.*")) if job else []
    if demo.keep:
        say(f"cleanup: every process stopped; work dir kept: {demo.workdir}")
    else:
        shutil.rmtree(demo.workdir, ignore_errors=True)
        say("cleanup: every process stopped" + (f"; {len(left)} shared-memory file(s) left!" if left else
                                                 ", no shared memory left, work dir removed"))


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="a 4-node cluster on this machine loses a worker and a node, "
                                           "and trains on bit-exact")
    p.add_argument("--quick", action="store_true", help="short mode: a tiny model and 24 steps (what the tests run)")
    p.add_argument("--steps", type=int, help="training steps (default 80)")
    p.add_argument("--crash-at", type=int, help="step after which a worker is SIGKILLed (default 25)")
    p.add_argument("--lose-at", type=int, help="step after which a whole node is lost (default 55)")
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default 4)")
    p.add_argument("--parity", type=int, default=1, help="parity blocks per group, m (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node, as torchrun's (default 1)")
    p.add_argument("--allreduce", choices=("ordered", "ring"), default="ordered",
                   help="DDP gradient averaging: 'ring' (DDP's default) is not bit-exact across a restart "
                        "with 3+ ranks; see README")
    p.add_argument("--step-sleep", type=float, help="extra seconds per step, to watch it slowly (default 0; 0.05 with --quick)")
    p.add_argument("--out", default="ftd-demo-out", help="where report.json and losses.png go (default ./ftd-demo-out)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, losses)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan()
    for name in ("steps", "crash_at", "lose_at"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if args.step_sleep is not None:
        plan.step_sleep = args.step_sleep
    plan.nodes, plan.parity, plan.nproc, plan.allreduce = args.nodes, args.parity, args.nproc_per_node, args.allreduce
    try:
        plan.check()
    except DemoError as e:
        print(f"ftd demo: {e}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ftd-demo-", dir="/tmp"))  # short: unix socket paths max ~107 chars
    demo = Demo(plan, workdir, Path(args.out).absolute(), args.keep)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return _run(demo)
    except DemoError as e:
        say(f"ftd demo failed: {e}")
        return 2
    except KeyboardInterrupt:
        say("\nftd demo: interrupted; stopping everything")
        return 130
    finally:
        if in_main:  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            _cleanup(demo)
        finally:
            if in_main:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, previous)
