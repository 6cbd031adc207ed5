"""Replica-aware snapshots of an HSDP job (FSDP2 on a (replicate 2, shard 2) mesh, under torchrun's own
elastic agent, replica_snapshots = true): the parameters and AdamW moments are DTensors placed
``Replicate()`` on the mesh's replicate dimension, so ranks 0 and 2 hold the same shard, as do 1 and 3.
Each rank snapshots half of its shard's bytes; rank 3 is SIGKILLed, torchrun restarts every rank, and
each puts its shard together from its own slice and its replica's.

Checked: every loss bit for bit against an uninterrupted run without ftd; the restored state equals
the full state the uninterrupted run gathered at that step; ``ftd status`` shows what ftd decided; the flushed
version holds each replicated byte once (the two replicas each wrote their piece of every shard), and
plain ``dcp.load`` of it into FSDP2 at world size 2 gives the gathered state bit for bit.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ftd.durable.ondisk import step_dir
from ftd.util.procs import wait_for

from support.checkpoints import assert_same, gathered
from support.losses import read_losses
from support.torchrun import torchrun

pytestmark = pytest.mark.timeout(420)
LAST = 7  # the small model trains steps 0..7
CONFIG = 'replica_snapshots = true\nflush_dir = "{}"\nflush_every = 1\nflush_interval = 0\nflush_keep = 8\n'


def test_hsdp_replicas_restore_from_their_slices_and_flush_each_byte_once(job, tmp_path):
    ref = tmp_path / "ref"
    # (--dump-restored gathers the state before the first step, which gives AdamW its state with a step of
    # lr 0 (DCP's get_state_dict does): the reference does the same)
    r = torchrun(4, ref, "--mesh", "hsdp", "--style", "stateful", "--dump-restored", "--save-full", "--no-ftd",
                 env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    d = job.daemon(extra=CONFIG.format(tmp_path / "flush"))
    run = tmp_path / "run"
    r = torchrun(4, run, "--mesh", "hsdp", "--style", "stateful", "--crash-rank", "3", "--crash-at", "4",
                 "--save-full", "--dump-restored", "--no-finish", env=job.env(d), restarts=1)
    text = r.stdout + r.stderr
    (tmp_path / "torchrun.log").write_text(text)
    assert r.returncode == 0, text[-4000:]
    resumed = re.findall(r"rank \d+ pid \d+: resuming after step (\d+)", text)
    assert resumed == ["4"] * 4, resumed
    assert text.count("replicated state put together from 2 slices") == 4, text[-4000:]
    for rank in range(4):
        want = dict(read_losses(ref / f"losses-rank{rank}.txt"))
        got = read_losses(run / f"losses-rank{rank}.txt")
        assert {s for s, _ in got} == set(range(LAST + 1)), (rank, got)
        for step, value in got:
            assert value == want[step], f"rank {rank} step {step}: {value} != {want[step]} (uninterrupted)"
    # what the restart restored (gathered on rank 0 right after restore) is the uninterrupted run's at step 4
    restored, want = gathered(run / "restored-1.pt"), gathered(ref / "full-step4.pt")
    assert_same(restored["model"], want["model"], "model")
    assert_same(restored["optim"]["state"], want["optim"]["state"], "optim.state")

    # what ftd decided, as `ftd status` shows it: ranks 0 and 2 share a shard, as do 1 and 3
    replica = {r["rank"]: r["replica"] for r in d.status()["ranks"]}
    assert sorted(replica) == [0, 1, 2, 3], replica
    for rank, info in replica.items():
        assert info["source"] == "DTensor Replicate() on mesh dim 'replicate'", info
        assert info["ranks"] == [rank % 2, rank % 2 + 2] and info["pos"] == rank // 2, (rank, info)
    for first in (0, 1):
        pair = (replica[first], replica[first + 2])
        assert pair[0]["replicated_bytes"] == pair[1]["replicated_bytes"] > 0
        assert pair[0]["slice_bytes"] + pair[1]["slice_bytes"] == pair[0]["replicated_bytes"]
        assert min(p["slice_bytes"] for p in pair) > 0.3 * pair[0]["replicated_bytes"], pair

    # the flush: each replicated byte once, both replicas of a shard writing a piece of it
    version = step_dir(tmp_path / "flush", job.name, LAST)
    wait_for(lambda: (version / ".metadata").exists(), 90, f"step {LAST} to be flushed")
    manifest = json.loads((version / "ftd-export-node0.json").read_text())
    items = {rank: [i for i in entry["items"] if i["fqn"].startswith("train.") and len(i.get("size", [])) >= 1]
             for rank, entry in manifest["restore"].items()}
    chunks: dict[str, int] = {}
    for rank_items in items.values():
        for i in rank_items:
            chunks[i["fqn"]] = chunks.get(i["fqn"], 0) + torch.Size(i["sizes"]).numel()
    sizes = {i["fqn"]: torch.Size(i["size"]).numel() for rank_items in items.values() for i in rank_items}
    assert chunks == sizes, [k for k in sizes if chunks[k] != sizes[k]][:5]  # every element once
    def nbytes(item: dict) -> int:  # (DCP's records carry a header each: count the tensor bytes)
        return torch.Size(item["sizes"]).numel() * torch.empty((), dtype=getattr(torch, item["dtype"])).element_size()

    written = {int(rank): sum(map(nbytes, rank_items)) for rank, rank_items in items.items()}
    for first in (0, 1):  # each replica of a shard wrote about half of its bytes
        pair = written[first] + written[first + 2]
        assert 0.3 * pair < written[first] < 0.7 * pair, written
    full = gathered(run / f"full-step{LAST}.pt")
    tensors = [*full["model"].values(), *(v for s in full["optim"]["state"].values() for v in s.values())]
    whole = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim())
    assert sum(written.values()) == whole, (written, whole)

    load = tmp_path / "load"
    r = torchrun(2, load, "--mesh", "fsdp", "--style", "stateful", "--load-dcp", str(version), env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = gathered(load / "restored-0.pt")
    assert_same(got["model"], full["model"], "model")
    assert_same(got["optim"]["state"], full["optim"]["state"], "optim.state")
    assert "Traceback" not in d.log()
