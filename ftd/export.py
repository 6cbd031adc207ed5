"""``ftd export``: a version held in a daemon's memory, written as a torch.distributed.checkpoint directory.

The directory is plain DCP, readable without ftd:
  DIR/.metadata, DIR/__0_0.distcp   rank 0's state (model, optimizer, scheduler, your data): with DDP
                                    every rank holds the same replica, so this loads at any world size
  DIR/rank-<R>/                     each rank's own state (sharded state, RNG states), one DCP each
  DIR/ftd-export-node<N>.json       step, job, world, ranks, and an xxh3-64 checksum of every file
A cluster's ranks live on several nodes: run the export on each node with the same DIR (a shared
file system) and every node adds its ranks. A version is read by copying its buffer and then
checking every chunk against the checksums committed with it, so a version the trainer overwrites
meanwhile is detected, never written half old, half new. Files appear under temporary names and are
renamed into place after an fsync; the manifest comes last.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import xxhash

from . import shm, treecodec
from .checksum import chunk_checksum
from .errors import FtdError
from .layout import Manifest, chunk_plan

EXPORT_FORMAT = "ftd-export-1"


class TornVersion(FtdError):
    """The version changed while it was being read (the trainer reused its buffer): read another."""


def pick_step(reply: dict, step: int | None) -> int:
    """The step to export: ``step`` if every rank of the node holds it, else the daemon's default
    (the recoverable step in a cluster, the newest step every rank holds otherwise)."""
    ranks = reply["ranks"]
    if not ranks:
        raise FtdError("the daemon holds no snapshot: nothing to export")
    held = [{v["step"] for v in r["versions"]} for r in ranks]
    if step is None:
        if reply["latest"] < 0:
            raise FtdError("no version is held by every rank yet (in a cluster: none is recoverable yet)")
        return reply["latest"]
    missing = [r["rank"] for r, steps in zip(ranks, held) if step not in steps]
    if missing:
        steps = sorted(set.intersection(*held), reverse=True)
        raise FtdError(f"rank(s) {missing} hold no snapshot of step {step}; steps every rank holds: "
                       f"{steps[:10] or 'none'}")
    return step


def read_state(path: Path, manifest: Manifest) -> dict:
    """One rank's snapshot as {key: state_dict or data} (+ "rng"), from a private copy of its buffer."""
    layout = manifest.layout
    mapping = shm.Mapping(path, populate=False, writable=False)
    try:
        if mapping.size < layout.nbytes:
            raise TornVersion(f"{path.name} is smaller than its manifest says")
        view = mapping.view()
        data = bytearray(view[:layout.nbytes])
        view.release()
    finally:
        mapping.close()
    for c, ((lo, hi), _) in enumerate(chunk_plan(layout, manifest.chunk_size)):
        if chunk_checksum(memoryview(data)[lo:hi]) != manifest.checksums[c]:
            raise TornVersion(f"{path.name} fails its checksum in chunk {c}: it changed while being read, "
                              "or is corrupt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer of a writable bytearray: fine, we own it
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    tensors = [raw[s.offset:s.end].view(treecodec.dtype_from_name(s.dtype)).view(s.shape) for s in layout.slots]
    tree = manifest.tree
    state = {key: treecodec.decode(sub, lambda i: tensors[i]) for key, sub in tree["state"].items()}
    if tree.get("rng") is not None:
        state["rng"] = treecodec.decode(tree["rng"], lambda i: tensors[i])
    return state


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_dcp(state: dict, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)
    _fsync_tree(directory)


def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def write_export(out: Path, step: int, states: dict[int, dict], *, job: str, node_rank: int, world: int) -> dict:
    """Write ``states`` ({rank: state}) of ``step`` into ``out``; returns the manifest written."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for rank, state in sorted(states.items()):
        final = out / f"rank-{rank}"
        tmp = out / f".rank-{rank}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save_dcp(state, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        files += sorted(p for p in final.rglob("*") if p.is_file())
    if 0 in states:  # the top level: rank 0's state, what a resharded DDP resume loads
        tmp = out / f".top.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        _save_dcp(states[0], tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != ".metadata"] + [".metadata"]:  # .metadata last: complete
            os.replace(tmp / name, out / name)
            files.append(out / name)
        tmp.rmdir()
    manifest = {"format": EXPORT_FORMAT, "step": step, "job": job, "node_rank": node_rank, "world": world,
                "ranks": sorted(states), "created": time.time(),
                "files": {str(p.relative_to(out)): file_checksum(p) for p in files}}
    path = out / f"ftd-export-node{node_rank}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def verify_export(out: Path) -> list[str]:
    """Files of an export whose checksum does not match its manifest (or that are missing)."""
    bad = []
    for manifest_path in sorted(out.glob("ftd-export-node*.json")):
        manifest = json.loads(manifest_path.read_text())
        for name, digest in manifest["files"].items():
            path = out / name
            if not path.is_file() or file_checksum(path) != digest:
                bad.append(name)
    return bad


def export(conn, out: Path, step: int | None, tries: int = 3) -> dict:
    """Export ``step`` (None: the daemon's default) of every rank the daemon at ``conn`` holds."""
    for attempt in range(tries):
        reply = conn.call("versions")
        chosen = pick_step(reply, step)
        shm_dir = Path(reply["shm_dir"])
        try:
            states = {}
            for r in reply["ranks"]:
                version = next(v for v in r["versions"] if v["step"] == chosen)
                states[r["rank"]] = read_state(shm_dir / Path(version["buffer"]).name,
                                               Manifest.from_json(version["manifest"]))
        except (TornVersion, FileNotFoundError) as e:
            if attempt + 1 == tries or step is not None and not reply["clustered"]:
                raise FtdError(f"step {chosen} could not be read consistently: {e}") from None
            continue  # the trainer moved on: take the newest step again
        world = max(r["world"] for r in reply["ranks"])
        return write_export(out, chosen, states, job=reply.get("job", ""), node_rank=reply["node_rank"],
                            world=world)
    raise AssertionError("unreachable")
