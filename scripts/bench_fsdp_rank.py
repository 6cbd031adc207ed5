"""One rank of ``scripts/bench_fsdp.py`` (torchrun starts two; not run by hand).

    torchrun --nproc-per-node 2 scripts/bench_fsdp_rank.py PLAN.json

Builds ``ftd.examples.fsdp_trainer``'s FSDP2 model, then trains through the plan's rounds, each with
one way of checkpointing every step, and writes every step's times to ``<out>/rank<R>.json``.
"""
from __future__ import annotations

import gc
import json
import queue
import re
import shutil
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ftd
from ftd.examples import fsdp_trainer


class NoCheckpoint:
    def before_optimizer_step(self) -> dict:
        return {}

    def after_optimizer_step(self) -> dict:
        return {}

    def save(self, step: int) -> dict:
        return {}

    def background(self) -> dict:
        return {}

    def drain(self) -> None:
        pass

    def close(self) -> None:
        pass


class FtdSnapshot(NoCheckpoint):
    """``client.snapshot(step, state)`` after every optimizer step; the pre-step hook's wait is read from
    the client's own counter (it runs inside ``optimizer.step()``)."""

    COUNTS = ("snapshots", "committed", "skipped_busy", "skipped_setup", "skipped_protecting", "failed")

    def __init__(self, client: ftd.Client, state: dict):
        self.client, self.state = client, state
        self._hook0 = 0.0

    def before_optimizer_step(self) -> dict:
        self._hook0 = self.client.stats["hook_wait_seconds"]
        return {}

    def after_optimizer_step(self) -> dict:
        return {"pre-step wait": self.client.stats["hook_wait_seconds"] - self._hook0}

    def save(self, step: int) -> dict:
        t = time.perf_counter()
        self.client.snapshot(step, self.state)
        return {"snapshot()": time.perf_counter() - t}

    def background(self) -> dict:
        return {"copy_s": self.client.stats["last_copy_seconds"]}

    def counts(self) -> dict:
        return {k: self.client.stats[k] for k in self.COUNTS}

    def drain(self) -> None:
        self.client.wait(120)


class DcpAsyncSave(NoCheckpoint):
    """torchtitan 0.3.0's DCPCheckpointManager with ``async_mode = "async_with_pinned_mem"``
    (``torchtitan/components/checkpointer/dcp.py``: ``__init__``, ``_save``, ``dcp_save``,
    ``_maybe_wait_for_staging``, ``_purge_stale_checkpoints``), as it runs when it saves every step."""

    def __init__(self, states: dict, folder: Path, process: bool, keep_latest: int):
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
        self.states, self.folder, self.keep_latest = states, folder, keep_latest
        self.kind = AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
        self.pg = dist.new_group(backend="gloo")  # torchtitan: async saves get a gloo group of their own
        self.stager = None
        self.staging_future = self.save_future = None
        self.purge_queue: queue.Queue = queue.Queue()
        self.purger = threading.Thread(target=self._purge_loop, daemon=True)
        self.purger.start()
        self._bg: dict = {"staging_s": None, "upload_s": None}

    def before_optimizer_step(self) -> dict:  # maybe_wait_for_staging(), right before optimizers.step()
        t = time.perf_counter()
        if self.staging_future is not None:
            self.staging_future.result()
            self.staging_future = None
        return {"staging wait": time.perf_counter() - t}

    def save(self, step: int) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        t0 = time.perf_counter()
        if self.save_future is not None:  # maybe_wait_for_saving(): the previous upload
            self.save_future.result()
            self.save_future = None
        t1 = time.perf_counter()
        gc.collect(1)  # GarbageCollection.collect("GC collection invoked by checkpointer.")
        if self.stager is None:
            # torchtitan passes use_non_blocking_copy=True, which DefaultStager refuses without an accelerator
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=True,
                                                       use_async_staging=True,
                                                       use_non_blocking_copy=torch.accelerator.is_available()))
        t2 = time.perf_counter()
        result = dcp.async_save(self.states, checkpoint_id=str(self.folder / f"step-{step}"), process_group=self.pg,
                                async_checkpointer_type=self.kind, async_stager=self.stager)
        self.staging_future, self.save_future = result.staging_completion, result.upload_completion
        self._time_background(t2)
        self._purge_stale()
        return {"upload wait": t1 - t0, "gc.collect": t2 - t1, "async_save()": time.perf_counter() - t2}

    def _time_background(self, issued: float) -> None:
        def done(key: str):
            return lambda _: self._bg.__setitem__(key, time.perf_counter() - issued)
        self.staging_future.add_done_callback(done("staging_s"))
        self.save_future.add_done_callback(done("upload_s"))

    def background(self) -> dict:
        return dict(self._bg)

    def _purge_stale(self) -> None:  # keep_latest_k: rank 0 queues the older step-N folders
        if self.keep_latest <= 0 or dist.get_rank() != 0 or not self.folder.is_dir():
            return
        found = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := re.search(r"step-(\d+)", p.name)))
        for _, path in found[:-self.keep_latest]:
            self.purge_queue.put(path)

    def _purge_loop(self) -> None:
        while (path := self.purge_queue.get()) is not None:
            shutil.rmtree(path, ignore_errors=True)

    def drain(self) -> None:
        self.before_optimizer_step()
        if self.save_future is not None:
            self.save_future.result()
            self.save_future = None

    def describe(self) -> str:
        st = self.stager._state_dict_stager if self.stager is not None else None
        pinned = "?" if st is None else "on" if st.pin_memory else "requested, off (StateDictStager ignores it without CUDA)"
        return (f"{self.kind.value} checkpointer, pinned memory {pinned}, shared memory on, async staging on, "
                f"non-blocking copy {'on' if torch.accelerator.is_available() else 'off (no accelerator)'}, "
                f"writes to {self.folder}, keep_latest_k {self.keep_latest}")

    def close(self) -> None:
        self.drain()
        if self.stager is not None:
            self.stager.close()
        self.purge_queue.put(None)
        self.purger.join(60)


def local_state_bytes(model: nn.Module) -> int:
    """This rank's shard of the parameters, times 3 (AdamW's two moments)."""
    return 3 * sum(p.to_local().numel() * p.element_size() for p in model.parameters())


def run_round(mode: str, ckpt: NoCheckpoint, rnd: int, plan: dict, train: dict, first_step: int) -> list[dict]:
    model, optimizer, scheduler, data = train["model"], train["optim"], train["sched"], train["data"]
    dim, batch = plan["dim"], plan["batch"]
    records = []
    for i in range(plan["warmup"] + plan["steps"]):
        t0 = time.perf_counter()
        x = torch.randn(batch, dim, generator=data)
        loss = nn.functional.mse_loss(model(x), x[:, :1].sin())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c0 = time.thread_time()
        parts = ckpt.before_optimizer_step()
        c1 = time.thread_time()
        optimizer.step()
        scheduler.step()
        parts.update(ckpt.after_optimizer_step())
        c2 = time.thread_time()
        parts.update(ckpt.save(first_step + i))
        cpu = (c1 - c0) + (time.thread_time() - c2)  # this thread's CPU in the checkpoint's calls
        step_s = time.perf_counter() - t0
        records.append({"mode": mode, "round": rnd, "i": i, "warmup": i < plan["warmup"], "step_s": step_s,
                        "blocked_s": sum(parts.values()), "blocked_cpu_s": cpu, "parts": parts,
                        "background": ckpt.background()})
    ckpt.drain()
    dist.barrier()
    return records


def main(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")  # said once, in the report
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    args = fsdp_trainer.parse_args(["--out", plan["out"], "--dim", str(plan["dim"]), "--layers", str(plan["layers"]),
                                    "--batch", str(plan["batch"])])
    model, optimizer, scheduler = fsdp_trainer.build(args, world)
    train = {"model": model, "optim": optimizer, "sched": scheduler,
             "data": torch.Generator().manual_seed(args.seed + 1000 * rank)}
    stateful = {"train": fsdp_trainer.TrainState(model, optimizer), "sched": scheduler}
    client = ftd.Client(verbose=False) if {"ftd", "ftd-sd"} & set(plan["modes"]) else None
    ckpts: dict[str, Any] = {"none": NoCheckpoint()}
    if client:
        ckpts["ftd"] = FtdSnapshot(client, {"model": model, "optim": optimizer, "sched": scheduler})
        ckpts["ftd-sd"] = FtdSnapshot(client, stateful)
    if "dcp" in plan["modes"]:
        ckpts["dcp"] = DcpAsyncSave(stateful, Path(plan["dcp_dir"]), plan["dcp_type"] == "process", plan["keep_latest"])
    steps: list[dict] = []
    counts: dict[str, list[dict]] = {}
    step = 0
    for rnd, mode in enumerate(plan["modes"]):
        ckpt = ckpts[mode]
        before = ckpt.counts() if isinstance(ckpt, FtdSnapshot) else None
        steps += run_round(mode, ckpt, rnd, plan, train, step)
        step += plan["warmup"] + plan["steps"]
        if before is not None:
            counts.setdefault(mode, []).append({k: v - before[k] for k, v in ckpt.counts().items()})
    info = {"rank": rank, "layers": plan["layers"], "state_mib": local_state_bytes(model) / 2**20,
            "dcp": ckpts["dcp"].describe() if "dcp" in ckpts else "not run"}
    for ckpt in ckpts.values():
        ckpt.close()
    if client:
        client.finish()
    Path(plan["out"], f"rank{rank}.json").write_text(json.dumps({"info": info, "steps": steps, "extra": counts}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
