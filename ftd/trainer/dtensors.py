"""DTensors (FSDP2, tensor parallel, HSDP): a shard's bytes, what it is a shard of, and its restore.

A snapshot stores each rank's local shard, as it lies in memory, and records in the skeleton what it
is a shard of (placements, mesh, global shape and stride, the shard's global offsets), so that a
restore can check it lands on the same layout (and copy in place, no gather) and the disk tier can
write one global checkpoint. torch.distributed is only touched for values that are DTensors.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ftd.errors import SerializationError


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a torch.distributed DTensor (without importing torch.distributed for others)."""
    return type(x).__name__ == "DTensor" and hasattr(x, "to_local") and hasattr(x, "placements")


def local_shard(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard: the tensor itself, as ``to_local()`` gives it but without going through
    autograd (``to_local()`` costs ~10 us a call, which adds up over every parameter and moment at every
    snapshot); the same storage either way."""
    local = getattr(x, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else x.to_local()


def dtensor_layout(x: torch.Tensor) -> dict:
    """What a DTensor is a shard of, as JSON: placements, mesh shape and dim names, global shape and
    stride, this rank's mesh coordinate and the global offsets of its shard (a fresh copy)."""
    return {k: list(v) for k, v in cached_layout(x, this_rank()).items()}


def this_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else -1


def cached_layout(x: torch.Tensor, rank: int) -> dict:
    """``dtensor_layout`` for this process's ``rank``, shared (not to be changed by the caller): what
    the encoder puts in every skeleton node, which is only serialized."""
    return _layout(x.device_mesh, tuple(x.placements), tuple(x.shape), x.stride(), rank)


@functools.lru_cache(maxsize=4096)
def _layout(mesh: Any, placements: tuple, shape: tuple, stride: tuple, rank: int) -> dict:
    """``dtensor_layout`` of a key that determines it (a mesh equals only a mesh of the same ranks, and
    this process's rank is part of the key): computed once per kind of shard, not once per tensor per
    snapshot (the offsets and the coordinate cost ~50 us a tensor). Not to be changed by its callers."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return {"placements": [repr(p) for p in placements], "mesh_shape": list(mesh.shape),
            "mesh_dims": list(mesh.mesh_dim_names or ()), "shape": list(shape), "stride": list(stride),
            "offsets": [int(o) for o in offsets], "coordinate": [int(c) for c in (mesh.get_coordinate() or ())]}


def check_fits(node: dict, live: Any, where: str) -> None:
    """SerializationError unless ``live`` is a DTensor holding the same shard of the same tensor on the
    same mesh as the saved ``node`` (placements, mesh, global shape and offsets)."""
    if not is_dtensor(live):
        raise SerializationError(
            f"{where} was saved as a shard of a DTensor ({node.get('placements')} on a mesh of shape "
            f"{node.get('mesh_shape')}); restore it into the live DTensor of the same model and optimizer "
            f"(build and shard them, e.g. with fully_shard, before restore()), "
            f"{'not a plain tensor' if isinstance(live, torch.Tensor) else 'got ' + type(live).__name__}")
    saved = {k: node.get(k) for k in ("placements", "mesh_shape", "mesh_dims", "shape", "offsets")}
    now = dtensor_layout(live)
    now = {k: now[k] for k in saved}
    if saved != now:
        differ = ", ".join(f"{k} {saved[k]} in the snapshot, {now[k]} now" for k in saved if saved[k] != now[k])
        raise SerializationError(
            f"{where} does not fit the live DTensor: {differ}. A snapshot in memory restores onto the same "
            f"mesh and placements only; to go onto another world size or mesh, load the version flushed to "
            f"disk (one global checkpoint that reshards), or start afresh")


def restore_shard(node: dict, shard: torch.Tensor, live: Any, where: str) -> Any:
    """Copy the saved shard into the live DTensor's local shard, after checking it is the same shard
    of the same tensor on the same mesh (no gather, no full tensor ever built)."""
    check_fits(node, live, where)
    local = live.to_local()
    if local.shape != shard.shape or local.dtype != shard.dtype:
        raise SerializationError(f"{where}: its local shard is {local.dtype}{list(local.shape)} now, "
                                 f"{shard.dtype}{list(shard.shape)} in the snapshot")
    with torch.no_grad():
        local.copy_(shard)
    return live
