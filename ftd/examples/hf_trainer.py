"""A small Hugging Face Trainer job, with ftd as one callback; the tests run it, SIGKILL it, and run it again.

A 2-layer GPT-2 built from a config (nothing downloaded; dropout on), AdamW with a linear warm-up
and decay, trained for a few epochs on random token sequences (shuffled by the Trainer's sampler).
Every optimizer step's loss goes to <out>/losses-rank<R>.txt as "step float.hex()" (from
compute_loss, so before that step's snapshot).

--resume ftd: ``callbacks=[FtdTrainerCallback()]`` and ``train(resume_from_checkpoint=resume_from(trainer))``;
--resume hf: the Trainer's own resume (a checkpoint every step, ``train(resume_from_checkpoint=True)``),
to measure what it restores; --resume none: the uninterrupted reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from ftd.integrations.transformers import FtdTrainerCallback, resume_from
from ftd.util.lines import say


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, length: int = 16, vocab: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class LossRecorder(Trainer):
    """Writes every step's loss, bit for bit, before the step's snapshot."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = (loss[0] if return_outputs else loss).item()
        with open(Path(self.args.output_dir) / f"losses-rank{self.args.process_index}.txt", "a") as f:
            f.write(f"{self.state.global_step} {value.hex()}\n")
        if self.step_sleep:
            time.sleep(self.step_sleep)
        return loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory for losses-rank<R>.txt (and the Trainer's output_dir)")
    p.add_argument("--resume", choices=("ftd", "hf", "none"), default="ftd")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(1234)
    model = GPT2LMHeadModel(config)
    own = args.resume == "hf"
    training = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=4, num_train_epochs=args.epochs, learning_rate=3e-3,
        warmup_steps=4, lr_scheduler_type="linear", weight_decay=0.01, seed=1234, use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="steps" if own else "no", save_steps=1, save_total_limit=1 if own else None,
        disable_tqdm=True, dataloader_num_workers=0)
    callbacks = [FtdTrainerCallback()] if args.resume == "ftd" else []
    trainer = LossRecorder(model=model, args=training, train_dataset=Tokens(), callbacks=callbacks)
    trainer.step_sleep = args.step_sleep
    if args.resume == "ftd":
        checkpoint = resume_from(trainer)
        say(f"rank {training.process_index}: resuming from {checkpoint}")
    elif own:
        checkpoint = True if any(Path(args.out).glob("checkpoint-*")) else None
    else:
        checkpoint = None
    trainer.train(resume_from_checkpoint=checkpoint)
    say(f"rank {training.process_index}: done after step {trainer.state.global_step - 1} (pid {os.getpid()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
