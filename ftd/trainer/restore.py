"""Reading a version back into the live state: every chunk's checksum checked on the way.

``restore_versions`` tries the versions the daemon offers, newest first: maps the buffer, checks that
the snapshot fits the live state (``check_fits``: the same top-level keys, the same tensor shapes,
before anything is loaded), reads every tensor out on a pool of threads, every chunk checked before
any live tensor is written and straight into the live tensors where it can (``readback``), then
loads them into the state (``load``, whose copies onto the live tensors are then no-ops). A version
failing a checksum is reported to the daemon as corrupt, with the live state untouched; a cluster
member then repairs it from its peers (``REPAIRING``: ask again), a standalone one offers the next.

What ``load`` does with each value of ``state``: values with ``load_state_dict()`` (modules,
optimizers, schedulers, any Stateful) load in place; dicts, lists and sets are updated in place (the
same objects, their contents replaced), and so are tensors and numpy arrays of the same shape and
dtype, torch Generators (``set_state``) and dataclass instances (their fields); numbers, strings,
tuples, None, paths and enums are immutable and are replaced in ``state``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ftd.errors import FtdError, SerializationError
from ftd.shm.layout import Manifest
from ftd.trainer import dtensors, readback, replica_restore, rng, statecodec
from ftd.trainer.arena import Arena, close_in_background
from ftd.trainer.capture import inner_optimizers, is_stateful
from ftd.units import format_size
from ftd.util.lines import say

log = logging.getLogger(__name__)

REPAIRING = object()  # restore_versions' answer when the daemon repairs the version: ask again
MAX_LISTED = 8        # differences named in a "does not fit" error


def restore_versions(conn, reply: dict, state: dict, rank: int, capture_rng: bool, *, strict: bool = True,
                     verbose: bool = True, arena_for: Callable[[str, Path], Arena] | None = None, world: int = 1):
    """The step restored into ``state`` from the versions in a restore ``reply``; None if none is
    usable; REPAIRING if the daemon repairs a corrupt one from its peers. FtdError if the snapshot
    does not fit the live state (other keys, other shapes): nothing is loaded then. ``arena_for(name,
    shm_dir)``: the mapping of a buffer, kept by the caller for its snapshots (else mapped here and
    unmapped after)."""
    shm_dir = Path(reply["shm_dir"])
    job = reply.get("job", "?")
    live = live_state_dicts(state) if reply["versions"] else {}
    for version in reply["versions"]:
        t0 = time.perf_counter()
        step, name = version["step"], version["buffer"]
        manifest = Manifest.from_json(version["manifest"])
        sliced = replica_restore.is_sliced(manifest)  # this rank's slice of replicated state: put the whole together
        full = replica_restore.full_manifest(manifest, f"rank {rank}'s version of step {step}") if sliced else manifest
        check_fits(full, state, job=job, step=step, strict=strict, live=live)
        try:
            where = readback.plan(full, state, live)
        except SerializationError as e:  # a DTensor on another mesh: refused before anything is written
            raise FtdError(f"job {job!r}, step {step}: {e}") from None
        try:
            arena = arena_for(name, shm_dir) if arena_for else Arena(shm_dir / Path(name).name)
        except FileNotFoundError:
            log.warning("ftd: snapshot of step %d vanished before it could be read; trying an older one", step)
            continue
        try:
            if sliced:  # straight from the replicas' slices into the live tensors, once all are verified
                got = replica_restore.assemble(conn, arena, manifest, full, where, step, rank, world)
                if got == "repairing":
                    return REPAIRING
                manifest, tensors = got if got is not None else (manifest, None)
            else:
                tensors = read_verified(arena, manifest, where, step, rank)
            if tensors is None:
                answer = conn.call("corrupt", rank=rank, buffer=name, step=step)
                if answer.get("repairing"):
                    return REPAIRING  # a cluster member rebuilds it from its peers: ask again
                continue
            load(manifest, state, tensors, capture_rng, job=job, step=step, strict=strict, live=live)
            del tensors
        finally:
            if arena_for is None:
                close_in_background(arena)
        origin = version.get("origin", "memory")
        from_disk = origin.startswith("disk")
        where = (f"the version flushed to disk ({origin.partition(':')[2] or 'flush_dir'})" if from_disk
                 else "memory" if origin == "memory" else f"memory, {origin}")  # "fetched from node N": it moved
        if sliced:
            where += f", replicated state put together from {len(replica_restore.replica_ranks(version))} slices"
        line = (f"ftd: rank {rank} restored step {step} from {where} (job {job!r}, node {reply.get('node_rank', 0)}): "
                f"{format_size(manifest.layout.nbytes)} in {time.perf_counter() - t0:.2f} s")
        if verbose:
            say(line, sys.stderr)
            log.info("%s", line)
        else:  # the memory copies could not give a step: say so loudly even when asked to be quiet
            log.log(logging.WARNING if from_disk else logging.INFO, "%s", line)
        return step
    return None


# ---- does the snapshot fit the live state? ------------------------------------------------------
def _saved_shapes(skeleton, slots, path: str, out: dict, whole: bool = False) -> None:
    """{path: (dtype, shape, mesh)} of every tensor in a skeleton, paths written as in ``statecodec``;
    a DTensor by its shard (by its global shape with ``whole``)."""
    if isinstance(skeleton, list):
        for i, v in enumerate(skeleton):
            _saved_shapes(v, slots, f"{path}[{i}]", out, whole)
    elif isinstance(skeleton, dict):
        tag = skeleton.get(statecodec.TAG)
        if (tag in ("tensor", "ndarray", "dtensor") and isinstance(skeleton.get("index"), int)
                and skeleton["index"] < len(slots)):
            s = slots[skeleton["index"]]
            if whole and tag == "dtensor":
                out[path] = (s.dtype, tuple(skeleton.get("shape") or ()), None)
            else:
                out[path] = (s.dtype, tuple(s.shape), _mesh_text(skeleton) if tag == "dtensor" else None)
        elif tag in ("dict", "odict") and isinstance(skeleton.get("items"), list):
            for pair in skeleton["items"]:
                if isinstance(pair, list) and len(pair) == 2:
                    _saved_shapes(pair[1], slots, f"{path}[{pair[0]!r}]", out, whole)
        elif tag == "tuple" and isinstance(skeleton.get("items"), list):
            _saved_shapes(skeleton["items"], slots, path, out, whole)
        elif tag is None:
            for k, v in skeleton.items():
                _saved_shapes(v, slots, f"{path}[{k!r}]", out, whole)


def _live_shapes(value, path: str, out: dict, whole: bool = False, depth: int = 0) -> None:
    if depth > statecodec.MAX_DEPTH:
        return
    if isinstance(value, torch.Tensor):  # a DTensor by its local shard (what a snapshot holds of it)
        dt = dtensors.is_dtensor(value)
        if whole:
            out[path] = (str(value.dtype).removeprefix("torch."), tuple(value.shape), None)
            return
        local = value.to_local() if dt else value
        out[path] = (str(local.dtype).removeprefix("torch."), tuple(local.shape),
                     _mesh_text(dtensors.dtensor_layout(value)) if dt else None)
    elif isinstance(value, dict):
        for k, v in value.items():
            _live_shapes(v, f"{path}[{k!r}]", out, whole, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _live_shapes(v, f"{path}[{i}]", out, whole, depth + 1)


def _mesh_text(layout: dict) -> str:
    return (f"a shard of {layout.get('shape')} with placements {layout.get('placements')} on a mesh of shape "
            f"{layout.get('mesh_shape')}")


def _shape_text(entry) -> str:
    dtype, shape, mesh = entry
    return f"{dtype}{list(shape)}" + (f" ({mesh})" if mesh else "")


def _fresh_hint(job: str) -> str:
    return (f"to start afresh instead, call restore(state, resume='never'), run `ftd clear` for job {job!r}, "
            f"or use another job name ($FTD_JOB)")


def live_state_dicts(state: dict) -> dict:
    """``state_dict()`` of every Stateful value of ``state``, by key: taken once per restore (for FSDP's
    state dicts it may be collective), then checked against, filled and loaded."""
    return {key: target.state_dict() for key, target in state.items() if is_stateful(target)}


def check_fits(manifest: Manifest, state: dict, *, job: str, step: int, strict: bool, whole: bool = False,
               live: dict | None = None) -> None:
    """FtdError naming what differs if the snapshot of ``step`` cannot be loaded into ``state``:
    top-level keys (unless not ``strict``) and the shapes of the tensors of its Stateful values (of
    DTensors: their shards, or with ``whole`` their global shapes, for a restore that reshards).
    ``live``: ``live_state_dicts(state)``, if the caller has it."""
    tree = manifest.tree
    if not isinstance(tree, dict) or not isinstance(tree.get("state"), dict):
        raise SerializationError("snapshot skeleton has no state")
    saved_keys, live_keys = set(tree["state"]), set(state)
    if strict and live_keys and saved_keys != live_keys:  # (an empty dict asks for everything, as plain data)
        only_saved, only_live = sorted(saved_keys - live_keys), sorted(live_keys - saved_keys)
        parts = ([f"the snapshot holds key(s) {only_saved} that the state lacks"] if only_saved else []) + \
                ([f"the state has key(s) {only_live} that the snapshot lacks"] if only_live else [])
        raise FtdError(f"job {job!r}, step {step}: {' and '.join(parts)}. Pass the same keys as when "
                       f"snapshotting; restore(state, strict=False) restores only the keys both have (and adds "
                       f"the others as plain data); {_fresh_hint(job)}")
    differ = []
    for key in sorted(saved_keys & live_keys):
        target = state[key]
        if not is_stateful(target):
            continue
        saved: dict = {}
        _saved_shapes(tree["state"][key], manifest.layout.slots, f"state[{key!r}]", saved, whole)
        now: dict = {}
        _live_shapes(live[key] if live is not None and key in live else target.state_dict(), f"state[{key!r}]",
                     now, whole)
        for path in sorted(saved.keys() & now.keys()):
            if saved[path] != now[path]:
                differ.append(f"{path} is {_shape_text(saved[path])} in the snapshot, {_shape_text(now[path])} now")
        if isinstance(target, torch.nn.Module):
            differ += [f"{path} is in the snapshot, not in the model" for path in sorted(saved.keys() - now.keys())]
            differ += [f"{path} is in the model, not in the snapshot" for path in sorted(now.keys() - saved.keys())]
    if differ:
        more = f" (and {len(differ) - MAX_LISTED} more)" if len(differ) > MAX_LISTED else ""
        mesh = any("mesh of shape" in d for d in differ)
        cause = ("The world size or the device mesh differs from the snapshot's: a snapshot in memory restores "
                 "onto the mesh it was taken on; a run at another world size restores from the newest version "
                 "flushed to disk (flush_dir), which reshards" if mesh else
                 "The model or optimizer changed since that snapshot was taken")
        raise FtdError(f"job {job!r}, step {step}: the snapshot does not fit the live state: "
                       f"{'; '.join(differ[:MAX_LISTED])}{more}. {cause}; {_fresh_hint(job)}")


def read_verified(arena: Arena, manifest: Manifest, where: readback.Plan, step: int,
                  rank: int) -> dict[int, torch.Tensor] | None:
    """Every tensor of a snapshot (``readback.read``: live, view or fresh, per ``where``), every chunk
    checked before any live tensor is written. None, after a warning and with the live state
    untouched, if a chunk fails its checksum."""
    tree = manifest.tree
    if not isinstance(tree, dict) or not isinstance(tree.get("state"), dict):
        raise SerializationError("snapshot skeleton has no state")
    if arena.mapping.size < manifest.layout.nbytes:
        log.warning("ftd: snapshot buffer is smaller than its manifest says; discarding it")
        return None
    try:
        return readback.read(arena, manifest, where)
    except readback.BadChunk as bad:
        more = f" (and {bad.count - 1} more)" if bad.count > 1 else ""
        log.warning("ftd: snapshot of step %d (rank %d) fails its checksum in chunk %d (bytes %d-%d)%s; "
                    "discarding it and trying an older one", step, rank, bad.chunk, *bad.span, more)
        return None


def load(manifest: Manifest, state: dict, tensors: dict[int, torch.Tensor] | Callable[[int], torch.Tensor],
         capture_rng: bool, *, job: str = "?", step: int = -1, strict: bool = True,
         on_dtensor: Callable | None = None, live: dict | None = None) -> None:
    """Load a checked snapshot into ``state`` (what goes in place and what is replaced: module doc).
    ``tensors``: the snapshot's tensors by slot, or a function giving them; ``on_dtensor``: what fills
    a live DTensor (default: its saved shard, on the same mesh; ``reshard``: the chunks overlapping it);
    ``live``: ``live_state_dicts(state)``, if the caller has it."""
    def tensor_at(i: int) -> torch.Tensor:
        if callable(tensors):
            return tensors(i)
        if i not in tensors:
            raise SerializationError(f"snapshot skeleton refers to tensor {i}, the layout has {len(tensors)}")
        return tensors[i]

    tree = manifest.tree
    live_keys = set(state)
    for key, sub in tree["state"].items():
        target = state.get(key)
        if is_stateful(target):
            template = live.get(key) if live is not None else None
            if isinstance(target, torch.optim.Optimizer) and _holds_dtensors(sub) and _init_optimizer_state(target):
                template = None  # its moments are DTensors, just created to land in: read them afresh
            try:
                # DTensor shards go into the live DTensors (the template); the rest is copied by load_state_dict
                if _holds_dtensors(sub) and template is None:
                    template = target.state_dict()
                elif not _holds_dtensors(sub):
                    template = None
                target.load_state_dict(statecodec.decode(sub, tensor_at, template=template, into_live=False,
                                                         path=f"state[{key!r}]", on_dtensor=on_dtensor))
            except SerializationError as e:
                raise FtdError(f"job {job!r}, step {step}: {e}") from None
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                raise FtdError(f"job {job!r}, step {step}: state[{key!r}].load_state_dict() refused the snapshot: "
                               f"{str(e)[:500]}; {_fresh_hint(job)}") from e
        elif key in state or not strict or not live_keys:
            state[key] = statecodec.decode(sub, tensor_at, template=target, on_dtensor=on_dtensor,
                                           path=f"state[{key!r}]")
    if capture_rng and tree.get("rng") is not None:
        rng.restore(statecodec.decode(tree["rng"], tensor_at))


def _holds_dtensors(skeleton) -> bool:
    return '"dtensor"' in json.dumps(skeleton) if isinstance(skeleton, (dict, list)) else False


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> bool:
    """An optimizer that has not stepped yet has no moments to restore DTensor shards into: create them
    the way torch.distributed.checkpoint does (a step with zero gradients and a learning rate of 0).
    A container of optimizers (torchtitan's) has no learning rate of its own to zero, so a step of the
    container would move the parameters: each optimizer in it is initialised instead. True if any was."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state
    created = False
    for opt in inner_optimizers(optimizer) or [optimizer]:
        if not opt.state:
            _init_optim_state(opt)
            created = True
    return created
