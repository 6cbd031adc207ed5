"""After the ftd run: every loss against the reference, the trainers' counters, the torch.save baseline."""
from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

from ftd.demo.plan import INDENT
from ftd.demo.report import read_losses, verify

if TYPE_CHECKING:
    from ftd.demo.run import Demo


def verify_all(demo: "Demo") -> tuple[bool, list[str], dict]:
    ok, lines, per_rank = True, [], {}
    for rank in range(demo.plan.world):
        ref = read_losses(demo.workdir / "reference" / f"losses-rank{rank}.txt")
        run = read_losses(demo.workdir / "run" / f"losses-rank{rank}.txt")
        good, verdict, twice = verify(ref, run, demo.plan.steps)
        ok &= good
        per_rank[rank] = {"bit_exact": good, "verdict": verdict, "steps_run_twice": twice}
        lines.append(f"{INDENT}rank {rank}: {verdict}" + (f" ({twice} re-run steps identical both times)" if twice else ""))
    return ok, lines, per_rank


def save_load_baseline(demo: "Demo") -> dict:
    """A synchronous torch.save + torch.load of the same state (model, AdamW moments, scheduler)."""
    import torch

    from ftd.examples import gpt_trainer
    args = gpt_trainer.parse_args(list(demo.plan.model))
    torch.manual_seed(args.seed)
    model, optimizer, scheduler = gpt_trainer.build(args)
    model(torch.zeros(1, args.context, dtype=torch.long)).sum().backward()
    optimizer.step()  # creates the optimizer's moments, as in training
    state = {"model": model, "optim": optimizer, "sched": scheduler}
    save_s, load_s = gpt_trainer.save_load_seconds(state, demo.workdir)
    return {"save_seconds": save_s, "load_seconds": load_s}


def read_stats(demo: "Demo") -> list[dict]:
    stats = []
    for rank in range(demo.plan.world):
        with contextlib.suppress(OSError, ValueError):
            stats.append(json.loads((demo.workdir / "run" / f"stats-rank{rank}.json").read_text()))
    return stats
