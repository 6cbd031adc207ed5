"""The global checkpoint without a process group: two ranks' arenas whose skeletons hold DTensor
shards (as a trainer under FSDP2/HSDP would commit them) are written as one DCP checkpoint, which
plain dcp.load reads whole and ftd's loader reads rank by rank; a Partial placement is refused."""
from __future__ import annotations

import pytest
import torch

from ftd.durable import dcp_writer, global_index, ondisk
from ftd.errors import FtdError

from support.arenas import as_dtensor, make_version

pytestmark = pytest.mark.timeout(60)
FULL = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
BIAS = torch.tensor([0.5, -1.0, 2.0])


def rank_version(rank: int, bias_placement: str = "Replicate()"):
    """Rank ``rank`` of an HSDP-like 2 x 2 mesh, seen on its shard dimension: rows [4r, 4r+4) of the
    weight; the bias replicated (written by coordinate 0 only)."""
    data, manifest = make_version({"model": {"w": FULL[4 * rank:4 * rank + 4].clone(), "b": BIAS.clone()},
                                   "seed": torch.tensor([rank])})
    tree = manifest.tree
    as_dtensor(tree, "w", placements=["Replicate()", "Shard(dim=0)"], mesh_shape=[2, 2], shape=[8, 3],
               offsets=[4 * rank, 0], coordinate=[0, rank])
    as_dtensor(tree, "b", placements=[bias_placement, "Replicate()"], mesh_shape=[2, 2], shape=[3],
               offsets=[0], coordinate=[rank, 0])
    return rank, 2, data, manifest


def test_shards_land_at_their_global_offsets_and_a_replica_is_written_once(tmp_path):
    import torch.distributed.checkpoint as dcp
    out = tmp_path / "v"
    written = dcp_writer.write_version(out, 3, [rank_version(0), rank_version(1)], job="j", node_rank=0, nodes=1)
    entry1 = written["restore"]["1"]
    assert any(isinstance(w, dict) and w["fqn"] == "model.b" for w in entry1["index"])  # rank 1 points at rank 0's
    assert sum(i["fqn"] == "model.b" for e in written["restore"].values() for i in e["items"]) == 1
    target = {"model": {"w": torch.zeros(8, 3), "b": torch.zeros(3)}, "seed": torch.zeros(1, dtype=torch.long),
              "rank-1": {"seed": torch.zeros(1, dtype=torch.long)}}
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=str(out), no_dist=True)
    assert torch.equal(target["model"]["w"], FULL) and torch.equal(target["model"]["b"], BIAS)
    assert target["seed"].item() == 0 and target["rank-1"]["seed"].item() == 1  # per-rank values, per rank
    index = global_index.read_index(out)
    assert index.world == 2 and sorted(index.chunks["model.w"], key=lambda c: c.offsets)[1].offsets == (4, 0)
    for rank in (0, 1):  # and each rank's arena comes back from the files, checksums checked
        data = bytearray(rank_version(rank)[2])
        back = bytearray(len(data))
        ondisk.load_rank(out, written["restore"][str(rank)], memoryview(back))
        manifest = rank_version(rank)[3]
        assert all(back[s.offset:s.end] == data[s.offset:s.end] for s in manifest.layout.slots)


def test_a_partial_placement_is_refused_naming_the_tensor(tmp_path):
    with pytest.raises(FtdError, match=r"model\['b'\].*Partial\(sum\).*cannot be written as a global checkpoint"):
        dcp_writer.write_version(tmp_path / "v", 3, [rank_version(0, "Partial(sum)")], job="j", node_rank=0, nodes=1)
