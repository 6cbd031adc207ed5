"""`ftd export`: a version in memory becomes a plain torch.distributed.checkpoint directory, which
plain PyTorch loads at another world size (DDP trained on 4 ranks, resumed on 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.util.procs import free_ports

from support.jobs import ROOT

pytestmark = pytest.mark.timeout(180)
MODEL = ["--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch", "4"]
STEPS = 6

# What a user writes to resume from the export with plain PyTorch, at any world size (README).
LOADER = r"""
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from ftd.examples import gpt_trainer
checkpoint, expected = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
args = gpt_trainer.parse_args(sys.argv[3:])
model, optimizer, _ = gpt_trainer.build(args)
for p in model.parameters():            # allocate AdamW's state, which dcp.load fills in place
    p.grad = torch.zeros_like(p)
optimizer.step()
state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
dcp.load(state, checkpoint_id=checkpoint)
model.load_state_dict(state["model"])
optimizer.load_state_dict(state["optim"])
want = torch.load(expected, weights_only=True)
same_model = all(torch.equal(v, want["model"][k]) for k, v in model.state_dict().items())
got_opt, want_opt = optimizer.state_dict(), want["optim"]
same_optim = all(torch.equal(got_opt["state"][i][name], value)
                 for i, s in want_opt["state"].items() for name, value in s.items())
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: model {same_model} optim {same_optim}", flush=True)
dist.destroy_process_group()
"""


def _ranks(world: int, cmd: list[str], env_extra: dict, logs: Path) -> list[subprocess.Popen]:
    import os
    port = str(free_ports(1)[0])
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env_extra)
        with open(logs / f"rank{rank}-{world}.log", "ab") as log:
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def test_export_of_4_ddp_ranks_loads_with_plain_dcp_on_2_ranks(job, tmp_path):
    d = job.daemon()
    final = tmp_path / "final.pt"
    trainers = _ranks(4, [sys.executable, "-m", "ftd.examples.gpt_trainer", "--out", str(tmp_path / "run"),
                          "--steps", str(STEPS), "--save-final", str(final), *MODEL],
                      {"FTD_ENDPOINT": d.endpoint}, tmp_path)
    job.procs += trainers
    for p in trainers:
        assert p.wait(120) == 0, (tmp_path / "rank0-4.log").read_text()[-3000:]
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "ftd.cli", "export", "--latest", "--to", str(out),
                        "--endpoint", d.endpoint], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"step {STEPS - 1} of job" in r.stdout and "ranks [0, 1, 2, 3] of 4" in r.stdout
    manifest = json.loads((out / "ftd-export-node0.json").read_text())
    assert manifest["step"] == STEPS - 1 and manifest["ranks"] == [0, 1, 2, 3] and manifest["world"] == 4
    assert (out / ".metadata").is_file() and all((out / f"rank-{r}" / "__0_0.distcp").is_file() for r in range(4))
    assert not list(out.glob("*.distcp"))                           # rank 0's state is not written twice

    loaders = _ranks(2, [sys.executable, "-c", LOADER, str(out), str(final), *MODEL], {}, tmp_path)
    job.procs += loaders
    for p in loaders:
        assert p.wait(120) == 0, (tmp_path / "rank0-2.log").read_text()[-3000:]
    for rank in range(2):
        log = (tmp_path / f"rank{rank}-2.log").read_text()
        assert f"rank {rank} of 2: model True optim True" in log, log[-2000:]


def test_export_checks_what_it_wrote_and_refuses_steps_not_held(job, tmp_path):
    import torch

    import ftd
    from ftd.durable.ondisk import verify_export
    d = job.daemon()
    with ftd.Client(d.endpoint, rank=0, world_size=1) as client:
        for step in range(3):
            client.snapshot(step, {"w": torch.full((1000,), float(step)), "meta": {"step": step}})
            assert client.wait(10)
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "ftd.cli", "export", "--endpoint", d.endpoint, "--to", str(out)]
    r = subprocess.run([*cmd, "--step", "0"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and "hold no snapshot of step 0; steps every rank holds: [2, 1]" in r.stderr
    r = subprocess.run([*cmd, "--step", "1"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import torch.distributed.checkpoint as dcp
    state = {"w": torch.empty(1000), "meta": {"step": -1}}   # dcp.load fills the keys it is given
    dcp.load(state, checkpoint_id=str(out), no_dist=True)      # rank 0's values are the top level
    assert torch.equal(state["w"], torch.full((1000,), 1.0)) and state["meta"] == {"step": 1}
    assert verify_export(out) == []
    victim = next(p for p in (out / "rank-0").iterdir() if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_export(out) == [f"rank-0/{victim.name}"]
