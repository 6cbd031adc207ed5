#!/usr/bin/env python3
"""How long from a failure to training again under torchrun's own elastic agent, and what a moved rank costs.

Run it as ``.venv/bin/python scripts/bench_torchrun.py`` (``--trials 2``, about 3 minutes; ``--quick``: one trial, a
smaller model, about 1.5 minutes).

Per trial, on 3 simulated nodes of this machine (``ftd launch``, m = 1; one ``torchrun --rdzv-backend
c10d`` agent per node at 127.0.0.1-3, ``ftd.local.torchrun_job``, the rendezvous store served apart,
``--max-restarts 3``), a DDP job (``ftd.examples.gpt_trainer``, one rank per node, gloo, a snapshot every
step) trains; then, once a step is recoverable:

1. *worker crash*: rank 1's worker is SIGKILLed; torchrun restarts every worker and each restores on
   the node it ran on;
2. *node loss*: node 1 is lost (its agent and workers SIGKILLed, its daemon killed and its shared
   memory deleted: ``ftd kill-node``); at once an empty daemon is started for node 1 (it rebuilds the
   node's snapshots from its peers' parity) and a replacement agent joins under another address
   (127.0.0.4, a spare host), so c10d sorts it last and two ranks land on other nodes than the ones
   holding their versions: each fetches it from the node that holds it.

"Training again" is the moment the first step after the restart is logged (the trainer prints a line
per step; the benchmark polls the agents' logs every 10 ms), measured from the moment of the kill.
Where the seconds go comes from the same logs and the workers' timeline marks (``FTD_TIMELINE``): restart lines ("resuming after step"), ftd's restore
lines (bytes and seconds of each rank's restore, "fetched from node N" for a moved one), and the
daemons' ``ftd status`` (bytes and seconds of each fetch). Results in ``bench-results/``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from bench_protect import Cluster, status_of  # scripts/bench_protect.py: ftd launch, kill-node, daemon restart
from benchutil import REPO, ftd_revision, sigterm_to_exit, table

sys.path.insert(0, str(REPO))
from ftd.local.torchrun_job import TorchrunNodes  # noqa: E402
from ftd.util import timeline  # noqa: E402
from ftd.util.procs import wait_for  # noqa: E402

NODES = 3
_STEP = re.compile(r"^(?:\[[^\]]*\]:?\s*)?step\s+\d+\s+loss", re.M)
_RESUME = re.compile(r"resuming after step (\d+)")
_RESTORE = re.compile(r"ftd: rank (\d+) restored step (\d+) from ([^(]*?) \(job .*?\): ([\d.]+) (\w+) in ([\d.]+) s")
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


TIMED = {"imported": "imported", "joined": "pg_joined"}  # the trainer's own marks (ftd/util/timeline.py)
EVENTS = {  # what the breakdown times, by the first line of each kind after the failure
    "agent_restarts": re.compile(r"will restart worker group|Stopping worker group"),
    "rendezvous_done": re.compile(r"Rendezvous complete for workers"),
    "restored": _RESTORE,
    "resumed": _RESUME,
}


class LogClock(threading.Thread):
    """Polls the agents' logs every 10 ms: when each line of ``EVENTS`` first appeared (``events``), and
    ``first_step_after(n)``: when a step line first followed the n-th restart line of every rank (the
    restarted job trained a step), in ``time.monotonic()``."""

    def __init__(self, job: TorchrunNodes):
        super().__init__(daemon=True)
        self.job, self.stop_event = job, threading.Event()
        self.seen: dict[int, float] = {}  # restarts seen (all ranks) -> when a step followed them all
        self.events: list[tuple[float, str, str]] = []  # (when, node, kind)
        self._offsets: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop_event.wait(0.01):
            now, restarts, stepped = time.monotonic(), 0, 0
            for name in self.job._names():
                text = self.job._text(name)
                start = self._offsets.get(name, 0)
                end = text.rfind("\n") + 1
                for kind, pattern in EVENTS.items():
                    self.events += [(now, name, kind) for _ in pattern.finditer(text, start, max(start, end))]
                self._offsets[name] = max(start, end)
                resumes = list(_RESUME.finditer(text))
                restarts += len(resumes)
                if resumes and _STEP.search(text, resumes[-1].end()):
                    stepped += len(resumes)
            if restarts and restarts % NODES == 0 and stepped == restarts and restarts not in self.seen:
                self.seen[restarts] = now

    def first_step_after(self, restarts: int, timeout: float) -> float:
        wait_for(lambda: restarts in self.seen, timeout, f"a step after {restarts // NODES} restart(s) of every rank")
        return self.seen[restarts]

    def breakdown(self, t0: float, t1: float) -> dict[str, float]:
        """Seconds from t0 to the last (every rank's) line of each kind before t1, and to the workers'
        last timeline mark of each kind of ``TIMED``: when the slowest node got there."""
        out: dict[str, float] = {}
        for when, _, kind in self.events:
            if t0 <= when <= t1:
                out[kind] = max(out.get(kind, 0.0), when - t0)
        wall0 = time.time() - (time.monotonic() - t0)  # the timeline's clock is the wall clock
        for event in timeline.read(self.job.dir / "timeline.jsonl"):
            kind = next((k for k, name in TIMED.items() if name == event["event"]), None)
            if kind and 0 <= event["t"] - wall0 <= t1 - t0:
                out[kind] = max(out.get(kind, 0.0), event["t"] - wall0)
        return out


def recoverable(cluster: Cluster) -> int:
    steps = [(status_of(ep) or {}).get("cluster", {}).get("recoverable") for ep in cluster.endpoints]
    return min((s for s in steps if s is not None), default=-1)


def restores_since(job: TorchrunNodes, marks: dict[str, int]) -> list[dict]:
    """ftd's restore lines written after the log offsets ``marks``."""
    out = []
    for name in job._names():
        for m in _RESTORE.finditer(job._text(name), marks.get(name, 0)):
            out.append({"node": name, "rank": int(m.group(1)), "step": int(m.group(2)), "where": m.group(3),
                        "bytes": float(m.group(4)) * UNITS[m.group(5)], "seconds": float(m.group(6))})
    return out


def log_marks(job: TorchrunNodes) -> dict[str, int]:
    return {name: len(job._text(name)) for name in job._names()}


def trial(args: argparse.Namespace, index: int) -> dict:
    cluster = Cluster(NODES, 1, 0, f"tr{index}")
    trainer = ["-m", "ftd.examples.gpt_trainer", "--layers", str(args.layers), "--dim", str(args.dim), "--heads", "4",
               "--context", "32", "--batch", "4", "--steps", str(args.steps), "--pg-timeout", "30",
               "--step-sleep", str(args.step_sleep), "--out", str(cluster.dir / "out")]
    job = None
    clock = None
    try:
        cluster.launch()
        job = TorchrunNodes(cluster.dir, NODES, trainer,  # agent timestamps; the workers' own marks
                            env=dict(os.environ, LOGLEVEL="INFO", **{timeline.ENV: str(cluster.dir / "timeline.jsonl")}),
                            rdzv_conf=args.rdzv_conf)
        for node in range(NODES):
            job.start(f"n{node}", cluster.dir / f"node-{node}.toml", f"127.0.0.{node + 1}")
        clock = LogClock(job)
        clock.start()
        wait_for(lambda: recoverable(cluster) >= 3, 300, "a recoverable step past 3")
        result: dict = {"trial": index}

        # 1. a worker crash
        marks = log_marks(job)
        t0 = time.monotonic()
        os.kill(job.worker_pid(1), signal.SIGKILL)
        back = clock.first_step_after(NODES, 200)
        result["crash"] = {"to_training_s": back - t0, "restores": restores_since(job, marks),
                           "breakdown": clock.breakdown(t0, back)}
        wait_for(lambda: recoverable(cluster) >= max(r["step"] for r in result["crash"]["restores"]) + 4, 300,
                 "a recoverable step 4 past the crash")

        # 2. node 1 lost; a spare host takes its place under a new address at once
        marks = log_marks(job)
        t0 = time.monotonic()
        job.kill("n1")
        r = cluster.ftd("kill-node", "--dir", str(cluster.dir), "--node-rank", "1")
        if r.returncode != 0:
            raise RuntimeError(f"ftd kill-node failed: {r.stderr[-2000:]}")
        killed = time.monotonic()
        cluster.restart_daemon(1)
        job.start("n1-new", cluster.dir / "node-1.toml", "127.0.0.4")
        back = clock.first_step_after(2 * NODES, 300)
        moves = []
        for ep in cluster.endpoints:
            st = status_of(ep) or {}
            moves += st.get("cluster", {}).get("moves", {}).get("fetched", [])
        result["loss"] = {"to_training_s": back - t0, "kill_s": killed - t0, "restores": restores_since(job, marks),
                          "fetched": moves, "breakdown": clock.breakdown(t0, back)}
        codes = job.wait(300)
        if set(codes.values()) != {0}:
            raise RuntimeError(f"the agents exited {codes}")
        return result
    finally:
        if clock is not None:
            clock.stop_event.set()
        if job is not None:
            job.close()
        forced = cluster.close(keep_dir=args.keep)
        if forced:
            print("   cleaned up by force:", forced)


def summarize(results: list[dict]) -> dict:
    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    moved = [r for t in results for r in t["loss"]["restores"] if "fetched from node" in r["where"]]
    stayed = [r for t in results for r in t["loss"]["restores"] if "fetched from node" not in r["where"]]
    crash = [r for t in results for r in t["crash"]["restores"]]
    return {
        "crash_to_training_s": med([t["crash"]["to_training_s"] for t in results]),
        "loss_to_training_s": med([t["loss"]["to_training_s"] for t in results]),
        "restore_after_crash_s": med([r["seconds"] for r in crash]),
        "restore_moved_s": med([r["seconds"] for r in moved]),
        "restore_unmoved_s": med([r["seconds"] for r in stayed]),
        "moved_ranks_per_loss": len(moved) / len(results),
        "bytes_per_rank": med([r["bytes"] for r in moved + stayed]),
        "fetched_bytes_per_loss": sum(f["bytes"] for t in results for f in t["loss"]["fetched"]) / len(results),
        "fetch_s": med([f["seconds"] for t in results for f in t["loss"]["fetched"]]),
    }


def report(results: list[dict], s: dict) -> str:
    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f} s"

    rows = [[str(t["trial"]), sec(t["crash"]["to_training_s"]), sec(t["loss"]["to_training_s"]),
             ", ".join(f"r{r['rank']} {r['seconds']:.2f} s ({r['where'].strip()})" for r in t["loss"]["restores"])]
            for t in results]
    lines = [table(["trial", "crash -> training", "node loss -> training", "restores after the node loss"], rows), ""]
    phases = [("agent_restarts", "every agent stopped its workers"), ("rendezvous_done", "c10d rendezvous complete"),
              ("imported", "every new worker imported torch and ftd"), ("joined", "every rank joined gloo"),
              ("restored", "every rank restored"), ("resumed", "every rank resumed"),
              (None, "the first step after it done")]
    phase_rows = []
    for key, label in phases:
        cells = []
        for kind in ("crash", "loss"):
            values = [t[kind]["to_training_s"] if key is None else t[kind]["breakdown"].get(key) for t in results]
            values = [v for v in values if v is not None]
            cells.append(sec(statistics.median(values)) if values else "-")
        phase_rows.append([label, *cells])
    lines += ["seconds after the kill (median over trials), when the slowest node got there:",
              table(["phase", "worker crash", "node loss"], phase_rows), ""]
    ratio = (s["restore_moved_s"] / s["restore_unmoved_s"]
             if s["restore_moved_s"] and s["restore_unmoved_s"] else None)
    lines.append(f"median: worker crash -> training again {sec(s['crash_to_training_s'])}; node loss -> training "
                 f"again {sec(s['loss_to_training_s'])}")
    lines.append(f"moved ranks per node loss: {s['moved_ranks_per_loss']:g}; bytes fetched per node loss: "
                 f"{s['fetched_bytes_per_loss'] / 2**20:.1f} MiB (a rank's version: {s['bytes_per_rank'] / 2**20:.1f} MiB); "
                 f"a fetch took {sec(s['fetch_s'])}")
    lines.append(f"restore of a moved rank {sec(s['restore_moved_s'])} against an unmoved one "
                 f"{sec(s['restore_unmoved_s'])}" + (f": {ratio:.1f}x" if ratio else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--dim", type=int, default=256, help="the GPT's width (state per rank about 48 * dim^2 * layers B)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--step-sleep", type=float, default=0.1)
    p.add_argument("--quick", action="store_true", help="one trial, --dim 128, 30 steps")
    p.add_argument("--rdzv-conf", default="", help="more of c10d's --rdzv-conf for every agent, e.g. "
                   "keep_alive_interval=1,keep_alive_max_attempt=3 (a lost agent leaves the rendezvous after 3 s, "
                   "not torch's default 15 s)")
    p.add_argument("--keep", action="store_true", help="keep each trial's directory (logs) under /tmp")
    p.add_argument("--out", default=str(REPO / "bench-results"))
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.dim, args.steps = 1, 128, 30
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_exit)
    results = []
    for i in range(args.trials):
        print(f"trial {i + 1} of {args.trials} ...", flush=True)
        results.append(trial(args, i))
    s = summarize(results)
    print(f"agents' --rdzv-conf: is_host=false{',' + args.rdzv_conf if args.rdzv_conf else ''}")
    print(report(results, s))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_torchrun-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "revision": ftd_revision(), "trials": results, "summary": s},
                               indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
