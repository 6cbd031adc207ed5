"""Loading this node's part of a flushed version back into shared memory, off the daemon's loop.

``DiskLoad`` runs ``load_flushed`` on a thread: new segments, every chunk read with ftd's own
pickle-free loader and checked against the version's checksums (``ondisk.load_rank``), then their
sidecars, so the daemon adopts them like versions rebuilt from the peers. A standalone daemon
(``standalone``) or a cluster node (``cluster_restore``) polls ``result()`` from its loop.
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Callable

from ftd.config import Config
from ftd.daemon.buffers import CAPACITY_QUANTUM
from ftd.durable import ondisk
from ftd.shm import segments
from ftd.units import round_up


def load_flushed(config: Config, step: int, segment_name: Callable[[int], str]) -> list[dict]:
    """Load this node's part of flushed ``step`` into new segments; returns their records
    (rank, world, name, capacity, manifest) for the catalog. CorruptVersion if it does not check out."""
    out = ondisk.step_dir(config.flush_dir, config.job, step)
    node = ondisk.read_node_manifest(out, config.node_rank)
    if node.get("step") != step or node.get("job") != config.job:
        raise ondisk.CorruptVersion(f"{out}: its manifest is of job {node.get('job')!r} step {node.get('step')}")
    records, created = [], []
    try:
        for key, entry in sorted(node["restore"].items()):
            if not key.isdigit() or not isinstance(entry, dict) or entry.get("dir") != f"rank-{int(key)}":
                raise ondisk.CorruptVersion(f"{out}: its manifest's entry for rank {key!r:.20} is malformed")
            rank, world = int(key), entry.get("world")
            if not (isinstance(world, int) and 0 <= rank < world):
                raise ondisk.CorruptVersion(f"{out}: rank {rank} of world {world!r:.20}")
            nbytes = (entry.get("manifest") or {}).get("nbytes")
            if not isinstance(nbytes, int) or not 0 <= nbytes <= config.memory_budget:
                raise ondisk.CorruptVersion(f"{out}: rank {rank}'s size {nbytes!r:.20} is beyond the memory budget")
            name = segment_name(rank)
            path = config.shm_dir / name
            capacity = round_up(max(nbytes, 1), CAPACITY_QUANTUM)
            segments.create(path, capacity)
            created.append(path)
            mapping = segments.Mapping(path, populate=False)
            try:
                ondisk.load_rank(out / entry["dir"], entry, mapping.view())
            finally:
                mapping.close()
            segments.write_meta(path, {"rank": rank, "world": world, "step": step, "seq": 0, "committed_at": None,
                                  "manifest": entry["manifest"]})
            records.append({"rank": rank, "world": world, "name": name, "capacity": capacity,
                            "manifest": entry["manifest"]})
    except BaseException:
        for p in created:
            segments.drop_meta(p)
            segments.unlink(p)
        raise
    return records


class DiskLoad:
    """``load_flushed`` on a thread; ``result()`` from the daemon's loop once it is done."""

    def __init__(self, config: Config, step: int, segment_name: Callable[[int], str]):
        self.step = step
        self._shm_dir = config.shm_dir
        self._done: queue.Queue = queue.Queue()
        self.origin = f"disk:{ondisk.step_dir(config.flush_dir, config.job, step)}"

        def work() -> None:
            t0 = time.monotonic()
            try:
                self._done.put(("ok", load_flushed(config, step, segment_name), time.monotonic() - t0))
            except Exception as e:
                self._done.put(("error", e, time.monotonic() - t0))

        self.thread = threading.Thread(target=work, name="ftd-disk-load", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """The daemon stops: wait for the thread, and remove whatever it loaded."""
        self.thread.join(60)
        done = self.result()
        if done and done[0]:
            for r in done[1]:
                path = Path(self._shm_dir) / r["name"]
                segments.drop_meta(path)
                segments.unlink(path)

    def result(self):
        """None while loading; else (ok, records or the error, seconds)."""
        try:
            kind, value, seconds = self._done.get_nowait()
        except queue.Empty:
            return None
        return kind == "ok", value, seconds
