"""Reading a version back into the live state: every chunk's checksum checked on the way.

``restore_versions`` tries the versions the daemon offers, newest first: maps the buffer, reads
every tensor out while checking each chunk (``read_verified``), then loads them into the state in
place (``load``). A version failing a checksum is reported to the daemon as corrupt; a cluster
member then repairs it from its peers (``REPAIRING``: ask again), a standalone one offers the next.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ftd.errors import SerializationError
from ftd.shm.checksum import chunk_checksum
from ftd.shm.layout import Manifest, chunk_plan
from ftd.trainer import rng, statecodec
from ftd.trainer.arena import Arena, close_in_background
from ftd.trainer.capture import is_stateful

log = logging.getLogger(__name__)

REPAIRING = object()  # restore_versions' answer when the daemon repairs the version: ask again


def restore_versions(conn, reply: dict, state: dict, rank: int, capture_rng: bool):
    """The step restored into ``state`` from the versions in a restore ``reply``; None if none is
    usable; REPAIRING if the daemon repairs a corrupt one from its peers."""
    shm_dir = Path(reply["shm_dir"])
    for version in reply["versions"]:
        step, name = version["step"], version["buffer"]
        manifest = Manifest.from_json(version["manifest"])
        try:
            arena = Arena(shm_dir / Path(name).name, populate=False)  # read once: no need to pre-fault
        except FileNotFoundError:
            log.warning("ftd: snapshot of step %d vanished before it could be read; trying an older one", step)
            continue
        try:
            tensors = read_verified(arena, manifest, state, step, rank)
            if tensors is None:
                answer = conn.call("corrupt", rank=rank, buffer=name, step=step)
                if answer.get("repairing"):
                    return REPAIRING  # a cluster member rebuilds it from its peers: ask again
                continue
            load(manifest, state, tensors, capture_rng)
            del tensors
        finally:
            close_in_background(arena)
        origin = version.get("origin", "memory")
        if origin.startswith("disk"):  # the memory copies could not give a step: say so loudly
            log.warning("ftd: rank %d restored step %d from the version flushed to disk (%s)", rank, step,
                        origin.partition(":")[2] or "flush_dir")
        else:
            log.info("ftd: rank %d restored step %d", rank, step)
        return step
    return None


def read_verified(arena: Arena, manifest: Manifest, state: dict, step: int,
                  rank: int) -> dict[int, torch.Tensor] | None:
    """Every tensor of a snapshot, out of shared memory, each chunk's checksum checked on the way.

    One pass: a chunk is hashed (which also brings it into cache), then its pieces are copied
    into fresh tensors. Tensors bound for an nn.Module stay views into the buffer, since
    Module.load_state_dict copies them into the existing parameters anyway. Returns None, after
    a warning, if a chunk fails its checksum.
    """
    layout = manifest.layout
    tree = manifest.tree
    if not isinstance(tree, dict) or not isinstance(tree.get("state"), dict):
        raise SerializationError("snapshot skeleton has no state")
    if arena.mapping.size < layout.nbytes:
        log.warning("ftd: snapshot buffer is smaller than its manifest says; discarding it")
        return None
    as_view: set[int] = set()
    for key, sub in tree["state"].items():
        if isinstance(state.get(key), torch.nn.Module):
            as_view |= statecodec.tensor_indices(sub)
    out: dict[int, torch.Tensor] = {}
    flat: dict[int, torch.Tensor] = {}
    for i, s in enumerate(layout.slots):
        dtype = statecodec.dtype_from_name(s.dtype)
        if i in as_view:
            out[i] = arena.tensor[s.offset:s.end].view(dtype).view(s.shape)
        else:
            out[i] = torch.empty(s.shape, dtype=dtype)
            if s.nbytes:
                flat[i] = out[i].view(-1).view(torch.uint8)
    for c, ((lo, hi), pieces) in enumerate(chunk_plan(layout, manifest.chunk_size)):
        if chunk_checksum(arena.view[lo:hi]) != manifest.checksums[c]:
            log.warning("ftd: snapshot of step %d (rank %d) fails its checksum in chunk %d (bytes %d-%d); "
                        "discarding it and trying an older one", step, rank, c, lo, hi)
            return None
        for p in pieces:
            if p.slot in flat:
                base = layout.slots[p.slot].offset
                flat[p.slot][p.start:p.end].copy_(arena.tensor[base + p.start:base + p.end])
    return out


def load(manifest: Manifest, state: dict, tensors: dict[int, torch.Tensor], capture_rng: bool) -> None:
    """Stateful values get load_state_dict(); everything else is replaced in ``state``; RNG restored."""
    def tensor_at(i: int) -> torch.Tensor:
        if i not in tensors:
            raise SerializationError(f"snapshot skeleton refers to tensor {i}, the layout has {len(tensors)}")
        return tensors[i]

    tree = manifest.tree
    for key, sub in tree["state"].items():
        target = state.get(key)
        if is_stateful(target):
            target.load_state_dict(statecodec.decode(sub, tensor_at))
        else:
            state[key] = statecodec.decode(sub, tensor_at)
    if capture_rng and tree.get("rng") is not None:
        rng.restore(statecodec.decode(tree["rng"], tensor_at))
