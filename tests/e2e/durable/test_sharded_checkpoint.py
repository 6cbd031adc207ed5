"""One global checkpoint per flushed version of a sharded job (FSDP2 on 4 ranks): plain ``dcp.load``
reads it into an unsharded model in one process and into FSDP2 at world size 2, and ftd's own
loader reshards it when the job restarts on 2 ranks; every tensor equals, bit for bit, the full
state the job gathered (``get_state_dict(full_state_dict=True)``) at that step.

FTD_SOAK=1 also runs HSDP (2 x 2) and FSDP + TP meshes, and a restart on 3 ranks."""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

from ftd.durable.ondisk import step_dir
from ftd.examples import fsdp_trainer
from ftd.util.procs import wait_for

from support.checkpoints import assert_same, gathered
from support.jobs import LocalJob
from support.torchrun import SMALL, torchrun
from support.soak import SOAK

pytestmark = pytest.mark.timeout(400)
FLUSH = 'flush_dir = "{}"\nflush_every = 1\nflush_interval = 0\nflush_keep = 8\n'
LAST = 7  # SMALL trains steps 0..7


@pytest.fixture(scope="module", params=["fsdp"] + (["hsdp", "fsdp_tp"] if SOAK else []))
def flushed(request, tmp_path_factory):
    """A 4-rank job that trained 8 steps, flushing each, gathering its full state after each, and ended
    without finish(): its daemon holds its versions, its flush_dir one global checkpoint per step."""
    base = tmp_path_factory.mktemp(f"sharded-{request.param}")
    job = LocalJob(base)
    try:
        d = job.daemon(extra=FLUSH.format(base / "flush"))
        r = torchrun(4, base / "run", "--mesh", request.param, "--style", "stateful", "--save-full", "--no-finish",
                     env=job.env(d))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        version = step_dir(base / "flush", job.name, LAST)
        wait_for(lambda: (version / ".metadata").exists(), 60, f"step {LAST} to be flushed")
        yield SimpleNamespace(job=job, daemon=d, dir=version, run=base / "run", mesh=request.param)
    finally:
        left = job.cleanup()
        assert not left, left


def test_plain_dcp_load_into_an_unsharded_model_in_one_process(flushed):
    import torch.distributed.checkpoint as dcp
    want = gathered(flushed.run / f"full-step{LAST}.pt")
    model = fsdp_trainer.make_model(fsdp_trainer.parse_args([*SMALL, "--out", "unused"]))
    model_sd = {k: torch.full_like(v, float("nan")) for k, v in model.state_dict().items()}
    moments = {fqn: {k: torch.full_like(v, float("nan")) for k, v in s.items()} for fqn, s in want["optim"]["state"].items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming the intent is to load in a single process"
        dcp.load({"train": {"model": model_sd, "optim": {"state": moments}}}, checkpoint_id=flushed.dir)
    assert_same(model_sd, want["model"], "model")
    assert_same(moments, want["optim"]["state"], "optim.state")
    model.load_state_dict(model_sd)  # and it is a state dict the unsharded model takes


def test_plain_dcp_load_into_fsdp2_at_another_world_size(flushed, tmp_path):
    r = torchrun(2, tmp_path, "--mesh", "fsdp", "--style", "stateful", "--load-dcp", str(flushed.dir),
                 env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = gathered(flushed.run / f"full-step{LAST}.pt")
    got = gathered(tmp_path / "restored-0.pt")
    assert_same(got["model"], want["model"], "model")
    assert_same(got["optim"]["state"], want["optim"]["state"], "optim.state")


def test_a_restart_on_fewer_ranks_reshards_the_flushed_version_and_goes_on(flushed, tmp_path):
    """4 -> 2 with ftd's loader; then a crash at world 2 resumes every rank at one step."""
    job, d = flushed.job, flushed.daemon
    r = torchrun(2, tmp_path, "--mesh", "fsdp", "--style", "stateful", "--dump-restored", "--save-full",
                 "--steps", "10", "--crash-rank", "1", "--crash-at", "8", env=job.env(d), restarts=1)
    text = r.stdout + r.stderr
    (tmp_path / "torchrun.log").write_text(text)
    assert r.returncode == 0, text[-4000:]
    resharded = [line for line in text.splitlines() if "resharded from 4 rank(s) to 2" in line]
    assert len(resharded) >= 2 and all(f"restored step {LAST} " in line for line in resharded), text[-4000:]
    resumed = [line.rsplit(" ", 1)[1] for line in text.splitlines() if "resuming after step" in line]
    assert len(resumed) == 4 and resumed[:2] == [str(LAST)] * 2 and resumed[2] == resumed[3], resumed
    for attempt, step in enumerate(int(s) for s in resumed[1::2]):
        # what each attempt restored equals the full state gathered at that step: the 4-rank run's
        # (resharded from disk) or this run's own (from memory, after the crash at world 2)
        want = gathered((flushed.run if step == LAST else tmp_path) / f"full-step{step}.pt")
        got = gathered(tmp_path / f"restored-{attempt}.pt")
        assert_same(got["model"], want["model"], f"attempt {attempt} model")
        assert_same(got["optim"]["state"], want["optim"]["state"], f"attempt {attempt} optim.state")
    assert f"job {job.name!r} restarts at world size 2" in d.log()


@pytest.mark.skipif(not SOAK, reason="soak: FTD_SOAK=1")
def test_the_objects_style_reshards_onto_3_ranks(job, tmp_path):
    """{"model": model, "optim": opt, ...} (the optimizer keyed by parameter index), 4 -> 3 ranks: uneven shards."""
    d = job.daemon(extra=FLUSH.format(tmp_path / "flush"))
    r = torchrun(4, tmp_path / "four", "--style", "objects", "--save-full", "--no-finish", env=job.env(d))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wait_for(lambda: (step_dir(tmp_path / "flush", job.name, LAST) / ".metadata").exists(), 60, "the last flush")
    r = torchrun(3, tmp_path / "three", "--style", "objects", "--dump-restored", env=job.env(d))
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    assert text.count("resharded from 4 rank(s) to 3") == 3, text[-4000:]
    want = gathered(tmp_path / "four" / f"full-step{LAST}.pt")
    got = gathered(tmp_path / "three" / "restored-0.pt")
    assert_same(got["model"], want["model"], "model")
    assert_same(got["optim"]["state"], want["optim"]["state"], "optim.state")
