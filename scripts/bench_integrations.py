"""What the framework integrations cost a trainer: step time, and time blocked per snapshot, side by side.

One process, one private daemon; the runs of each framework alternate (forward, then reverse order)
so the machine's noise hits them alike.

Lightning (``--framework lightning``): a LightningModule of --mib MiB of Linear parameters plus
AdamW; modes: no ftd, ``FtdCallback``, and ``FtdCallback`` with the wait before the forward pass
(``run_closure_first`` off: ftd's pre-step hook then waits inside ``optimizer.step(closure)`` before
Lightning's closure runs forward and backward, so the copy overlaps nothing).

Hugging Face (``--framework transformers``): a GPT-2 from a config (n_embd 512, 6 layers, about
76 MiB of parameters plus AdamW); modes: no checkpoint, ``FtdTrainerCallback``, and the Trainer's
own checkpoint every step (``save_steps=1`` into a temporary directory on disk, ``save_total_limit=1``).

    .venv/bin/python scripts/bench_integrations.py --mib 64 --steps 40 --repeat 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from benchutil import private_daemon
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


# ---- Lightning ------------------------------------------------------------------------------------
def lightning_run(mode: str, mib: int, steps: int) -> dict:
    import lightning.pytorch as pl

    from ftd.integrations import lightning as ftd_lightning

    class Wide(pl.LightningModule):
        def __init__(self):
            super().__init__()
            width = 1024
            self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(max(1, (mib << 20) // (4 * width * width)))])
            self.times: list[float] = []

        def training_step(self, batch, batch_idx):
            self.times.append(time.perf_counter())
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    model, callbacks, stats = Wide(), [], {}
    saved = set(ftd_lightning.CLOSURE_ONCE)
    if mode != "none":
        if mode == "ftd, wait before forward":
            ftd_lightning.CLOSURE_ONCE.clear()

        class Keep(ftd_lightning.FtdCallback):
            def teardown(self, trainer, pl_module, stage):
                stats.update(self.client.stats)
                super().teardown(trainer, pl_module, stage)
        callbacks.append(Keep(restore=False))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    try:
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(steps * 32, 1024)), batch_size=32))
    finally:
        ftd_lightning.CLOSURE_ONCE.update(saved)
    return result(model.times, stats)


# ---- Hugging Face -----------------------------------------------------------------------------------
def transformers_run(mode: str, steps: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from ftd.integrations.transformers import FtdTrainerCallback

    times: list[float] = []
    stats: dict = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    class Keep(FtdTrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            stats.update(self.client.stats)
            super().on_train_end(args, state, control, **kwargs)

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=1024, n_positions=64))
    ids = torch.randint(0, 1024, (steps * 4, 64))
    data = [{"input_ids": x, "labels": x} for x in ids]
    with tempfile.TemporaryDirectory(prefix="ftd-bench-hf-", dir="/tmp") as out:
        own = mode == "Trainer checkpoint every step"
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps, use_cpu=True,
                                 report_to=[], logging_strategy="no", disable_tqdm=True,
                                 save_strategy="steps" if own else "no", save_steps=1, save_total_limit=1)
        callbacks = [Clock()] + ([Keep()] if mode == "ftd" else [])
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return result(times, stats)


def result(times: list[float], stats: dict) -> dict:
    steps = [b - a for a, b in zip(times, times[1:])][5:]  # after the buffers are set up
    out = {"step_ms": 1000 * statistics.median(steps)}
    if stats:
        out["blocked_ms"] = 1000 * (stats["snapshot_seconds"] + stats["hook_wait_seconds"]) / max(1, stats["snapshots"])
        out["committed"] = f"{stats['committed']}/{stats['snapshots']}"
    return out


def report(title: str, modes: list[str], results: dict[str, list[dict]]) -> None:
    base = statistics.median(x["step_ms"] for x in results[modes[0]])
    print(title)
    print(f"  {'mode':<32}{'step (median)':>14}{'vs first':>10}{'blocked/snapshot':>18}{'committed':>11}")
    for m in modes:
        step = statistics.median(x["step_ms"] for x in results[m])
        blocked = [x["blocked_ms"] for x in results[m] if "blocked_ms" in x]
        shown = f"{statistics.median(blocked):.1f} ms" if blocked else "-"
        print(f"  {m:<32}{step:>11.1f} ms{step / base:>9.2f}x{shown:>18}{results[m][-1].get('committed', '-'):>11}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--framework", choices=("lightning", "transformers", "both"), default="both")
    p.add_argument("--mib", type=int, default=64, help="Lightning model size")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    plans = []
    if args.framework in ("lightning", "both"):
        plans.append((f"Lightning: {args.mib} MiB of parameters (+ AdamW moments), {args.steps} steps, {args.repeat} runs each",
                      ["none", "ftd", "ftd, wait before forward"], lambda m: lightning_run(m, args.mib, args.steps)))
    if args.framework in ("transformers", "both"):
        plans.append((f"Hugging Face Trainer: GPT-2 (n_embd 512, 6 layers), {args.steps} steps, {args.repeat} runs each",
                      ["no checkpoint", "ftd", "Trainer checkpoint every step"], lambda m: transformers_run(m, args.steps)))
    with private_daemon("ftd-bench-integrations-") as endpoint:
        os.environ["FTD_ENDPOINT"] = endpoint
        for title, modes, run in plans:
            results: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(args.repeat):
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    results[m].append(run(m))
            report(title, modes, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
