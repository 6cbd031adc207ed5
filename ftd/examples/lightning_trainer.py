"""A small PyTorch Lightning job, with ftd as one callback; the tests run it, SIGKILL it, and run it again.

A LightningModule with dropout, AdamW and a per-step LR schedule, trained on a shuffled
TensorDataset for a few epochs. Every optimizer step's loss goes to <out>/losses-rank<R>.txt as
"step float.hex()" (from training_step, so before that step's snapshot; a step re-run after a
crash appears twice, and both lines must match), and a fingerprint of its batch to
<out>/batches-rank<R>.txt (which data each step saw).

--resume ftd: ``Trainer(callbacks=[FtdCallback()])``; --resume ckpt: Lightning's own resume (a
checkpoint every step, ``fit(ckpt_path="last")``), to measure what it restores; --resume none: the
uninterrupted reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ftd.integrations.lightning import FtdCallback, fingerprint
from ftd.util.lines import say


class Regressor(pl.LightningModule):
    def __init__(self, out: Path, step_sleep: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
        self.out, self.step_sleep = out, step_sleep
        self._fd: int | None = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self._fd is None:
            self._fd = os.open(self.out / f"losses-rank{self.global_rank}.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(self._fd, f"{self.global_step} {loss.item().hex()}\n".encode())
        with open(self.out / f"batches-rank{self.global_rank}.txt", "a") as f:  # which data each step saw
            f.write(f"{self.global_step} {fingerprint(batch)}\n")
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.7)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def loader(workers: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)  # the data itself is fixed; only the shuffle draws from the global RNG
    x = torch.randn(120, 16, generator=g)
    y = x[:, :3].sum(dim=1, keepdim=True).sin() + 0.1 * torch.randn(120, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory for losses-rank<R>.txt (and checkpoints)")
    p.add_argument("--resume", choices=("ftd", "ckpt", "none"), default="ftd")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--devices", type=int, default=1, help="2: the ddp strategy over gloo (2 processes)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    pl.seed_everything(1234, verbose=False)
    out = Path(args.out)
    callbacks: list[pl.Callback] = []
    ckpt_path = None
    if args.resume == "ftd":
        callbacks.append(FtdCallback())
    elif args.resume == "ckpt":
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0))
        ckpt_path = "last" if (out / "ckpt" / "last.ckpt").exists() else None
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", callbacks=callbacks, logger=False,
                         enable_checkpointing=args.resume == "ckpt", enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    model = Regressor(out, args.step_sleep)
    trainer.fit(model, train_dataloaders=loader(args.workers), ckpt_path=ckpt_path)
    if args.resume == "ftd":
        say(f"rank {trainer.global_rank}: restored step {callbacks[0].restored_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
