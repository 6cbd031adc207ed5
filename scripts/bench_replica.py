#!/usr/bin/env python3
"""Replica-aware snapshots against today's whole-rank snapshots, side by side in one run.

``.venv/bin/python scripts/bench_replica.py [--replicas 2 4] [--state-mib 256] [--steps 5]``

For each R, R trainer processes (gloo, one node daemon: the R ranks of a replica set on one node) hold
the same ``--state-mib`` of replicated state (an MLP's parameters and Adam moments) and snapshot it,
once whole per rank (today: ``Client()``), once sliced (``Client(replicas=WORLD)``: each rank copies
1/R). Measured per mode: the copy time per rank (each rank snapshots and waits, all R at once), the
trainer's blocked time per snapshot (time in ``snapshot()`` plus the optimizer pre-step hook's wait,
with ``--compute`` seconds of stand-in compute between snapshots), the node's shared memory (the
daemon's ``used``), and the restore time after every worker was killed (new processes, the versions
still in the daemon). Results in ``bench-results/bench_replica-<timestamp>.json``.

``--cluster``: the R ranks on R nodes instead (``ftd launch --nodes R --parity 1``, one rank per node,
the peer links over localhost), where a sliced restore needs the other R - 1 slices from their
nodes; adds the time to protection (a step's commit by a node's last rank -> recoverable on every
node: the daemons' ``protection_lag``, averaged over the nodes' versions), gives the memory per node,
and runs the sliced mode a second time with ``--no-replica-prefetch``: there the restore fetches the
slices when it asks, instead of finding them fetched while the new workers started.
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
from ftd.util.procs import free_ports, kill_everything_from, wait_for  # noqa: E402

WIDTH = 1024


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    from torch import nn

    import ftd
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    layers = max(1, round(args.state_mib * (1 << 20) / 12 / (WIDTH * WIDTH)))  # params + 2 Adam moments, fp32
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    state = {"model": model, "optim": opt}
    client = ftd.Client(replicas=dist.group.WORLD if args.sliced else None, verbose=False)
    out: dict = {"rank": rank}
    if args.phase == "restore":
        dist.barrier()
        t0 = time.perf_counter()
        out["restored"] = client.restore(state, resume="must")
        out["restore_s"] = time.perf_counter() - t0
    else:
        client.restore(state, resume="never")
        copies = []
        for step in range(args.steps):  # copy time: every rank snapshots at once, then waits
            opt.step()
            for attempt in range(100):  # (in a cluster a snapshot is skipped while the last one is protected)
                dist.barrier()
                client.snapshot(step, state)
                ok = client.wait(120)
                done = torch.tensor([int(ok)])
                dist.all_reduce(done)
                if int(done) == dist.get_world_size():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"step {step} was not committed on every rank: {client.stats}")
            copies.append(client.stats["last_copy_seconds"])
        before = client.stats["snapshot_seconds"] + client.stats["hook_wait_seconds"]
        for step in range(args.steps, 2 * args.steps):  # blocked time: compute, then the next optimizer step
            dist.barrier()
            client.snapshot(step, state)
            time.sleep(args.compute)
            opt.step()
        client.wait(120)
        out.update(copy_s=sorted(copies)[len(copies) // 2], blocked_s=(client.stats["snapshot_seconds"] +
                   client.stats["hook_wait_seconds"] - before) / args.steps, replicas=client.stats["replicas"],
                   committed=client.stats["committed"])
    Path(args.result).write_text(json.dumps(out))
    if args.phase != "restore":
        os._exit(0)  # a worker crash: no close(), no teardown; the daemons see the trainers gone
    client.close()
    dist.destroy_process_group()
    return 0


def run_ranks(d: Path, endpoints: list[str], r: int, sliced: bool, phase: str, args: argparse.Namespace) -> list[dict]:
    """R worker processes, rank i talking to ``endpoints[i]`` (one node's for all, or one node each)."""
    port = str(free_ports(1)[0])
    procs = []
    local = r if len(set(endpoints)) == 1 else 1
    for rank in range(r):
        env = dict(os.environ, PYTHONPATH=str(REPO), FTD_ENDPOINT=endpoints[rank], RANK=str(rank), WORLD_SIZE=str(r),
                   LOCAL_RANK=str(rank % local), LOCAL_WORLD_SIZE=str(local), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        cmd = [sys.executable, __file__, "--worker", "--phase", phase, "--result", str(d / f"{phase}-{rank}.json"),
               "--state-mib", str(args.state_mib), "--steps", str(args.steps), "--compute", str(args.compute)]
        procs.append(subprocess.Popen(cmd + (["--sliced"] if sliced else []), env=env, cwd=REPO,
                                      stdout=open(d / f"{phase}-{rank}.log", "wb"), stderr=subprocess.STDOUT))
    for rank, p in enumerate(procs):
        if p.wait(900) != 0:
            raise RuntimeError(f"rank {rank} failed: {(d / f'{phase}-{rank}.log').read_text()[-2000:]}")
    return [json.loads((d / f"{phase}-{rank}.json").read_text()) for rank in range(r)]


def measure(r: int, sliced: bool, args: argparse.Namespace) -> dict:
    d = Path(tempfile.mkdtemp(prefix="brep-", dir="/tmp"))
    job = f"br{os.getpid()}{r}{int(sliced)}"
    cfg = d / "node.toml"
    cfg.write_text(f'job = "{job}"\nruntime_dir = "{d}/run"\nmemory_budget = "12GiB"\nmemory_reserve = "512MiB"\n')
    daemon = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(cfg)], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(d / "daemon.log", "wb"),
                              stderr=subprocess.STDOUT)
    endpoint = f"ipc://{d}/run/{job}/node0.sock"
    try:
        wait_for(lambda: status_or_none(endpoint), 60, "the daemon to answer")
        return phases(d, [endpoint] * r, r, sliced, args)
    finally:
        stop(daemon, d, job)


def measure_cluster(r: int, sliced: bool, args: argparse.Namespace, prefetch: bool = True) -> dict:
    """The same on R nodes of a local cluster (``ftd launch``), one rank each."""
    d = Path(tempfile.mkdtemp(prefix="brepc-", dir="/tmp"))
    job = f"bc{os.getpid()}{r}{int(sliced)}"
    launcher = subprocess.Popen([sys.executable, "-m", "ftd.cli", "launch", "--nodes", str(r), "--parity", "1",
                                 "--dir", str(d / "cluster"), "--job", job, "--memory-budget", "6GiB",
                                 "--replica-snapshots" if sliced else "--no-replica-snapshots",
                                 "--replica-prefetch" if prefetch else "--no-replica-prefetch"], cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=open(d / "launch.log", "wb"),
                                stderr=subprocess.STDOUT)
    try:
        info = d / "cluster" / "cluster.json"
        wait_for(lambda: info.exists() or launcher.poll() is not None, 60, "ftd launch to write cluster.json")
        endpoints = [m["endpoint"] for m in json.loads(info.read_text())["members"]]
        wait_for(lambda: all((status_or_none(e) or {}).get("cluster", {}).get("ready") for e in endpoints), 60,
                 "every node to be ready")
        out = phases(d, endpoints, r, sliced, args)
        lags = [status_or_none(e)["cluster"]["stats"]["protection_lag"] for e in endpoints]
        count = sum(lag["count"] for lag in lags)
        out["protection_s"] = sum(lag["total_seconds"] for lag in lags) / count if count else float("nan")
        out["prefetches_taken"] = sum(status_or_none(e)["replica_versions"]["prefetches_taken"] for e in endpoints)
        return out
    finally:
        stop(launcher, d, job)


def phases(d: Path, endpoints: list[str], r: int, sliced: bool, args: argparse.Namespace) -> dict:
    ran = run_ranks(d, endpoints, r, sliced, "run", args)
    used = max(status_or_none(e)["used"] for e in set(endpoints))  # (the most loaded node)
    restored = run_ranks(d, endpoints, r, sliced, "restore", args)
    return {"copy_s": max(x["copy_s"] for x in ran), "blocked_s": max(x["blocked_s"] for x in ran),
            "node_bytes": used, "restore_s": max(x["restore_s"] for x in restored),
            "replicas": ran[0]["replicas"], "restored": [x["restored"] for x in restored]}


def stop(proc: subprocess.Popen, d: Path, job: str) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    kill_everything_from(d)
    for f in Path("/dev/shm").iterdir():
        if f.name.startswith(f"ftd.{job}."):
            f.unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 4])
    p.add_argument("--state-mib", type=int, default=256, help="replicated state per rank (MLP + Adam)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compute", type=float, default=0.05, help="seconds of stand-in compute between snapshots")
    p.add_argument("--cluster", action="store_true", help="R nodes of a local cluster, one rank each")
    p.add_argument("--out", default=str(REPO / "bench-results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sliced", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="run", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {"command": " ".join([sys.executable] + sys.argv), "ftd": ftd_revision(), "args": vars(args), "runs": {}}
    rows = []
    for r in args.replicas:
        run = measure_cluster if args.cluster else measure
        whole, sliced = run(r, False, args), run(r, True, args)
        results["runs"][str(r)] = {"whole": whole, "sliced": sliced}
        if args.cluster:
            late = measure_cluster(r, True, args, prefetch=False)
            results["runs"][str(r)]["sliced_no_prefetch"] = late
        figures = [("copy time per rank", "copy_s", ms), ("blocked per snapshot", "blocked_s", ms),
                   ("node shared memory", "node_bytes", lambda b: f"{b / (1 << 20):.0f} MiB"),
                   ("restore after a worker crash", "restore_s", ms)]
        if args.cluster:
            figures.append(("time to protection", "protection_s", ms))
        for name, key, fmt in figures:
            w, s = whole[key], sliced[key]
            rows.append([f"R={r}", name, fmt(w), fmt(s), f"{s / w:.2f} (1/R = {1 / r:.2f})" if w else "-"])
        if args.cluster:
            w, s = whole["restore_s"], late["restore_s"]
            rows.append([f"R={r}", "restore, no prefetch", ms(w), ms(s), f"{s / w:.2f}"])
            print(f"R={r}: restores that found the slices fetched ahead: {sliced['prefetches_taken']} of "
                  f"{r * (r - 1)} slices (no prefetch: {late['prefetches_taken']})")
    print(table(["replicas", "per snapshot", "today (whole)", "sliced", "sliced / today"], rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_replica-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
