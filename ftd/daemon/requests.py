"""What the daemon answers to each control request: one handler per message type.

``RequestHandler.handle`` validates the frame (``control.protocol``), looks its type up in a table and
returns the reply frame. The catalog decides about buffers and versions; a cluster member's node
and the disk tier get their say where they change the answer (a restore that must wait, a commit
that may start a protection round or a flush). Malformed requests are counted and refused; an
internal error is refused with its reason, and the daemon stays up for the other ranks.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Callable

from ftd.control import protocol
from ftd.daemon.replica_versions import ReplicaVersions
from ftd.daemon.world_change import WorldChange
from ftd.errors import ProtocolError, Refused

if TYPE_CHECKING:
    from ftd.daemon.server import Daemon

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY = 60.0  # seconds between two log lines about refusals of one kind


class RequestHandler:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.invalid_requests = 0  # control messages dropped or refused as malformed
        self._refusals: dict[str, list] = {}  # kind of refusal -> [when last logged, how many since]
        self.table: dict[str, Callable[..., dict]] = {
            "ping": self.ping, "status": self.status, "register": self.register, "begin": self.begin, "prepare": self.prepare,
            "commit": self.commit, "abort": self.abort, "restore": self.restore, "corrupt": self.corrupt,
            "recover": self.recover, "versions": self.versions, "finish": self.finish, "clear": self.clear,
            "detach": self.detach,
            "replica_version": lambda **f: {**self.replicas.answer(**f), **self._where()},
            "replica_release": lambda **f: self.replicas.release(**f),
        }
        self.replicas = ReplicaVersions(daemon)  # other ranks' versions, for a restore from replica slices

    @functools.cached_property
    def world_change(self) -> WorldChange:
        disk = self.daemon.standalone_disk
        return WorldChange(self.daemon.catalog, self.daemon.config.job, disk.newest_complete if disk else None)

    def handle(self, payload: bytes) -> bytes:
        kind, fields, t0 = None, {}, time.perf_counter()
        try:
            msg = protocol.decode_request(payload)
            kind, fields = msg["type"], {k: v for k, v in msg.items() if k not in ("v", "type")}
            result = self.table[kind](**fields)
            self._observe(kind, fields, result, t0)
            return protocol.ok(**result)
        except (ProtocolError, Refused) as e:
            if isinstance(e, ProtocolError):
                self.invalid_requests += 1
            else:
                self._observe(kind, fields, None, t0)
            self._log_refusal(str(e))
            return protocol.error(str(e))
        except Exception as e:  # the daemon must stay up for the other ranks
            log.exception("internal error while handling a request")
            return protocol.error(f"internal error in the daemon: {type(e).__name__}: {e}")

    def _observe(self, kind: str | None, fields: dict, result: dict | None, t0: float) -> None:
        if self.daemon.metrics is not None and kind is not None:
            self.daemon.metrics.on_request(kind, fields, result, time.perf_counter() - t0)

    def refuse_malformed(self, why: str) -> bytes:
        """A frame that is not even one request (a routing problem, several frames)."""
        self.invalid_requests += 1
        self._log_refusal(why)
        return protocol.error(why)

    def _log_refusal(self, why: str) -> None:
        """The first refusal of a kind at once, then how many more there were, at most every minute: a
        trainer refused at every step must not bury the log (its client warns the trainer itself)."""
        kind = re.sub(r"\d+", "N", why)[:160]
        now = time.monotonic()
        seen = self._refusals.get(kind)
        if seen is None:
            self._refusals[kind] = [now, 0]
            log.warning("request refused: %s", why)
        elif now - seen[0] >= REFUSAL_LOG_EVERY:
            log.warning("request refused %d more time(s) in %.0f s like: %s", seen[1] + 1, now - seen[0], why)
            self._refusals[kind] = [now, 0]
        else:
            seen[1] += 1

    # ---- the handlers -------------------------------------------------------------------------
    def _where(self) -> dict:
        """What a client needs to map buffers: sent with register, restore and versions."""
        c = self.daemon.config
        return dict(shm_dir=str(c.shm_dir), chunk_size=c.chunk_size, node_rank=c.node_rank, job=c.job,
                    nodes=max(1, c.nodes), replica_snapshots=c.replica_snapshots,
                    replica_min_bytes=c.replica_min_bytes)

    def ping(self) -> dict:
        c = self.daemon.config
        return dict(node_rank=c.node_rank, job=c.job, pid=os.getpid(), replica_snapshots=c.replica_snapshots)

    def status(self) -> dict:
        return self.daemon.status()

    def register(self, **fields) -> dict:
        return {**self.daemon.catalog.register(**fields), **self._where()}

    def begin(self, **fields) -> dict:
        d = self.daemon
        if d.node is not None:
            d.node.latest_step = fields["step"]
        result = d.catalog.begin(**fields)
        self._copies_changed()
        return result

    def prepare(self, **fields) -> dict:
        return self.daemon.catalog.prepare(**fields)

    def commit(self, **fields) -> dict:
        d = self.daemon
        result = d.catalog.commit(**fields)
        if d.node is not None:
            d.node.maybe_candidate()
        elif d.standalone_disk is not None:
            d.standalone_disk.after_commit()
        self._copies_changed()
        return result

    def abort(self, **fields) -> dict:
        result = self.daemon.catalog.abort(**fields)
        self._copies_changed()
        return result

    def _copies_changed(self) -> None:
        if self.daemon.flusher is not None:
            self.daemon.flusher.copies_changed()

    def restore(self, rank: int, local_world: int | None = None, pid: int | None = None,
                resume: str = "auto", world: int | None = None) -> dict:
        d, cat = self.daemon, self.daemon.catalog
        if resume not in ("auto", "never", "must"):
            raise ProtocolError(f"restore.resume={resume!r} is not one of 'auto', 'never', 'must'")
        cat.check_holder(rank, pid)  # before anything is dropped or waited for
        fresh = None
        if d.node is not None:
            why = self._new_run_reason(resume, d.node.cluster_finished)
            if why:
                wait = d.node.request_new_run(why)
                if wait:
                    return {"wait": wait}
                fresh = why
            wait = d.node.restore_wait()
            if wait:
                return {"wait": wait}
            if d.node.lost_error:
                raise Refused(f"node {d.config.node_rank} cannot restore: {d.node.lost_error}")
        else:
            why = self._new_run_reason(resume, cat.run_finished())
            if why and (cat.has_previous_run() or cat.run_finished() or self._has_flushed()):
                self._start_new_run_here(why)
                fresh = why
            elif d.standalone_disk is not None:
                wait = d.standalone_disk.restore_wait()
                if wait:
                    return {"wait": wait}
        reshard = self.world_change.answer(world, d.node is not None) if world else None
        if reshard is not None:  # a run at another world size: every rank reads the flushed version
            return {"versions": [], "reshard": reshard, **self._where()}
        moved = d.node is not None and cat.recoverable >= 0 and not cat.holds_rank(rank, cat.recoverable)
        if moved and (world or 1) > 1:  # another node holds it (c10d moved it); world 1: a job per node, refused
            return {"wait": d.node.moves.want(rank, cat.recoverable, world)}
        result = cat.restore(rank, local_world, pid)
        if d.node is not None:
            d.node.on_restored(rank, result["versions"][0]["step"] if result["versions"] else -1)
        if fresh and not result["versions"]:
            result["fresh"] = fresh
        entry = cat.ranks.get(rank)
        if (entry is not None and entry.pid is not None and entry.pid != pid and not entry.detached
                and cat.alive(entry.pid)):  # another live process holds the rank: its client must not take it over
            result["held_by"] = entry.pid
        return {**result, **self._where()}

    @staticmethod
    def _new_run_reason(resume: str, finished: bool) -> str | None:
        if resume == "never":
            return "resume='never': the job's previous versions are dropped"
        if resume == "auto" and finished:
            return "the previous run finished (every rank called finish()), so this one starts afresh"
        return None

    def _has_flushed(self) -> bool:
        disk = self.daemon.standalone_disk
        return disk is not None and bool(disk.flusher.on_disk())

    def _start_new_run_here(self, why: str) -> list[int]:
        """A standalone node drops the previous run: memory and its flushed versions."""
        d = self.daemon
        newest = d.catalog.newest_step()
        d.catalog.reset_to(-1)
        self.world_change.forget()
        removed = d.standalone_disk.new_run() if d.standalone_disk is not None else []
        log.warning("a new run of job %r starts (%s): dropped the previous run's versions%s%s", d.config.job, why,
                    f" up to step {newest}" if newest >= 0 else "", f" and flushed steps {removed}" if removed else "")
        return removed

    def finish(self, session: str) -> dict:
        result = self.daemon.catalog.finish(session)
        if result["run_finished"]:
            log.info("every rank of node %d finished its run (newest step %d); a rerun starts afresh",
                     self.daemon.config.node_rank, self.daemon.catalog.newest_step())
        return result

    def detach(self, rank: int, pid: int) -> dict:
        return self.daemon.catalog.detach(rank, pid)

    def clear(self, force: bool = False) -> dict:
        """``ftd clear``: drop the job's versions, in memory and in flush_dir (a cluster: on every node)."""
        d, cat = self.daemon, self.daemon.catalog
        live = cat.live_trainers()
        if live and not force:
            who = ", ".join(f"rank {r} (pid {pid})" for r, pid in live)
            raise Refused(f"trainers of job {d.config.job!r} still run on node {d.config.node_rank}: {who}; stop "
                          f"them first, or pass --force to drop their snapshots anyway")
        newest = max(cat.newest_step(), cat.recoverable)
        if d.node is not None:
            d.node.request_new_run("ftd clear", always=True)
            return {"epoch": d.node.epoch, "newest": newest, "cluster": True}
        removed = self._start_new_run_here("ftd clear")
        return {"newest": newest, "flushed": removed, "cluster": False}

    def corrupt(self, **fields) -> dict:
        if self.daemon.node is not None:
            self.daemon.node.on_corrupt()
            return {"repairing": True}
        return self.daemon.catalog.corrupt(**fields)

    def recover(self) -> dict:
        node = self.daemon.node
        if node is None:
            raise Refused("this daemon is a standalone node (no peers in its config): there is nothing "
                          "to rebuild from; `ftd recover` needs a cluster config (see `ftd launch`)")
        started = node.start_recover()
        return {"started": started, "rebuilding": node.rebuilding}

    def versions(self) -> dict:
        return {**self.daemon.catalog.versions(), **self._where()}
