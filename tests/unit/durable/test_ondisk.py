"""The on-disk format of a version: written through DCP, loaded back by ftd without unpickling,
bit for bit, and refused when anything does not match (ondisk, dcp_writer)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from ftd.durable import dcp_writer, ondisk

from support.arenas import make_version

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class LoaderPosition:
    epoch: int
    order: torch.Tensor


def sample_state() -> dict:
    """Model and optimizer tensors, and the per-rank values DCP would pickle whole unless the writer
    turns them into tensors: a Generator, a dataclass holding a tensor."""
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(64, 33, generator=g), "b": torch.randn(33, generator=g).to(torch.bfloat16),
             "steps": torch.arange(7), "empty": torch.zeros(0, 5), "flag": torch.tensor(True)}
    optim = {"state": {0: {"exp_avg": torch.randn(64, 33, generator=g), "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 0.1, "params": [0]}]}
    data = torch.Generator().manual_seed(5)
    return {"model": model, "optimizer": optim, "epoch": 4, "data": data,
            "loader": LoaderPosition(2, torch.randperm(9, generator=g))}


def write(tmp_path, data, manifest, rank=0, node=0):
    out = tmp_path / "v"
    written = dcp_writer.write_version(out, 7, [(rank, rank + 1, bytearray(data), manifest)], job="j",
                                     node_rank=node, nodes=1)
    return out, written


def test_round_trip_is_bit_exact_with_the_padding_zeroed(tmp_path):
    rng = {"numpy": ("MT19937", np.arange(624, dtype=np.uint32), 5, 0, 0.0), "torch": torch.arange(16, dtype=torch.uint8)}
    data, manifest = make_version(sample_state(), rng=rng, padding=0xAB)
    out, written = write(tmp_path, data, manifest)
    entry = written["restore"]["0"]
    assert written["step"] == 7 and written["ranks"] == [0] and ondisk.verify_export(out) == []
    back = bytearray(manifest.layout.nbytes)
    ondisk.load_rank(out, entry, memoryview(back))
    for s in manifest.layout.slots:
        assert back[s.offset:s.end] == data[s.offset:s.end]
    assert set(back) - set(data) <= {0}  # only the padding differs: zero on disk


def test_plain_dcp_reads_the_top_level_as_rank_0s_state(tmp_path):
    import torch.distributed.checkpoint as dcp
    state = sample_state()
    data, manifest = make_version(state)
    out, _ = write(tmp_path, data, manifest)
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()},
              "data": torch.empty_like(state["data"].get_state()), "loader": {"order": torch.zeros(9, dtype=torch.long)}}
    with pytest.warns(UserWarning):  # "assuming the intent is to load in a single process"
        dcp.load(target, checkpoint_id=str(out), no_dist=True)
    for k, v in state["model"].items():
        assert torch.equal(target["model"][k], v), k
    assert torch.equal(target["data"], state["data"].get_state())      # a Generator: its state tensor
    assert torch.equal(target["loader"]["order"], state["loader"].order)  # a dataclass: a dict of its fields


def test_a_flipped_byte_or_a_lying_manifest_is_refused(tmp_path):
    data, manifest = make_version(sample_state())
    out, written = write(tmp_path, data, manifest)
    entry = written["restore"]["0"]
    dest = memoryview(bytearray(manifest.layout.nbytes))
    bad = dict(entry, index=[["../../etc/passwd", 0, 10] if w else w for w in entry["index"]])
    with pytest.raises(ondisk.CorruptVersion, match="outside"):
        ondisk.load_rank(out, bad, dest)
    short = dict(entry, index=entry["index"][:-1])
    with pytest.raises(ondisk.CorruptVersion, match="index"):
        ondisk.load_rank(out, short, dest)
    sums = list(entry["manifest"]["checksums"])
    sums[0] ^= 1
    with pytest.raises(ondisk.CorruptVersion, match="checksum"):
        ondisk.load_rank(out, dict(entry, manifest={**entry["manifest"], "checksums": sums}), dest)
    where = max((w for w in entry["index"] if w), key=lambda w: w[2])
    path = out / where[0]
    raw = bytearray(path.read_bytes())
    raw[where[1] + where[2] // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ondisk.CorruptVersion):
        ondisk.load_rank(out, entry, dest)
    assert ondisk.verify_export(out) == [where[0]] and where[0].startswith("rank-0/")


def test_a_torn_buffer_is_never_written(tmp_path):
    data, manifest = make_version(sample_state())
    seg = tmp_path / "segment"
    changed = bytearray(data)
    changed[manifest.layout.slots[0].offset] ^= 1  # the trainer reused the buffer meanwhile
    seg.write_bytes(bytes(changed))
    with pytest.raises(ondisk.TornVersion):
        ondisk.read_buffer(seg, manifest)
    seg.write_bytes(bytes(data))
    assert ondisk.read_buffer(seg, manifest) == data


def test_prune_keeps_the_newest_complete_parts_and_only_this_nodes_files(tmp_path):
    data, manifest = make_version({"model": {"w": torch.ones(3)}})
    for step in (2, 4, 6, 8):
        dcp_writer.write_version(ondisk.step_dir(tmp_path, "j", step), step, [(0, 2, bytearray(data), manifest)],
                               job="j", node_rank=0, nodes=2)
        dcp_writer.write_version(ondisk.step_dir(tmp_path, "j", step), step, [(1, 2, bytearray(data), manifest)],
                               job="j", node_rank=1, nodes=2)
    half = ondisk.step_dir(tmp_path, "j", 5)  # a flush of node 0 that was killed: no manifest
    (half / ".rank-0.123.tmp").mkdir(parents=True)
    assert ondisk.flushed_steps(tmp_path, "j", 0) == [8, 6, 4, 2]
    removed = ondisk.prune(tmp_path, "j", 0, keep=2, ranks=[0], newest=8)
    assert removed == [2, 4, 5]
    assert ondisk.flushed_steps(tmp_path, "j", 0) == [8, 6]
    assert ondisk.flushed_steps(tmp_path, "j", 1) == [8, 6, 4, 2]  # node 1's parts are node 1's to remove
    assert not (ondisk.step_dir(tmp_path, "j", 2) / ".metadata").exists()  # the global metadata went too
    assert not half.exists()
    ondisk.prune(tmp_path, "j", 1, keep=2, ranks=[1], newest=8)
    assert sorted(p.name for p in ondisk.job_dir(tmp_path, "j").iterdir()) == ["step-0000000006", "step-0000000008"]


def test_prune_on_a_shared_directory_keeps_what_every_node_completed(tmp_path):
    """Nodes flushed different steps (one superseded some): each keeps its part of the newest
    versions complete on every node, so a restore from disk still has a choice."""
    data, manifest = make_version({"model": {"w": torch.ones(3)}})
    for node, steps in ((0, (4, 8, 12, 16)), (1, (4, 12, 20))):
        for step in steps:
            dcp_writer.write_version(ondisk.step_dir(tmp_path, "j", step), step,
                                   [(node, 2, bytearray(data), manifest)], job="j", node_rank=node, nodes=2)
    ondisk.prune(tmp_path, "j", 0, keep=2, ranks=[0], newest=16, nodes=2)
    assert ondisk.flushed_steps(tmp_path, "j", 0) == [16, 12, 4]  # its own 2 newest + the 2 newest common
    ondisk.prune(tmp_path, "j", 1, keep=2, ranks=[1], newest=20, nodes=2)
    assert ondisk.flushed_steps(tmp_path, "j", 1) == [20, 12, 4]


def test_a_manifest_of_another_node_or_format_is_refused(tmp_path):
    data, manifest = make_version({"model": {"w": torch.ones(3)}})
    out, written = write(tmp_path, data, manifest)
    with pytest.raises(ondisk.CorruptVersion, match="no manifest of node 1"):
        ondisk.read_node_manifest(out, 1)
    (out / "ftd-export-node0.json").write_text(json.dumps({**written, "format": "ftd-export-1"}))
    with pytest.raises(ondisk.CorruptVersion, match="not an ftd-export-3 manifest"):
        ondisk.read_node_manifest(out, 0)
