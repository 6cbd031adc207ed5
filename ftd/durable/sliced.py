"""A sliced version (replica-aware snapshots) as part of one global DCP checkpoint: the replicated
tensors written once across the replica set, each replica its own piece of them.

Rank i of a replica set holds, of each replicated tensor its stream range meets, the whole rows
(dim 0) that fall in it (``ftd.shm.slices``). The writer gives each such piece to DCP as a chunk of
the global tensor at its row offset, under the tensor's top-level key (the key rank 0's values use),
so the R replicas' chunks together are the tensor, written once, and plain ``dcp.load`` reads it as
it reads any sharded tensor. The rank's per-rank values stay per rank as in any version. Each piece
is exactly one slot of the rank's arena, so ftd's own loader reads the rank's sliced arena back as it
was in memory (``ondisk.load_rank``), and the restore then puts the whole state together from the
replicas' versions as after a restore from memory (``trainer.replica_restore``).
"""
from __future__ import annotations

from typing import Any

import torch

from ftd.errors import FtdError
from ftd.shm import slices
from ftd.shm.layout import Manifest
from ftd.trainer import statecodec


class Elsewhere:
    """A replicated tensor this rank holds no piece of: another replica writes it."""


def _no_parameters(x: Any) -> Any:
    """The skeleton without Parameter marks (the writer stores a Parameter's data as any tensor)."""
    if isinstance(x, list):
        return [_no_parameters(v) for v in x]
    if isinstance(x, dict):
        return {k: _no_parameters(v) for k, v in x.items() if not (k == "parameter" and x.get(statecodec.TAG))}
    return x


def slot_node(node: dict, slot_of: list[int]) -> dict:
    """A DTensor node of a sliced version with its ``index`` (of the whole state) made a slot of this
    rank's arena, as the writer's slot index counts them; without one where the rank holds no slot of it."""
    out = {k: v for k, v in node.items() if k != "index"}
    index = node.get("index")
    if isinstance(index, int) and 0 <= index < len(slot_of) and slot_of[index] >= 0:
        out["index"] = slot_of[index]
    return out


def in_global(node: dict, piece: dict) -> dict:
    """A DTensor node for this replica's rows of its local shard (``piece``: their offsets in the local
    shard): the offsets in the global tensor, which the local shard sits in as one block at the node's."""
    offsets = [int(a) + int(b) for a, b in zip(node["offsets"], piece["offsets"])]
    out = {k: v for k, v in node.items() if k != "index"}
    out["offsets"] = offsets
    return out


def check_info(info: Any, slots: int) -> dict:
    ok = (isinstance(info, dict) and isinstance(info.get("tensors"), list) and isinstance(info.get("bounds"), list)
          and isinstance(info.get("pos"), int) and 0 <= info["pos"] < len(info["bounds"])
          and all(isinstance(e, list) and len(e) == 4 and isinstance(e[2], int) and isinstance(e[3], int)
                  and e[3] < slots and (e[2] >= 0 or e[3] >= 0) for e in info["tensors"]))
    if not ok:
        raise FtdError("this sliced version's replica entry is malformed: it cannot be written to disk")
    return info


def full_tensors(arena: list[torch.Tensor], manifest: Manifest, shard_class) -> tuple[dict, list]:
    """(the skeleton to decode, the value of each tensor index of the whole state): per-rank tensors
    from their slots, this rank's piece of a replicated one as a ``shard_class`` chunk at its row
    offset (``shard_class(local, {"offsets", "shape"})``), the others ``Elsewhere``. FtdError for a
    piece that is not whole rows (a version sliced by an ftd that cut mid-row)."""
    info = check_info(manifest.tree.get("replica"), len(arena))
    lo, hi = info["bounds"][info["pos"]]
    out: list = []
    for k, (dtype, shape, offset, slot) in enumerate(info["tensors"]):
        shape = [int(d) for d in shape]
        torch_dtype = statecodec.dtype_from_name(dtype)
        if offset < 0:
            out.append(arena[slot])
            continue
        itemsize = torch.empty((), dtype=torch_dtype).element_size()
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        row = slices.row_bytes(shape, itemsize)
        if nbytes == 0:  # nothing to slice: the first replica writes its (empty) key
            whole = torch.empty(shape, dtype=torch_dtype)
            out.append(shard_class(whole, {"offsets": [0] * len(shape), "shape": shape})
                       if info["pos"] == 0 else Elsewhere())
            continue
        if slot < 0:
            out.append(Elsewhere())
            continue
        cut = slices.piece(offset, nbytes, lo, hi)
        if cut is None or cut[1] - cut[0] != arena[slot].numel() or cut[0] % row or cut[1] % row:
            raise FtdError(f"replicated tensor {k} ({dtype}{shape}) is cut at bytes {cut} of its rows of {row} "
                           f"bytes: this version was sliced mid-row (by an older ftd) and cannot be written as DCP "
                           f"chunks; snapshot again with this ftd, or set replica_snapshots = false")
        local = arena[slot].view(torch_dtype)
        if shape:
            local = local.view([(cut[1] - cut[0]) // row, *shape[1:]])
            offsets = [cut[0] // row] + [0] * (len(shape) - 1)
        else:
            local, offsets = local.view(()), []
        out.append(shard_class(local, {"offsets": offsets, "shape": shape}))
    tree = {k: v for k, v in manifest.tree.items() if k != "replica"}
    return _no_parameters(tree), out
