"""Snapshots on disk: one version of a job as one global torch.distributed.checkpoint, which ftd can
also load back without unpickling anything.

Layout of one version (``ftd export`` and the background flush write the same; ``dcp_writer``)::

  DIR/.metadata                 DCP's metadata of the whole version, built from every node's manifest
                                once all are there: plain ``dcp.load`` reads it at any world size, onto
                                any mesh, or into an unsharded model
  DIR/rank-<R>/__0_0.distcp     rank R's records: the DTensor shards it writes (a shard several replicas
                                hold is written by one), of a sliced version (replica-aware snapshots)
                                its row chunks of the replicated tensors (``sliced``), and its per-rank
                                values (at the top level of the checkpoint for rank 0, under
                                ``rank-<R>.`` for the others)
  DIR/ftd-export-node<N>.json   the node's manifest, written last: step, job, world, an xxh3-64
                                checksum of every file, and per rank what ftd needs to load it back

Writing needs torch (``dcp_writer``); this module, which the daemon uses to list and load versions,
does not. DCP's reader unpickles (``.metadata``, and non-tensor values with ``weights_only=False``), so
ftd never uses it on files another host wrote. The manifest keeps, per rank, the arena layout, the
JSON skeleton of the state and, per tensor, where its bytes lie: a record of a ``.distcp`` file (DCP
stores each tensor as a torch.save zip record, uncompressed), or, for a shard another replica wrote,
that shard's key and offsets, found in that replica's manifest. ftd's loader reads those bytes with
``zipfile`` into a fresh arena and checks every chunk against the checksums, so a restore from disk
goes through the same check as one from memory, and is bit-exact or refused.

The checksums on disk are those of the *canonical* arena (padding between tensors zeroed): the
writer checks its private copy of the buffer against the committed checksums first, so no torn
version is ever written, then zeroes the padding, whose bytes the trainer never wrote.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import xxhash

from ftd.errors import CorruptVersion, ProtocolError, TornVersion
from ftd.shm import segments
from ftd.shm.checksum import chunk_checksum
from ftd.shm.layout import Manifest, chunk_plan, chunk_ranges

FORMAT = "ftd-export-3"
IO_SLICE = 1 << 20  # bytes per read or write system call: a low-priority flush yields the CPU between them


def _no_pause() -> None:
    pass


between_slices = _no_pause  # the flush worker sets this: it waits there while a trainer's copy runs
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_NODE_MANIFEST = re.compile(r"^ftd-export-node(\d+)\.json$")


# ---- reading a version out of shared memory ----------------------------------------------------
def read_buffer(path: Path, manifest: Manifest, into: bytearray | None = None) -> bytearray:
    """A private copy of one rank's arena, checked against the checksums committed with it; into
    ``into`` if it has the arena's size (a buffer kept from an earlier copy: no page faults)."""
    layout = manifest.layout
    mapping = segments.Mapping(path, populate=False, writable=False)
    try:
        if mapping.size < layout.nbytes:
            raise TornVersion(f"{path.name} is smaller than its manifest says")
        view = mapping.view()
        if into is not None and len(into) == layout.nbytes:
            data = into
            data[:] = view[:layout.nbytes]
        else:
            data = bytearray(view[:layout.nbytes])
        view.release()
    finally:
        mapping.close()
    for c, (lo, hi) in enumerate(chunk_ranges(layout.nbytes, manifest.chunk_size)):
        if chunk_checksum(memoryview(data)[lo:hi]) != manifest.checksums[c]:
            raise TornVersion(f"{path.name} fails its checksum in chunk {c}: it changed while being read, "
                              "or is corrupt")
    return data


def canonical_checksums(data: bytearray, manifest: Manifest) -> list[int]:
    """Zero the padding of ``data`` (an arena) and return the chunk checksums of the result."""
    view = memoryview(data)
    pos = 0
    for s in manifest.layout.slots:
        if s.offset > pos:
            view[pos:s.offset] = bytes(s.offset - pos)
        pos = max(pos, s.end)
    if manifest.layout.nbytes > pos:
        view[pos:manifest.layout.nbytes] = bytes(manifest.layout.nbytes - pos)
    return [chunk_checksum(view[lo:hi]) for lo, hi in chunk_ranges(manifest.layout.nbytes, manifest.chunk_size)]


# ---- files ------------------------------------------------------------------------------------
def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while block := f.read(IO_SLICE):
            h.update(block)
            between_slices()
    return h.hexdigest()



# ---- reading back -----------------------------------------------------------------------------
class _Window(io.RawIOBase):
    """Bytes [start, start + length) of an open file, as a seekable file (for zipfile)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = min(max(0, base + offset), self.length)
        return self.pos

    def readinto(self, b) -> int:
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def read_record(directory: Path, where, nbytes: int, dest: memoryview, name: str) -> None:
    """Copy the ``nbytes`` of the tensor record at ``where`` ([file relative to ``directory``, offset,
    length]: one torch.save zip record of a ``.distcp`` file) into ``dest``, with zipfile, never torch.load."""
    if not (isinstance(where, list) and len(where) == 3 and isinstance(where[0], str)
            and all(isinstance(x, int) and x >= 0 for x in where[1:])):
        raise CorruptVersion(f"{name}: the manifest's location {where!r:.80} is not [file, offset, length]")
    rel, start, length = where
    path = (directory / rel).resolve()
    if directory.resolve() not in path.parents:
        raise CorruptVersion(f"{name}: the manifest points outside {directory} ({rel!r})")
    try:
        with open(path, "rb", buffering=0) as f:
            zf = zipfile.ZipFile(_Window(f, start, length))
            records = [i for i in zf.infolist() if re.fullmatch(r"[^/]+/data/\d+", i.filename)]
            if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or records[0].file_size != nbytes:
                raise CorruptVersion(f"{name}: {rel} at {start} does not hold one stored record of {nbytes} bytes")
            with zf.open(records[0]) as src:
                done = 0
                while done < nbytes:
                    block = src.read(min(IO_SLICE, nbytes - done))
                    if not block:
                        raise CorruptVersion(f"{name}: {rel} ends early")
                    dest[done:done + len(block)] = block
                    done += len(block)
                    between_slices()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CorruptVersion(f"{name}: cannot read {rel}: {e}") from None


def load_rank(out: Path, entry: dict, dest: memoryview) -> Manifest:
    """Fill ``dest`` (zeroed, at least the arena's size) with one rank's arena from version directory
    ``out`` and check every chunk; CorruptVersion if anything does not match. Returns the rank's manifest."""
    try:
        manifest = Manifest.from_json(entry.get("manifest"), max_nbytes=len(dest))
    except ProtocolError as e:
        raise CorruptVersion(f"{out}: {e}") from None
    index = entry.get("index")
    slots = manifest.layout.slots
    if not isinstance(index, list) or len(index) != len(slots):
        raise CorruptVersion(f"{out}: the manifest's tensor index does not match its layout")
    shards = None
    for i, (s, where) in enumerate(zip(slots, index)):
        if not s.nbytes:
            continue
        if isinstance(where, dict):  # a shard another replica wrote: its record is in that replica's manifest
            shards = shard_records(out) if shards is None else shards
            key = (where.get("fqn"), tuple(where.get("offsets") or ()))
            if key not in shards:
                raise CorruptVersion(f"{out}: the shard {key[0]} at {list(key[1])} that another replica writes is "
                                     f"not there; every node's part must be in one directory (a shared flush_dir)")
            where = shards[key]
        read_record(out, where, s.nbytes, dest[s.offset:s.end], f"{entry.get('dir', out.name)} tensor {i}")
    bad = [c for c, ((lo, hi), _) in enumerate(chunk_plan(manifest.layout, manifest.chunk_size))
           if chunk_checksum(dest[lo:hi]) != manifest.checksums[c]]
    if bad:
        raise CorruptVersion(f"{out} ({entry.get('dir', '?')}): {len(bad)} chunk(s) fail their checksums (first: chunk {bad[0]})")
    return manifest


def shard_records(out: Path) -> dict[tuple, list]:
    """(key, global offsets) -> [file, offset, length] of every tensor record the nodes' manifests in
    ``out`` list (their JSON only)."""
    found: dict = {}
    for path in sorted(out.glob("ftd-export-node*.json")):
        try:
            manifest = read_node_manifest(out, int(_NODE_MANIFEST.match(path.name).group(1)))
        except (CorruptVersion, AttributeError):
            continue
        for entry in manifest["restore"].values():
            for item in entry.get("items", []) if isinstance(entry, dict) else []:
                if isinstance(item, dict) and "offsets" in item:
                    found[(item.get("fqn"), tuple(item["offsets"]))] = [item.get("file"), item.get("offset"),
                                                                        item.get("length")]
    return found


def read_node_manifest(out: Path, node_rank: int) -> dict:
    """The manifest of ``node_rank`` in a version directory, checked for shape; CorruptVersion if not."""
    path = out / f"ftd-export-node{node_rank}.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptVersion(f"{out} holds no manifest of node {node_rank}: that node's part is incomplete") from None
    except (OSError, ValueError) as e:
        raise CorruptVersion(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("node_rank") != node_rank:
        raise CorruptVersion(f"{path}: not an {FORMAT} manifest of node {node_rank}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("restore"), dict):
        raise CorruptVersion(f"{path}: lacks its file checksums or its restore index")
    return manifest


def verify_files(out: Path, manifest: dict) -> list[str]:
    """Files of a node manifest that are missing or fail their checksum."""
    bad = []
    for name, digest in manifest["files"].items():
        path = out / name
        if ".." in Path(name).parts or not path.is_file() or file_checksum(path) != digest:
            bad.append(name)
    return bad


def verify_export(out: Path) -> list[str]:
    """Files of an export whose checksum does not match its manifest (or that are missing)."""
    bad = []
    for path in sorted(out.glob("ftd-export-node*.json")):
        node = int(_NODE_MANIFEST.match(path.name).group(1))
        try:
            bad += verify_files(out, read_node_manifest(out, node))
        except CorruptVersion:
            bad.append(path.name)
    return bad


# ---- a directory of flushed versions --------------------------------------------------------------
def job_dir(root: Path, job: str) -> Path:
    return root / job


def step_dir(root: Path, job: str, step: int) -> Path:
    return job_dir(root, job) / f"step-{step:010d}"


def flushed_steps(root: Path, job: str, node_rank: int) -> list[int]:
    """Steps whose directory holds this node's manifest (its part is complete), newest first."""
    out: list[int] = []
    try:
        entries = list(os.scandir(job_dir(root, job)))
    except OSError:  # none yet, or the directory is unusable (the flushes say why)
        return out
    for e in entries:
        m = _STEP_DIR.match(e.name)
        if m and os.path.exists(os.path.join(e.path, f"ftd-export-node{node_rank}.json")):
            out.append(int(m.group(1)))
    return sorted(out, reverse=True)


def _step_dirs(root: Path, job: str) -> Iterator[tuple[int, Path]]:
    try:
        entries = list(os.scandir(job_dir(root, job)))
    except OSError:
        return
    for e in entries:
        m = _STEP_DIR.match(e.name)
        if m:
            yield int(m.group(1)), Path(e.path)


def remove_part(out: Path, node_rank: int, ranks: Iterable[int]) -> None:
    """Remove what ``node_rank`` wrote into a version directory (its manifest first, so the part
    reads as incomplete at once); the directory goes once no node's part is left in it."""
    segments.unlink(out / f"ftd-export-node{node_rank}.json")
    segments.unlink(out / ".metadata")  # the version is not whole any more
    for rank in ranks:
        shutil.rmtree(out / f"rank-{rank}", ignore_errors=True)
    mine = [f".rank-{r}." for r in ranks] + [f".ftd-export-node{node_rank}.json."]
    for p in out.glob(".*.tmp"):  # this node's leftovers of a flush that was killed
        if p.name.startswith(tuple(mine)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else segments.unlink(p)
    try:
        out.rmdir()
    except OSError:
        pass  # other nodes' parts are still there


def remove_node_parts(root: Path, job: str, node_rank: int, ranks: Iterable[int]) -> list[int]:
    """Remove every part ``node_rank`` wrote of the job's versions (the ranks its manifests name, and
    ``ranks``, for parts without a manifest); returns the steps whose part was complete."""
    removed = []
    for step, path in sorted(_step_dirs(root, job)):
        mine = set(ranks)
        try:
            mine |= set(read_node_manifest(path, node_rank).get("ranks", []))
            removed.append(step)
        except CorruptVersion:
            pass
        remove_part(path, node_rank, sorted(r for r in mine if isinstance(r, int)))
    return removed


def prune(root: Path, job: str, node_rank: int, keep: int, ranks: Iterable[int], newest: int, nodes: int = 1) -> list[int]:
    """Remove this node's parts of older versions: it keeps its newest ``keep`` complete parts, and
    (on a shared directory, where it sees the other nodes' manifests) also its part of the newest
    ``keep`` versions that all ``nodes`` completed, so the cluster keeps versions it can restore
    even when nodes flushed different steps. Incomplete parts older than ``newest`` (a flush that
    was killed) go too. Returns the steps removed."""
    ranks = list(ranks)
    mine = flushed_steps(root, job, node_rank)
    everyone = set(mine)
    for other in range(nodes):
        if other != node_rank:
            everyone &= set(flushed_steps(root, job, other))
    kept = set(mine[:keep]) | set(sorted(everyone, reverse=True)[:keep])
    removed = []
    for step, path in sorted(_step_dirs(root, job)):
        done = step in mine
        if (done and step not in kept) or (not done and step < newest):
            remove_part(path, node_rank, ranks)
            removed.append(step)
    return removed
