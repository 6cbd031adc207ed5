"""The daemon's state machine: ranks, their double buffers, and the versions they hold. Pure logic.

Each trainer rank has at most two buffers (shared-memory segments). A buffer is ``writing`` (a
copy is under way, or was abandoned), ``complete`` (holds a committed, checksummed version) or
``free``. ``begin`` always hands out the buffer that does *not* hold the rank's newest complete
version, so an interrupted copy can never destroy the last good snapshot. All I/O (creating and
unlinking segments, writing the sidecar that marks a version complete) goes through a store
object, so tests can drive this class with scripted requests and a fake store.

In a cluster (``clustered``) two more versions matter: the node's *recoverable* step (protected by
parity in every group; the only one a restore may serve) and each rank's *pinned* step (the first
commit at or after the coordinator's target, held for the next protection round). Neither is ever
overwritten; when both buffers of a rank hold one of them, ``begin`` answers "busy" and the client
skips that snapshot, so a slow protection makes ftd snapshot less often, never slows training.
A background flush to disk holds the version it copies out in the same way, for that copy only.

Call order (the daemon's loop only, so no locks):
  1. ``adopt`` for every version found at start-up (a predecessor's, in commit order), rebuilt from
     the peers or loaded from disk;
  2. per trainer rank: ``register``, ``prepare`` (optional, at restore), per snapshot ``begin`` and ``commit``
     (or ``abort``); ``restore`` and ``corrupt`` when a trainer restarts; ``versions`` for ``ftd export``;
  3. ``finish`` when a trainer's run is over (``run_finished`` once every rank's is);
     ``reset_to(-1)`` when a new run starts (resume="never", a rerun of a finished run, ``ftd clear``);
  4. in a cluster (``catalog_cluster``): ``sync`` on each coordinator sync, ``candidate`` after commits,
     ``forget_newer`` after a restore, ``reset_to`` after a restore from disk or the start of a new
     run; ``adopt(foreign=True)`` + ``arrived`` for a rank's version fetched from another node,
     ``depart`` for a rank that left;
  5. around a flush's copy-out: ``hold_for_flush``, then ``release_flush_hold``;
  6. ``release_all`` at shutdown (unless trainers are alive: the next daemon adopts their versions).
"""
from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from ftd.daemon.buffers import CAPACITY_QUANTUM, Buffer, RankEntry, SegmentStore, check_room
from ftd.daemon.catalog_cluster import ClusterCatalog
from ftd.errors import Refused
from ftd.shm.layout import Manifest
from ftd.units import round_up


class Catalog(ClusterCatalog):
    def __init__(self, store: SegmentStore, *, budget: int, available: Callable[[], int], reserve: int,
                 segment_name: Callable[[int], str], clock: Callable[[], float] = time.time,
                 new_session: Callable[[], str] = lambda: secrets.token_hex(8),
                 alive: Callable[[int], bool] = lambda pid: True):
        self.store = store
        self.budget = budget
        self.available = available
        self.reserve = reserve
        self.segment_name = segment_name
        self.clock = clock
        self.new_session = new_session
        self.alive = alive
        self.ranks: dict[int, RankEntry] = {}
        self._seq = 0
        self.clustered = False
        self.extra_used: Callable[[], int] = lambda: 0  # cluster: parity held for the peers
        self.recoverable = -1             # cluster: newest step recoverable in every group, -1 if none
        self.target: int | None = None    # cluster: pin the first commit at or after this step
        self.local_world = 0              # ranks on this node, as clients report it ($LOCAL_WORLD_SIZE)

    # ---- accounting -------------------------------------------------------------------------
    @property
    def used(self) -> int:
        return sum(b.capacity for r in self.ranks.values() for b in r.buffers)

    def _allocate(self, entry: RankEntry, nbytes: int, replacing: Buffer | None) -> Buffer:
        capacity = round_up(max(nbytes, 1), CAPACITY_QUANTUM)
        freed = replacing.capacity if replacing else 0
        check_room(entry.rank, nbytes, capacity, in_use=self.used + self.extra_used() - freed, budget=self.budget,
                   grows_by=capacity - freed, available=self.available(), reserve=self.reserve)
        if replacing is not None:
            self.store.release(replacing.name)
            entry.buffers.remove(replacing)
        buf = Buffer(self.segment_name(entry.rank), capacity)
        self.store.allocate(buf.name, capacity)
        entry.buffers.append(buf)
        return buf

    def _by_session(self, session: str) -> RankEntry:
        entry = next((e for e in self.ranks.values() if e.session == session), None)
        if entry is not None:
            return entry
        raise Refused("unknown or outdated session (the daemon restarted, or another process registered this "
                      "rank since); register again")

    @staticmethod
    def _buffer(entry: RankEntry, name: str) -> Buffer:
        buf = next((b for b in entry.buffers if b.name == name), None)
        if buf is not None:
            return buf
        raise Refused(f"rank {entry.rank} has no buffer {name!r}")

    # ---- requests ---------------------------------------------------------------------------
    def adopt(self, rank: int, world: int, name: str, capacity: int, step: int, manifest: dict,
              committed_at: float | None, origin: str = "memory", trainer_pid: int | None = None,
              foreign: bool = False) -> None:
        """Take over a complete, verified version left by a predecessor daemon, rebuilt from the
        peers, loaded from disk or (``foreign``) fetched from another node for a restore here (call in
        commit order). ``trainer_pid``: the process that committed it, if it still runs (it holds the
        rank until it says otherwise: a daemon stopped again keeps its versions)."""
        entry = self.ranks.setdefault(rank, RankEntry(rank, world))
        if foreign:
            self.arrived(rank, step)
        if trainer_pid is not None and entry.pid is None and self.alive(trainer_pid):
            entry.pid = trainer_pid
        self._seq += 1
        entry.buffers.append(Buffer(name, capacity, "complete", step, manifest, self._seq, committed_at,
                                    origin=origin, foreign=foreign))
        if len(entry.buffers) > 2:
            oldest = min((b for b in entry.buffers if b.name != entry.flush_hold), key=lambda b: b.seq)
            self.store.release(oldest.name)
            entry.buffers.remove(oldest)

    def check_holder(self, rank: int, pid: int | None) -> None:
        """Two live processes claiming one rank would overwrite each other's snapshots and restore each
        other's steps: the second is refused while the first lives (a dead holder is replaced)."""
        entry = self.ranks.get(rank)
        if (pid is not None and entry is not None and entry.session is not None and entry.pid is not None
                and entry.pid != pid and self.alive(entry.pid)):
            raise Refused(f"rank {rank} is held by another live trainer process (pid {entry.pid}); two processes "
                          f"cannot snapshot the same rank of one job on one node. Stop pid {entry.pid} first, give "
                          f"this process another rank ($RANK), or use another job name ($FTD_JOB)")

    def register(self, rank: int, world: int, pid: int, local_world: int | None = None) -> dict:
        self._note_local_world(local_world)
        if rank >= world:
            raise Refused(f"rank {rank} is not below world size {world}")
        self.check_holder(rank, pid)
        entry = self.ranks.setdefault(rank, RankEntry(rank, world))
        entry.world, entry.pid, entry.session, entry.detached = world, pid, self.new_session(), False
        for b in entry.buffers:  # a write of the previous session will never be committed
            if b.state == "writing":
                b.state = "free"
        return {"session": entry.session}

    def begin(self, session: str, step: int, nbytes: int) -> dict:
        entry = self._by_session(session)
        later = [b.step for b in entry.complete() if b.pid == entry.pid and b.step > step]
        if later:
            raise Refused(f"step {step} comes after step {max(later)} in this trainer (pid {entry.pid}) of rank "
                          f"{entry.rank}: snapshot steps must not go back (a restore would otherwise return the "
                          f"abandoned step {max(later)}). To roll back on purpose, start the trainer again with "
                          f"restore(state, resume='never'), or run `ftd clear`")
        spare = self._spare(entry)
        if not spare and len(entry.buffers) >= 2:
            held = (f"versions the cluster still needs (recoverable step {self.recoverable}, step {entry.pinned} "
                    "being protected, or a version being copied out to disk)" if self.clustered else
                    "the newest version, and one being copied out to disk")
            return {"busy": f"both buffers of rank {entry.rank} hold {held}"}
        spare.sort(key=lambda b: (b.state == "complete", b.seq))  # prefer free/writing over an older version
        target = spare[0] if spare else None
        if target is None or target.capacity < nbytes:
            target = self._allocate(entry, nbytes, target)
        if len(entry.buffers) < 2:  # allocate the second buffer now, not in the middle of a later step
            self._allocate(entry, nbytes, None)
        self.store.mark_writing(target.name)
        target.state, target.step, target.manifest, target.committed_at = "writing", step, None, None
        target.origin, target.foreign = "memory", False
        following = next(b for b in entry.buffers if b is not target)
        return {"buffer": target.name, "capacity": target.capacity, "next": following.name}

    def _spare(self, entry: RankEntry) -> list[Buffer]:
        """The buffers ``begin`` may hand out: not the newest version (standalone) or the versions the
        cluster needs (its recoverable step, the step being protected), and not one a flush copies out."""
        if self.clustered:
            # the buffer that serves each needed step (the newest holding it: a step loaded from disk
            # may also be held from memory); any other buffer is spare
            needed = set()
            for kept in {self.recoverable, entry.pinned}:
                holders = [b for b in entry.complete() if b.step == kept]
                if holders:
                    needed.add(holders[0].name)
        else:
            complete = entry.complete()
            needed = {complete[0].name} if complete else set()
        return [b for b in entry.buffers if b.name not in needed and b.name != entry.flush_hold]

    def prepare(self, session: str, nbytes: int) -> dict:
        """Before a rank's first snapshot (its client knows the size at ``restore``): two buffers of at
        least ``nbytes``, created sparse, at once (the trainer reserves their memory in the background);
        a spare one too small is replaced, as ``begin`` would. Refused if the budget is short."""
        entry = self._by_session(session)
        for small in [b for b in self._spare(entry) if b.capacity < nbytes]:
            self._allocate(entry, nbytes, small)
        while len(entry.buffers) < 2:
            self._allocate(entry, nbytes, None)
        return {"buffers": [b.name for b in entry.buffers]}

    def commit(self, session: str, buffer: str, step: int, manifest: dict,
               copy_seconds: float | None = None, blocked_seconds: float | None = None) -> dict:
        entry = self._by_session(session)
        buf = self._buffer(entry, buffer)
        if buf.state != "writing" or buf.step != step:
            raise Refused(f"buffer {buffer} of rank {entry.rank} is not being written for step {step}")
        Manifest.from_json(manifest, max_nbytes=buf.capacity)
        now = self.clock()
        self._seq += 1
        meta = {"rank": entry.rank, "world": entry.world, "step": step, "seq": self._seq,
                "committed_at": now, "manifest": manifest, "pid": entry.pid}
        self.store.mark_complete(buf.name, meta)
        buf.state, buf.manifest, buf.seq, buf.committed_at, buf.pid = "complete", manifest, self._seq, now, entry.pid
        entry.commits += 1
        entry.last_commit_at, entry.last_copy_seconds, entry.last_blocked_seconds = now, copy_seconds, blocked_seconds
        if self.clustered and self.target is not None and entry.pinned is None and step >= self.target:
            entry.pinned = step
        return {}

    def abort(self, session: str, buffer: str, reason: str = "") -> dict:
        buf = self._buffer(self._by_session(session), buffer)
        if buf.state == "writing":
            buf.state, buf.step = "free", None
        return {}

    def _note_local_world(self, local_world: int | None) -> None:
        self.local_world = max(self.local_world, local_world or 0)

    def finish(self, session: str) -> dict:
        """This rank's trainer says its run is over; returns the step of its newest version."""
        entry = self._by_session(session)
        entry.finished, complete = True, entry.complete()
        return {"step": complete[0].step if complete else -1, "run_finished": self.run_finished()}

    def detach(self, rank: int, pid: int) -> dict:
        """Process ``pid`` closed its client of ``rank``: its versions stay (a restarted trainer restores
        them), but it no longer holds the rank, and a daemon stop need not keep them for it. (By pid, not
        session: a trainer whose daemon restarted meanwhile has no session with this one.)"""
        entry = self.ranks.get(rank)
        if entry is not None and entry.pid == pid:
            entry.session, entry.detached = None, True
        return {}

    def run_finished(self) -> bool:
        """Every rank of the node finished its run (a rerun starts afresh)."""
        hosted = self.hosted()
        return bool(hosted) and len(hosted) >= self.local_world and all(r.finished for r in hosted)

    def live_trainers(self) -> list[tuple[int, int]]:
        """(rank, pid) of every registered trainer whose process still runs."""
        return [(r.rank, r.pid) for r in sorted(self.ranks.values(), key=lambda r: r.rank)
                if r.pid is not None and not r.detached and self.alive(r.pid)]

    def has_previous_run(self) -> bool:
        """Whether a version here was committed by a trainer that is gone, closed its client, or ran
        before this daemon: what a new run must drop. Versions of the trainers that hold their rank now
        belong to the run under way."""
        return any(b.pid is None or b.pid != r.pid or r.session is None or not self.alive(b.pid)
                   for r in self.ranks.values() for b in r.complete())

    def newest_step(self) -> int:
        return max((b.step for r in self.ranks.values() for b in r.complete()), default=-1)

    def restore(self, rank: int, local_world: int | None = None, pid: int | None = None) -> dict:
        """Versions this rank should try, newest first: only steps every rank of the node holds.
        In a cluster: only the recoverable step."""
        self._note_local_world(local_world)
        self.check_holder(rank, pid)
        if self.clustered and self.recoverable >= 0:
            entry = self.ranks.get(rank)
            mine = [b for b in entry.complete() if b.step == self.recoverable] if entry else []
            if not mine:  # (in a job of several ranks, the cluster side fetches it from the node that holds it first)
                raise Refused(
                    f"rank {rank} has no snapshot of the cluster's recoverable step {self.recoverable} on this node "
                    f"(it holds ranks {sorted(self.ranks)}); a trainer of world size 1 must restart on the node it "
                    f"ran on (ranks of a larger job are fetched from the node that holds them), or the job must "
                    f"start afresh with a new job name")
            self.returned(rank)
            return {"versions": [{"step": b.step, "buffer": b.name, "manifest": b.manifest, "origin": b.origin}
                                 for b in mine[:1]]}
        if rank not in self.ranks or self.clustered:
            return {"versions": []}
        holders = [r for r in self.ranks.values() if r.complete()]
        common = set.intersection(*({b.step for b in r.complete()} for r in holders)) if holders else set()
        mine = [b for b in self.ranks[rank].complete() if b.step in common]
        mine.sort(key=lambda b: (-b.step, -b.seq))
        return {"versions": [{"step": b.step, "buffer": b.name, "manifest": b.manifest, "origin": b.origin}
                             for b in mine]}

    def versions(self) -> dict:
        """Every rank's complete versions, newest first, and the step an export should take by default
        (the recoverable one in a cluster, else the newest every rank holds). Changes nothing."""
        ranks = [{"rank": r.rank, "world": r.world,
                  "versions": [{"step": b.step, "buffer": b.name, "manifest": b.manifest}
                               for b in sorted(r.complete(), key=lambda b: (-b.step, -b.seq))]}
                 for r in sorted(self.ranks.values(), key=lambda r: r.rank)]
        common = set.intersection(*({v["step"] for v in r["versions"]} for r in ranks)) if ranks else set()
        latest = self.recoverable if self.clustered else max(common, default=-1)
        return {"ranks": ranks, "latest": latest, "clustered": self.clustered}

    def corrupt(self, rank: int, buffer: str, step: int) -> dict:
        """A client found a version failing its checksums: never serve it again."""
        entry = self.ranks.get(rank)
        if entry is None:
            raise Refused(f"unknown rank {rank}")
        buf = self._buffer(entry, buffer)
        if buf.state == "complete" and buf.step == step:
            self.store.mark_writing(buf.name)
            buf.state, buf.step, buf.manifest = "free", None, None
        return {}

    def newest_common(self) -> int:
        """Newest step every rank of this node holds (standalone: what a restore serves), or -1."""
        return max(self.held_steps(), default=-1)

    def hold_for_flush(self, step: int) -> list[dict]:
        """Hold every rank's buffer of ``step`` while a flush copies it out; [] if a rank lacks it."""
        held = self.buffers_of(step)
        for r, b in held:
            r.flush_hold = b.name
        return [{"rank": r.rank, "world": r.world, "name": b.name, "manifest": b.manifest} for r, b in held]

    def release_flush_hold(self) -> None:
        for r in self.ranks.values():
            r.flush_hold = None

    def held_steps(self) -> list[int]:
        """Steps of which this node holds its whole image (every rank, see ``buffers_of``), newest first."""
        steps = {b.step for r in self.ranks.values() for b in r.complete() if not b.foreign}
        return sorted((s for s in steps if self.buffers_of(s)), reverse=True)

    def buffers_of(self, step: int) -> list[tuple[RankEntry, Buffer]]:
        """This node's image of ``step``: (rank, buffer) for every rank of it, in rank order; [] unless all
        of them hold it. Standalone that is every rank; in a cluster, ranks that arrived after ``step`` or
        left before it are not part of it (``catalog_cluster``), nor are versions fetched from other nodes."""
        out = []
        for r in sorted(self.ranks.values(), key=lambda r: r.rank):
            if not self.in_image(r, step):
                continue
            b = next((b for b in r.complete() if b.step == step and not b.foreign), None)
            if b is None:
                return []
            out.append((r, b))
        return out

    def status(self) -> dict[str, Any]:
        ranks = []
        for r in sorted(self.ranks.values(), key=lambda r: r.rank):
            ranks.append({
                "rank": r.rank, "world": r.world, "pid": r.pid, "commits": r.commits,
                "versions": [{"step": b.step, "bytes": b.manifest["nbytes"], "committed_at": b.committed_at}
                             for b in r.complete()],
                "writing": [b.step for b in r.buffers if b.state == "writing"],
                "buffer_bytes": sum(b.capacity for b in r.buffers),
                "last_commit_at": r.last_commit_at, "last_copy_seconds": r.last_copy_seconds,
                "last_blocked_seconds": r.last_blocked_seconds, "pinned": r.pinned,
                **({"departed_after": r.until} if r.until is not None else {}),
                **({"arrived_at": r.since} if r.since >= 0 else {}),
                **({"fetched": [b.step for b in r.complete() if b.foreign]} if any(b.foreign for b in r.buffers) else {}),
                **replica_slice(r.complete()),
            })
        return {"budget": self.budget, "used": self.used, "ranks": ranks}

    def release_all(self, forget: bool = False) -> None:
        """Unlink every buffer (shutdown); ``forget``: drop the ranks too (a run at another world size)."""
        for entry in self.ranks.values():
            for b in entry.buffers:
                self.store.release(b.name)
            entry.buffers.clear()
        if forget:
            self.ranks.clear()
            self.local_world = 0


def replica_slice(complete: list[Buffer]) -> dict:
    """What ``ftd status`` shows of a rank's newest version that holds only its slice of replicated state
    (``ftd.trainer.replicas``): its replica set, its position, and its slice of the replicated bytes."""
    manifest = complete[0].manifest if complete else None
    tree = manifest.get("tree") if isinstance(manifest, dict) else None  # None: a version without a state tree
    info = tree.get("replica") if isinstance(tree, dict) else None
    if not isinstance(info, dict):
        return {}
    try:  # written by the trainer, not checked at commit: a status must not fail on what it holds
        lo, hi = info["bounds"][info["pos"]]
        return {"replica": {"ranks": list(info["ranks"]), "pos": int(info["pos"]), "source": str(info["source"]),
                            "slice_bytes": int(hi) - int(lo), "replicated_bytes": int(info["stream"])}}
    except (KeyError, IndexError, TypeError, ValueError):
        return {"replica": {"error": "the version's replica entry is malformed"}}
