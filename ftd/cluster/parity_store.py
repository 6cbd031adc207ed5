"""What a cluster node holds for protection, and serving it to peers. Shared memory, no sockets.

The parity segments (one per protected step, plus one spare kept for the next round, so a round
writes into memory that is already reserved and mapped), the mappings of the node's segments (kept
while a segment lives: rank buffers and parity are reused round after round), each step's
verification against its checksums, and the answers to peers' ``meta`` and ``fetch`` queries. The
catalog still owns the rank buffers; this class only reads them.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path

from ftd.cluster.protection import NodeImage
from ftd.cluster.stripes import StripeLayout
from ftd.config import Config
from ftd.daemon.catalog import Catalog
from ftd.errors import FtdError
from ftd.shm import segments
from ftd.shm.checksum import bad_chunks, chunk_checksum
from ftd.shm.layout import Manifest
from ftd.units import format_size

_ZEROS = b""


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes: a view of one shared buffer, so answering a fetch of padding allocates nothing."""
    global _ZEROS
    if len(_ZEROS) < n:
        _ZEROS = bytes(n)
    return memoryview(_ZEROS)[:n]


class ParityStore:
    def __init__(self, config: Config, catalog: Catalog, layout: StripeLayout, position: int):
        self.config, self.catalog, self.layout, self.pos = config, catalog, layout, position
        self.me = config.node_rank
        self.parity: dict[int, tuple[str, dict]] = {}     # step -> (segment name, record), complete
        self.spare: list[str] = []                        # a parity segment kept for the next round
        self.round_segment: str | None = None             # the segment of the round in flight
        self._maps: dict[tuple[str, bool], segments.Mapping] = {}
        self._verified: dict[int, list[tuple[int, int]]] = {}
        self._par_re = re.compile(re.escape(config.shm_prefix) + r"par\.[0-9a-f]{12}$")

    def adopt_parity(self) -> None:
        """Keep parity segments a killed predecessor left, if their checksums hold (newest wins)."""
        for path in segments.list_prefix(self.config.shm_dir, self.config.shm_prefix + "par"):
            if not self._par_re.match(path.name):
                continue
            record = segments.read_meta(path)
            if not isinstance(record, dict) or record.get("kind") != "parity" or not parity_intact(path, record):
                segments.drop_meta(path)
                segments.unlink(path)
                continue
            old = self.parity.get(record["step"])
            if old:
                self.drop_segment(old[0])
            self.parity[record["step"]] = (path.name, record)

    def is_parity_file(self, name: str) -> bool:
        """A parity segment, its sidecar (``.meta``) or a sidecar being written (``.meta.tmp``)."""
        return bool(self._par_re.match(re.sub(r"\.meta(\.tmp)?$", "", name)))

    def take_segment(self, need: int) -> str:
        """A parity segment of at least ``need`` bytes: the spare one if it is large enough (already
        reserved and mapped: no first-touch cost), else a new one, within the memory budget."""
        while self.spare:
            name = self.spare.pop()
            if self.segment_size(name) >= need:
                return name
            self.drop_segment(name, reuse=False)
        in_use = self.catalog.used + self.parity_bytes
        if in_use + need > self.catalog.budget:
            raise FtdError(f"its parity needs {format_size(need)} but the memory budget is "
                           f"{format_size(self.catalog.budget)} with {format_size(in_use)} in use; "
                           f"raise memory_budget on node {self.me}")
        name = self._create(need)
        if in_use + 2 * need <= self.catalog.budget:
            # and the spare now: the next round would need it while this one's parity is kept
            self.spare.append(self._create(need))
            self.mapping(self.spare[-1], writable=True)
        return name

    def _create(self, size: int) -> str:
        name = f"{self.config.shm_prefix}par.{secrets.token_hex(6)}"
        segments.create(self.config.shm_dir / name, size)
        return name

    def drop_segment(self, name: str, reuse: bool = True) -> None:
        """Parity no longer needed: keep one segment as the spare for the next round, unlink the rest."""
        path = self.config.shm_dir / name
        segments.drop_meta(path)
        if reuse and not self.spare and path.exists():
            self.spare.append(name)
            return
        for key in [k for k in self._maps if k[0] == name]:
            self._maps.pop(key).close()
        segments.unlink(path)

    # ---- metadata and fetches -----------------------------------------------------------------
    def node_meta(self, step: int) -> dict:
        held = self.catalog.buffers_of(step)
        return {"ranks": [{"rank": r.rank, "world": r.world, "capacity": b.capacity, "manifest": b.manifest,
                           "committed_at": b.committed_at} for r, b in held],
                "nbytes": sum(b.manifest["nbytes"] for _, b in held)}

    def meta_for(self, step: int, node: int) -> dict | None:
        held = self.parity.get(step)
        if held is None:
            return None
        record = held[1]
        if node == self.me:
            meta = self.node_meta(step) if self.catalog.buffers_of(step) else None
        else:
            meta = record["metas"].get(str(node))
        if meta is None:
            return None
        return {"node": meta, "sizes": record["sizes"], "c": record["c"], "frame_size": record["frame_size"],
                "round": record["round"]}

    def image_holder(self, step: int, rank: int) -> int:
        """The group peer whose image of ``step`` holds ``rank``, from the metadata kept with its parity;
        -1 if none does (or this node holds no parity of that step)."""
        held = self.parity.get(step)
        for node, meta in (held[1]["metas"].items() if held else ()):
            if any(r.get("rank") == rank for r in (meta or {}).get("ranks", [])):
                return int(node)
        return -1

    def fetch(self, step: int, stripe: int, number: int, f: int) -> tuple[object, str, str | None]:
        """(payload, error, corrupt) for a peer's fetch of frame ``f`` of block ``number`` of ``stripe``.
        error is "" when the payload is good; corrupt names what failed its checksum here ("data" or
        "parity"), so the caller can repair it."""
        held = self.parity.get(step)
        if held is None or self.layout.block_number(self.pos, stripe) != number:
            return b"", f"node {self.me} holds no block {number} of stripe {stripe} for step {step}", None
        name, record = held
        c, fs = record["c"], record["frame_size"]
        if not 0 <= f * fs < max(c, 1):
            return b"", f"frame {f} is out of range", None
        lo, hi = f * fs, min(c, f * fs + fs)
        if number < self.layout.k:
            held_data = self.catalog.buffers_of(step)
            if not held_data:
                return b"", f"node {self.me} no longer holds step {step}", None
            a, b = number * c + lo, number * c + hi
            if any(x < b and a < y for x, y in self.bad_ranges(step, held_data)):
                return b"", f"corrupt: node {self.me}'s data of step {step} fails its checksum", "data"
            data = self.image(held_data).read(a, b)
            return (_zeros(b - a) if data is None else data), "", None
        j = number - self.layout.k
        block = record["blocks"][j] if j < len(record["blocks"]) else None
        if block is None or block["stripe"] != stripe:
            return b"", f"node {self.me} holds no parity block {number} of stripe {stripe}", None
        payload = self.mapping(name).view()[j * c + lo:j * c + hi]
        if chunk_checksum(payload) != block["checksums"][f]:
            return b"", (f"corrupt: node {self.me}'s parity block {number} of stripe {stripe} fails its "
                         f"checksum"), "parity"
        return payload, "", None

    def mapping(self, name: str, writable: bool = False) -> segments.Mapping:
        """Mappings of this node's segments, kept while the segment lives: the rank buffers and parity
        segments are reused round after round, so their page tables are built once."""
        key = (name, writable)
        m = self._maps.get(key)
        if m is None:
            m = self._maps[key] = segments.Mapping(self.config.shm_dir / name, populate=writable, writable=writable)
        return m

    def image(self, held) -> NodeImage:
        return NodeImage([self.mapping(b.name).view()[:b.manifest["nbytes"]] for _, b in held])

    def forget_verification(self) -> None:
        self._verified.clear()

    def keep_verification(self, step: int) -> None:
        self._verified = {s: v for s, v in self._verified.items() if s == step}

    def holds(self, step: int) -> bool:
        return step in self.parity and bool(self.catalog.buffers_of(step))

    def keep(self, step: int, name: str, record: dict) -> None:
        """``name`` now holds the complete parity of ``step`` (replacing an older copy)."""
        old = self.parity.get(step)
        if old and old[0] != name:
            self.drop_segment(old[0])
        self.parity[step] = (name, record)

    def complete_round(self, step: int, record: dict) -> None:
        """The round's segment holds all of this node's parity of ``step``: write its sidecar, keep it."""
        segments.write_meta(self.config.shm_dir / self.round_segment, record)
        self.keep(step, self.round_segment, record)

    def drop_steps(self, keep=lambda step: False) -> None:
        """Drop the parity of every step for which ``keep(step)`` is false."""
        for step in [s for s in self.parity if not keep(s)]:
            self.drop_segment(self.parity.pop(step)[0])

    def close(self, keep: bool = False) -> None:
        """Unmap everything; unless ``keep`` (a successor adopts the protected parity), unlink it too."""
        if keep:  # the parity of protected steps has its sidecar: a successor adopts it; the rest goes
            for name in self.spare + ([self.round_segment] if self.round_segment else []):
                self.drop_segment(name, reuse=False)
        else:
            for name in [n for n, _ in self.parity.values()] + self.spare + ([self.round_segment] if self.round_segment else []):
                self.drop_segment(name, reuse=False)
        self.parity.clear()
        self.spare.clear()
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def prune_mappings(self) -> None:
        """Unmap segments that are gone (rank buffers replaced after a layout change, say)."""
        live = {b.name for r in self.catalog.ranks.values() for b in r.buffers}
        live |= {n for n, _ in self.parity.values()} | set(self.spare) | {self.round_segment}
        for key in [k for k in self._maps if k[0] not in live]:
            self._maps.pop(key).close()

    def bad_ranges(self, step: int, held) -> list[tuple[int, int]]:
        """Image byte ranges of this node's data of ``step`` that fail their checksums (cached)."""
        if step in self._verified:
            return self._verified[step]
        bad, base = [], 0
        for _, b in held:
            manifest = Manifest.from_json(b.manifest)
            m = segments.Mapping(self.config.shm_dir / b.name, populate=False, writable=False)
            try:
                for i in bad_chunks(m.view(), manifest.layout.nbytes, manifest.chunk_size, manifest.checksums):
                    bad.append((base + i * manifest.chunk_size, base + (i + 1) * manifest.chunk_size))
            finally:
                m.close()
            base += manifest.layout.nbytes
        self._verified[step] = bad
        return bad

    @property
    def parity_bytes(self) -> int:
        """Shared memory held for parity: protected steps, the round in flight, the spare."""
        total = 0
        names = {n for n, _ in self.parity.values()} | set(self.spare)
        for name in names | ({self.round_segment} if self.round_segment else set()):
            try:
                total += (self.config.shm_dir / name).stat().st_size
            except FileNotFoundError:
                pass
        return total

    def segment_size(self, name: str) -> int:
        try:
            return (self.config.shm_dir / name).stat().st_size
        except FileNotFoundError:
            return 0


def parity_intact(path: Path, record: dict) -> bool:
    """Whether a parity segment still matches the per-frame checksums its record holds."""
    try:
        m = segments.Mapping(path, populate=False, writable=False)
    except OSError:
        return False
    try:
        view, c, fs = m.view(), record["c"], record["frame_size"]
        for j, block in enumerate(record["blocks"]):
            for f, want in enumerate(block["checksums"]):
                lo = j * c + f * fs
                if want is None or chunk_checksum(view[lo:min(lo + fs, (j + 1) * c)]) != want:
                    return False
        return True
    except (KeyError, TypeError, IndexError):
        return False
    finally:
        m.close()
