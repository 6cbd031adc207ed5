"""Writing a version to disk as a torch.distributed.checkpoint directory (the format: ``durable``).

Apart from ``durable`` because it needs torch (DCP writes the files), which the daemon never
imports: only ``ftd export`` and the flush worker write.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter

from ftd.durable import ondisk
from ftd.durable.ondisk import FORMAT, IO_SLICE, canonical_checksums, file_checksum, load_rank
from ftd.errors import FtdError
from ftd.shm.layout import Manifest
from ftd.trainer import statecodec
from ftd.util.files import fsync_dir, write_atomic


def arena_tensors(data: bytearray, manifest: Manifest) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer of a writable bytearray: fine, we own it
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return [raw[s.offset:s.end].view(statecodec.dtype_from_name(s.dtype)).view(s.shape)
            for s in manifest.layout.slots]


def state_of(tensors: list[torch.Tensor], manifest: Manifest) -> dict:
    """{key: state_dict or data} (+ "rng") over ``tensors``, in the form DCP stores every tensor of as
    a tensor: numpy arrays become tensors and tuples lists (DCP would pickle an array, or a tuple
    whole; numpy's RNG state is a tuple holding an array)."""
    tree = manifest.tree
    state = {key: statecodec.decode(sub, lambda i: tensors[i]) for key, sub in tree["state"].items()}
    if tree.get("rng") is not None:
        state["rng"] = statecodec.decode(tree["rng"], lambda i: tensors[i])
    return _arrays_as_tensors(state)


def _arrays_as_tensors(x):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, dict):
        return {k: _arrays_as_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, torch.Size):
        return [_arrays_as_tensors(v) for v in x]
    return x


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


def _save_dcp(state: dict, directory: Path):
    writer = FileSystemWriter(directory)
    writer.fs = _SlicedFileSystem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        metadata = dcp.save(state, storage_writer=writer, no_dist=True)
    _fsync_tree(directory)
    return metadata


def _tensor_index(state: dict, metadata, tensors: list[torch.Tensor], manifest: Manifest) -> list:
    """Per slot, [file, offset, length] of the zip record DCP wrote its bytes to (None: empty slot)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    flat, _ = flatten_state_dict(state)
    where = {info_key.fqn: info for info_key, info in metadata.storage_data.items()}
    slot_of = {t.data_ptr(): i for i, t in enumerate(tensors) if t.numel()}
    index: list = [None] * len(tensors)
    for fqn, value in flat.items():
        if isinstance(value, torch.Tensor) and value.numel() and fqn in where:
            i = slot_of.get(value.data_ptr())
            if i is not None and index[i] is None:
                info = where[fqn]
                index[i] = [info.relative_path, info.offset, info.length]
    missing = [i for i, s in enumerate(manifest.layout.slots) if s.nbytes and index[i] is None]
    if missing:
        raise FtdError(f"tensor(s) {missing[:5]} of the snapshot are not saved as tensors by DCP (inside a "
                       f"tuple or an unusual container?); this state cannot be written to disk")
    return index


def write_version(out: Path, step: int, ranks: Iterable[tuple[int, int, bytearray, Manifest]], *, job: str,
                  node_rank: int, nodes: int, verify: bool = True) -> dict:
    """Write ``ranks`` ((rank, world, checked private arena copy, manifest), one at a time so that only
    one arena is held) of ``step`` into ``out``; return the node manifest, which is written last.

    Every part appears under a temporary name and is renamed into place after an fsync. With
    ``verify``, each rank is loaded back from the files just written and checked bit for bit."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    restore: dict[str, dict] = {}
    world = 0
    for rank, rank_world, data, manifest in ranks:
        world = max(world, rank_world)
        sums = canonical_checksums(data, manifest)
        tensors = arena_tensors(data, manifest)
        state = state_of(tensors, manifest)
        final, tmp = out / f"rank-{rank}", out / f".rank-{rank}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        index = _tensor_index(state, _save_dcp(state, tmp), tensors, manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        entry = {"world": rank_world, "dir": final.name, "index": index,
                 "manifest": {**manifest.to_json(), "checksums": sums}}
        if rank == 0:  # the top level: rank 0's state, what a resharded DDP resume loads
            tmp = out / f".top.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _save_dcp(state, tmp)
            names = sorted(p.name for p in tmp.iterdir())
            for name in [n for n in names if n != ".metadata"] + [".metadata"]:  # .metadata last: complete
                os.replace(tmp / name, out / name)
                files.append(out / name)
            tmp.rmdir()
        del state, tensors
        if verify:  # into the copy just written out: it is not needed any more, and no new memory is touched
            load_rank(final, entry, memoryview(data))
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
    return node_manifest


