"""Restoring a flushed version onto another world size or mesh: ftd's own reader of its global
checkpoint, which never unpickles anything.

A version on disk is one global torch.distributed.checkpoint (``ftd.durable.ondisk``): every DTensor
is a set of chunks at global offsets. Each new rank fills each of its live DTensors' local shards
from the chunks that overlap it (``overlap``), reading only those chunks' records and checking,
before it reads, each file it touches against the xxh3-64 checksum in the manifest. A plain tensor
restored from a saved DTensor (an unsharded model in one process) is filled the same way, at
offsets 0. Values that are not DTensors (RNG states, a data loader position, a scheduler, the
optimizer's step counts) are per rank: new rank r takes old rank r's, and a rank the old run did
not have takes rank 0's (with a warning: its random streams then repeat rank 0's).

What is bit-exact: every tensor equals what plain ``dcp.load`` gives for the same mesh, and the
state is the saved step's. A run that continues at another world size is not the run that would
have continued at the old one: the data each rank sees, and the order of floating-point reductions,
change with the world size.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ftd.durable import global_index, ondisk
from ftd.durable.global_index import Chunk, VersionIndex
from ftd.errors import CorruptVersion, FtdError, SerializationError
from ftd.shm.layout import Manifest
from ftd.trainer import dtensors, statecodec
from ftd.trainer.restore import check_fits, load
from ftd.units import format_size
from ftd.util.lines import say

log = logging.getLogger(__name__)


def overlap(a_offsets, a_sizes, b_offsets, b_sizes) -> list[tuple[int, int]] | None:
    """Per dimension [lo, hi) of the global index range two blocks share; None if they share none."""
    out = []
    for ao, an, bo, bn in zip(a_offsets, a_sizes, b_offsets, b_sizes):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return out


class _Reader:
    """Records of one version, each file checked against its checksum before its first read."""

    def __init__(self, index: VersionIndex):
        self.index = index
        self.checked: set[str] = set()
        self.bytes_read = 0

    def _check(self, rel: str) -> None:
        if rel in self.checked:
            return
        want = self.index.files.get(rel)
        if want is None or ondisk.file_checksum(self.index.directory / rel) != want:
            raise CorruptVersion(f"{self.index.directory / rel} does not match the checksum in its manifest")
        self.checked.add(rel)

    def read(self, where, dtype: torch.dtype, shape, name: str) -> torch.Tensor:
        self._check(where[0])
        out = torch.empty(tuple(shape), dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            ondisk.read_record(self.index.directory, list(where), nbytes, out.view(-1).view(torch.uint8).numpy().data,
                               name)
        self.bytes_read += nbytes
        return out


class _Filler:
    """Fills live tensors from the global chunks of a saved DTensor (``statecodec.decode``'s on_dtensor)."""

    def __init__(self, reader: _Reader, keys: dict[int, str]):
        self.reader, self.keys = reader, keys

    def __call__(self, node: dict, _shard, live, where: str):
        key = self.keys.get(node.get("index"))
        chunks = self.reader.index.chunks.get(key or "", [])
        shape = tuple(node.get("shape") or ())
        if not chunks:
            raise CorruptVersion(f"{where}: the checkpoint has no chunk of it (key {key!r})")
        dtype = statecodec.dtype_from_name(chunks[0].dtype)
        if dtensors.is_dtensor(live):
            target, offsets = live.to_local(), dtensors.dtensor_layout(live)["offsets"]
        elif isinstance(live, torch.Tensor):
            target, offsets = live, [0] * len(shape)  # an unsharded tensor: the whole of it
        else:
            live = target = torch.empty(shape, dtype=dtype)
            offsets = [0] * len(shape)
        if tuple(live.shape) != shape or target.dtype != dtype:
            raise SerializationError(f"{where} is {dtype}{list(shape)} in the checkpoint, "
                                     f"{target.dtype}{list(live.shape)} now")
        self.fill(target, offsets, chunks, where)
        return live

    def fill(self, target: torch.Tensor, offsets, chunks: list[Chunk], where: str) -> None:
        covered = 0
        for chunk in chunks:
            shared = overlap(offsets, target.shape, chunk.offsets, chunk.sizes)
            if shared is None:
                continue
            data = self.reader.read(chunk.where, target.dtype, chunk.sizes, f"{where} at {list(chunk.offsets)}")
            src, dst = data, target
            for dim, (lo, hi) in enumerate(shared):
                src = src.narrow(dim, lo - chunk.offsets[dim], hi - lo)
                dst = dst.narrow(dim, lo - offsets[dim], hi - lo)
            with torch.no_grad():
                dst.copy_(src)
            covered += src.numel()
        if covered != target.numel():
            raise CorruptVersion(f"{where}: the checkpoint's chunks cover {covered} of the {target.numel()} elements "
                                 f"this rank holds (a part of the version is missing)")


def restore_resharded(answer: dict, state: dict, rank: int, world: int, capture_rng: bool, *, strict: bool,
                      verbose: bool, job: str) -> int:
    """Load the flushed version the daemon named in ``answer`` ({"dir", "step", "world"}) into ``state``,
    resharded for ``rank`` of ``world``; return its step. FtdError if it does not fit or fails its checks."""
    t0 = time.perf_counter()
    out = Path(answer["dir"])
    try:
        index = global_index.read_index(out)
    except CorruptVersion as e:
        raise FtdError(f"job {job!r}: the flushed version to reshard from cannot be read: {e}") from None
    source = rank if rank in index.entries else 0
    if source != rank:
        log.warning("ftd: rank %d has no counterpart among the %d ranks of step %d: its per-rank state (RNG, data "
                    "position) is rank 0's, so its random streams repeat rank 0's", rank, index.world, index.step)
    entry = index.entries[source]
    manifest = Manifest.from_json(entry["manifest"])
    if isinstance(manifest.tree, dict) and "replica" in manifest.tree:
        raise FtdError(f"job {job!r}: the flushed version of step {index.step} ({out}) was written from replica-aware "
                       f"snapshots (replica_snapshots); ftd restores those from disk only at the world size that wrote "
                       f"them ({index.world} ranks), not resharded onto {world} yet. Plain PyTorch loads it at any "
                       f"world size: dcp.load(state_dict, checkpoint_id='{out}')")
    check_fits(manifest, state, job=job, step=index.step, strict=strict, whole=True)
    reader = _Reader(index)
    keys = index.slot_keys(source)
    dtensor_slots = statecodec.tensor_indices(manifest.tree, ("dtensor",))
    slots = manifest.layout.slots
    where_of = entry.get("index") or []

    def tensor_at(i: int) -> torch.Tensor:
        if not 0 <= i < len(slots):
            raise SerializationError(f"snapshot skeleton refers to tensor {i}, the layout has {len(slots)}")
        s = slots[i]
        dtype = statecodec.dtype_from_name(s.dtype)
        if i in dtensor_slots:
            return torch.empty(0, dtype=dtype)  # a DTensor: _Filler fills the live one from the chunks
        if not s.nbytes:
            return torch.empty(s.shape, dtype=dtype)
        where = where_of[i] if i < len(where_of) else None
        if not isinstance(where, list):
            raise CorruptVersion(f"{out}: rank {source}'s tensor {i} has no record")
        return reader.read(where, dtype, s.shape, f"rank {source} tensor {i}")

    try:
        load(manifest, state, tensor_at, capture_rng, job=job, step=index.step, strict=strict,
             on_dtensor=_Filler(reader, keys))
    except CorruptVersion as e:
        raise FtdError(f"job {job!r}: the flushed version of step {index.step} fails its checks: {e}") from None
    line = (f"ftd: rank {rank} restored step {index.step} from the version flushed to disk ({out}), resharded from "
            f"{index.world} rank(s) to {world}: read {format_size(reader.bytes_read)} in "
            f"{time.perf_counter() - t0:.2f} s")
    if verbose:
        say(line, sys.stderr)
    log.info("%s", line)
    return index.step
