"""A framework's example job run the way a user's would be: once uninterrupted, once SIGKILLed
mid-run (its whole process group: a DDP job's ranks go together), and once again to resume.

The example jobs (``ftd/examples/lightning_trainer.py``, ``ftd/examples/hf_trainer.py``) append
"step float.hex()" lines to <out>/losses-rank<R>.txt; ``compare`` checks a resumed run's against
the reference's bit for bit, re-run steps included.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ftd.util.procs import wait_for

from support.jobs import ROOT, DaemonProcess, LocalJob
from support.losses import read_losses


class FrameworkJob:
    """Runs ``python -m <module> --out DIR <args>`` in its own process group; output to DIR/<phase>.log."""

    def __init__(self, job: LocalJob, daemon: DaemonProcess | None, module: str, args: list[str]):
        self.job, self.daemon, self.module, self.args = job, daemon, module, args
        self.groups: list[subprocess.Popen] = []

    def start(self, out: Path, phase: str, *extra: str) -> subprocess.Popen:
        out.mkdir(exist_ok=True)
        env = self.job.env(self.daemon) if self.daemon else dict(os.environ, PYTHONPATH=str(ROOT))
        env["PYTHONWARNINGS"] = "ignore"
        with open(out / f"{phase}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", self.module, "--out", str(out), *self.args, *extra],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(p)
        return p

    def finish(self, p: subprocess.Popen, out: Path, phase: str, timeout: float = 90) -> str:
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            raise AssertionError(f"{phase} did not finish in {timeout} s:\n{tail(out / f'{phase}.log')}") from None
        text = (out / f"{phase}.log").read_text(errors="replace")
        assert rc == 0, f"{phase} exited with {rc}:\n{tail(out / f'{phase}.log')}"
        return text

    def run(self, out: Path, phase: str, *extra: str, timeout: float = 90) -> str:
        return self.finish(self.start(out, phase, *extra), out, phase, timeout)

    def kill_after(self, p: subprocess.Popen, out: Path, phase: str, step: int, rank: int = 0) -> int:
        """SIGKILL the job's process group once rank ``rank`` wrote the loss of ``step``; the last step it wrote."""
        losses = out / f"losses-rank{rank}.txt"
        wait_for(lambda: any(s >= step for s, _ in read_losses(losses)) or p.poll() is not None, 60,
                 f"step {step} of {phase}")
        assert p.poll() is None, f"{phase} ended before the kill:\n{tail(out / f'{phase}.log')}"
        self.kill(p)
        return max(s for s, _ in read_losses(losses))

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()

    def cleanup(self) -> None:
        for p in self.groups:
            self.kill(p)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def compare(run: Path, reference: Path, ranks: int, name: str = "losses") -> int:
    """Every line any run wrote equals the reference's for its step and rank; every step is there.
    Returns how many steps were written twice (re-run after the kill)."""
    rerun = 0
    for rank in range(ranks):
        ref = dict(read_losses(reference / f"{name}-rank{rank}.txt"))
        got = read_losses(run / f"{name}-rank{rank}.txt")
        assert ref and {s for s, _ in got} == set(ref), f"rank {rank}: the resumed run did not reach every step"
        for step, value in got:
            assert value == ref[step], f"rank {rank} step {step}: {name} {value} differs from the reference's {ref[step]}"
        rerun = max(rerun, len(got) - len(ref))
    return rerun
