#!/usr/bin/env python3
"""Does protection across nodes make the trainer wait? Trainer-blocked time per snapshot, side by side.

``.venv/bin/python scripts/bench_blocked.py [--nodes 4] [--steps 200] [--width 512]``

The same N trainers (``ftd.examples.tiny_trainer``: MLP + BatchNorm + AdamW, a snapshot every step,
``--step-sleep`` standing in for a bigger model's compute), one per node, run twice on this machine:
against N standalone daemons (no peers: issue 2's single-node mode) and against an N-node cluster
(``ftd launch``, m = 1) that protects their snapshots with parity. Each trainer reports its client's
counters; blocked time = time inside ``snapshot()`` + waits in the optimizer's pre-step hook, per
snapshot taken. In the cluster some snapshots are skipped while an older step is being protected
(``skipped_protecting``): that is how protection avoids making the trainer wait. Results in
``bench-results/bench_blocked-<timestamp>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import REPO, ftd_revision, ms, table

sys.path.insert(0, str(REPO))
from ftd.control.connection import status_or_none  # noqa: E402
from ftd.util.procs import kill_everything_from, wait_for  # noqa: E402


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "FTD_ENDPOINT", "FTD_JOB", "FTD_NODE_RANK"):
        e.pop(key, None)
    return e


def status(endpoint: str) -> dict | None:
    return status_or_none(endpoint)


def standalone_daemons(d: Path, nodes: int, job: str) -> list[str]:
    endpoints = []
    for n in range(nodes):
        cfg = d / f"node-{n}.toml"
        cfg.write_text(f'job = "{job}-{n}"\nruntime_dir = "{d}/run"\nmemory_budget = "1GiB"\n'
                       f'memory_reserve = "256MiB"\n')
        subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(cfg)], env=env(), cwd=REPO,
                         stdout=open(d / f"node-{n}.log", "wb"), stderr=subprocess.STDOUT)
        endpoints.append(f"ipc://{d}/run/{job}-{n}/node0.sock")
    wait_for(lambda: all(status(ep) for ep in endpoints), 60, "the daemons to answer")
    return endpoints


def cluster(d: Path, nodes: int, job: str) -> list[str]:
    subprocess.Popen([sys.executable, "-m", "ftd.cli", "launch", "--nodes", str(nodes), "--parity", "1", "--dir",
                      str(d / "c"), "--job", job, "--memory-budget", "1GiB"], env=env(), cwd=REPO,
                     stdout=open(d / "launch.out", "wb"), stderr=subprocess.STDOUT)
    wait_for(lambda: (d / "c" / "cluster.json").exists(), 60, "ftd launch to write cluster.json")
    endpoints = [m["endpoint"] for m in json.loads((d / "c" / "cluster.json").read_text())["members"]]
    wait_for(lambda: all((st := status(ep)) and st["cluster"]["ready"] for ep in endpoints), 60, "the cluster to be ready")
    return endpoints


def run_trainers(d: Path, endpoints: list[str], args: argparse.Namespace, tag: str) -> list[dict]:
    procs = []
    for n, ep in enumerate(endpoints):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ftd.examples.tiny_trainer", "--steps", str(args.steps), "--losses",
             str(d / f"{tag}-loss{n}"), "--seed", str(100 + n), "--width", str(args.width), "--depth", "3",
             "--step-sleep", str(args.step_sleep), "--stats", str(d / f"{tag}-stats{n}.json")],
            env=dict(env(), FTD_ENDPOINT=ep), cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(d / f"{tag}-{n}.err", "wb")))
    for p in procs:
        if p.wait(600) != 0:
            raise RuntimeError(f"a trainer failed; see {d}")
    return [json.loads((d / f"{tag}-stats{n}.json").read_text()) for n in range(len(endpoints))]


def summary(stats: list[dict]) -> dict:
    snaps = sum(s["snapshots"] for s in stats)
    blocked = sum(s["snapshot_seconds"] + s["hook_wait_seconds"] for s in stats)
    return {"snapshots": snaps, "committed": sum(s["committed"] for s in stats),
            "skipped_protecting": sum(s.get("skipped_protecting", 0) for s in stats),
            "skipped_busy": sum(s["skipped_busy"] for s in stats), "failed": sum(s["failed"] for s in stats),
            "blocked_per_snapshot_s": blocked / max(snaps, 1),
            "blocked_max_trainer_s": max((s["snapshot_seconds"] + s["hook_wait_seconds"]) / max(s["snapshots"], 1)
                                         for s in stats)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--width", type=int, default=512, help="MLP width (512: about 9 MiB of state per trainer)")
    p.add_argument("--step-sleep", type=float, default=0.02, help="seconds of stand-in compute per step")
    p.add_argument("--out", default=str(REPO / "bench-results"))
    args = p.parse_args()
    results = {"command": " ".join([sys.executable] + sys.argv), "ftd": ftd_revision(), "args": vars(args)}
    t0 = time.monotonic()
    for mode in ("standalone", "cluster"):
        d = Path(tempfile.mkdtemp(prefix=f"bblk-{mode}-", dir="/tmp"))
        job = f"bb{os.getpid()}{mode[0]}"
        try:
            endpoints = (standalone_daemons if mode == "standalone" else cluster)(d, args.nodes, job)
            results[mode] = summary(run_trainers(d, endpoints, args, mode))
            if mode == "cluster":
                st = status(endpoints[0])["cluster"]
                results[mode].update(rounds_done=st["coordinator"]["rounds_done"], recoverable=st["recoverable"])
        finally:
            kill_everything_from(d)
            for f in Path("/dev/shm").iterdir():
                if f.name.startswith(f"ftd.{job}"):
                    f.unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
    rows = []
    for mode in ("standalone", "cluster"):
        r = results[mode]
        rows.append([mode, str(r["snapshots"]), str(r["committed"]), str(r["skipped_protecting"]),
                     str(r["skipped_busy"]), ms(r["blocked_per_snapshot_s"]), ms(r["blocked_max_trainer_s"]),
                     str(r.get("rounds_done", "-")), str(r.get("recoverable", "-"))])
    print(f"{args.nodes} trainers, {args.steps} steps each, a snapshot every step, {args.step_sleep * 1000:.0f} ms "
          f"of stand-in compute per step")
    print(table(["daemons", "snapshots", "committed", "skipped (protecting)", "skipped (busy)",
                 "blocked per snapshot ms", "worst trainer ms", "rounds", "recoverable step"], rows))
    ratio = results["cluster"]["blocked_per_snapshot_s"] / max(results["standalone"]["blocked_per_snapshot_s"], 1e-9)
    print(f"blocked per snapshot, cluster / standalone: {ratio:.2f}x")
    results["ratio"] = ratio
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / f"bench_blocked-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"command: {results['command']}\nelapsed: {time.monotonic() - t0:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
