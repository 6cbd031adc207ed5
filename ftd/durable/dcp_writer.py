"""Writing a version to disk as one global torch.distributed.checkpoint (the format: ``ondisk``).

Every rank contributes what it owns: the shards of its DTensors at their global offsets (a shard
that several replicas hold, under HSDP's replicate dimension say, is written once, by the replica
at coordinate 0 of those dimensions), its pieces of the replicated tensors if the version is
sliced (replica-aware snapshots: row chunks, each replicated byte written once across the replica
set; ``sliced``), and its per-rank values (plain tensors and data: RNG states, a
data loader position, and with DDP the model and optimizer). Rank 0's per-rank values sit at the top
level, so that plain ``dcp.load`` of a DDP job finds its model there; rank R's under ``rank-R.``.
Each rank's records go to ``rank-R/__0_0.distcp``; the node's manifest lists them (as JSON), and the
global ``.metadata`` is built from every node's manifest once all of them are there
(``build_global_metadata``), so plain ``dcp.load`` reads the version at any world size, onto any
mesh, or into an unsharded model.

Apart from ``ondisk`` because it needs torch, which the daemon never imports: only ``ftd export`` and
the flush worker write.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from ftd.durable import ondisk, sliced
from ftd.durable.ondisk import FORMAT, IO_SLICE, canonical_checksums, file_checksum, load_rank
from ftd.errors import FtdError
from ftd.shm.layout import Manifest
from ftd.trainer import statecodec
from ftd.util.files import fsync_dir, write_atomic

DATA_FILE = "__0_0.distcp"


def arena_tensors(data: bytearray, manifest: Manifest) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer of a writable bytearray: fine, we own it
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return [raw[s.offset:s.end].view(statecodec.dtype_from_name(s.dtype)).view(s.shape)
            for s in manifest.layout.slots]


# ---- what a rank writes ----------------------------------------------------------------------------
class Shard:
    """A DTensor's local shard, placed in its global tensor: DCP writes it as one chunk at its offsets."""

    def __init__(self, local: torch.Tensor, node: dict):
        self.local, self.node = local, node
        self.offsets = torch.Size(node["offsets"])
        self.size = torch.Size(node["shape"])

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(self.offsets, self.local.shape),
                                                      properties=TensorProperties(dtype=self.local.dtype),
                                                      size=self.size))]


class _ShardPlanner(DefaultSavePlanner):
    """DCP's planner, that also knows where a ``Shard``'s bytes are."""

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict.get(index.fqn)
        return obj.local if isinstance(obj, Shard) else super().lookup_object(index)


def writes_shard(node: dict) -> bool:
    """Whether this rank writes a DTensor shard: not if another replica of it (the one at coordinate 0
    of every replicated or partial mesh dimension) does."""
    coord = node.get("coordinate") or []
    for dim, placement in enumerate(node.get("placements", [])):
        if not placement.startswith(("Shard(", "_StridedShard(")) and dim < len(coord) and coord[dim] != 0:
            return False
    return True


class _Ref:
    """A DTensor shard that another replica writes: this rank's slot points at that record."""

    def __init__(self, node: dict):
        self.node = node


def split_state(tensors: list[torch.Tensor], manifest: Manifest) -> tuple[dict, dict, dict]:
    """(global part: the DTensor shards this rank writes; per-rank part: everything else; refs: the
    shards another replica writes, as ``_Ref``s). All three keep the state's nesting, in the form DCP
    stores every tensor of as a tensor: arrays become tensors, tuples lists, Generators their state
    tensor, dataclasses dicts of their fields (DCP would pickle an array, a tuple, a Generator or a
    dataclass whole)."""
    tree = manifest.tree
    slot_of = None  # a sliced version: tensor index of the whole state -> slot of this rank's arena (or -1)
    if isinstance(tree, dict) and "replica" in tree:  # one replica's slice: its pieces as chunks (``sliced``)
        slot_of = [e[3] for e in tree["replica"]["tensors"]]
        tree, tensors = sliced.full_tensors(tensors, manifest, Shard)

    def on_dtensor(node: dict, shard, live, where: str):
        partial = [p for p in node.get("placements", []) if p.startswith("Partial")]
        if partial:
            raise FtdError(f"{where} is a DTensor with placement {partial[0]}: its value is the sum of the ranks' "
                           f"shards, not a shard, so it cannot be written as a global checkpoint; redistribute it "
                           f"(Replicate or Shard) before snapshotting, or keep it out of the state")
        if slot_of is not None:
            node = sliced.slot_node(node, slot_of)
        if isinstance(shard, sliced.Elsewhere):
            return shard
        if isinstance(shard, Shard):  # this replica's rows of its replicated local shard: written by it alone
            return Shard(shard.local, sliced.in_global(node, shard.node))
        return Shard(shard, node) if writes_shard(node) else _Ref(node)

    full = {key: statecodec.decode(sub, lambda i: tensors[i], on_dtensor=on_dtensor, path=key, generator_states=True)
            for key, sub in tree["state"].items()}
    if tree.get("rng") is not None:
        full["rng"] = statecodec.decode(tree["rng"], lambda i: tensors[i], generator_states=True)
    return _split(_storable(full))


def _split(x) -> tuple:
    """(shards, per-rank values, refs) of a nested dict, each keeping the nesting of its own leaves."""
    if isinstance(x, sliced.Elsewhere):
        return None, None, None
    if isinstance(x, Shard):
        return x, None, None
    if isinstance(x, _Ref):
        return None, None, x
    if isinstance(x, dict):
        parts: tuple[dict, dict, dict] = ({}, {}, {})
        for k, v in x.items():
            for part, value in zip(parts, _split(v)):
                if value is not None:
                    part[k] = value
        g, r, f = parts
        return (g or None), (r if r or not (g or f) else None), (f or None)
    return None, x, None


def _storable(x):
    if isinstance(x, (Shard, _Ref, sliced.Elsewhere)):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _storable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _storable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return [_storable(v) for v in x]
    return x


# ---- writing the files -------------------------------------------------------------------------------
def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


class _SlicedWrites:
    """A file whose large writes go to the kernel IO_SLICE bytes at a time. A kernel without
    preemption runs one write() of a whole tensor (tens of MB copied into the page cache) to its end,
    even for a nice-19 thread, and the trainer's copy thread waits for the core meanwhile."""

    def __init__(self, f):
        self._f = f

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for lo in range(0, len(view), IO_SLICE):
            self._f.write(view[lo:lo + IO_SLICE])
            ondisk.between_slices()
        return len(view)

    def __getattr__(self, name):
        return getattr(self._f, name)


class _SlicedFileSystem(FileSystem):
    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            yield _SlicedWrites(stream) if "w" in mode or "a" in mode else stream


def _save_dcp(state: dict, directory: Path) -> Metadata:
    writer = FileSystemWriter(directory)
    writer.fs = _SlicedFileSystem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        metadata = dcp.save(state, storage_writer=writer, planner=_ShardPlanner(), no_dist=True)
    (directory / ".metadata").unlink()  # this rank's view only: the global one is built from every node's
    _fsync_tree(directory)
    return metadata


def _items(metadata: Metadata, subdir: str) -> list[dict]:
    """What this rank wrote, as JSON: per record its key, the chunk it holds and where its bytes are."""
    out = []
    for index, info in metadata.storage_data.items():
        md = metadata.state_dict_metadata[index.fqn]
        item = {"fqn": index.fqn, "file": f"{subdir}/{info.relative_path}", "offset": info.offset,
                "length": info.length}
        if isinstance(md, TensorStorageMetadata):
            chunk = next(c for c in md.chunks if tuple(c.offsets) == tuple(index.offset or ()))
            item.update(dtype=str(md.properties.dtype).removeprefix("torch."), size=list(md.size),
                        offsets=list(chunk.offsets), sizes=list(chunk.sizes))
        out.append(item)
    return out


def _slot_index(items: list[dict], state: dict, refs: dict | None, tensors: list[torch.Tensor],
                manifest: Manifest) -> list:
    """Per slot, [file, offset, length] of the record that holds its bytes, or a reference to a shard
    another replica writes ({"fqn", "offsets"}: the loader finds it in that replica's manifest); the
    same for an empty DTensor shard (nothing to read, but its key); None for another empty slot."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    flat, _ = flatten_state_dict(state)
    where = {i["fqn"]: i for i in items}  # one record per key and rank
    slot_of = {t.data_ptr(): i for i, t in enumerate(tensors) if t.numel()}
    index: list = [None] * len(tensors)
    for fqn, value in flat.items():
        local = value.local if isinstance(value, Shard) else value
        if isinstance(value, Shard) and not local.numel():  # an empty shard: its key, for a resharded restore
            if "index" in value.node:  # (a sliced version's empty replicated tensor has no slot)
                index[value.node["index"]] = {"fqn": fqn, "offsets": value.node["offsets"]}
        elif isinstance(local, torch.Tensor) and local.numel() and fqn in where:
            i = slot_of.get(local.data_ptr())
            if i is not None and index[i] is None:
                index[i] = [where[fqn]["file"], where[fqn]["offset"], where[fqn]["length"]]
    for fqn, ref in (flatten_state_dict(refs)[0] if refs else {}).items():
        index[ref.node["index"]] = {"fqn": fqn, "offsets": ref.node["offsets"]}
    missing = [i for i, s in enumerate(manifest.layout.slots) if s.nbytes and index[i] is None]
    if missing:
        raise FtdError(f"tensor(s) {missing[:5]} of the snapshot are not saved as tensors by DCP (inside a "
                       f"tuple or an unusual container?); this state cannot be written to disk")
    return index


def write_version(out: Path, step: int, ranks: Iterable[tuple[int, int, bytearray, Manifest]], *, job: str,
                  node_rank: int, nodes: int, verify: bool = True) -> dict:
    """Write ``ranks`` ((rank, world, checked private arena copy, manifest), one at a time so that only
    one arena is held) of ``step`` into ``out``; return the node manifest, which is written last, and
    build the global ``.metadata`` if every node's part is there now.

    Every part appears under a temporary name and is renamed into place after an fsync. With
    ``verify``, each rank is loaded back from the files just written and checked bit for bit (a shard
    another replica writes is checked when that replica's part is there)."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    restore: dict[str, dict] = {}
    world = 0
    for rank, rank_world, data, manifest in ranks:
        world = max(world, rank_world)
        sums = canonical_checksums(data, manifest)
        tensors = arena_tensors(data, manifest)
        global_part, per_rank, refs = split_state(tensors, manifest)
        # rank 0's own values at the top level (what plain dcp.load of a DDP job reads), rank R's under rank-R
        mine = (per_rank or {}) if rank == 0 else ({f"rank-{rank}": per_rank} if per_rank else {})
        state = _merge(global_part or {}, mine)
        final, tmp = out / f"rank-{rank}", out / f".rank-{rank}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        items = _items(_save_dcp(state, tmp), final.name)
        index = _slot_index(items, state, refs, tensors, manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        entry = {"world": rank_world, "dir": final.name, "index": index, "items": items,
                 "manifest": {**manifest.to_json(), "checksums": sums}}
        del state, tensors, global_part, per_rank
        if verify and not any(isinstance(w, dict) and s.nbytes for w, s in zip(index, manifest.layout.slots)):
            load_rank(out, entry, memoryview(data))  # into the copy just written out: no new memory touched
        del data
        files += sorted(p for p in final.rglob("*") if p.is_file())
        restore[str(rank)] = entry
    fsync_dir(out)
    node_manifest = {"format": FORMAT, "step": step, "job": job, "node_rank": node_rank, "nodes": nodes,
                     "world": world, "ranks": sorted(int(r) for r in restore), "created": time.time(),
                     "files": {str(p.relative_to(out)): file_checksum(p) for p in files}, "restore": restore}
    # last, so a node's part reads as complete only once all of it is on disk; readable as the DCP files are
    write_atomic(out / f"ftd-export-node{node_rank}.json", json.dumps(node_manifest, indent=1), mode=0o666)
    fsync_dir(out)
    build_global_metadata(out, nodes)
    return node_manifest


def _merge(a: dict, b: dict) -> dict:
    """Two nested dicts with disjoint leaves, as one (rank 0's shards and its per-rank values)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# ---- the global metadata -------------------------------------------------------------------------------
def build_global_metadata(out: Path, nodes: int) -> bool:
    """Write ``out/.metadata`` (DCP's, for plain ``dcp.load``) from every node's manifest, if all ``nodes``
    wrote theirs; False if some are missing yet (the last node to finish writes it). Only JSON written
    by ftd is read here: never a pickle from another host."""
    manifests = []
    for node in range(nodes):
        try:
            manifests.append(ondisk.read_node_manifest(out, node))
        except ondisk.CorruptVersion:
            return False
    state_md: dict = {}
    storage: dict = {}
    for manifest in manifests:
        for entry in manifest["restore"].values():
            for item in entry.get("items", []):
                fqn = item["fqn"]
                info = _storage_info(item)
                if "dtype" in item:
                    md = state_md.setdefault(fqn, TensorStorageMetadata(
                        TensorProperties(dtype=statecodec.dtype_from_name(item["dtype"])), torch.Size(item["size"]),
                        []))
                    chunk = ChunkStorageMetadata(torch.Size(item["offsets"]), torch.Size(item["sizes"]))
                    if chunk not in md.chunks:  # (a shard two meshes replicate, e.g. a layer outside TP)
                        md.chunks.append(chunk)
                    storage[MetadataIndex(fqn, torch.Size(item["offsets"]))] = info
                else:
                    state_md[fqn] = BytesStorageMetadata()
                    storage[MetadataIndex(fqn)] = info
    buf = io.BytesIO()
    pickle.dump(Metadata(state_dict_metadata=state_md, storage_data=storage), buf)  # DCP's own format
    write_atomic(out / ".metadata", buf.getvalue(), mode=0o666)
    return True


def _storage_info(item: dict):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    return _StorageInfo(relative_path=item["file"], offset=item["offset"], length=item["length"])
