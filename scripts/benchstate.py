"""The training state and the daemon the benchmarks share (``bench_snapshot.py``, ``bench_peers.py``).

The state is a stack of ``N_LAYERS`` square ``nn.Linear`` layers plus AdamW, sized to a number of bytes
(parameters a third, the two moments the rest); ``build_model`` makes it as a restarted trainer does
(parameters touched, no moments yet), ``build_trained`` after one step. ``state_digest`` tells two
states apart, for checking what a restore loaded. ``Daemon`` is a private ``ftd daemon`` subprocess,
always stopped with SIGTERM and swept from /dev/shm. Not a package module: the scripts run as
``python scripts/bench_X.py``, which puts ``scripts/`` on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import xxhash
from benchutil import REPO
from torch import nn

sys.path.insert(0, str(REPO))
import ftd  # noqa: E402  (the repo's ftd, also when the venv has it installed elsewhere)
from ftd.control.connection import Connection  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
N_LAYERS = 8                # nn.Linear(w, w) layers: 16 parameters, 32 moments, 16 step counters
DAEMON_START_TIMEOUT = 30.0
DAEMON_STOP_TIMEOUT = 15.0


# ---- small helpers ------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'64M', '256MiB', '1G', '2GiB' -> bytes (binary units)."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def fmt_size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ---- the training state -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """A model of N_LAYERS nn.Linear(width, width): params + 2 AdamW moments ~= the target bytes."""
    target_bytes: int
    width: int

    @classmethod
    def for_bytes(cls, nbytes: int) -> "Spec":
        params = nbytes / 3 / 4  # float32 elements of parameters
        width = max(64, round(math.sqrt(params / N_LAYERS) / 64) * 64)
        return cls(nbytes, width)


def build_model(spec: Spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model with zeroed (touched) parameters and a fresh AdamW without moments, as a restart builds them."""
    layers = [nn.utils.skip_init(nn.Linear, spec.width, spec.width) for _ in range(N_LAYERS)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)


def build_trained(spec: Spec) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after one AdamW step (moments exist), with fake gradients that stay for every later step."""
    model, optimizer = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)
            p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [p.detach() for p in model.parameters()]
    for st in optimizer.state.values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return ts


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": optimizer.state_dict()}


def compute_for(seconds: float, _mats: dict = {}) -> None:
    """The forward/backward stand-in: 1-thread matmuls on cache-resident matrices for ``seconds``."""
    if seconds <= 0:
        return
    if not _mats:
        _mats["a"], _mats["b"] = torch.randn(256, 256), torch.randn(256, 256)
    a, b = _mats["a"], _mats["b"]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        torch.mm(a, b)


def trained_state(nbytes: int) -> tuple:
    """(spec, model, AdamW optimizer with its moments, state tensors, their bytes) for a state of ``nbytes``."""
    spec = Spec.for_bytes(nbytes)
    model, optimizer = build_trained(spec)
    tensors = state_tensors(model, optimizer)
    return spec, model, optimizer, tensors, sum(t.numel() * t.element_size() for t in tensors)


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """xxh3 over every state tensor's bytes, in a fixed order: equal digests, equal states."""
    h = xxhash.xxh3_64()
    for t in state_tensors(model, optimizer):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# ---- the daemon ---------------------------------------------------------------------------------
_EXEC_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "  # PR_SET_PDEATHSIG: die with the bench
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Daemon:
    """An ``ftd daemon`` subprocess with its own job, runtime dir and config, stopped with SIGTERM."""

    def __init__(self, workdir: Path, budget: str, extra_config: str = ""):
        self.job = f"bench-{os.getpid()}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = workdir / "rt"
        self.config = workdir / "ftd.toml"
        self.log = workdir / "daemon.log"
        self.config.write_text(f'job = "{self.job}"\nruntime_dir = "{self.runtime_dir}"\n'
                               f'memory_budget = "{budget}"\nshm_dir = "/dev/shm"\n' + extra_config)
        self.socket = self.runtime_dir / self.job / "node0.sock"
        self.endpoint = f"ipc://{self.socket}"
        self.shm_prefix = f"ftd.{self.job}."
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = REPO / ".venv" / "bin" / "ftd"
        cmd = [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(exe), "daemon", "--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ftd daemon did not start; its log:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (the daemon unlinks its segments), SIGKILL if it hangs, then sweep what is left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(f"warning: ftd daemon {self.proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        leftovers = [p for p in Path("/dev/shm").iterdir() if p.name.startswith(self.shm_prefix)]
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            print(f"warning: removed {len(leftovers)} segment(s) the daemon left in /dev/shm", file=sys.stderr)

    def status(self) -> dict:
        """The daemon's ``status`` reply (its own connection: never queued behind the client's requests)."""
        conn = Connection(self.endpoint, 10.0)
        try:
            return conn.call("status")
        finally:
            conn.close()

    def __enter__(self) -> "Daemon":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def client_for(daemon: Daemon) -> Iterator[Any]:
    client = ftd.Client(endpoint=daemon.endpoint, rank=0, world_size=1)
    try:
        yield client
    finally:
        client.close()
