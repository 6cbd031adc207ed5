"""torchtitan's own Trainer (``torchtitan.train`` under torchrun, 2 ranks, FSDP2 over gloo) with
``checkpoint=FtdCheckpointManager.Config()``: a rank SIGKILLed mid-run, torchrun restarts both, they
resume from ftd, and every loss and gradient norm either attempt logged equals an uninterrupted run's
bit for bit, with dropout in the model (so the RNG states come back too).

The job (``ftd/examples/torchtitan_configs.py``): torchtitan's llama3 debug model cut to 2 layers,
SDPA attention, on the CPU through ``ftd/examples/torchtitan_cpu.py`` (module doc: what it bends).

CI runs the first test (about a minute on 2 cores: three starts of torchtitan, each mostly imports,
the uninterrupted reference beside the interrupted run); FTD_SOAK=1 also compares torchtitan's own resume (a DCP checkpoint every step), ftd without
dropout, and ftd beside torchtitan's DCP checkpoints, falling back to them when ftd's memory is gone.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from support.frameworks import compare
from support.losses import read_losses
from support.torchrun import torchrun_module
from support.soak import SOAK

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (./scripts/setup installs it)")

pytestmark = pytest.mark.timeout(300)
CRASH_AT = 5  # rank 1 kills itself after logging this step (before saving it)
RESTORED = re.compile(r"ftd: rank (\d) restored step (\d+) from memory")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

_references: dict[str, Future] = {}
_background = ThreadPoolExecutor(2, thread_name_prefix="titan-reference")


def titan(out: Path, config: str, *args: str, env: dict, crash: bool = False) -> str:
    """``torchrun -m ftd.examples.torchtitan_cpu --module ftd.examples.torchtitan_configs --config ...``;
    with ``crash``, rank 1 SIGKILLs itself after step CRASH_AT and torchrun restarts both ranks once."""
    crash_args = ("--metrics.crash_rank", "1", "--metrics.crash_at", str(CRASH_AT)) if crash else ()
    r = torchrun_module(2, "ftd.examples.torchtitan_cpu", "--module", "ftd.examples.torchtitan_configs",
                        "--config", config, "--dump_folder", str(out), *crash_args, *args,
                        env=dict(env, **OFFLINE), restarts=1 if crash else 0, timeout=280)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-6000:]
    return text


def start_reference(tmp_path_factory, config: str) -> Future:
    """An uninterrupted run of ``config`` without checkpoints (once per config), started in the
    background: it runs beside the run it is compared with (a start of torchtitan is mostly imports
    on one core, and launcher waits; two side by side take little longer than one)."""
    if config not in _references:
        _references[config] = _background.submit(_reference, tmp_path_factory.mktemp(config), config)
    return _references[config]


def _reference(out: Path, config: str) -> Path:
    titan(out, config, env=dict(os.environ))
    assert [s for s, _ in read_losses(out / "losses-rank0.txt")] == list(range(1, 11))
    return out


def reference(tmp_path_factory, config: str) -> Path:
    return start_reference(tmp_path_factory, config).result(timeout=300)


def first_difference(run: Path, ref: Path) -> int | None:
    want = dict(read_losses(ref / "losses-rank0.txt"))
    return next((s for s, v in read_losses(run / "losses-rank0.txt") if v != want[s]), None)


def assert_resumed_from_ftd(text: str) -> int:
    restored = {int(rank): int(step) for rank, step in RESTORED.findall(text)}
    assert sorted(restored) == [0, 1] and len(set(restored.values())) == 1, text[-6000:]
    step = restored[0]
    assert CRASH_AT - 2 <= step < CRASH_AT, f"resumed after step {step}, the crash came at {CRASH_AT}"
    return step


def test_a_rank_killed_mid_run_resumes_bit_exact_dropout_included(job, tmp_path, tmp_path_factory):
    d = job.daemon()
    started = start_reference(tmp_path_factory, "llama3_tiny_dropout")
    run = tmp_path / "run"
    try:
        text = titan(run, "llama3_tiny_dropout_ftd", env=job.env(d), crash=True)
    finally:
        wait([started], timeout=300)  # no torchrun of this test outlives it, even a failed one
    step = assert_resumed_from_ftd(text)
    ref = started.result()
    rerun = compare(run, ref, 2)
    compare(run, ref, 2, "gradnorm")
    assert rerun == CRASH_AT - step, (rerun, step)  # the steps after the snapshot ran twice, both times equal


@pytest.mark.skipif(not SOAK, reason="FTD_SOAK=1: torchtitan's own resume against ftd's")
@pytest.mark.parametrize("config,bit_exact", [("llama3_tiny_dcp", True), ("llama3_tiny_dropout_dcp", False)])
def test_torchtitans_own_resume_is_bit_exact_only_without_random_numbers(tmp_path, tmp_path_factory, config,
                                                                         bit_exact):
    ref = reference(tmp_path_factory, config.removesuffix("_dcp"))
    run = tmp_path / "run"
    text = titan(run, config, env=dict(os.environ), crash=True)
    assert f"Loading the checkpoint from {run}/checkpoint/step-{CRASH_AT - 1}" in text, text[-4000:]
    if bit_exact:  # llama3 draws no random numbers after its initialisation: nothing for the RNG to lose
        compare(run, ref, 2)
    else:          # the resumed run draws its dropout masks from the RNG as seeded at start
        assert first_difference(run, ref) == CRASH_AT


@pytest.mark.skipif(not SOAK, reason="FTD_SOAK=1")
def test_without_dropout_and_beside_torchtitans_dcp_checkpoints_which_it_falls_back_to(job, tmp_path,
                                                                                       tmp_path_factory):
    d = job.daemon()
    ref = reference(tmp_path_factory, "llama3_tiny")
    run = tmp_path / "run"
    both = ("--checkpoint.dcp_checkpoints", "--checkpoint.interval", "3")
    assert_resumed_from_ftd(titan(run, "llama3_tiny_ftd", *both, env=job.env(d), crash=True))
    compare(run, ref, 2)
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["step-10", "step-3", "step-6", "step-9"]

    # the daemon restarted (its memory gone, nothing flushed) and a run killed after step 5 again:
    # step 3 comes back from torchtitan's DCP checkpoint
    d.stop()
    d = job.daemon()
    again = tmp_path / "again"
    again.mkdir()
    (again / "checkpoint").mkdir()
    (run / "checkpoint" / "step-3").rename(again / "checkpoint" / "step-3")
    text = titan(again, "llama3_tiny_ftd", *both, env=job.env(d))
    assert "Loading the checkpoint from" in text and "step-3" in text and not RESTORED.search(text), text[-4000:]
    got = read_losses(again / "losses-rank0.txt")
    assert [s for s, _ in got] == list(range(4, 11))
    want = dict(read_losses(ref / "losses-rank0.txt"))
    assert all(v == want[s] for s, v in got)  # (a DCP checkpoint holds no RNG state; this model needs none)
