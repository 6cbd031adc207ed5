#!/usr/bin/env python3
"""ftd against its peers, side by side in one process: what a checkpoint every step costs the trainer,
and how fast each one puts the state back into the live model.

``.venv/bin/python scripts/bench_peers.py`` (256 MiB, 6 rounds, about 2 minutes; ``--quick``: 2 rounds
of fewer steps, about a minute; ``--size 1G`` for a larger state).

One state for every method (``benchstate``: 8 x ``nn.Linear`` + AdamW after a step, parameters a
third of the bytes), one trainer loop: compute for D (1-thread matmuls standing in for forward and
backward; D = 2x the 1-thread memcpy time of the state, measured at the start, or ``--compute-ms``),
``optimizer.step()``, then the method's checkpoint call. The methods, in ``--rounds`` rounds whose
order alternates (A B C D, then D C B A), so that drift of the host falls on all of them alike:

- ``none``: no checkpoint (the baseline of every step-time ratio);
- ``torch.save``: a synchronous ``torch.save`` of the state dict to /dev/shm every step;
- ``dcp``: ``torch.distributed.checkpoint.async_save`` as torchtitan's ``async_with_pinned_mem`` mode
  runs it (``bench_fsdp_rank.DcpAsyncSave``: ``async_stager=DefaultStager(StagingOptions(shared
  memory, async staging))``, ``async_checkpointer_type=PROCESS``, a gloo group of its own, the
  previous upload awaited before the next save, staging awaited before ``optimizer.step()``),
  writing to /dev/shm, the two newest checkpoints kept; a one-rank gloo group is started for it;
- ``ftd``: ``client.snapshot(step, state)`` every step into a daemon this script starts
  (``benchstate.Daemon``); the optimizer pre-step hook waits if the previous copy still runs.

Per method: **blocked** per checkpoint, the trainer's time in the checkpoint's calls of a step,
every wait included (ftd: ``snapshot()`` + the pre-step hook's wait; DCP: the wait for the previous
upload + ``gc.collect`` + ``async_save()`` + the wait for staging before the optimizer step;
torch.save: the call); **step** time over ``none``'s, ratios of medians over all rounds and the
spread of the per-round ratios; **restore** into the live model and optimizer (a trainer rolling back
in process: every state tensor changed first, then put back, and checked against a digest of the
state that was checkpointed): ftd ``client.restore(state)``; ``torch.load(weights_only=True)`` +
both ``load_state_dict``; ``dcp.load`` of the newest checkpoint through the same Stateful
(``get_state_dict``/``set_state_dict``). Before each timed restore, as much fresh memory as the state
is touched and freed (``benchutil.prefault``: the VM's first-touch noise). Results in
``bench-results/bench_peers-<time>.json``.

Targets (issue 17): ftd's restore >= 3x faster than ``torch.load`` of the same state from /dev/shm
(``scripts/bench_restore.py`` measures it from a fresh process, and against a ``copy_``).
NVIDIA's resiliency extension is not measured: its package pins its own torch build.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from bench_fsdp_rank import DcpAsyncSave, FtdSnapshot, NoCheckpoint  # scripts/bench_fsdp_rank.py
from bench_snapshot import measure_memcpy, warm_up  # scripts/bench_snapshot.py
from benchstate import (  # scripts/benchstate.py
    Daemon,
    GiB,
    MiB,
    client_for,
    compute_for,
    fmt_size,
    full_state_dict,
    median,
    parse_size,
    state_digest,
    trained_state,
)
from benchutil import MALLOC_KEEP, CpuWatch, ftd_revision, ms, prefault, sigterm_to_exit, table, verdict

from ftd.examples.fsdp_trainer import TrainState
from ftd.util.procs import free_ports

METHODS = ("none", "torch.save", "dcp", "ftd")
LABELS = {"none": "no checkpoint", "torch.save": "torch.save to /dev/shm",
          "dcp": "dcp.async_save + DefaultStager", "ftd": "ftd (a snapshot every step)"}
WARMUP = 2                  # untimed steps at the start of every round
TARGET_RESTORE_SPEEDUP = 3.0


class TorchSave(NoCheckpoint):
    """A synchronous ``torch.save`` of the whole state dict to one file every step."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path):
        self.model, self.optimizer, self.path = model, optimizer, path

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        torch.save(full_state_dict(self.model, self.optimizer), self.path)
        return {"torch.save": time.perf_counter() - t}

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- restores into the live model -------------------------------------------------------------------
def restore_torch_save(ckpt: TorchSave, expect_step: int) -> None:
    sd = torch.load(ckpt.path, map_location="cpu", weights_only=True)
    ckpt.model.load_state_dict(sd["model"])
    ckpt.optimizer.load_state_dict(sd["optim"])


def restore_dcp(ckpt: DcpAsyncSave, expect_step: int) -> None:
    import torch.distributed.checkpoint as dcp
    newest = ckpt.folder / f"step-{expect_step}"
    if not newest.is_dir():
        raise RuntimeError(f"DCP's checkpoint of step {expect_step} is not in {ckpt.folder}")
    dcp.load(ckpt.states, checkpoint_id=str(newest))


def restore_ftd(ckpt: FtdSnapshot, expect_step: int) -> None:
    step = ckpt.client.restore(ckpt.state, resume="must")
    if step != expect_step:
        raise RuntimeError(f"ftd restored step {step}, expected {expect_step}")


RESTORES = {"torch.save": restore_torch_save, "dcp": restore_dcp, "ftd": restore_ftd}


def timed_restores(method: str, ckpt: Any, tensors: list[torch.Tensor], model, optimizer, expect_step: int,
                   repeat: int, prefault_bytes: int) -> list[float]:
    """``repeat`` restores of the newest checkpoint into the live state, each after every state tensor
    was changed, each checked against the digest of the state that was checkpointed."""
    digest = state_digest(model, optimizer)  # the state as it was checkpointed: no step ran since
    out = []
    for _ in range(repeat):
        with torch.no_grad():
            for t in tensors:
                t.add_(1)
        prefault(prefault_bytes)
        t0 = time.perf_counter()
        RESTORES[method](ckpt, expect_step)
        out.append(time.perf_counter() - t0)
        if state_digest(model, optimizer) != digest:
            raise RuntimeError(f"{method}'s restore did not bring back the checkpointed state")
    return out


# ---- the trainer loop ---------------------------------------------------------------------------------
def run_round(method: str, ckpt: Any, optimizer: torch.optim.Optimizer, compute_s: float, steps: int,
              first_step: int) -> list[dict]:
    """WARMUP + ``steps`` steps (compute, optimizer step, checkpoint); the checkpoint's waits drained."""
    records = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        compute_for(compute_s)
        parts = ckpt.before_optimizer_step()
        optimizer.step()
        parts.update(ckpt.after_optimizer_step())
        parts.update(ckpt.save(first_step + i))
        if i >= WARMUP:
            records.append({"step_s": time.perf_counter() - t0, "blocked_s": sum(parts.values()), "parts": parts})
    ckpt.drain()
    return records


def init_single_rank_group() -> None:
    """A one-rank gloo world: DCP's PROCESS checkpointer and torchtitan's own group need one."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_ports(1)[0]))
    dist.init_process_group("gloo", rank=0, world_size=1)


# ---- the report ---------------------------------------------------------------------------------------
def summarize(records: dict[str, list[list[dict]]], restores: dict[str, list[float]]) -> dict:
    step = {m: median([r["step_s"] for rnd in records[m] for r in rnd]) for m in METHODS}
    out: dict = {}
    for m in METHODS:
        per_round = [median([r["step_s"] for r in rnd]) / median([r["step_s"] for r in base])
                     for rnd, base in zip(records[m], records["none"])]
        parts: dict[str, list[float]] = {}
        for rnd in records[m]:
            for r in rnd:
                for k, v in r["parts"].items():
                    parts.setdefault(k, []).append(v)
        out[m] = {"step_s": step[m], "step_ratio": step[m] / step["none"],
                  "step_ratio_rounds": [min(per_round), max(per_round)],
                  "blocked_s": median([r["blocked_s"] for rnd in records[m] for r in rnd]),
                  "blocked_parts_s": {k: median(v) for k, v in parts.items()},
                  "restore_s": median(restores[m]) if restores.get(m) else None}
    for m in METHODS[1:]:
        o = out[m]
        o["blocked_vs_ftd"] = o["blocked_s"] / out["ftd"]["blocked_s"] if m != "ftd" else 1.0
        o["overhead_vs_ftd"] = (o["step_ratio"] - 1) / (out["ftd"]["step_ratio"] - 1) \
            if m != "ftd" and out["ftd"]["step_ratio"] > 1 else None
        o["restore_vs_ftd"] = o["restore_s"] / out["ftd"]["restore_s"]
    return out


def report(s: dict, state_bytes: int, compute_s: float, rounds: int, steps: int) -> list[str]:
    rows = []
    for m in METHODS:
        o = s[m]
        lo, hi = o["step_ratio_rounds"]
        rows.append([LABELS[m], "-" if m == "none" else f"{ms(o['blocked_s'])} ms",
                     f"{ms(o['step_s'])} ms", f"{o['step_ratio']:.2f}x ({lo:.2f}-{hi:.2f})",
                     "-" if o["restore_s"] is None else f"{ms(o['restore_s'])} ms",
                     "-" if m in ("none", "ftd") else f"{o['blocked_vs_ftd']:.0f}x",
                     "-" if m in ("none", "ftd") or o["overhead_vs_ftd"] is None else f"{o['overhead_vs_ftd']:.1f}x",
                     "-" if m in ("none", "ftd") else f"{o['restore_vs_ftd']:.2f}x"])
    lines = [f"state {state_bytes / MiB:.0f} MiB (model + AdamW), compute D = {ms(compute_s)} ms per step, "
             f"{rounds} rounds x {steps} steps per method, torch threads {torch.get_num_threads()}", "",
             table(["method", "blocked/ckpt", "step", "step vs none (rounds)", "restore (live)",
                    "blocked vs ftd", "step overhead vs ftd", "restore vs ftd"], rows), ""]
    for m in METHODS[1:]:
        lines.append(f"{m} blocked: " + ", ".join(f"{k} {ms(v)} ms" for k, v in s[m]["blocked_parts_s"].items()))
    speedup = s["torch.save"]["restore_s"] / s["ftd"]["restore_s"]
    lines.append(f"target: ftd restore >= {TARGET_RESTORE_SPEEDUP:g}x faster than torch.load from /dev/shm: "
                 f"{speedup:.2f}x, {verdict(speedup >= TARGET_RESTORE_SPEEDUP)}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M", help="model + AdamW state (256M, 1G)")
    p.add_argument("--rounds", type=int, default=6, help="rounds; the order alternates A B C D, D C B A")
    p.add_argument("--steps", type=int, default=15, help="measured steps per method and round")
    p.add_argument("--restores", type=int, default=3, help="timed restores per method and round")
    p.add_argument("--compute-ms", type=float, default=None, help="D; default 2x the 1-thread memcpy time")
    p.add_argument("--dcp-type", choices=("process", "thread"), default="process",
                   help="DCP's async checkpointer (torchtitan: process)")
    p.add_argument("--malloc", choices=("keep", "default"), default="keep",
                   help="keep: glibc's heap trimming and mmap threshold off (benchutil.MALLOC_KEEP; the script "
                        "starts itself again with them), as bench_busy_host.py; default: glibc as it comes")
    p.add_argument("--quick", action="store_true", help="2 rounds of 6 steps, 1 restore each")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "bench-results"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.restores = 2, 6, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.malloc == "keep" and any(os.environ.get(k) != v for k, v in MALLOC_KEEP.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_KEEP})
    signal.signal(signal.SIGTERM, sigterm_to_exit)  # stopped: the daemon, the files in /dev/shm go too
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # DefaultStager without CUDA: said in the doc
    torch.set_num_threads(1)
    t_start = time.monotonic()
    cpu = CpuWatch()
    nbytes = parse_size(args.size)
    spec, model, optimizer, tensors, state_bytes = trained_state(nbytes)
    compute_s = args.compute_ms / 1e3 if args.compute_ms is not None else 2 * median(measure_memcpy(tensors, 3, 1))
    print(f"{fmt_size(nbytes)}: {state_bytes / MiB:.0f} MiB of state in {len(tensors)} tensors, D = "
          f"{ms(compute_s)} ms", flush=True)
    init_single_rank_group()
    state = {"model": model, "optim": optimizer}
    records: dict[str, list[list[dict]]] = {m: [] for m in METHODS}
    restores: dict[str, list[float]] = {m: [] for m in METHODS}
    ckpts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ftd-bench-peers-") as work, \
            tempfile.TemporaryDirectory(prefix="ftd-bench-peers-", dir="/dev/shm") as shm_dir, \
            Daemon(Path(work) / "daemon", f"{max(1, 3 * state_bytes // GiB + 1)}GiB") as daemon, \
            client_for(daemon) as client:
        try:
            client.restore(state, resume="never")
            warm_up(client, model, optimizer)
            ckpts = {"none": NoCheckpoint(), "torch.save": TorchSave(model, optimizer, Path(shm_dir) / "state.pt"),
                     "dcp": DcpAsyncSave({"train": TrainState(model, optimizer)}, Path(shm_dir) / "dcp",
                                         args.dcp_type == "process", keep_latest=2),
                     "ftd": FtdSnapshot(client, state)}
            step = 100
            for r in range(args.rounds):
                for m in METHODS if r % 2 == 0 else METHODS[::-1]:
                    gc.collect()
                    records[m].append(run_round(m, ckpts[m], optimizer, compute_s, args.steps, step))
                    step += WARMUP + args.steps
                    if m != "none":
                        restores[m] += timed_restores(m, ckpts[m], tensors, model, optimizer, step - 1,
                                                      args.restores, state_bytes)
                    rnd = records[m][-1]
                    print(f"round {r + 1} {m}: step {ms(median([x['step_s'] for x in rnd]))} ms, blocked "
                          f"{ms(median([x['blocked_s'] for x in rnd]))} ms"
                          + (f", restore {ms(restores[m][-1])} ms" if restores[m] else ""), flush=True)
            counts = ckpts["ftd"].counts()
            dcp_info = ckpts["dcp"].describe()
        finally:
            for c in ckpts.values():
                c.close()
            dist.destroy_process_group()
    s = summarize(records, restores)
    lines = report(s, state_bytes, compute_s, args.rounds, args.steps)
    results = {"command": " ".join([sys.executable] + sys.argv), "ftd": ftd_revision(), "args": vars(args),
               "state_bytes": state_bytes, "compute_s": compute_s, "dcp": dcp_info, "ftd_counts": counts,
               "other_processes_cores": cpu.others(), "summary": s, "records": records, "restores_s": restores}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    path = out / f"bench_peers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print("\n" + "\n".join(lines))
    print(f"dcp: {dcp_info}\nftd: {counts}\nother processes kept {cpu.others():.2f} cores busy\n"
          f"command: {results['command']}\nelapsed: {time.monotonic() - t_start:.0f} s\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
