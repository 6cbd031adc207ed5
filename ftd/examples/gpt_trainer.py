"""A small GPT-like character model trained with DDP over gloo, snapshotted by ftd after every step.

It exists so that the demo and the agent tests run a trainer shaped like a real one: several ranks
launched by torchrun (or the ftd agent), a transformer with dropout, AdamW with a warmup schedule,
batches drawn from each rank's own RNG, and a restore that is bit-exact only if ftd brings back
every part of the state (weights, moments, scheduler, counters and RNG states). Each step's loss is
appended to --out/losses-rank{R}.txt *before* the snapshot, so a step re-run after a crash writes
its loss again and the two must match.

    torchrun --nproc-per-node 2 -m ftd.examples.gpt_trainer --out /tmp/run    # with `ftd daemon` running
    python -m ftd.examples.gpt_trainer --no-ftd --out /tmp/ref                # a reference run, no ftd
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ftd
from ftd.examples.corpus import TEXT, VOCAB, encode
from ftd.trainer.ddp import ordered_allreduce_hook
from ftd.util.timeline import mark
from ftd.util.lines import say


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ftd.examples.gpt_trainer",
                                description="A character-level GPT trained with DDP (gloo) and snapshotted by ftd.")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64, help="tokens per training window")
    p.add_argument("--batch", type=int, default=16, help="windows per rank and step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (after warmup)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=1234, help="model init; each rank's data RNG uses seed + 1000*rank")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (stands in for a bigger model)")
    p.add_argument("--pg-timeout", type=float, default=60.0, help="seconds before a gloo collective gives up")
    p.add_argument("--out", default="gpt-trainer-out", help="directory for losses-rank{R}.txt and stats-rank{R}.json")
    p.add_argument("--allreduce", choices=("ordered", "ring"), default="ordered",
                   help="DDP gradient averaging: 'ordered' sums in rank order (bit-exact after a restore, see "
                        "ftd/ddp.py), 'ring' is DDP's default (equal only to the last bits with 3+ ranks)")
    p.add_argument("--save-final", help="rank 0 writes torch.save({'model', 'optim'} state dicts) here at the end")
    p.add_argument("--no-ftd", action="store_true", help="reference run without snapshots")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    return args


# ---- model -------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, layers: int, dim: int, heads: int, dropout: float):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(args: argparse.Namespace) -> tuple[GPT, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The model (initialised from --seed, the same on every rank), AdamW and a warmup-then-cosine schedule."""
    torch.manual_seed(args.seed)
    model = GPT(len(VOCAB), args.context, args.layers, args.dim, args.heads, args.dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return model, optimizer, scheduler


def get_batch(data: torch.Tensor, context: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the corpus, drawn from the global torch RNG (so its state is part of the run)."""
    starts = torch.randint(len(data) - context - 1, (batch,))
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts.tolist()])
    return x, y


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def state_bytes(state: dict) -> int:
    """Bytes of the state's tensors: model parameters and buffers, and the optimizer's state."""
    total = sum(t.numel() * t.element_size() for t in state["model"].state_dict().values())
    for per_param in state["optim"].state.values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def save_load_seconds(state: dict, directory: str | os.PathLike) -> tuple[float, float]:
    """Seconds for a synchronous torch.save (with fsync) of the state to a file in ``directory`` and
    for a torch.load (weights_only) of it back: the disk checkpoint ftd is compared with."""
    payload = {k: v.state_dict() if callable(getattr(v, "state_dict", None)) else v for k, v in state.items()}
    path = Path(directory) / f"gpt-trainer-{os.getpid()}.pt"
    try:
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.load(path, weights_only=True)
        load_s = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
    return save_s, load_s


# ---- training --------------------------------------------------------------------------------------
def _train(args, net, optimizer, scheduler, state, client, data, fd: int, first: int) -> float:
    """Steps ``first``..``--steps``-1, a loss line and a snapshot each; returns the seconds they took."""
    t0 = time.perf_counter()
    for step in range(first, args.steps):
        net.train()
        x, y = get_batch(data, args.context, args.batch)
        loss = F.cross_entropy(net(x).view(-1, len(VOCAB)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        state["progress"]["tokens_seen"] += x.numel()  # a plain dict: restore() refills it in place
        value = loss.item()
        os.write(fd, f"{step} {value.hex()}\n".encode())
        if step == first:
            mark("first_step", step=step)  # before the log line: whoever sees that line finds the mark
        say(f"step {step:4d}  loss {value:.4f}")
        if client:
            client.snapshot(step, state)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    mark("imported")  # the timeline of a restart (ftd/util/timeline.py; where $FTD_TIMELINE is set)
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.pg_timeout))
        mark("pg_joined")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, optimizer, scheduler = build(args)
    seed_all(args.seed + 1000 * rank)
    state = {"model": model, "optim": optimizer, "sched": scheduler, "progress": {"tokens_seen": 0}}
    client = None if args.no_ftd else ftd.Client()
    start = client.restore(state) if client else None  # before DDP wraps the model
    mark("restored", step=start)
    first = 0 if start is None else start + 1
    say(f"rank {rank} pid {os.getpid()}: " + ("starting fresh" if start is None else f"resuming after step {start}"))
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
        # sum the ranks' gradients in rank order: bit-exact with an uninterrupted run (see ftd/ddp.py)
        if args.allreduce == "ordered":
            net.register_comm_hook(None, ordered_allreduce_hook)
        mark("ddp_ready")  # DDP's constructor broadcasts the parameters: every rank waits for the slowest

    data = torch.tensor(encode(TEXT), dtype=torch.long)
    fd = os.open(out / f"losses-rank{rank}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        loop_seconds = _train(args, net, optimizer, scheduler, state, client, data, fd, first)
    except Exception:
        mark("failed")  # a peer is gone (or anything else): the time until this process exits is teardown
        raise
    os.close(fd)

    if client:
        client.finish()  # the run is over: a rerun of this command starts afresh
    stats = dict(client.stats if client else {}, state_bytes=state_bytes(state),
                 params=sum(p.numel() for p in model.parameters()), steps_run=max(0, args.steps - first),
                 loop_seconds=loop_seconds, rank=rank, world=world)
    (out / f"stats-rank{rank}.json").write_text(json.dumps(stats, indent=1) + "\n")
    if args.save_final and rank == 0:
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, args.save_final)
    # Free DDP's reducer (and the gloo work it holds) while the process group is alive: else the
    # process sometimes aborts at exit ("terminate called without an active exception").
    del net
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
