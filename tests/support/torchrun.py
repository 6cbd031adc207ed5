"""Running a trainer under torchrun's own elastic agent (c10d rendezvous, gloo): ``ftd.examples.fsdp_trainer``
(``torchrun``), or any module with its arguments (``torchrun_module``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ftd.util.procs import free_ports

from support.jobs import ROOT

SMALL = ("--dim", "32", "--layers", "2", "--steps", "8")


def torchrun_module(nproc: int, module: str, *args: str, env: dict, restarts: int = 0,
                    timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc --max-restarts restarts -m module args...``, to the end."""
    port = free_ports(1)[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts",
           str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", module, *args]
    # each attempt its own store: a restarted agent must not find the dead attempt's keys
    run_env = dict(env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, out: Path, *args: str, env: dict, restarts: int = 0, timeout: float = 240,
             small: tuple[str, ...] = SMALL) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m ftd.examples.fsdp_trainer --out out ...``, to the end."""
    return torchrun_module(nproc, "ftd.examples.fsdp_trainer", "--out", str(out), *small, *args, env=env,
                           restarts=restarts, timeout=timeout)
