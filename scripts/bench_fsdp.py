#!/usr/bin/env python3
"""FSDP2: ftd's snapshot every step against ``dcp.async_save`` every step, side by side in one run.

    .venv/bin/python scripts/bench_fsdp.py [--mib 256] [--steps 6] [--rounds 4] [--json PATH]
    .venv/bin/python scripts/bench_fsdp.py --quick      # a smoke run, about a minute

torchrun starts 2 ranks (gloo, CPU, ``torch.set_num_threads(1)`` each) of ``ftd.examples.fsdp_trainer``'s
model (FSDP2 ``fully_shard`` per block) sized so that each rank's shard of the parameters plus its
AdamW moments is about --mib MiB. The same two processes train through every mode in turn, in rounds
ordered forward then backward (none, ftd, ..., dcp, dcp, ..., ftd, none, ...) so that the machine's
noise hits the modes alike; the first --warmup steps of each round are left out. Modes:

- ``none``: no checkpoint.
- ``ftd``: ``client.snapshot(step, {"model": model, "optim": optimizer, "sched": scheduler})``, a
  private daemon started by this script; the shards are copied in the background and the optimizer's
  pre-step hook waits only if a copy is still running.
- ``ftd-sd``: the same with the get_state_dict Stateful that DCP saves (``--style stateful`` of the
  example trainer).
- ``dcp``: what torchtitan 0.3.0's ``async_mode = "async_with_pinned_mem"`` does
  (``torchtitan/components/checkpointer/dcp.py``), every step: ``save()`` first waits for the previous
  upload, runs ``gc.collect(1)``, then ``dcp.async_save(get_state_dict Stateful, process_group=<a gloo
  group of its own>, async_checkpointer_type=PROCESS, async_stager=DefaultStager(StagingOptions(
  use_pinned_memory=True, use_shared_memory=True, use_async_staging=True, use_non_blocking_copy=<True
  where an accelerator exists: DefaultStager refuses it without one>)))``, then queues all but the newest
  --keep-latest checkpoint directories for a purge thread (rank 0); ``maybe_wait_for_staging()`` runs
  right before ``optimizer.step()``. Checkpoints go to a private directory on tmpfs (--dcp-dir: elsewhere).

Blocked = time the training thread spends in the save/snapshot call plus any wait before or in the
optimizer step that the checkpoint causes; its CPU = the training thread's CPU time in those calls
(``time.thread_time``: what they cost, less the machine's noise and the waits). Step = one whole
iteration. Ratios to DCP are given for the pooled medians and per pass (each pass runs every mode
once; ftd's median in a pass against DCP's in the same pass), as median and range over the passes. Results: a table, and JSON with
every step's figures (--json). Nothing outlives the run: the daemon, the ranks, DCP's checkpoint
processes, the shared-memory segments and the checkpoint directories go even on an error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from benchutil import REPO, CpuWatch, ftd_revision, ms, private_daemon, sigterm_to_exit, table, verdict

from ftd.util.procs import free_ports, log_tail  # noqa: E402  (benchutil put this checkout first on sys.path)

MODES = {"none": "no checkpoint",
         "ftd": "ftd snapshot (model, optimizer objects)",
         "ftd-sd": "ftd snapshot (get_state_dict Stateful)",
         "dcp": "dcp.async_save + DefaultStager (torchtitan async_with_pinned_mem)"}
TARGET_BLOCKED, TARGET_OVERHEAD = 1 / 20, 1 / 5
TAG = "FTD_BENCH_FSDP_RUN"  # set in every process of a run (inherited by DCP's checkpoint processes)


# ---- the run ---------------------------------------------------------------------------------------
def schedule(modes: list[str], rounds: int) -> list[str]:
    """Rounds forward, then backward, ...: every mode meets each neighbour on both sides."""
    return [m for r in range(rounds) for m in (modes if r % 2 == 0 else modes[::-1])]


def layers_for(mib: float, dim: int, world: int) -> int:
    """Blocks (Linear d->2d, Linear 2d->d) so that a rank's parameter shard + AdamW moments is ~mib MiB."""
    per_block = 4 * dim * dim + 3 * dim
    return max(1, round(mib * 2**20 * world / (3 * 4 * per_block)))


def kill_tagged(value: str) -> list[int]:
    """SIGKILL every process of this user whose environment carries this run's tag (ranks, and the
    checkpoint processes DCP spawned, which live in torchrun's workers' own sessions)."""
    victims = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.pid != os.getpid() and proc.info["uids"].real == os.getuid() and proc.environ().get(TAG) == value:
                proc.kill()
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pass
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def run_ranks(args: argparse.Namespace, work: Path, dcp_dir: Path, endpoint: str) -> list[dict]:
    plan = {"modes": schedule(args.modes, args.rounds), "steps": args.steps, "warmup": args.warmup,
            "dim": args.dim, "layers": layers_for(args.mib, args.dim, 2), "batch": args.batch,
            "dcp_dir": str(dcp_dir), "dcp_type": args.dcp_type, "keep_latest": args.keep_latest, "out": str(work)}
    (work / "plan.json").write_text(json.dumps(plan))
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", str(Path(__file__).resolve().with_name("bench_fsdp_rank.py")), str(work / "plan.json")]
    env = dict(os.environ, PYTHONPATH=str(REPO), FTD_ENDPOINT=endpoint, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               **{TAG: str(work)})
    log = work / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(args.timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        raise RuntimeError(f"the ranks failed ({'timed out' if rc is None else f'exit {rc}'}):\n{log_tail(log, 40)}")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


# ---- figures ---------------------------------------------------------------------------------------
def quantiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def summarize(ranks: list[dict], modes: list[str]) -> dict:
    """Per mode: step time, blocked time and the trainer thread's CPU in the checkpoint's calls, over
    every measured step of both ranks, and the median step time of each pass (every mode once); the
    overhead against no checkpoint (medians)."""
    steps = [s for r in ranks for s in r["steps"] if not s["warmup"]]
    out: dict = {}
    for m in modes:
        mine = [s for s in steps if s["mode"] == m]
        out[m] = {"step_s": quantiles([s["step_s"] for s in mine]), "blocked_s": quantiles([s["blocked_s"] for s in mine]),
                  "blocked_cpu_s": quantiles([s["blocked_cpu_s"] for s in mine]),
                  "parts_s": {k: statistics.median(s["parts"][k] for s in mine) for k in mine[0]["parts"]}}
        passes = sorted({s["round"] // len(modes) for s in mine})
        per_pass = [[s for s in mine if s["round"] // len(modes) == k] for k in passes]
        out[m]["passes"] = [{key: statistics.median(s[key] for s in group) for key in ("step_s", "blocked_s", "blocked_cpu_s")}
                            for group in per_pass]
        extra = [x for r in ranks for x in r.get("extra", {}).get(m, [])]
        if extra:
            out[m]["extra"] = {k: sum(e[k] for e in extra) for k in extra[0]}
    if "none" in out:
        base = out["none"]["step_s"]["median"]
        for m in modes:
            out[m]["step_ratio"] = out[m]["step_s"]["median"] / base
            out[m]["overhead_s"] = out[m]["step_s"]["median"] - base
            for mine, none in zip(out[m]["passes"], out["none"]["passes"]):
                mine["overhead_s"] = mine["step_s"] - none["step_s"]
    return out


def ratio(mine: float, dcp: float, clamp: bool = False) -> float | None:
    """mine / dcp; for overheads (``clamp``) a negative one of ours counts as 0, and none when DCP's
    is not positive (the noise outweighed it)."""
    if dcp <= 0:
        return None
    return (max(mine, 0.0) if clamp else mine) / dcp


def spread(xs: list[float | None]) -> dict:
    """Median and range of the per-pass ratios that could be formed."""
    xs = [x for x in xs if x is not None]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else {"n": 0}


def targets(summary: dict) -> list[dict]:
    """ftd against DCP: the ratio of the pooled medians, and its median and range over the passes
    (each pass's ftd against the same pass's DCP, the order alternating)."""
    rows = []
    dcp = summary.get("dcp")
    for m in ("ftd", "ftd-sd"):
        if m not in summary or dcp is None:
            continue
        mine = summary[m]
        row: dict = {"mode": m}
        for key in ("blocked_s", "blocked_cpu_s"):
            row[key] = {"pooled": ratio(mine[key]["median"], dcp[key]["median"]),
                        "passes": spread([ratio(a[key], b[key]) for a, b in zip(mine["passes"], dcp["passes"])])}
        if "overhead_s" in mine:
            row["overhead_s"] = {"pooled": ratio(mine["overhead_s"], dcp["overhead_s"], clamp=True),
                                 "passes": spread([ratio(a["overhead_s"], b["overhead_s"], clamp=True)
                                                   for a, b in zip(mine["passes"], dcp["passes"])])}
        row["blocked_ok"] = row["blocked_s"]["pooled"] <= TARGET_BLOCKED
        pooled = row.get("overhead_s", {}).get("pooled")
        row["overhead_ok"] = None if pooled is None else pooled <= TARGET_OVERHEAD
        rows.append(row)
    return rows


def ratio_text(r: dict) -> str:
    pooled = "n/a" if r["pooled"] is None else f"{r['pooled']:.3f}"
    p = r["passes"]
    over = f"passes: median {p['median']:.3f}, {p['min']:.3f}..{p['max']:.3f}, n={p['n']}" if p["n"] else "no pass"
    return f"{pooled} ({over})"


def report(summary: dict, goals: list[dict], modes: list[str], header: str) -> str:
    rows = []
    for m in modes:
        s = summary[m]
        st, bl, cpu = s["step_s"], s["blocked_s"], s["blocked_cpu_s"]
        passes = [p["overhead_s"] for p in s["passes"] if "overhead_s" in p]
        over = "-" if m == "none" or "overhead_s" not in s else (
            f"{ms(s['overhead_s'])} ({ms(min(passes))}..{ms(max(passes))})")
        rows.append([MODES[m], f"{ms(st['median'])} ({ms(st['p25'])}-{ms(st['p75'])})",
                     "-" if "step_ratio" not in s else f"{s['step_ratio']:.3f}x", over,
                     "-" if m == "none" else f"{ms(bl['median'])} ({ms(bl['p25'])}-{ms(bl['p75'])}, max {ms(bl['max'])})",
                     "-" if m == "none" else ms(cpu["median"]),
                     " ".join(f"{k} {ms(v)}" for k, v in s["parts_s"].items()) or "-"])
    lines = [header, table(["mode", "step ms (IQR)", "vs none", "overhead ms (passes)", "blocked ms (IQR, max)",
                            "its CPU ms", "blocked, medians of its parts (ms)"], rows),
             "ratios to DCP: of the pooled medians (per pass: median, range, number of passes)"]
    for g in goals:
        lines.append(f"{g['mode']} / dcp: blocked {ratio_text(g['blocked_s'])}, target <= {TARGET_BLOCKED:.2f}: "
                     f"{verdict(g['blocked_ok'])}")
        lines.append(f"{' ' * len(g['mode'])}        trainer-thread CPU in the calls {ratio_text(g['blocked_cpu_s'])}")
        if "overhead_s" in g:
            lines.append(f"{' ' * len(g['mode'])}        step overhead {ratio_text(g['overhead_s'])}, target <= "
                         f"{TARGET_OVERHEAD:.2f}: {verdict(g['overhead_ok'])}")
    for m in modes:
        if "extra" in summary[m]:
            lines.append(f"{m}: " + ", ".join(f"{k} {v}" for k, v in summary[m]["extra"].items()))
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=256, help="parameter shard + AdamW moments per rank (default 256)")
    p.add_argument("--dim", type=int, default=1024, help="width of the blocks (the block count follows from --mib)")
    p.add_argument("--batch", type=int, default=32, help="rows per rank per step")
    p.add_argument("--quick", action="store_true", help="a smoke run in about a minute: --mib 16 --steps 3 "
                   "--warmup 1 --rounds 2 (figures not meaningful)")
    p.add_argument("--steps", type=int, default=6, help="measured steps per round")
    p.add_argument("--warmup", type=int, default=2, help="steps left out at the start of every round")
    p.add_argument("--rounds", type=int, default=4, help="rounds per mode, i.e. passes over all modes (the order reverses each pass)")
    p.add_argument("--modes", default="none,ftd,ftd-sd,dcp", type=lambda s: s.split(","),
                   help=f"comma-separated, of {', '.join(MODES)} (none is the baseline of the ratios)")
    p.add_argument("--dcp-type", choices=("process", "thread"), default="process",
                   help="AsyncCheckpointerType (torchtitan's async_with_pinned_mem: process)")
    p.add_argument("--dcp-dir", help="where DCP writes (default: a private directory on tmpfs, /dev/shm)")
    p.add_argument("--keep-latest", type=int, default=2, help="DCP checkpoints kept (torchtitan's keep_latest_k)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds the whole run may take")
    p.add_argument("--json", help="write the results here (default bench-results/bench_fsdp-<time>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.mib, args.steps, args.warmup, args.rounds = 16, 3, 1, 2
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}: use {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_exit)
    t0, cpu = time.monotonic(), CpuWatch()
    work = Path(tempfile.mkdtemp(prefix="ftd-bench-fsdp-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="ftd-bench-fsdp-", dir="/dev/shm"))
    dcp_dir = Path(tempfile.mkdtemp(prefix="ftd-bench-fsdp-dcp-", dir=args.dcp_dir)) if args.dcp_dir else shm / "dcp"
    before = set(os.listdir("/dev/shm"))
    try:
        with private_daemon("ftd-bench-fsdp-daemon-", budget="4GiB", shm_dir=shm) as endpoint:
            ranks = run_ranks(args, work, dcp_dir, endpoint)
    finally:
        stray = kill_tagged(str(work))
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        if args.dcp_dir:
            shutil.rmtree(dcp_dir, ignore_errors=True)
    # this run's segments and checkpoints lie in private directories, removed above; what else appeared
    # in /dev/shm meanwhile (torch's shared memory is unlinked at creation) would be a leak, or another
    # job's segments (ftd.<job>.*: this machine is shared)
    leaked = sorted(n for n in set(os.listdir("/dev/shm")) - before if not n.startswith("ftd."))
    leaked += [str(p) for p in (work, shm, dcp_dir) if p.exists()]
    summary = summarize(ranks, args.modes)
    goals = targets(summary)
    info = ranks[0]["info"]
    header = (f"FSDP2, 2 ranks (gloo, CPU, 1 thread each) on {os.cpu_count()} cores: {info['state_mib']:.0f} MiB of "
              f"parameter shard + AdamW moments per rank ({info['layers']} blocks of width {args.dim}, batch "
              f"{args.batch}); {args.rounds} rounds of {args.steps} measured steps per mode (+{args.warmup} warm-up "
              f"each), order {' '.join(schedule(args.modes, args.rounds))}; DCP: {info['dcp']}.\n"
              f"Other processes kept {cpu.others():.2f} cores busy on average during the run (this machine is shared); "
              f"medians over both ranks' steps, IQR in brackets.")
    text = report(summary, goals, args.modes, header)
    print(text)
    print(f"left behind: {', '.join(leaked) if leaked else 'nothing'} in /dev/shm or the run's directories; "
          f"{len(stray)} stray process(es) of the run killed at the end")
    results = {"command": " ".join([sys.executable] + sys.argv), "ftd": ftd_revision(), "args": vars(args),
               "info": info, "summary": summary, "targets": goals, "leaked": leaked, "stray_processes": stray,
               "other_cores_busy": cpu.others(), "elapsed_s": time.monotonic() - t0, "ranks": ranks}
    path = Path(args.json) if args.json else REPO / "bench-results" / f"bench_fsdp-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"command: {results['command']}\nelapsed: {results['elapsed_s']:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
