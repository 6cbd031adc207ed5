"""A small trainer that uses ftd the way a real one would; the demo and the tests run it.

A MLP with BatchNorm and dropout, AdamW and a step LR schedule, on synthetic data drawn from the
global torch, numpy and python RNGs (so a restore is only bit-exact if every RNG state and the
BatchNorm statistics come back). Each step's loss is appended to --losses as "step float.hex()"
*before* the snapshot, so a step re-run after a crash writes its loss again and the two must match.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn

import ftd
from ftd.util.lines import say


def build(width: int, depth: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    layers: list[nn.Module] = [nn.Linear(32, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1)]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1)]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.8)
    return model, optimizer, scheduler


def batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 32)
    noise = float(np.random.uniform(0.0, 0.1)) * random.random()
    y = (x[:, :4].sum(dim=1, keepdim=True).sin() + noise * torch.randn(size, 1))
    return x, y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--losses", required=True, help="file to append 'step loss.hex()' lines to")
    p.add_argument("--no-ftd", action="store_true", help="reference run without snapshots")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (stands in for a bigger model)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stats", help="write the ftd client's counters (client.stats) to this JSON file at the end")
    p.add_argument("--finish", action="store_true",
                   help="end with client.finish(): the run is over, a rerun starts afresh (default: close(), as a "
                        "run to be extended later)")
    p.add_argument("--resume", default="auto", choices=("auto", "never", "must"), help="restore(state, resume=...)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model, optimizer, scheduler = build(args.width, args.depth)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "meta": {"samples_seen": 0}}

    client = None if args.no_ftd else ftd.Client()
    start = client.restore(state, resume=args.resume) if client else None
    first = 0 if start is None else start + 1
    say(f"trainer pid {os.getpid()}: {'resuming after step ' + str(start) if start is not None else 'starting fresh'}")
    fd = os.open(args.losses, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    loss_fn = nn.MSELoss()
    for step in range(first, args.steps):
        model.train()
        x, y = batch()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["meta"]["samples_seen"] += x.shape[0]
        os.write(fd, f"{step} {loss.item().hex()}\n".encode())
        say(f"step {step:4d}  loss {loss.item():.6f}")
        if client:
            client.snapshot(step, state)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    os.close(fd)
    if client:
        client.close(finished=args.finish)
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump(client.stats, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
