"""What FtdCallback costs a Lightning trainer: step time and time blocked per snapshot, side by side.

One process, one private daemon. A LightningModule of --mib MiB of parameters (Linear layers,
AdamW: 3x that much state) trains --steps steps per run; the runs alternate (none, ftd, ftd with
the wait before the forward pass, ...) so the machine's noise hits them alike. "ftd, wait before
forward" turns off ``run_closure_first``: ftd's pre-step hook then waits inside
``optimizer.step(closure)`` before Lightning's closure runs forward and backward, so the copy
overlaps nothing.

    .venv/bin/python scripts/bench_lightning.py --mib 64 --steps 40 --repeat 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ftd  # noqa: E402
from ftd.integrations import lightning as ftd_lightning  # noqa: E402
from ftd.util.procs import wait_for  # noqa: E402


class Wide(pl.LightningModule):
    def __init__(self, mib: int):
        super().__init__()
        width = 1024
        layers = max(1, (mib << 20) // (4 * width * width))
        self.net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        self.times: list[float] = []
        self._t = None

    def training_step(self, batch, batch_idx):
        now = time.perf_counter()
        if self._t is not None:
            self.times.append(now - self._t)
        self._t = now
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def run(mode: str, mib: int, steps: int) -> dict:
    model = Wide(mib)
    callbacks = []
    saved = set(ftd_lightning.CLOSURE_ONCE)
    if mode != "none":
        if mode == "ftd-wait-before-forward":
            ftd_lightning.CLOSURE_ONCE.clear()
        callbacks.append(ftd_lightning.FtdCallback(restore=False))
    data = DataLoader(TensorDataset(torch.randn(steps * 32, 1024)), batch_size=32)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    stats = {}
    if callbacks:
        cb = callbacks[0]
        original = cb.teardown

        def keep_stats(trainer, pl_module, stage):
            stats.update(cb.client.stats)
            original(trainer, pl_module, stage)
        cb.teardown = keep_stats
    trainer.fit(model, data)
    ftd_lightning.CLOSURE_ONCE.update(saved)
    times = model.times[5:]  # after the buffers are set up
    out = {"step_ms": 1000 * statistics.median(times)}
    if stats:
        blocked = stats["snapshot_seconds"] + stats["hook_wait_seconds"]
        out["blocked_ms"] = 1000 * blocked / max(1, stats["snapshots"])
        out["committed"] = f"{stats['committed']}/{stats['snapshots']}"
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="ftd-bench-lightning-"))
    job = f"bench{uuid.uuid4().hex[:8]}"
    config = work / "daemon.toml"
    config.write_text(f'job = "{job}"\nruntime_dir = "{work}/rt"\nmemory_budget = "8GiB"\nmemory_reserve = "256MiB"\n')
    log = open(work / "daemon.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: "serving at" in (work / "daemon.log").read_text(), 20, "the daemon to serve")
        os.environ["FTD_ENDPOINT"] = f"ipc://{work}/rt/{job}/node0.sock"
        modes = ["none", "ftd", "ftd-wait-before-forward"]
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.repeat):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                results[m].append(run(m, args.mib, args.steps))
        base = statistics.median(x["step_ms"] for x in results["none"])
        print(f"{args.mib} MiB of parameters (+ AdamW moments), {args.steps} steps, {args.repeat} runs each")
        print(f"{'mode':<26}{'step (median)':>14}{'vs none':>9}{'blocked/snapshot':>18}{'committed':>11}")
        for m in modes:
            step = statistics.median(x["step_ms"] for x in results[m])
            blocked = statistics.median(x["blocked_ms"] for x in results[m]) if m != "none" else None
            committed = results[m][-1].get("committed", "-")
            print(f"{m:<26}{step:>11.1f} ms{step / base:>8.2f}x"
                  f"{'-' if blocked is None else f'{blocked:.1f} ms':>18}{committed:>11}")
    finally:
        daemon.terminate()
        daemon.wait(20)
        log.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
