"""Sliced versions (replica-aware snapshots) on disk, without processes: R replicas' slices of the
same model and Adam state written as one global DCP checkpoint, each replicated tensor once (its
pieces as row chunks from their holders); plain dcp.load reads the whole state back bit for bit,
ftd's loader each rank's sliced arena, and those arenas put the whole state together again."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ftd.durable import dcp_writer, ondisk, sliced
from ftd.errors import FtdError
from ftd.shm.checksum import checksums
from ftd.shm.layout import Manifest, plan_layout
from ftd.trainer import replica_restore, statecodec
from ftd.trainer.replicas import ReplicaSet, slice_sources

from support.arenas import as_dtensor

pytestmark = pytest.mark.timeout(60)
CHUNK = 4096


def trained_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 33), nn.Tanh(), nn.Linear(33, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "extra": torch.randn(5, 3, 7).bfloat16(),
            "seen": {"samples": 4}, "mine": torch.arange(3)}


def versions(state: dict, replicas: int) -> list[tuple]:
    """Each replica's committed version: every tensor replicated but ``mine`` (per rank)."""
    skeleton, tensors = statecodec.encode({"state": state, "rng": None})
    mine = state["mine"]
    mask = [t.data_ptr() != mine.data_ptr() for t in tensors]
    return [(pos, replicas, *sliced_version(skeleton, tensors, mask, ReplicaSet(tuple(range(replicas)), pos, "test")))
            for pos in range(replicas)]


def sliced_version(skeleton: dict, tensors: list, mask: list[bool], rs: ReplicaSet) -> tuple[bytearray, Manifest]:
    """The arena and manifest of replica ``rs.pos``'s version: its slice of the ``mask``ed tensors."""
    part = slice_sources(rs, tensors, tensors, [None] * len(tensors), mask, 64)
    layout = plan_layout(part.specs)
    data = bytearray(layout.nbytes)
    for s, src in zip(layout.slots, part.sources):
        data[s.offset:s.end] = src.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    tree = {**skeleton, "replica": part.info}
    return data, Manifest(layout, CHUNK, tuple(checksums(memoryview(data), layout.nbytes, CHUNK)), tree)


def zeroed(x):
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x)
    if isinstance(x, dict):
        return {k: zeroed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [zeroed(v) for v in x]
    return x


def same(a, b, where="state") -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                         b.view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):  # (the writer stores tuples as lists, as for any version)
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("replicas", [2, 3])
def test_a_sliced_version_is_one_dcp_checkpoint_each_replicated_byte_written_once(tmp_path, replicas):
    import torch.distributed.checkpoint as dcp
    state, out = trained_state(), tmp_path / "v"
    ranks = versions(state, replicas)
    written = dcp_writer.write_version(out, 7, ranks, job="j", node_rank=0, nodes=1)
    items = [i for e in written["restore"].values() for i in e["items"]]
    replicated = {f"model.{k}" for k in state["model"]} | {"extra"}
    for key in replicated:  # its chunks, from the replicas, add up to the tensor once; no per-rank copy of it
        chunks = [i for i in items if i["fqn"] == key]
        numel = torch.Size(chunks[0]["size"]).numel()
        assert sum(torch.Size(c["sizes"]).numel() for c in chunks) == numel, key
        assert not any(i["fqn"].endswith("." + key) for i in items), key
    assert len({i["fqn"] for i in items if i["fqn"] == "model.0.weight"}) == 1
    assert any(i["fqn"] == "rank-1.mine" for i in items)
    target = zeroed(state)
    target["rank-1"] = {"mine": torch.zeros(3, dtype=torch.long)}
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=str(out), no_dist=True)
    mine1 = target.pop("rank-1")["mine"]
    same(state, target)  # plain PyTorch: the whole state, bit for bit
    assert torch.equal(mine1, state["mine"])

    # ftd's loader: each rank's sliced arena as it was committed; together they are the whole state
    skeleton, tensors = statecodec.encode({"state": state, "rng": None})
    first = ranks[0][3]
    full = replica_restore.full_manifest(first, "test")
    whole = torch.zeros(full.layout.nbytes, dtype=torch.uint8)
    for pos, _, data, manifest in ranks:
        back = bytearray(len(data))
        ondisk.load_rank(out, written["restore"][str(pos)], memoryview(back))
        assert back == data
        arena = type("A", (), {"tensor": torch.frombuffer(back, dtype=torch.uint8)})
        replica_restore._copy_pieces(replica_restore.flat_views(whole, full), full, arena, manifest, manifest.tree["replica"], per_rank=pos == 0)
    for k, (t, s) in enumerate(zip(tensors, full.layout.slots)):
        got = whole[s.offset:s.end].view(t.dtype).view(t.shape)
        assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


W = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
B = torch.tensor([0.5, -1.0, 2.0])
C = torch.arange(4, dtype=torch.float32)


def hsdp_rank(rank: int) -> tuple:
    """Rank ``rank`` (coordinate (r, s)) of a (replicate 2, shard 2) mesh, its DTensor shards sliced
    across its replicate pair (ranks s and s + 2, as ``replicas.replicated_dtensors`` decides): ``w``
    Shard(0) on the shard dim, rows [4s, 4s + 4), sliced; ``b`` replicated on both dims and ``c``
    sharded on the replicate dim, both per rank in a sliced version (each written once, by the
    coordinate 0 of its unsharded dims, the others referring to it)."""
    r, s = divmod(rank, 2)
    state = {"model": {"w": W[4 * s:4 * s + 4].clone(), "b": B.clone(), "c": C[2 * r:2 * r + 2].clone()},
             "seed": torch.tensor([rank])}
    skeleton, tensors = statecodec.encode({"state": state, "rng": None})
    common = {"mesh_shape": [2, 2], "coordinate": [r, s]}
    as_dtensor(skeleton, "w", placements=["Replicate()", "Shard(dim=0)"], shape=[8, 6], offsets=[4 * s, 0], **common)
    as_dtensor(skeleton, "b", placements=["Replicate()", "Replicate()"], shape=[3], offsets=[0], **common)
    as_dtensor(skeleton, "c", placements=["Shard(dim=0)", "Replicate()"], shape=[4], offsets=[2 * r], **common)
    mask = [True, False, False, False]  # w: sliced across the pair; b, c, seed: per rank
    return (rank, 4, *sliced_version(skeleton, tensors, mask, ReplicaSet((s, s + 2), r, "test")))


def test_a_sliced_hsdp_version_writes_each_shard_once_from_both_its_replicas(tmp_path):
    import torch.distributed.checkpoint as dcp
    out = tmp_path / "v"
    ranks = [hsdp_rank(rank) for rank in range(4)]
    written = dcp_writer.write_version(out, 7, ranks, job="j", node_rank=0, nodes=1)
    items = [i for e in written["restore"].values() for i in e["items"]]
    w = sorted((tuple(i["offsets"]), tuple(i["sizes"])) for i in items if i["fqn"] == "model.w")
    assert len(w) == 4 and sum(torch.Size(s).numel() for _, s in w) == W.numel(), w  # 2 pieces per shard, once
    rows = [(o[0], o[0] + size[0]) for o, size in w]  # each replica's rows, at their offset in the global tensor
    assert rows[0][0] == 0 and rows[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(rows, rows[1:])), rows
    assert {o[0] for o, _ in w} >= {0, 4}, w  # the two shards start at rows 0 and 4
    assert sum(torch.Size(i["sizes"]).numel() for i in items if i["fqn"] == "model.b") == B.numel()
    assert sum(torch.Size(i["sizes"]).numel() for i in items if i["fqn"] == "model.c") == C.numel()
    target = {"model": {"w": torch.zeros_like(W), "b": torch.zeros_like(B), "c": torch.zeros_like(C)},
              "seed": torch.zeros(1, dtype=torch.long)}
    with pytest.warns(UserWarning):
        dcp.load(target, checkpoint_id=str(out), no_dist=True)
    assert torch.equal(target["model"]["w"], W) and torch.equal(target["model"]["b"], B)
    assert torch.equal(target["model"]["c"], C) and int(target["seed"]) == 0
    for rank, _, data, _ in ranks:  # ftd's loader: each rank's sliced arena as committed (c by reference)
        back = bytearray(len(data))
        ondisk.load_rank(out, written["restore"][str(rank)], memoryview(back))
        assert back == data, rank


def test_a_slice_cut_mid_row_is_refused_by_name():
    rank = versions(trained_state(), 2)[0]
    manifest = rank[3]
    info = manifest.tree["replica"]
    k = next(k for k, e in enumerate(info["tensors"]) if e[2] >= 0 and e[3] >= 0 and len(e[1]) == 2)
    dtype, shape, offset, slot = info["tensors"][k]
    bounds = [list(b) for b in info["bounds"]]
    bounds[0][1] = bounds[1][0] = offset + 4  # one element into the tensor's first row
    tree = {**manifest.tree, "replica": {**info, "bounds": bounds}}
    arena = dcp_writer.arena_tensors(rank[2], manifest)
    with pytest.raises(FtdError, match="sliced mid-row"):
        sliced.full_tensors(arena, Manifest(manifest.layout, CHUNK, manifest.checksums, tree), dcp_writer.Shard)


def test_a_resharded_restore_of_a_sliced_flush_is_refused_naming_plain_dcp_load(tmp_path):
    from ftd.trainer import reshard
    state, out = trained_state(), tmp_path / "v"
    dcp_writer.write_version(out, 7, versions(state, 2), job="j", node_rank=0, nodes=1)
    with pytest.raises(FtdError, match=r"replica-aware snapshots.*not resharded onto 3.*dcp.load"):
        reshard.restore_resharded({"dir": str(out), "step": 7, "world": 2}, zeroed(state), 0, 3, False,
                                  strict=True, verbose=False, job="j")
