"""Replica-aware snapshots, the trainer's side: which tensors are replicated across which ranks, and
the slice of them this rank copies.

Replicated (the same bytes on every rank of a replica set): the parameters of a module wrapped in
``DistributedDataParallel`` and their optimizer state, across the DDP process group; without DDP, the
local shards of DTensors placed ``Replicate()`` on a mesh dimension (HSDP's replicate dimension: every
replica holds the same shard), across that dimension's group; or, with ``Client(replicas=group)``, the
parameters of the state's modules and their optimizer state, across ``group``. Everything else stays
per rank: RNG states, plain data, a loose tensor, and module buffers
(DDP broadcasts rank 0's buffers at each forward, but after it each rank's BatchNorm statistics are its
own batch's: a restore that mixed the ranks' slices of them would not be the uninterrupted run's). The decision is
made once per layout (``ReplicaDecision``) and shown in ``ftd status``.

A sliced version carries ``tree["replica"]``: the replica set, this rank's position, the cut of the
stream (``ftd.shm.slices``), and for every tensor of the full state its dtype, shape, stream offset
(replicated) or arena slot (per rank), so a restore can put the full state together from the R
versions (``replica_restore``).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any

import torch

from ftd.errors import FtdError
from ftd.shm import slices
from ftd.trainer import statecodec
from ftd.trainer.dtensors import local_shard

log = logging.getLogger(__name__)

FORMAT = 1
SLICE_ALIGN = 64  # slice boundaries in the stream: element-aligned for every dtype, and balanced for small states


class ReplicaMismatch(FtdError):
    """The ranks of a replica set disagree on the replicated tensors: slices would not fit together."""


@dataclasses.dataclass
class ReplicaSet:
    ranks: tuple[int, ...]   # global ranks of the set, in group-rank order
    pos: int                 # this rank's position in ``ranks`` (its slice)
    source: str              # how it was decided: "DistributedDataParallel" or "replicas="
    group: Any = None        # the torch.distributed process group (for the agreement check)

    @property
    def size(self) -> int:
        return len(self.ranks)


def _identity(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.dtype, tuple(t.shape), t.device)


def _ddp_class():
    try:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None


def find_ddp(modules: list[torch.nn.Module]) -> list[Any]:
    """The DistributedDataParallel wrappers of ``modules`` (a module of the state may be the wrapper
    itself, or the module it wraps: trainers restore before wrapping and pass the inner module).
    One scan of the garbage collector's objects, done once per layout."""
    ddp = _ddp_class()
    if ddp is None or not modules:
        return []
    found = [m for m in modules if isinstance(m, ddp)]
    inner = {id(m) for m in modules if not isinstance(m, ddp)}
    if inner:
        # by exact type (DDP and its subclasses), not isinstance, which is the slow part of a pass over a
        # trainer's hundreds of thousands of objects: this runs on the trainer thread at the first snapshot
        kinds = _with_subclasses(ddp)
        found += [o for o in gc.get_objects() if type(o) in kinds and id(getattr(o, "module", None)) in inner
                  and all(o is not f for f in found)]
    return found


def _with_subclasses(cls: type) -> set[type]:
    out, todo = {cls}, [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in out:
                out.add(sub)
                todo.append(sub)
    return out


def replicated_dtensors(dtensors: dict[int, torch.Tensor]) -> tuple[Any, int, list[int]] | None:
    """(mesh, mesh dim, tensor indices) of the DTensors placed ``Replicate()`` on that dim of that mesh
    and sharded on every other, for the (mesh, dim) of size 2+ that replicates the most bytes; None if
    there is none. A DTensor replicated on two dims (or partial on one) stays per rank: its slices from
    several replica groups would be cut differently (their streams differ) and could not be written
    once. Decided from global shapes only, which every rank sees alike: the ranks of one replica group
    (whose local shards may differ from other groups') all pick the same dim, or the agreement check
    (a collective over the chosen group) would not meet."""
    weight: dict[tuple, int] = {}
    members: dict[tuple, list[int]] = {}
    for index, x in dtensors.items():
        mesh = x.device_mesh
        unsharded = [dim for dim, p in enumerate(x.placements) if not p.is_shard() and mesh.size(dim) > 1]
        if len(unsharded) == 1 and x.placements[unsharded[0]].is_replicate():
            key = (mesh, unsharded[0])
            weight[key] = weight.get(key, 0) + x.numel() * x.element_size()
            members.setdefault(key, []).append(index)
    if not weight:
        return None
    mesh, dim = max(weight, key=lambda k: (weight[k], -k[1]))  # ties: the first mesh met, its outer dim
    return mesh, dim, members[(mesh, dim)]


def _dtensor_set(found: tuple[Any, int, list[int]]) -> ReplicaSet:
    mesh, dim, _ = found
    names = mesh.mesh_dim_names
    group = mesh.get_group(dim)
    return ReplicaSet(_group_ranks(group), -1, f"DTensor Replicate() on mesh dim {names[dim] if names else dim!r}",
                      group)


def _group_ranks(group: Any) -> tuple[int, ...]:
    import torch.distributed as dist
    return tuple(dist.get_process_group_ranks(group))


def decide(state: dict, explicit: Any, detect: bool, rank: int, optimizers: list,
           find=find_ddp, dtensors: dict | None = None) -> tuple[ReplicaSet | None, set]:
    """(the replica set or None, identities of the replicated tensors). ``explicit``: the group given
    as ``Client(replicas=)``; ``detect``: look for DDP, else for replicated DTensors (the config's
    ``replica_snapshots``); ``find``: ``find_ddp``, or a cache of it; ``dtensors``: the state's DTensors
    by tensor index (``statecodec.Encoder.dtensors``)."""
    modules = [v for v in state.values() if isinstance(v, torch.nn.Module)]
    if explicit is not None:
        tensors = [p for m in modules for p in m.parameters()]
        params = {id(p) for p in tensors}
        rs = ReplicaSet(_group_ranks(explicit), -1, "replicas=", explicit)
    elif detect and not find(modules) and dtensors:
        found = replicated_dtensors(dtensors)
        if found is None:
            return None, set()
        # by DTensor's contract the replicas' local shards are equal (HSDP all-reduces their gradients)
        tensors = [local_shard(dtensors[i]) for i in found[2]]
        params = set()
        rs = _dtensor_set(found)
    elif detect:
        wrappers = find(modules)
        if not wrappers:
            return None, set()
        groups = {id(w.process_group): w.process_group for w in wrappers}
        if len(groups) > 1:
            raise FtdError("the state holds modules wrapped in DistributedDataParallel over different process "
                           "groups; ftd slices replicated state across one group: pass Client(replicas=group), "
                           "or set replica_snapshots = false")
        # (parameters DDP was told to ignore are not synchronised: they stay per rank)
        tensors = [p for w in wrappers for p in w.module.parameters() if not getattr(p, "_ddp_ignored", False)]
        params = {id(p) for p in tensors}
        rs = ReplicaSet(_group_ranks(wrappers[0].process_group), -1, "DistributedDataParallel",
                        wrappers[0].process_group)
    else:
        return None, set()
    if rank not in rs.ranks:
        raise FtdError(f"rank {rank} is not in its replica group (ranks {list(rs.ranks)})")
    rs.pos = rs.ranks.index(rank)
    if rs.size < 2:
        return None, set()
    replicated = {_identity(t) for t in tensors}
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in params:
                    replicated |= {_identity(v) for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)}
    return rs, replicated


def check_agreement(rs: ReplicaSet, specs: list[tuple[str, tuple]], paths: list[str], want: bool = True) -> bool:
    """Whether every rank of the set wants to slice (``want``: its own setting, e.g. the size threshold
    of "auto"), in one all-gather with a hash of its replicated (dtype, shape) list; ReplicaMismatch
    unless every rank has the same list (then a second all-gather of each tensor's hash names the
    first that differs). Every rank that found a replica set takes part, whatever it wants: ranks that
    decided differently (other configs, other ftd versions) must not leave the others in a collective."""
    import torch.distributed as dist
    if rs.group is None or not dist.is_initialized():
        return want
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend(rs.group) == "nccl" else torch.device("cpu"))
    mine = torch.tensor([slices.signature_hash(specs), len(specs), int(want)], dtype=torch.int64, device=device)
    got = [torch.empty_like(mine) for _ in range(rs.size)]
    dist.all_gather(got, mine, group=rs.group)
    rows = [[int(v) for v in g.cpu()] for g in got]  # (one copy to the host per rank)
    wants = [bool(r[2]) for r in rows]
    sigs = [tuple(r[:2]) for r in rows]
    if len(set(sigs)) == 1:
        if len(set(wants)) > 1:
            log.warning("ftd: the replica set (ranks %s, from %s) disagrees on slicing (ranks %s would, %s would "
                        "not: other replica_snapshots settings or ftd versions?); every rank snapshots its whole "
                        "state", list(rs.ranks), rs.source, [r for r, w in zip(rs.ranks, wants) if w],
                        [r for r, w in zip(rs.ranks, wants) if not w])
        return all(wants)
    counts = [s[1] for s in sigs]
    if len(set(counts)) > 1:
        raise ReplicaMismatch(f"the replica set (ranks {list(rs.ranks)}, from {rs.source}) disagrees on the number of "
                              f"replicated tensors: {dict(zip(rs.ranks, counts))}; every replica must hold the same "
                              f"model and optimizer (set replica_snapshots = false to snapshot each rank whole)")
    each = torch.tensor([slices.spec_hash(d, s) for d, s in specs], dtype=torch.int64, device=device)
    every = [torch.empty_like(each) for _ in range(rs.size)]
    dist.all_gather(every, each, group=rs.group)
    cols = torch.stack([e.cpu() for e in every])
    k = int((cols != cols[rs.pos]).any(dim=0).nonzero()[0])
    others = [rs.ranks[j] for j in range(rs.size) if int(cols[j, k]) != int(cols[rs.pos, k])]
    dtype, shape = specs[k]
    raise ReplicaMismatch(f"the replica set (ranks {list(rs.ranks)}, from {rs.source}) disagrees on replicated tensor "
                          f"{paths[k]}: {dtype}{list(shape)} on rank {rs.ranks[rs.pos]}, another dtype or shape on "
                          f"rank(s) {others}; every replica must hold the same model and optimizer (set "
                          f"replica_snapshots = false to snapshot each rank whole)")


def tensor_paths(skeleton: Any, count: int) -> list[str]:
    """The key path of each tensor index in a skeleton (for messages)."""
    out = [f"tensor {i}" for i in range(count)]

    def walk(x: Any, path: str) -> None:
        if isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, dict):
            tag = x.get(statecodec.TAG)
            if tag in ("tensor", "dtensor", "ndarray", "generator") and isinstance(x.get("index"), int):
                if 0 <= x["index"] < count:
                    out[x["index"]] = path
            elif tag in ("dict", "odict") and isinstance(x.get("items"), list):
                for pair in x["items"]:
                    if isinstance(pair, list) and len(pair) == 2:
                        walk(pair[1], f"{path}[{pair[0]!r}]")
            elif tag is None:
                for k, v in x.items():
                    walk(v, f"{path}[{k!r}]")
            else:
                for v in x.values():
                    walk(v, path)

    for key, sub in (skeleton.get("state") or {}).items():  # written as the user wrote them: state['model']...
        walk(sub, f"state[{key!r}]")
    walk(skeleton.get("rng"), "the RNG states")
    return out


@dataclasses.dataclass
class Sliced:
    """What the arena of a sliced snapshot holds: its slots' specs, sources and version counters, the
    identity of each source's base tensor, and the ``replica`` entry of its skeleton."""
    specs: list[tuple[str, tuple]]
    sources: list[torch.Tensor]
    versions: list[int | None]
    origins: list[tuple]
    info: dict


def slice_sources(rs: ReplicaSet, tensors: list[torch.Tensor], sources: list[torch.Tensor],
                  versions: list[int | None], replicated: list[bool], align: int) -> Sliced:
    """Per-rank tensors whole, replicated ones only where this rank's stream range meets them (a
    byte view of the live tensor: the copy runs in the background as for any live tensor; views share
    the version counter, so a tensor changed in place is still caught)."""
    full = [(statecodec.dtype_name(t.dtype), tuple(t.shape)) for t in tensors]
    sizes = [t.numel() * t.element_size() if r else 0 for t, r in zip(tensors, replicated)]
    offsets = slices.stream_offsets(sizes)
    total = sum(sizes)
    rows = [(offsets[k], sizes[k], slices.row_bytes(t.shape, t.element_size()))
            for k, t in enumerate(tensors) if sizes[k]]
    bounds = slices.snap_to_rows(slices.partition(total, rs.size, align), rows)  # pieces are whole rows: DCP chunks
    lo, hi = bounds[rs.pos]
    out = Sliced([], [], [], [], {})
    entries = []
    for k, t in enumerate(tensors):
        if not replicated[k]:
            entries.append([full[k][0], list(full[k][1]), -1, len(out.specs)])
            out.specs.append(full[k])
            out.sources.append(sources[k])
            out.versions.append(versions[k])
            out.origins.append(_identity(t))
            continue
        entries.append([full[k][0], list(full[k][1]), offsets[k], -1])
        cut = slices.piece(offsets[k], sizes[k], lo, hi)
        if cut is None:
            continue
        src, version = sources[k], versions[k]
        if not src.is_contiguous():
            src, version = src.contiguous(), None
        entries[-1][3] = len(out.specs)
        out.specs.append(("uint8", (cut[1] - cut[0],)))
        out.sources.append(src.reshape(-1).view(torch.uint8)[cut[0]:cut[1]])
        out.versions.append(version)
        out.origins.append(_identity(t))
    out.info = {"format": FORMAT, "ranks": list(rs.ranks), "pos": rs.pos, "source": rs.source,
                "signature": slices.signature_hash([f for f, r in zip(full, replicated) if r]),
                "bounds": [list(b) for b in bounds], "stream": total, "tensors": entries}
    return out



class ReplicaPolicy:
    """The client's replica decision, made again whenever the state's tensors change (the optimizer's
    first step adds its moments): which tensors are replicated, checked across the set (``check_agreement``)
    before the first snapshot of each new layout. Slicing is wanted where the daemon's config says
    ``replica_snapshots = true`` (``detect``); the lookup and the check run whatever it says."""

    def __init__(self, explicit: Any, configured: bool, rank: int, stats: dict, min_bytes: int = 0):
        self.explicit, self.configured, self.rank, self.stats = explicit, configured, rank, stats
        self.daemon_setting: bool | None = None
        self.min_bytes = min_bytes  # (replica_snapshots = "auto") a smaller replicated state stays whole
        self._checked: tuple | None = None  # the (signature, mask) last agreed on
        self._agreed = False                 # ... and whether every replica would slice it
        self._why_whole = ""
        self._found: tuple[tuple, list] = ((), [])  # (module ids, their DDP wrappers): one scan per state

    def _under_threshold(self, what: str) -> str:
        return f"{what} is under the {self.min_bytes} bytes per rank that replica_snapshots = \"auto\" slices (set true)"

    def _find(self, modules: list) -> list:
        key = tuple(id(m) for m in modules)
        if self._found[0] != key:
            self._found = (key, find_ddp(modules))
        return self._found[1]

    def detect(self) -> bool:
        """Decided once and kept (the ranks must not switch at different snapshots: the agreement check
        is a collective): the daemon's config as the restore's reply gave it, else (no restore before
        the first snapshot) this process's config. Never asks the daemon from the trainer thread."""
        if self.daemon_setting is None:
            self.daemon_setting = self.configured
        return self.daemon_setting

    def may_slice(self, reply: dict) -> bool:
        """At restore (``reply``: the daemon's answer): whether the next snapshots may be sliced (then the
        full-size buffers are not prepared ahead: the first sliced snapshot sets up its smaller ones)."""
        if "replica_snapshots" in reply and self.daemon_setting is None:
            self.daemon_setting = bool(reply["replica_snapshots"])
            self.min_bytes = int(reply.get("replica_min_bytes", 0))
        import torch.distributed as dist
        return self.explicit is not None or (self.detect() and dist.is_available() and dist.is_initialized()
                                             and dist.get_world_size() > 1)

    def apply(self, state: dict, optimizers: list, skeleton: dict, tensors: list[torch.Tensor],
              sources: list[torch.Tensor], versions: list[int | None],
              dtensors: dict[int, torch.Tensor] | None = None) -> Sliced | None:
        detect = self.explicit is None and self.detect()
        # Replicas are looked for whatever this rank's setting says, and every rank that finds them takes
        # part in the agreement check below, saying whether it would slice: a rank whose node says
        # false (or "auto" with a state under its threshold) must still meet the others there, or they
        # would wait in the collective (or meet the training's next one). Costs the DDP lookup and one
        # all-gather at the first snapshot of each layout.
        import torch.distributed as dist
        if self.explicit is None and not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self.stats["replicas"] = {"sliced": False, "why": "no process group of 2+ ranks: nothing is replicated"}
            return None
        rs, replicated = decide(state, self.explicit, self.explicit is None, self.rank, optimizers, self._find,
                                dtensors)
        if rs is None:
            self.stats["replicas"] = {"sliced": False, "why": "replica_snapshots is off" if not detect and
                                      self.explicit is None else "no DistributedDataParallel module or "
                                      "Replicate() DTensor over 2+ ranks"}
            return None
        mask = [_identity(t) in replicated for t in tensors]
        full = [(statecodec.dtype_name(t.dtype), tuple(t.shape)) for t in tensors]
        key = (tuple(full), tuple(mask))
        if key != self._checked:
            specs = [f for f, m in zip(full, mask) if m]
            paths = tensor_paths(skeleton, len(tensors))
            nbytes = sum(t.numel() * t.element_size() for t, m in zip(tensors, mask) if m)
            # "auto": only a state worth slicing (decided with the others, in the agreement check)
            want = self.explicit is not None or (detect and nbytes >= self.min_bytes)
            self._agreed = check_agreement(rs, specs, [p for p, m in zip(paths, mask) if m], want)
            self._checked = key
            if not self._agreed:
                self._why_whole = ("replica_snapshots is off" if not detect and self.explicit is None else
                                   self._under_threshold(f"a replicated state of {nbytes} bytes") if not want else
                                   "the replica set disagreed on slicing (see the log)")
        if not self._agreed:
            self.stats["replicas"] = {"sliced": False, "why": self._why_whole}
            return None
        sliced = slice_sources(rs, tensors, sources, versions, mask, SLICE_ALIGN)
        lo, hi = sliced.info["bounds"][rs.pos]
        self.stats["replicas"] = {"sliced": True, "source": rs.source, "ranks": list(rs.ranks), "pos": rs.pos,
                                  "replicated_tensors": sum(mask), "per_rank_tensors": len(mask) - sum(mask),
                                  "replicated_bytes": sliced.info["stream"], "slice_bytes": hi - lo}
        return sliced
