"""What one flushed version holds, read from its node manifests (JSON, never the pickled ``.metadata``):
every rank's restore entry and, per checkpoint key, the chunks of the global tensor with their files.

A restore onto another world size works from this index (``ftd.trainer.reshard``): each new rank
takes the chunks that overlap its shards, and its per-rank values from one old rank. No torch here,
so the daemon can use it to tell whether a version is complete.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ftd.durable import ondisk
from ftd.errors import CorruptVersion


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One record of a global tensor: ``sizes`` elements at ``offsets`` of a tensor of ``size``."""
    fqn: str
    dtype: str
    size: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    where: tuple[str, int, int]  # (file relative to the version directory, offset, length)

    @property
    def file(self) -> str:
        return self.where[0]


@dataclasses.dataclass
class VersionIndex:
    directory: Path
    step: int
    job: str
    world: int                          # ranks of the run that wrote it
    entries: dict[int, dict]            # rank -> its restore entry (manifest, slot index, records)
    chunks: dict[str, list[Chunk]]      # checkpoint key -> the chunks of that tensor, from every rank
    files: dict[str, str]               # file -> xxh3-64, of every node

    def slot_keys(self, rank: int) -> dict[int, str]:
        """Slot of ``rank``'s arena -> the checkpoint key its bytes were written under."""
        entry = self.entries[rank]
        by_place = {(i.get("file"), i.get("offset")): i.get("fqn") for i in entry.get("items", [])
                    if isinstance(i, dict)}
        out = {}
        for slot, where in enumerate(entry.get("index") or []):
            if isinstance(where, dict) and isinstance(where.get("fqn"), str):
                out[slot] = where["fqn"]              # a shard another replica wrote
            elif isinstance(where, list) and len(where) == 3 and (where[0], where[1]) in by_place:
                out[slot] = by_place[(where[0], where[1])]
        return out


def read_index(out: Path) -> VersionIndex:
    """The index of the version in ``out``; CorruptVersion unless every node's part is there."""
    first = _first_manifest(out)
    nodes = first.get("nodes")
    if not isinstance(nodes, int) or nodes < 1:
        raise CorruptVersion(f"{out}: its manifest does not say how many nodes wrote it")
    manifests = [ondisk.read_node_manifest(out, n) for n in range(nodes)]
    entries: dict[int, dict] = {}
    chunks: dict[str, list[Chunk]] = {}
    files: dict[str, str] = {}
    for manifest in manifests:
        files.update(manifest["files"])
        for rank, entry in manifest["restore"].items():
            if not isinstance(entry, dict):
                raise CorruptVersion(f"{out}: node {manifest['node_rank']}'s entry of rank {rank} is not an object")
            entries[int(rank)] = entry
            for item in entry.get("items", []):
                if isinstance(item, dict) and "offsets" in item:
                    chunk = _chunk(out, item)
                    same = chunks.setdefault(chunk.fqn, [])
                    if all(c.offsets != chunk.offsets for c in same):  # a shard two meshes replicate: once
                        same.append(chunk)
    world = max((e.get("world", 0) for e in entries.values() if isinstance(e.get("world"), int)), default=0)
    missing = sorted(set(range(world)) - set(entries))
    if missing:
        raise CorruptVersion(f"{out}: rank(s) {missing[:10]} of the {world} that wrote step {first.get('step')} "
                             f"are in no node's manifest")
    return VersionIndex(out, int(first.get("step", -1)), str(first.get("job", "")), world, entries, chunks, files)


def _first_manifest(out: Path) -> dict:
    names = sorted(out.glob("ftd-export-node*.json"))
    if not names:
        raise CorruptVersion(f"{out} holds no node manifest: not a complete flushed version")
    node = int(names[0].stem.removeprefix("ftd-export-node"))
    return ondisk.read_node_manifest(out, node)


def _chunk(out: Path, item: dict) -> Chunk:
    try:
        where = (item["file"], item["offset"], item["length"])
        if not (isinstance(where[0], str) and isinstance(where[1], int) and isinstance(where[2], int)):
            raise TypeError
        size, offsets, sizes = (tuple(int(x) for x in item[k]) for k in ("size", "offsets", "sizes"))
        if not len(size) == len(offsets) == len(sizes):
            raise ValueError
        return Chunk(str(item["fqn"]), str(item["dtype"]), size, offsets, sizes, where)
    except (KeyError, TypeError, ValueError):
        raise CorruptVersion(f"{out}: a tensor record of its manifest is malformed ({str(item)[:120]})") from None


def is_complete(out: Path) -> bool:
    """Whether every node's part of the version in ``out`` is there (what a resharded restore needs)."""
    try:
        read_index(out)
        return True
    except CorruptVersion:
        return False
