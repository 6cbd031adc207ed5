"""A small 2-rank trainer for the replica tests' edge cases (run as a script, ranks from $RANK/$WORLD_SIZE).

--by-hand: no DDP; the ranks keep their replicas equal themselves (the same seed, the gradients
  all-reduced in rank order) and declare it with ``ftd.Client(replicas=group)``.
--mismatch (with --by-hand; DDP itself refuses such models): rank 1's model has another width, so the
  replica set disagrees on the replicated tensors (and the gradients are not averaged).
Writes "step loss.hex()" lines to --out/losses-rank{R}.txt, and prints each snapshot's outcome.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import ftd
from ftd.util.lines import say


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--by-hand", action="store_true")
    p.add_argument("--mismatch", action="store_true")
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    torch.manual_seed(0)
    width = 24 if args.mismatch and rank == 1 else 16
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = {"model": model, "optim": opt, "seen": {"samples": 0}}
    client = ftd.Client(replicas=dist.group.WORLD if args.by_hand else None)
    start = client.restore(state)
    say(f"rank {rank}: " + ("starting fresh" if start is None else f"resuming after step {start}"))
    net = model if args.by_hand else nn.parallel.DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(0 if start is None else start + 1):
        torch.randn(4, 8, generator=gen)
    out = open(os.path.join(args.out, f"losses-rank{rank}.txt"), "a")
    for step in range(0 if start is None else start + 1, args.steps):
        x = torch.randn(4, 8, generator=gen)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if args.by_hand and not args.mismatch:  # what DDP would do, in rank order (bit-exact whatever the restarts)
            for prm in model.parameters():
                got = [torch.empty_like(prm.grad) for _ in range(world)]
                dist.all_gather(got, prm.grad)
                prm.grad.copy_(sum(got[1:], got[0]) / world)
        opt.step()
        state["seen"]["samples"] += 4
        out.write(f"{step} {loss.item().hex()}\n")
        out.flush()
        client.snapshot(step, state)
        ok = client.wait(30)
        say(f"rank {rank} step {step}: snapshot {'committed' if ok else 'not committed'}")
        time.sleep(args.step_sleep)
    say("replicas " + json.dumps(client.stats["replicas"]))
    client.finish()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
