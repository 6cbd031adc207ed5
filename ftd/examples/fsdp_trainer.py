"""A small model trained with FSDP2 (``fully_shard``), HSDP or FSDP + tensor parallel, snapshotted by ftd.

Parameters and AdamW moments are DTensors: each rank snapshots its own shards. The state is handed
over either as the objects (``--style objects``: ``{"model": model, "optim": opt}``) or the way
torchtitan and torch.distributed.checkpoint do (``--style stateful``: a Stateful built on
``get_state_dict``/``set_state_dict``). Each step's loss is appended to --out/losses-rank{R}.txt as
"step float.hex()" *before* the snapshot, so a step re-run after a crash writes its loss again.

    torchrun --nproc-per-node 2 -m ftd.examples.fsdp_trainer --out /tmp/run          # with `ftd daemon`
    torchrun --nproc-per-node 4 -m ftd.examples.fsdp_trainer --mesh hsdp --out /tmp/run
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ftd
from ftd.util.lines import say


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ftd.examples.fsdp_trainer", description=__doc__.split("\n")[0])
    p.add_argument("--mesh", choices=("fsdp", "hsdp", "fsdp_tp"), default="fsdp",
                   help="fsdp: 1-D mesh; hsdp: (replicate 2, shard N/2); fsdp_tp: (dp N/2, tp 2)")
    p.add_argument("--style", choices=("objects", "stateful"), default="objects")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    p.add_argument("--crash-rank", type=int, default=-1, help="in the first attempt, this rank SIGKILLs itself...")
    p.add_argument("--crash-at", type=int, default=-1, help="... right after snapshotting this step")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--no-ftd", action="store_true", help="reference run without snapshots")
    p.add_argument("--no-finish", action="store_true", help="end without finish(): a rerun resumes the last step")
    p.add_argument("--save-full", action="store_true",
                   help="after each step, rank 0 writes the gathered full state to --out/full-step<S>.pt")
    p.add_argument("--dump-restored", action="store_true",
                   help="after restore(), rank 0 writes the gathered full state to --out/restored-<attempt>.pt")
    p.add_argument("--load-dcp", metavar="DIR",
                   help="instead of training: plain dcp.load of DIR into this job, then as --dump-restored")
    return p.parse_args(argv)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.down(torch.relu(self.up(x))))


def make_model(args: argparse.Namespace) -> nn.Module:
    """The model before it is sharded (also what an unsharded load of a checkpoint builds)."""
    torch.manual_seed(args.seed)
    return nn.Sequential(*[Block(args.dim) for _ in range(args.layers)], nn.Linear(args.dim, 1))


def build(args: argparse.Namespace, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = make_model(args)
    if args.mesh == "fsdp":
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("shard",))
    elif args.mesh == "hsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        full = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        for block in model[:-1]:
            parallelize_module(block, full["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
        mesh = full["dp"]
    for block in model[:-1]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.7)
    return model, optimizer, scheduler


class TrainState:
    """The torchtitan / DCP way: a Stateful over get_state_dict / set_state_dict (FQN-keyed)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def save_full(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The whole model and optimizer, gathered (FQN-keyed, as get_state_dict gives them), on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"model": model_sd, "optim": optim_sd}, path)


def load_plain_dcp(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What a user without ftd does with a flushed version: dcp.load it into the job (any world size)."""
    import torch.distributed.checkpoint as dcp
    key = "train" if args.style == "stateful" else None
    train = TrainState(model, optimizer)
    if key:
        dcp.load({key: train}, checkpoint_id=args.load_dcp)
    else:  # the objects style keeps the model under "model" (the optimizer by parameter index: not loaded)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
        sd = {"model": get_model_state_dict(model)}
        dcp.load(sd, checkpoint_id=args.load_dcp)
        set_model_state_dict(model, sd["model"])


def leave_process_group() -> None:
    """All ranks leave together, so none destroys its group while a peer is still in a collective
    (rank 0 gathering the full state)."""
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, scheduler = build(args, world)
    # each data-parallel rank its own batches (the two ranks of a tensor-parallel pair see the same ones)
    data_rank = rank // 2 if args.mesh == "fsdp_tp" else rank
    data = torch.Generator().manual_seed(args.seed + 1000 * data_rank)
    progress = {"samples": 0}
    if args.style == "objects":
        state = {"model": model, "optim": optimizer, "sched": scheduler, "data": data, "progress": progress}
    else:
        state = {"train": TrainState(model, optimizer), "sched": scheduler, "data": data, "progress": progress}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.load_dcp:
        load_plain_dcp(args, model, optimizer)
        save_full(model, optimizer, out / f"restored-{attempt}.pt")
        leave_process_group()
        return 0
    client = None if args.no_ftd else ftd.Client()
    start = client.restore(state) if client else None
    if args.dump_restored:
        save_full(model, optimizer, out / f"restored-{attempt}.pt")
    say(f"rank {rank} pid {os.getpid()}: " + (f"resuming after step {start}" if start is not None else "starting fresh"))
    fd = os.open(out / f"losses-rank{rank}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    first_attempt = attempt == 0
    for step in range(0 if start is None else start + 1, args.steps):
        x = torch.randn(args.batch, args.dim, generator=data)
        y = x[:, :1].sin()
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress["samples"] += args.batch
        value = loss.detach()
        dist.all_reduce(value)  # every rank logs the same global loss
        os.write(fd, f"{step} {value.item().hex()}\n".encode())
        if client:
            client.snapshot(step, state)
        if args.save_full:
            save_full(model, optimizer, out / f"full-step{step}.pt")
        if first_attempt and rank == args.crash_rank and step == args.crash_at:
            client.wait(10)
            os.kill(os.getpid(), signal.SIGKILL)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    os.close(fd)
    if client:
        client.close() if args.no_finish else client.finish()
    leave_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is done (the client finished or closed, the process group left), and torch 2.13's gloo
    # can still abort in the interpreter's teardown ("terminate called without an active exception",
    # SIGABRT: 1 run in 20 here, with or without ftd), which torchrun counts as the job failing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
