"""Sharded state (FSDP2, HSDP, FSDP + tensor parallel) under torchrun's own elastic agent: one rank is
SIGKILLed mid-run, torchrun restarts every rank, each restores its own shards from the daemon, and
every loss either run wrote equals an uninterrupted run's, bit for bit. Also: both ways users hand
over state (the objects, or a Stateful over get_state_dict as torchtitan does), and a snapshot taken
on one mesh refused, with what differs, on another mesh or world size when nothing is flushed.

CI runs the cases marked below; FTD_SOAK=1 runs every mesh with both styles."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from support.losses import read_losses
from support.torchrun import torchrun
from support.soak import SOAK

pytestmark = pytest.mark.timeout(300)


_references: dict[tuple, Path] = {}


def reference(tmp_path_factory, nproc: int, mesh: str) -> Path:
    """The losses of an uninterrupted run without ftd (once per mesh and size)."""
    key = (nproc, mesh)
    if key not in _references:
        out = tmp_path_factory.mktemp(f"ref-{mesh}-{nproc}")
        r = torchrun(nproc, out, "--mesh", mesh, "--no-ftd", env=dict(os.environ))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        _references[key] = out
    return _references[key]


def assert_bit_exact(run: Path, ref: Path, nproc: int, steps: int = 8) -> None:
    for rank in range(nproc):
        want = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert sorted(want) == list(range(steps)) and {s for s, _ in got} == set(range(steps)), (rank, got)
        for step, value in got:
            assert value == want[step], f"rank {rank} step {step}: {value} != {want[step]} (uninterrupted)"


CASES = [  # CI: each mesh once, both styles (a 4-rank FSDP2 job also runs in test_fsdp_cluster and
           # test_sharded_checkpoint); FTD_SOAK=1: every mesh with both styles
    (2, "fsdp", "objects"), (4, "hsdp", "stateful"), (4, "fsdp_tp", "objects"),
]
SOAK_CASES = [(2, "fsdp", "stateful"), (4, "fsdp", "objects"), (4, "fsdp", "stateful"), (4, "hsdp", "objects"),
              (4, "fsdp_tp", "stateful")]


@pytest.mark.parametrize("nproc,mesh,style", CASES + (SOAK_CASES if SOAK else []),
                         ids=lambda v: str(v))
def test_a_rank_killed_mid_run_resumes_bit_exact_with_its_shards(job, tmp_path, tmp_path_factory, nproc, mesh, style):
    d = job.daemon()
    ref = reference(tmp_path_factory, nproc, mesh)
    run = tmp_path / "run"
    r = torchrun(nproc, run, "--mesh", mesh, "--style", style, "--crash-rank", str(nproc - 1), "--crash-at", "4",
                 env=job.env(d), restarts=1)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # the ranks print at once: two lines can interleave on the shared pipe, so match, don't split
    resumed = re.findall(r"rank \d+ pid \d+: resuming after step (\d+)", r.stdout + r.stderr)
    assert len(resumed) == nproc and all(step == "4" for step in resumed), resumed
    assert_bit_exact(run, ref, nproc)


def test_another_mesh_or_world_size_is_refused_naming_what_differs(job, tmp_path):
    d = job.daemon()
    r = torchrun(4, tmp_path / "fsdp", "--crash-rank", "1", "--crash-at", "5", env=job.env(d))  # crashed: not finished
    assert "SIGKILL" in r.stdout + r.stderr or r.returncode != 0, r.stderr[-3000:]
    r = torchrun(4, tmp_path / "hsdp", "--mesh", "hsdp", env=job.env(d))   # the same world on a 2-D mesh
    text = r.stdout + r.stderr
    assert r.returncode != 0 and "does not fit the live state" in text, text[-4000:]
    assert "mesh of shape [4]" in text and "[2, 2]" in text and "resume='never'" in text, text[-4000:]
    r = torchrun(2, tmp_path / "two", env=job.env(d))                      # another world size, nothing flushed
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-4000:]
    assert "taken by a run of 4 rank(s), this one has 2" in text and "no flush_dir is configured" in text, text[-4000:]
    assert "Restart with 4 ranks" in text
