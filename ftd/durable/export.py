"""``ftd export``: a version held in a daemon's memory, written as a torch.distributed.checkpoint directory.

The directory is one global DCP checkpoint, readable without ftd at any world size (layout in
``ondisk``): every DTensor shard at its global offsets, each rank's other values (rank 0's at the top
level), and a checksummed manifest per node. A cluster's ranks live on several nodes: run the export
on each node with the same DIR (a shared file system); the last node to finish writes the global
``.metadata``. A version is read by copying its buffer and then checking every chunk
against the checksums committed with it, so a version the trainer overwrites meanwhile is
detected, never written half old, half new.
"""
from __future__ import annotations

from pathlib import Path

from ftd.durable.dcp_writer import write_version
from ftd.durable.ondisk import TornVersion, read_buffer
from ftd.errors import FtdError
from ftd.shm.layout import Manifest


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


def export(conn, out: Path, step: int | None, tries: int = 3) -> dict:
    """Export ``step`` (None: the daemon's default) of every rank the daemon at ``conn`` holds."""
    for attempt in range(tries):
        reply = conn.call("versions")
        chosen = pick_step(reply, step)
        shm_dir = Path(reply["shm_dir"])
        try:
            ranks = []
            for r in reply["ranks"]:  # all copied before any is written: the version is consistent
                version = next(v for v in r["versions"] if v["step"] == chosen)
                manifest = Manifest.from_json(version["manifest"])
                ranks.append((r["rank"], r["world"], read_buffer(shm_dir / Path(version["buffer"]).name, manifest),
                              manifest))
        except (TornVersion, FileNotFoundError) as e:
            if attempt + 1 == tries or step is not None and not reply["clustered"]:
                raise FtdError(f"step {chosen} could not be read consistently: {e}") from None
            continue  # the trainer moved on: take the newest step again
        return write_version(out, chosen, ranks, job=reply.get("job", ""), node_rank=reply["node_rank"],
                             nodes=reply.get("nodes", 1))
    raise AssertionError("unreachable")
