"""Restoring a version that holds only this rank's slice of the replicated state: the full state put
together from the R versions of the same step of its replica set, every byte checked.

``full_manifest`` gives the layout of the whole state (from the version's ``replica`` entry) before
any byte is read, so the usual checks (``restore.check_fits``, ``readback.plan``) run on it as on any
version. ``assemble`` then asks the daemon for every other replica's version of the step
(``replica_version``: on this node straight from shared memory; in a cluster, from another node,
fetched and checked by the daemon while this waits), verifies each source's chunks against its own
manifest, and only once every source passed copies the per-rank tensors from this rank's version and
each replica's slice straight to where ``readback.plan`` put each tensor: into the live tensor it
fills in place, or a fresh one. One copy of each byte, as for a whole-rank version, and a source that
fails leaves the live state untouched.

Nothing silent: a replica whose version of the step is missing, or whose slices do not fit this
rank's (another replica set, another cut, other tensors), is an FtdError naming the rank and step.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ftd.errors import FtdError
from ftd.shm import slices
from ftd.shm import segments
from ftd.shm.checksum import chunk_checksum
from ftd.shm.layout import Manifest, chunk_count, plan_layout
from ftd.trainer import readback, statecodec
from ftd.trainer.arena import Arena
from ftd.trainer.replicas import FORMAT, ReplicaMismatch

log = logging.getLogger(__name__)

WAIT_SECONDS = 600.0  # longest a restore waits for a replica's version to be fetched from another node
REPORT_EVERY = 10.0


def is_sliced(manifest: Manifest) -> bool:
    return isinstance(manifest.tree, dict) and isinstance(manifest.tree.get("replica"), dict)


def replica_ranks(version: dict) -> list:
    """The replica set of a sliced version as the daemon offered it (its manifest's JSON)."""
    return version["manifest"]["tree"]["replica"]["ranks"]


def _info(manifest: Manifest, what: str) -> dict:
    info = manifest.tree.get("replica")
    ok = (isinstance(info, dict) and info.get("format") == FORMAT and isinstance(info.get("tensors"), list)
          and isinstance(info.get("bounds"), list) and isinstance(info.get("ranks"), list)
          and isinstance(info.get("pos"), int) and 0 <= info["pos"] < len(info["ranks"]) == len(info["bounds"]))
    if not ok:
        raise FtdError(f"{what} has a malformed replica entry (format {FORMAT} expected)")
    return info


def full_manifest(manifest: Manifest, what: str) -> Manifest:
    """The manifest of the whole state (its layout and skeleton; checksums filled in by ``assemble``)."""
    info = _info(manifest, what)
    layout = plan_layout([(e[0], tuple(e[1])) for e in info["tensors"]])
    tree = {k: v for k, v in manifest.tree.items() if k != "replica"}
    return Manifest(layout, manifest.chunk_size, (), tree)


def _check_same_cut(mine: dict, theirs: dict, j: int, who: str) -> None:
    def replicated(info: dict) -> list:
        return [e[:3] for e in info["tensors"] if e[2] >= 0]
    differ = [name for name, a, b in (
        ("replica set", mine["ranks"], theirs["ranks"]), ("position", j, theirs["pos"]),
        ("cut of the replicated bytes", mine["bounds"], theirs["bounds"]),
        ("replicated tensors (dtype, shape, offset)", replicated(mine), replicated(theirs))) if a != b]
    if differ:
        raise ReplicaMismatch(f"{who}'s slice does not fit this rank's: its {', '.join(differ)} differ(s) (this rank: "
                              f"set {mine['ranks']}, position {mine['pos']}); the replicas' snapshots of this step are "
                              f"not one replica set's. Start afresh (restore(state, resume='never')) or set "
                              f"replica_snapshots = false")


COPY_SLICE = 16 << 20  # bytes per copy task: a large tensor's copy spread over the restore's threads


def _pieces(full: Manifest, manifest: Manifest, info: dict, per_rank: bool) -> list[tuple[int, int, int, int]]:
    """(slot of the whole state, byte offset in that tensor, byte offset in the source arena, bytes) of
    each piece a source version holds: its replicated pieces and, with ``per_rank``, its per-rank tensors."""
    lo, hi = info["bounds"][info["pos"]]
    out = []
    for k, (dtype, shape, offset, slot) in enumerate(info["tensors"]):
        if slot < 0 or slot >= len(manifest.layout.slots):
            continue
        s, f = manifest.layout.slots[slot], full.layout.slots[k]
        if offset < 0:
            if per_rank:
                out.append((k, 0, s.offset, s.nbytes))
            continue
        cut = slices.piece(offset, f.nbytes, lo, hi)
        if cut is None or cut[1] - cut[0] != s.nbytes:
            raise FtdError(f"replica slot {slot} holds {s.nbytes} bytes, the cut says {cut}")
        out.append((k, cut[0], s.offset, s.nbytes))
    return out


def _copy_pieces(dsts: dict[int, torch.Tensor], full: Manifest, src: Arena, manifest: Manifest, info: dict,
                 per_rank: bool) -> None:
    """Copy ``src``'s pieces (``_pieces``) into ``dsts`` (slot of the whole state -> the flat bytes of
    the tensor it goes to; a slot not in it is skipped), on the restore's threads."""
    spans = [(dsts[k], d + a, o + a, min(COPY_SLICE, n - a))
             for k, d, o, n in _pieces(full, manifest, info, per_rank) if k in dsts for a in range(0, n, COPY_SLICE)]

    def copy(span: tuple) -> None:
        dst, d, o, n = span
        dst[d:d + n].copy_(src.tensor[o:o + n])

    threads = max(1, min(readback.restore_threads(), len(spans)))
    with torch.no_grad():
        if threads == 1:
            list(map(copy, spans))
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="ftd-replica-copy") as pool:
                list(pool.map(copy, spans))


def flat_views(buf: torch.Tensor, full: Manifest) -> dict[int, torch.Tensor]:
    """Each slot's bytes in one buffer of the whole state's layout (``_copy_pieces``'s ``dsts``)."""
    return {k: buf[s.offset:s.end] for k, s in enumerate(full.layout.slots) if s.nbytes}


def destinations(full: Manifest, where: readback.Plan) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(the tensor each slot of the whole state is restored into, by slot; the flat bytes of each):
    the live tensor ``readback.plan`` fills in place, else a fresh CPU tensor (also for a slot that a
    whole-rank restore would leave as a view of the arena: there is no single arena here)."""
    out, flat = {}, {}
    for k, s in enumerate(full.layout.slots):
        if k in where.live:
            out[k] = where.live[k]
            if s.nbytes:
                flat[k] = out[k].detach().view(-1).view(torch.uint8)
            continue
        out[k] = torch.empty(s.shape, dtype=statecodec.dtype_from_name(s.dtype))
        if s.nbytes:
            flat[k] = out[k].view(-1).view(torch.uint8)
            segments.populate(flat[k].data_ptr(), s.nbytes, write=True)  # one call, not a fault per page
    return out, flat


def _verified(arena: Arena, manifest: Manifest) -> bool:
    """Every chunk of ``arena`` matches its checksum; on ``restore_threads()`` threads (xxh3 and the
    page-table population release the GIL)."""
    n = manifest.layout.nbytes
    if arena.mapping.size < n or len(manifest.checksums) != chunk_count(n, manifest.chunk_size):
        return False
    base = arena.tensor.data_ptr() if n else 0

    def good(c: int) -> bool:
        lo, hi = c * manifest.chunk_size, min(n, (c + 1) * manifest.chunk_size)
        if hi > lo:
            segments.populate(base + lo, hi - lo, write=False)
        return chunk_checksum(arena.view[lo:hi]) == manifest.checksums[c]

    chunks = range(len(manifest.checksums))
    threads = max(1, min(readback.restore_threads(), len(chunks)))
    if threads == 1:
        return all(map(good, chunks))
    with ThreadPoolExecutor(threads, thread_name_prefix="ftd-replica-check") as pool:
        return all(pool.map(good, chunks))


def _replica_version(conn, rank: int, step: int, world: int, who: str) -> dict:
    """The daemon's answer naming ``rank``'s version of ``step``; waits while it is fetched."""
    started = reported = time.monotonic()
    pause = 0.005  # a fetch that is nearly done is not waited for 0.2 s: the pause doubles up to that
    while True:
        try:
            reply = conn.call("replica_version", rank=rank, step=step, world=world)
        except FtdError as e:
            raise FtdError(f"{who} cannot restore step {step}: {e}") from None
        if "wait" not in reply:
            return reply
        now = time.monotonic()
        if now - started > WAIT_SECONDS:
            raise FtdError(f"{who} gave up after {WAIT_SECONDS:.0f} s waiting for rank {rank}'s slice of step {step}: "
                           f"{reply['wait']}")
        if now - reported >= REPORT_EVERY:
            log.info("ftd: %s waits for rank %d's slice of step %d: %s", who, rank, step, reply["wait"])
            reported = now
        time.sleep(pause)
        pause = min(0.2, 2 * pause)


def _map_replica(conn, rank: int, step: int, world: int, who: str) -> tuple[dict, Arena]:
    """The daemon's answer for ``rank``'s version of ``step``, and its buffer mapped. A fetched copy that
    another local rank's restore released meanwhile is simply asked for again (fetched again)."""
    for attempt in range(3):
        reply = _replica_version(conn, rank, step, world, who)
        try:
            return reply, Arena(Path(reply["shm_dir"]) / Path(reply["buffer"]).name)
        except FileNotFoundError:
            if attempt == 2:
                raise FtdError(f"{who} cannot restore step {step}: rank {rank}'s version vanished three times "
                               f"while it was being read (is the cluster moving on?)") from None
    raise AssertionError("unreachable")


def assemble(conn, own: Arena, manifest: Manifest, full: Manifest, where: readback.Plan, step: int, rank: int,
             world: int):
    """(full manifest, every tensor of the whole state by slot) of a sliced version, its tensors where
    ``where`` puts them (``destinations``); None if this rank's own version fails its checksums (the
    caller reports it), "repairing" if a replica's does (reported here: ask again). Every replica's
    slice is mapped and verified before the first byte goes to a live tensor."""
    who = f"rank {rank}"
    info = _info(manifest, f"{who}'s version of step {step}")
    if not _verified(own, manifest):
        log.warning("ftd: %s's version of step %d (its slice of the replicated state) fails its checksums; "
                    "it is dropped and an older step restored, or it is rebuilt from the peers", who, step)
        return None
    sources: list[tuple[Arena, Manifest, dict, bool]] = [(own, manifest, info, True)]
    held: list[tuple[int, dict, Arena]] = []  # (rank, reply, mapping) of each other replica's version
    others = [(j, other) for j, other in enumerate(info["ranks"]) if j != info["pos"]]
    for _, other in others[1:]:  # ask for all at once: the daemon fetches remote ones side by side
        try:
            conn.call("replica_version", rank=other, step=step, world=world)
        except FtdError:
            pass  # (asked again below, where a refusal is reported)
    try:
        for j, other in others:
            reply, arena = _map_replica(conn, other, step, world, who)
            held.append((other, reply, arena))
            theirs = Manifest.from_json(reply["manifest"])
            their_info = _info(theirs, f"rank {other}'s version of step {step}")
            _check_same_cut(info, their_info, j, f"rank {other}")
            if not _verified(arena, theirs):
                log.warning("ftd: rank %d's version of step %d (a replica's slice) fails its checksums, so step %d "
                            "cannot be put together: %s's own version of it is dropped too (unless the peers "
                            "rebuild it) and an older step restored", other, step, step, who)
                if reply.get("origin", "memory") == "memory":
                    answer = conn.call("corrupt", rank=other, buffer=reply["buffer"], step=step)
                    return "repairing" if answer.get("repairing") else None
                return "repairing"  # (released below: fetched again)
            sources.append((arena, theirs, their_info, False))
        tensors, flat = destinations(full, where)
        for arena, their_manifest, their_info, per_rank in sources:  # every source checked: now write
            _copy_pieces(flat, full, arena, their_manifest, their_info, per_rank)
    finally:
        for other, reply, arena in held:
            arena.close()
            if reply.get("origin", "memory") != "memory":
                conn.call("replica_release", rank=other, step=step)
    sums = (0,) * chunk_count(full.layout.nbytes, full.chunk_size)  # (every byte came from a checked source)
    return Manifest(full.layout, full.chunk_size, sums, full.tree), tensors
