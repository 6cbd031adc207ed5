"""Reading a version out of shared memory on a pool of threads, every chunk checked before its bytes
are used, straight into the live tensors where it can.

Each slot of the arena goes to one of three places (``plan``):
- **live**: a CPU tensor of the live state that the restore would copy into anyway (a module's
  parameters and buffers, an optimizer's existing moments, a tensor in a dict, a DTensor's local
  shard), filled in place, so that ``load_state_dict``'s own copy becomes a copy onto itself, which
  torch skips;
- **view**: a view of the arena, for a value that is copied by its consumer anyway and cannot be
  filled in place (a CUDA parameter, a non-contiguous one);
- **fresh**: a new CPU tensor, for what has no live tensor yet (the moments of an optimizer that has
  not stepped in this process) or is replaced rather than filled.

``read`` runs two passes over the chunks, each on ``restore_threads()`` threads (xxh3 and torch's
copy release the GIL, and so does ``segments.populate``, which maps a chunk's pages with one system
call instead of a page fault per 4 KiB). Pass 1 hashes every chunk and copies its fresh pieces at
once, while the chunk is in cache (a fresh tensor is seen by no one until the load). Pass 2, only
once every chunk matched its checksum, copies the live pieces. A chunk that fails thus leaves the
live state untouched: nothing is ever half-loaded.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ftd.shm import segments
from ftd.shm.checksum import chunk_checksum
from ftd.shm.layout import Manifest, Piece, TensorSlot, chunk_plan
from ftd.trainer import dtensors, statecodec
from ftd.trainer.arena import Arena

MAX_THREADS = 16


def restore_threads() -> int:
    """Threads for a restore: the cores this process may use, shared among the node's ranks (they
    restore at the same time), 1 to 16. $FTD_RESTORE_THREADS overrides. The trainer waits for the
    restore, so its own cores are spare."""
    if os.environ.get("FTD_RESTORE_THREADS", "").isdigit():
        return max(1, int(os.environ["FTD_RESTORE_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    ranks = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, min(MAX_THREADS, cores // ranks))


@dataclasses.dataclass
class Plan:
    """Where each slot goes: ``live`` slots into the given tensors, ``views`` stay in the arena, the
    rest into fresh tensors."""
    live: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    views: set[int] = dataclasses.field(default_factory=set)


def plan(manifest: Manifest, state: dict, live_dicts: dict[str, Any]) -> Plan:
    """Match the snapshot's skeleton against the live state: ``live_dicts`` holds the ``state_dict()``
    of each Stateful value of ``state`` (by key), what ``load_state_dict`` will be given."""
    out = Plan()
    slots = manifest.layout.slots
    for key, sub in manifest.tree["state"].items():
        if key in live_dicts:
            module = isinstance(state.get(key), torch.nn.Module)
            _match(sub, live_dicts[key], slots, out, stateful=True, module=module, where=f"state[{key!r}]")
        elif key in state:
            _match(sub, state[key], slots, out, stateful=False, module=False, where=f"state[{key!r}]")
    return out


def _fits(live: Any, slot: TensorSlot) -> bool:
    """A live tensor the slot's bytes can be written into as they are."""
    return (isinstance(live, torch.Tensor) and not dtensors.is_dtensor(live) and live.device.type == "cpu"
            and live.layout == torch.strided and live.is_contiguous() and not live.is_conj() and not live.is_neg()
            and str(live.dtype).removeprefix("torch.") == slot.dtype and tuple(live.shape) == slot.shape)


def _match(x: Any, live: Any, slots, out: Plan, *, stateful: bool, module: bool, where: str, depth: int = 0) -> None:
    """Walk a skeleton and the live value side by side, as ``statecodec.decode`` does."""
    if depth > statecodec.MAX_DEPTH:
        return
    if isinstance(x, list):
        for i, v in enumerate(x):
            _match(v, _at(live, i), slots, out, stateful=stateful, module=module, where=f"{where}[{i}]", depth=depth + 1)
        return
    if not isinstance(x, dict):
        return
    tag = x.get(statecodec.TAG)
    if tag is None:
        for k, v in x.items():
            _match(v, _get(live, k), slots, out, stateful=stateful, module=module, where=f"{where}[{k!r}]",
                   depth=depth + 1)
    elif tag in ("dict", "odict") and isinstance(x.get("items"), list):
        for pair in x["items"]:
            if isinstance(pair, list) and len(pair) == 2 and not isinstance(pair[0], (list, dict)):
                _match(pair[1], _get(live, pair[0]), slots, out, stateful=stateful, module=module,
                       where=f"{where}[{pair[0]!r}]", depth=depth + 1)
    elif tag == "tuple" and isinstance(x.get("items"), list):
        _match(x["items"], live, slots, out, stateful=stateful, module=module, where=where, depth=depth + 1)
    elif tag in ("tensor", "dtensor") and isinstance(x.get("index"), int) and 0 <= x["index"] < len(slots):
        i, slot = x["index"], slots[x["index"]]
        if tag == "dtensor":
            if live is None:  # the moments of an optimizer that has not stepped: made by ``load``, filled from
                out.views.add(i)  # the arena after every chunk passed
                return
            dtensors.check_fits(x, live, where)  # another layout: refused now, nothing written yet
            local = live.to_local()
            if _fits(local, slot):
                out.live[i] = local
            else:
                out.views.add(i)  # _restore_dtensor copies the shard into the live one after the checks
        elif stateful or not x.get("parameter"):  # a parameter in plain data is replaced, not filled
            if _fits(live, slot) and not (not stateful and isinstance(live, torch.nn.Parameter)):
                out.live[i] = live
            elif module:
                out.views.add(i)  # Module.load_state_dict copies it (a CUDA or non-contiguous parameter)


def _get(live: Any, key: Any) -> Any:
    return live.get(key) if isinstance(live, dict) else None


def _at(live: Any, i: int) -> Any:
    return live[i] if isinstance(live, (list, tuple)) and i < len(live) else None


class BadChunk(Exception):
    """A chunk failed its checksum: ``chunk`` (its index), ``span`` (its bytes), ``count`` (how many failed)."""

    def __init__(self, chunk: int, span: tuple[int, int], count: int):
        super().__init__(f"chunk {chunk} (bytes {span[0]}-{span[1]}) fails its checksum")
        self.chunk, self.span, self.count = chunk, span, count


def read(arena: Arena, manifest: Manifest, where: Plan, threads: int | None = None) -> dict[int, torch.Tensor]:
    """Every tensor of the version (slot -> live, view or fresh tensor, per ``where``), every chunk
    checked first; BadChunk, with the live tensors untouched, if a chunk fails its checksum."""
    layout = manifest.layout
    out: dict[int, torch.Tensor] = {}
    fresh: dict[int, torch.Tensor] = {}  # slot -> flat uint8 view of its fresh tensor
    live: dict[int, torch.Tensor] = {}   # slot -> flat uint8 view of its live tensor
    for i, s in enumerate(layout.slots):
        if i in where.live:
            out[i] = where.live[i]
            if s.nbytes:
                live[i] = where.live[i].detach().view(-1).view(torch.uint8)
        elif i in where.views:
            out[i] = arena.tensor[s.offset:s.end].view(statecodec.dtype_from_name(s.dtype)).view(s.shape)
        else:
            out[i] = torch.empty(s.shape, dtype=statecodec.dtype_from_name(s.dtype))
            if s.nbytes:
                fresh[i] = out[i].view(-1).view(torch.uint8)
    chunks = chunk_plan(layout, manifest.chunk_size)
    src = arena.tensor
    base = src.data_ptr() if src.numel() else 0

    def copy(pieces: list[Piece], into: dict[int, torch.Tensor], populate_dst: bool) -> None:
        for p in pieces:
            dst = into.get(p.slot)
            if dst is None:
                continue
            if populate_dst:  # fresh memory: its pages in one call, not a fault per page inside the copy
                segments.populate(dst.data_ptr() + p.start, p.end - p.start, write=True)
            off = layout.slots[p.slot].offset
            dst[p.start:p.end].copy_(src[off + p.start:off + p.end])

    def verify(c: int) -> int | None:
        (lo, hi), pieces = chunks[c]
        if hi > lo:
            segments.populate(base + lo, hi - lo, write=False)
        if chunk_checksum(arena.view[lo:hi]) != manifest.checksums[c]:
            return c
        copy(pieces, fresh, populate_dst=True)
        return None

    n = max(1, min(threads or restore_threads(), len(chunks)))
    pool = ThreadPoolExecutor(n, thread_name_prefix="ftd-restore") if n > 1 else None
    try:
        run = pool.map if pool else map
        failed = [c for c in run(verify, range(len(chunks))) if c is not None]
        if failed:
            raise BadChunk(failed[0], chunks[failed[0]][0], len(failed))
        with torch.no_grad():
            list(run(lambda c: copy(chunks[c][1], live, populate_dst=False), range(len(chunks))))
    finally:
        if pool:
            pool.shutdown(wait=True)
    return out
