"""What Lightning's and the Hugging Face Trainer's own resume restore, against ftd's, as measured.

For each framework's example job (ftd/examples/lightning_trainer.py, hf_trainer.py): an
uninterrupted reference run; then, for each way of resuming (the framework's own, with a
checkpoint written every step; ftd's callback), a run SIGKILLed mid-epoch and run again. Printed
per way: whether every loss equals the reference's bit for bit, the first step that differs, the
steps re-run, and (Lightning) whether the resumed run trained on the same batches, and what keys
Lightning's own checkpoint holds.

    .venv/bin/python scripts/framework_resume.py          # about 2 minutes on 2 cores
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.frameworks import FrameworkJob  # noqa: E402
from support.jobs import LocalJob  # noqa: E402
from support.losses import read_losses  # noqa: E402

JOBS = {"lightning": ("ftd.examples.lightning_trainer", "ckpt", 20), "transformers": ("ftd.examples.hf_trainer", "hf", 16)}


def differences(run: Path, ref: Path, name: str) -> tuple[int | None, int]:
    """(first step whose value differs from the reference's, steps written twice)."""
    reference = dict(read_losses(ref / f"{name}-rank0.txt"))
    got = read_losses(run / f"{name}-rank0.txt")
    first = next((s for s, v in got if reference.get(s) != v), None)
    return first, len(got) - len(reference)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ftd-framework-resume-") as tmp:
        tmp = Path(tmp)
        job = LocalJob(tmp)
        try:
            print(f"{'framework':<13}{'resume':<7}{'killed after':>13}{'bit-exact':>11}{'first diff':>12}{'re-run':>8}"
                  f"{'same batches':>14}")
            for node, (framework, (module, own, kill_at)) in enumerate(JOBS.items()):
                daemon = job.daemon(node_rank=node)  # a daemon of its own: the snapshots of one framework
                out = tmp / framework
                out.mkdir()
                FrameworkJob(job, None, module, []).run(out / "ref", "ref", "--resume", "none", timeout=300)
                for way in (own, "ftd"):
                    f = FrameworkJob(job, daemon if way == "ftd" else None, module, [])
                    run = out / way
                    first = f.start(run, "first", "--resume", way, "--step-sleep", "0.15")
                    killed = f.kill_after(first, run, "first", kill_at)
                    f.run(run, "second", "--resume", way, timeout=300)
                    diff, rerun = differences(run, out / "ref", "losses")
                    batches = "-"
                    if (run / "batches-rank0.txt").exists():
                        batches = "yes" if differences(run, out / "ref", "batches")[0] is None else "no"
                    print(f"{framework:<13}{way:<7}{killed:>13}{'yes' if diff is None else 'no':>11}"
                          f"{'-' if diff is None else diff:>12}{rerun:>8}{batches:>14}", flush=True)
                if framework == "lightning":
                    import torch
                    ckpt = torch.load(out / own / "ckpt" / "last.ckpt", weights_only=False)
                    print(f"  Lightning's checkpoint holds: {sorted(ckpt)}")
        finally:
            left = job.cleanup()
            assert not left, left
    return 0


if __name__ == "__main__":
    sys.exit(main())
