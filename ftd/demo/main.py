"""``ftd demo``: the whole demo, from plan to verdict, and the cleanup that runs whatever happens.

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

import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

from ftd.demo import checks
from ftd.demo.plan import INDENT, Plan, say
from ftd.demo.plot import write_plot
from ftd.demo.report import blocked_per_snapshot, protection_lag, summary_lines
from ftd.demo.run import Demo, Run, run_reference
from ftd.errors import DemoError
from ftd.local.agentjob import AGENT_ARGS, AgentCluster
from ftd.local.configs import config_path
from ftd.util.procs import kill_everything_from, stop_process_group


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
                                job_prefix="demo", agent_args=AGENT_ARGS + (() if plan.standby else ("--no-standby",)),
                                config=None if plan.replica_snapshots is None else
                                {"replica_snapshots": plan.replica_snapshots})
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
    ok, lines, per_rank = checks.verify_all(demo)
    for line in lines:
        say(line)
    say("[4/4] for comparison: a synchronous torch.save + torch.load of the same state")
    baseline = checks.save_load_baseline(demo)
    stats = checks.read_stats(demo)
    report = {
        "job": demo.cluster.job, "nodes": plan.nodes, "ranks_per_node": plan.nproc, "k": plan.nodes - plan.parity, "m": plan.parity, "steps": plan.steps,
        "model": list(plan.model), "bit_exact": ok, "ranks": per_rank,
        "failures": [{k: v for k, v in f.items() if k not in ("t", "t_wall")} for f in run.failures],
        "steps_lost": sum(f["steps_lost"] for f in run.failures),
        "blocked_per_snapshot": blocked_per_snapshot(stats),
        "protection_lag": protection_lag(list(run.daemons.lags.values())),
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
    for line in summary_lines(report):
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


def run_demo(plan: Plan, out: Path, keep: bool) -> int:
    """Run the demo of a checked ``plan``; returns the exit status (0: bit-exact)."""
    workdir = Path(tempfile.mkdtemp(prefix="ftd-demo-", dir="/tmp"))  # short: unix socket paths max ~107 chars
    demo = Demo(plan, workdir, Path(out).absolute(), keep)
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
