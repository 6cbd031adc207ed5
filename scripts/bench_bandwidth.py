#!/usr/bin/env python3
"""Does protection slow a DDP job down? Its step time with protection at full speed, at a budget, and off.

``.venv/bin/python scripts/bench_bandwidth.py`` (2 nodes, budget 10MB/s, 2 rounds, 7-10 minutes here;
``--quick``: 1 round of 40 steps, about 4 minutes).

The job: ``ftd.examples.gpt_trainer`` (DDP over gloo with ftd's ordered allreduce, AdamW, a snapshot
every step), one rank per node on ``--nodes`` simulated nodes of this machine, run three ways, side by
side in interleaved rounds (off, full, budget, then budget, full, off):

- ``off``: the same ranks without ftd (``ftd.local.agentjob.start_reference``: no agents, no daemons,
  ``--no-ftd``): the step time training has on its own;
- ``full``: under ``ftd agent`` (``AgentCluster``), m = 1, ``protect_bandwidth`` unset (unlimited);
- ``budget``: the same with ``protect_bandwidth = --budget``.

Per mode: the step time (each rank's ``loop_seconds / steps_run``, the median over ranks and rounds)
and its ratio to ``off``; from every daemon's last status (``DaemonWatch``): the protection rounds
done, the recoverable step at the end, the bytes its peer links sent per second of the run, the
highest one-second send rate its meter saw (``cluster.bandwidth``), and how often the budget made a
send wait; from the clients: snapshots committed and skipped while an older step was protected.
On this machine the ranks, the daemons and their traffic share 2 cores and the loopback device, so
what a budget buys here is mostly CPU (the daemons' copies and parity); on a real cluster it is the
network that training's allreduce shares. Results in ``bench-results/bench_bandwidth-<time>.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchutil import REPO, ftd_revision, ms, sigterm_to_exit, table

from ftd.local.agentjob import AgentCluster, DaemonWatch, start_reference
from ftd.units import format_size
from ftd.util.procs import wait_for

MODES = ("off", "full", "budget")
MODEL = ("--layers", "4", "--dim", "256", "--heads", "4", "--context", "64", "--batch", "8")


def trainer(args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ftd.examples.gpt_trainer", "--steps", str(args.steps), *MODEL, "--out", str(out),
            *extra]


def rank_stats(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"stats-rank{r}.json").read_text()) for r in range(ranks)]


def run_off(args: argparse.Namespace, work: Path) -> dict:
    out = work / "run"
    procs = start_reference(args.nodes, 1, trainer(args, out, "--no-ftd"), out)
    for r, p in enumerate(procs):
        if p.wait(900) != 0:
            raise RuntimeError(f"rank {r} of the job without ftd failed; see {out}/rank{r}.log")
    return {"ranks": rank_stats(out, args.nodes)}


def run_ftd(args: argparse.Namespace, work: Path, budget: str | None) -> dict:
    out = work / "run"
    cluster = AgentCluster(args.nodes, 1, 1, work, trainer(args, out), job_prefix="bw",
                           config={"protect_bandwidth": budget} if budget else None)
    watch = DaemonWatch(cluster)
    watch.start()
    t0 = time.monotonic()
    try:
        for n in range(args.nodes):
            cluster.start_agent(n)
        wait_for(lambda: cluster.agent_failure(finished_ok=True) or all(p.poll() is not None
                                                                         for p in cluster.agents.values()),
                 900, "the job to end")
        failure = cluster.agent_failure(finished_ok=True)
        if failure:
            raise RuntimeError(failure)
    finally:
        watch.halt.set()
        watch.join()
        cluster.stop()
    seconds = time.monotonic() - t0
    nodes = []
    for n in range(args.nodes):
        cl = watch.status.get(n, {}).get("cluster") or {}
        bw, sent = cl.get("bandwidth") or {}, (cl.get("traffic") or {}).get("sent", {})
        data = sent.get("by_kind", {}).get("data", {})
        nodes.append({"recoverable": cl.get("recoverable"), "rounds_done": (cl.get("stats") or {}).get("rounds_done"),
                      "sent_bytes": sent.get("bytes"), "data_bytes": data.get("bytes"), "bandwidth": bw,
                      "seconds": seconds})
    return {"ranks": rank_stats(out, args.nodes), "nodes": nodes}


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    step = {m: statistics.median(r["loop_seconds"] / r["steps_run"] for run in runs[m] for r in run["ranks"])
            for m in MODES}
    out = {}
    for m in MODES:
        o: dict = {"step_s": step[m], "step_ratio": step[m] / step["off"]}
        if m != "off":
            ranks = [r for run in runs[m] for r in run["ranks"]]
            nodes = [n for run in runs[m] for n in run["nodes"]]
            o.update(committed=sum(r["committed"] for r in ranks), snapshots=sum(r["snapshots"] for r in ranks),
                     skipped_protecting=sum(r.get("skipped_protecting", 0) for r in ranks),
                     rounds_done=statistics.median(n["rounds_done"] or 0 for n in nodes),
                     recoverable=min(n["recoverable"] if n["recoverable"] is not None else -1 for n in nodes),
                     send_rate=statistics.median((n["sent_bytes"] or 0) / n["seconds"] for n in nodes),
                     peak_rate=max(n["bandwidth"].get("peak_send_rate_bytes_per_second", 0) for n in nodes),
                     waits=sum(n["bandwidth"].get("waits", 0) for n in nodes))
        out[m] = o
    return out


def report(s: dict, args: argparse.Namespace, state_bytes: int) -> list[str]:
    rows = []
    for m in MODES:
        o = s[m]
        label = {"off": "off (no ftd)", "full": "full speed (unlimited)", "budget": f"budget {args.budget}"}[m]
        if m == "off":
            rows.append([label, f"{ms(o['step_s'])} ms", "1.00x", "-", "-", "-", "-", "-"])
            continue
        rows.append([label, f"{ms(o['step_s'])} ms", f"{o['step_ratio']:.2f}x",
                     f"{o['committed']} of {o['snapshots']} ({o['skipped_protecting']})", f"{o['rounds_done']:g}",
                     str(o["recoverable"]), f"{format_size(o['send_rate'])}/s, peak {format_size(o['peak_rate'])}/s",
                     str(o["waits"])])
    return [f"{args.nodes} nodes x 1 DDP rank (gloo), gpt_trainer {' '.join(MODEL)}, {format_size(state_bytes)} of "
            f"state per rank, {args.steps} steps, {args.rounds} round(s), m = 1", "",
            table(["protection", "step", "vs off", "snapshots committed (skipped: protecting)", "rounds per node",
                   "recoverable at the end", "sent per node (peak 1 s)", "budget waits"], rows)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--budget", default="10MB/s", help="protect_bandwidth of the budget mode")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2, help="rounds; the order alternates")
    p.add_argument("--quick", action="store_true", help="1 round of 40 steps")
    p.add_argument("--out", default=str(REPO / "bench-results"))
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 40
    signal.signal(signal.SIGTERM, sigterm_to_exit)  # stopped: the agents and daemons go too
    t0 = time.monotonic()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for m in MODES if r % 2 == 0 else MODES[::-1]:
            work = Path(tempfile.mkdtemp(prefix=f"ftd-bench-bw-{m}-", dir="/tmp"))
            try:
                runs[m].append(run_off(args, work) if m == "off" else
                               run_ftd(args, work, args.budget if m == "budget" else None))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            ranks = runs[m][-1]["ranks"]
            step = statistics.median(x["loop_seconds"] / x["steps_run"] for x in ranks)
            print(f"round {r + 1} {m}: step {ms(step)} ms", flush=True)
    s = summarize(runs, args)
    state_bytes = runs["full"][0]["ranks"][0]["state_bytes"]
    lines = report(s, args, state_bytes)
    results = {"command": " ".join([sys.executable] + sys.argv), "ftd": ftd_revision(), "args": vars(args),
               "model": MODEL, "state_bytes": state_bytes, "summary": s, "runs": runs}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / f"bench_bandwidth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(lines))
    print(f"command: {results['command']}\nelapsed: {time.monotonic() - t0:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
