"""The flush of replica-aware snapshots (replica_snapshots = true, 2 DDP ranks on one node): each
replicated tensor is written once, each rank its slice of it as row chunks; plain dcp.load reads the
flushed step bit for bit as it reads the same step flushed from whole-rank snapshots; after both
ranks are SIGKILLed and the daemon is gone (memory empty), a new daemon restores every rank from
disk, each putting its state together from both ranks' slices, and every loss equals the
uninterrupted run's; `ftd export` of a sliced version works the same."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftd.durable import ondisk
from ftd.util.procs import free_ports, wait_for

from support.jobs import ROOT
from support.losses import read_losses

pytestmark = pytest.mark.timeout(480)
STEPS, WORLD = 8, 2
TRAINER = ROOT / "tests" / "support" / "replica_trainer.py"
ON, OFF = "replica_snapshots = true\n", "replica_snapshots = false\n"


def flush_config(flush_dir: Path) -> str:
    return f'flush_dir = "{flush_dir}"\nflush_every = 1\nflush_interval = 0\nflush_keep = 20\n'


def ranks(job, daemon, out: Path, phase: str, *extra: str) -> list[subprocess.Popen]:
    port = str(free_ports(1)[0])
    procs = []
    for rank in range(WORLD):
        env = job.env(daemon, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with open(out / f"{phase}-rank{rank}.log", "ab") as log:
            p = subprocess.Popen([sys.executable, str(TRAINER), "--out", str(out), "--steps", str(STEPS), *extra],
                                 env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        job.procs.append(p)
        procs.append(p)
    return procs


def finish(procs, out: Path, phase: str) -> None:
    for rank, p in enumerate(procs):
        assert p.wait(120) == 0, (out / f"{phase}-rank{rank}.log").read_text()[-3000:]


def flush_idle(daemon) -> dict:
    def idle():
        r = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--json", "--endpoint", daemon.endpoint],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        s = json.loads(r.stdout) if r.returncode == 0 else None
        return s if s and s["flush"]["running"] is None else None
    return wait_for(idle, 60, "the flush to be idle")


# plain PyTorch, no ftd: the replica trainer's state built again, loaded from a flushed step (dcp.load)
LOADER = r"""
import json, sys, torch, torch.distributed.checkpoint as dcp
from torch import nn
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
opt = torch.optim.Adam(model.parameters(), lr=0.01)
model(torch.zeros(1, 8)).sum().backward()
opt.step()  # allocates Adam's state, which dcp.load fills in place
out = {}
for path in sys.argv[1:]:
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "seen": {"samples": -1}}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    out[path] = {"seen": state["seen"]["samples"],
                 "tensors": {k: v.numpy().tobytes().hex() for k, v in state["model"].items()}
                 | {f"{i}.{n}": v.numpy().tobytes().hex() for i, s in state["optim"]["state"].items()
                    for n, v in s.items()}}
print(json.dumps(out))
"""


def test_sliced_flush_is_one_dcp_checkpoint_and_restores_every_rank_bit_exact(job, tmp_path):
    ref, run, whole_dir, sliced_dir = (tmp_path / n for n in ("ref", "run", "whole", "sliced"))
    ref.mkdir()
    run.mkdir()
    whole = job.daemon(0, OFF + flush_config(whole_dir))
    finish(ranks(job, whole, ref, "ref", "--step-sleep", "0.2"), ref, "ref")
    flush_idle(whole)
    whole.stop()

    sliced = job.daemon(0, ON + flush_config(sliced_dir))
    first = ranks(job, sliced, run, "first", "--step-sleep", "0.4")
    wait_for(lambda: len(ondisk.flushed_steps(sliced_dir, job.name, 0)) >= 3 or first[0].poll() is not None, 120,
             "three flushed steps")
    for p in first:
        p.send_signal(signal.SIGKILL)
        p.wait()
    st = flush_idle(sliced)
    assert st["flush"]["failures"] == 0, st["flush"]
    assert sliced.stop() == 0  # its memory is gone: only the disk holds the state now
    on_disk = ondisk.flushed_steps(sliced_dir, job.name, 0)
    newest = on_disk[0]
    assert newest < STEPS - 1, "the run ended before the kill: nothing left to resume"
    step_dir = ondisk.step_dir(sliced_dir, job.name, newest)
    assert ondisk.verify_export(step_dir) == []

    # each replicated tensor once: its row chunks from both ranks add up to it; no rank writes all of it
    node = json.loads((step_dir / "ftd-export-node0.json").read_text())
    items = {r: e["items"] for r, e in node["restore"].items()}
    tensor_keys = {i["fqn"] for i in items["0"] + items["1"]  # the parameters and their Adam state
                   if "sizes" in i and i["fqn"].startswith(("model.", "optim.state."))}
    assert "model.0.weight" in tensor_keys and "optim.state.0.exp_avg" in tensor_keys
    for key in tensor_keys:
        chunks = [i for r in items.values() for i in r if i["fqn"] == key]
        assert sum(math.prod(c["sizes"]) for c in chunks) == math.prod(chunks[0]["size"]), key
        assert not any(i["fqn"] == f"rank-1.{key}" for i in items["1"]), key
    mine = lambda r: {i["fqn"] for i in items[r] if i["fqn"] in tensor_keys}  # noqa: E731
    assert mine("0") and mine("1"), "one rank wrote every replicated tensor"

    # plain dcp.load: the sliced flush of a step is the whole-rank flush of the same step, bit for bit
    common = sorted(set(on_disk) & set(ondisk.flushed_steps(whole_dir, job.name, 0)), reverse=True)
    assert common, (on_disk, ondisk.flushed_steps(whole_dir, job.name, 0))
    a, b = str(ondisk.step_dir(whole_dir, job.name, common[0])), str(ondisk.step_dir(sliced_dir, job.name, common[0]))
    r = subprocess.run([sys.executable, "-c", LOADER, a, b], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = json.loads(r.stdout)
    assert loaded[a] == loaded[b] and loaded[b]["seen"] == 4 * (common[0] + 1)

    # a new daemon, memory empty: every rank restored from disk, bit-exact against the uninterrupted run
    again = job.daemon(0, ON + flush_config(sliced_dir))
    finish(ranks(job, again, run, "second"), run, "second")
    for rank in range(WORLD):
        log = (run / f"second-rank{rank}.log").read_text()
        assert f"rank {rank}: resuming after step {newest}" in log, log[-3000:]
        expected = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        assert sorted(expected) == list(range(STEPS))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(range(STEPS))
        for step, value in got:
            assert value == expected[step], f"rank {rank} step {step}: {value} differs from the reference's"
    assert f"restored step {newest}" in again.log()

    out = tmp_path / "export"  # `ftd export` of a sliced version in memory
    r = subprocess.run([sys.executable, "-m", "ftd.cli", "export", "--latest", "--to", str(out), "--endpoint",
                        again.endpoint], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", LOADER, str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout)[str(out)]["seen"] == 4 * STEPS, r.stderr[-3000:]
    assert "Traceback" not in again.log()
