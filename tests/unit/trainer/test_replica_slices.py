"""Replica slices on the trainer side, without processes: each position's sliced sources, put back
together from the R slices, give every tensor's bytes; slices that do not fit are named."""
from types import SimpleNamespace

import pytest
import torch

from ftd.errors import ConfigError
from ftd.config import AUTO_REPLICA_BYTES, load_config
from ftd.shm.layout import Manifest, plan_layout
from ftd.trainer import replica_restore
from ftd.trainer.replicas import ReplicaMismatch, ReplicaSet, slice_sources

pytestmark = pytest.mark.timeout(20)


def arena_of(sliced) -> SimpleNamespace:
    """What a committed version of these sources holds (its arena), and its manifest."""
    layout = plan_layout(sliced.specs)
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for s, src in zip(layout.slots, sliced.sources):
        buf[s.offset:s.end].copy_(src.reshape(-1).view(torch.uint8))
    manifest = Manifest(layout, 4096, (), {"state": {}, "replica": sliced.info})
    return SimpleNamespace(tensor=buf), manifest


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_the_slices_of_every_replica_put_the_whole_state_back(replicas):
    torch.manual_seed(0)
    tensors = [torch.randn(37, 5), torch.arange(3, dtype=torch.int64), torch.randn(()), torch.randn(200).t(),
               torch.zeros(0), torch.randn(4, 6).t()]  # the last one is not contiguous
    replicated = [True, False, True, True, True, True]
    versions = [None] * len(tensors)
    parts = [slice_sources(ReplicaSet(tuple(range(replicas)), pos, "replicas="), tensors, tensors, versions,
                           replicated, 64) for pos in range(replicas)]
    stream = sum(t.numel() * t.element_size() for t, r in zip(tensors, replicated) if r)
    assert sum(p.info["bounds"][i][1] - p.info["bounds"][i][0] for i, p in enumerate(parts)) == stream
    full = replica_restore.full_manifest(arena_of(parts[0])[1], "test")
    out = torch.zeros(full.layout.nbytes, dtype=torch.uint8)
    for pos, part in enumerate(parts):
        arena, manifest = arena_of(part)
        replica_restore._copy_pieces(replica_restore.flat_views(out, full), full, arena, manifest, part.info, per_rank=pos == 0)
    for k, (t, s) in enumerate(zip(tensors, full.layout.slots)):
        got = out[s.offset:s.end].view(t.dtype).view(t.shape)
        assert torch.equal(got, t), f"tensor {k}"
    # a per-rank tensor is whole in its rank's version, a replicated one only in slices
    assert parts[1].info["tensors"][1][2] == -1 and parts[1].info["tensors"][1][3] >= 0


def test_a_slice_of_another_cut_or_set_is_named():
    tensors = [torch.randn(64)]
    mine = slice_sources(ReplicaSet((0, 1), 0, "replicas="), tensors, tensors, [None], [True], 64).info
    theirs = slice_sources(ReplicaSet((0, 1, 2), 1, "replicas="), tensors, tensors, [None], [True], 64).info
    with pytest.raises(ReplicaMismatch, match="replica set.*cut of the replicated bytes"):
        replica_restore._check_same_cut(mine, theirs, 1, "rank 1")
    other = [torch.randn(65)]
    theirs = slice_sources(ReplicaSet((0, 1), 1, "replicas="), other, other, [None], [True], 64).info
    with pytest.raises(ReplicaMismatch, match="replicated tensors"):
        replica_restore._check_same_cut(mine, theirs, 1, "rank 1")


def test_the_config_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('job = "j"\nreplica_snapshots = true\n')
    assert load_config(cfg).replica_snapshots is True
    cfg.write_text('job = "j"\nreplica_snapshots = "yes"\n')
    with pytest.raises(ConfigError, match='replica_snapshots must be true or false or "auto"'):
        load_config(cfg)
    # the default, "auto": on in a cluster (a node with peers), off on a standalone node
    cfg.write_text('job = "j"\npeers = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]\n')
    assert load_config(cfg).replica_snapshots is True
    assert load_config(cfg).replica_min_bytes == AUTO_REPLICA_BYTES  # ... for a state worth slicing
    cfg.write_text('job = "j"\npeers = ["tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]\nreplica_snapshots = false\n')
    assert load_config(cfg).replica_snapshots is False
    cfg.write_text('job = "j"\nreplica_snapshots = "auto"\n')
    assert load_config(cfg).replica_snapshots is False
    cfg.write_text(f'job = "j"\nreplica_snapshots = true\nflush_dir = "{tmp_path}"\n')
    assert load_config(cfg).replica_snapshots is True  # the flush writes sliced versions (durable/sliced.py)
    assert load_config(None).replica_snapshots is False


class FakeMesh:
    def __init__(self, shape):
        self.shape = shape

    def size(self, dim):
        return self.shape[dim]


class FakeDTensor:
    """What ``replicated_dtensors`` reads of a DTensor: its mesh, placements and global size."""

    def __init__(self, mesh, placements, numel):
        self.device_mesh, self.placements, self._numel = mesh, placements, numel

    def numel(self):
        return self._numel

    def element_size(self):
        return 4


def test_the_replicate_dimension_of_dtensors_is_found_from_global_sizes():
    from torch.distributed.tensor import Replicate, Shard
    from ftd.trainer.replicas import replicated_dtensors
    hsdp = FakeMesh((2, 2))
    # HSDP: every parameter and moment Replicate() on dim 0, Shard(0) on dim 1
    found = replicated_dtensors({0: FakeDTensor(hsdp, (Replicate(), Shard(0)), 100),
                                 3: FakeDTensor(hsdp, (Replicate(), Shard(0)), 7)})
    assert found == (hsdp, 0, [0, 3])
    # FSDP + TP: only the norms are replicated, on the tp dim; a dim of size 1 replicates nothing
    tp = FakeMesh((2, 2))
    found = replicated_dtensors({0: FakeDTensor(tp, (Shard(0), Shard(0)), 1000),
                                 1: FakeDTensor(tp, (Shard(0), Replicate()), 10),
                                 2: FakeDTensor(FakeMesh((1, 4)), (Replicate(), Shard(0)), 5000)})
    assert found == (tp, 1, [1])
    # two candidate dims: the one replicating more bytes of the global tensors; a tie: the outer dim
    two = FakeMesh((2, 2))
    assert replicated_dtensors({0: FakeDTensor(two, (Replicate(), Shard(0)), 10),
                                1: FakeDTensor(two, (Shard(0), Replicate()), 30)}) == (two, 1, [1])
    assert replicated_dtensors({0: FakeDTensor(two, (Shard(0), Replicate()), 10),
                                1: FakeDTensor(two, (Replicate(), Shard(0)), 10)}) == (two, 0, [1])
    # replicated on two dims, or partial on another: per rank
    from torch.distributed.tensor import Partial
    assert replicated_dtensors({0: FakeDTensor(two, (Replicate(), Replicate()), 10),
                                1: FakeDTensor(two, (Replicate(), Partial()), 10)}) is None
    assert replicated_dtensors({0: FakeDTensor(hsdp, (Shard(0), Shard(1)), 10)}) is None
    assert replicated_dtensors({}) is None


def test_auto_slices_only_a_replicated_state_of_the_threshold_or_more(monkeypatch):
    """replica_snapshots = "auto": a DDP state under ``replica_min_bytes`` stays whole per rank (and says
    why in the client's stats); at or over it, it is sliced; ``true`` (min 0) slices any."""
    from torch import nn
    from ftd.trainer import replicas, statecodec

    model = nn.Linear(16, 16)  # 1088 bytes of parameters
    wrapper = SimpleNamespace(module=model, process_group="pg")
    monkeypatch.setattr(replicas, "_group_ranks", lambda group: (0, 1))
    state = {"model": model}
    skeleton, tensors = statecodec.encode({"state": {"model": model.state_dict()}, "rng": None})

    checks: list[bool] = []

    def agree(rs, specs, paths, want):
        checks.append(want)
        return want

    monkeypatch.setattr(replicas, "check_agreement", agree)
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # (a job of 2 ranks, as far as the policy sees)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def apply(min_bytes: int, configured: bool = True):
        stats: dict = {}
        policy = replicas.ReplicaPolicy(None, configured, 0, stats, min_bytes)
        policy._find = lambda modules: [wrapper]
        return policy.apply(state, [], skeleton, tensors, list(tensors), [None] * len(tensors)), stats["replicas"]

    sliced, why = apply(2000)  # under it: not sliced, but it takes part in the check, saying so
    assert sliced is None and not why["sliced"] and "of 1088 bytes is under the 2000 bytes" in why["why"], why
    assert checks == [False]
    sliced, why = apply(0, configured=False)  # replica_snapshots = false: the same (a node set otherwise
    assert sliced is None and why["why"] == "replica_snapshots is off" and checks == [False, False]  # meets it)
    sliced, why = apply(1088)
    assert sliced is not None and why["sliced"] and why["replicated_bytes"] == 1088
    sliced, why = apply(0)
    assert sliced is not None and why["slice_bytes"] < why["replicated_bytes"]


def test_a_process_without_a_process_group_of_two_ranks_looks_for_no_replicas():
    from torch import nn
    from ftd.trainer import replicas, statecodec

    model = nn.Linear(4, 4)
    skeleton, tensors = statecodec.encode({"state": {"model": model.state_dict()}, "rng": None})
    stats: dict = {}
    policy = replicas.ReplicaPolicy(None, True, 0, stats, 0)
    policy._find = lambda modules: pytest.fail("looked for DDP in a process of one rank")
    assert policy.apply({"model": model}, [], skeleton, tensors, list(tensors), [None] * len(tensors)) is None
    assert stats["replicas"] == {"sliced": False, "why": "no process group of 2+ ranks: nothing is replicated"}
