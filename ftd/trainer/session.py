"""A trainer rank's session with its daemon: registration, the buffers it is handed, and their mappings.

Every request that needs a session goes through ``call``, which registers first (and again, once,
if the daemon restarted and forgot the session), so a daemon restart costs the trainer nothing but
the snapshot in flight. The buffers the daemon hands out are mapped once and kept while the daemon
keeps them (their memory reserved on a background thread: ``arena``), the one a restore read
included; ``prepare`` has the daemon create both buffers of the first snapshot as soon as its size is
known (at ``restore``), so they are reserved while the first steps run; the buffer the *next*
snapshot will get is mapped (and page-locked) right after a commit, off the trainer's critical path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ftd.control.connection import Connection
from ftd.errors import DaemonUnavailable, FtdError, Refused
from ftd.trainer.arena import Arena
from ftd.trainer.capture import expected_nbytes
from ftd.trainer.discovery import local_world

log = logging.getLogger(__name__)

SESSION_LOST = "unknown or outdated session"


class Busy(Exception):
    """Internal: the daemon keeps both buffers (recoverable + being protected, or one being flushed):
    skip this snapshot. Never reaches the user."""


class DaemonSession:
    def __init__(self, conn: Connection, rank: int, world_size: int, chunk_size: int):
        self.conn, self.rank, self.world_size = conn, rank, world_size
        self.chunk_size = chunk_size
        self.id: str | None = None
        self.shm_dir: Path | None = None
        self.arenas: dict[str, Arena] = {}
        self.next_buffer: str | None = None
        self.ready_nbytes = -1  # snapshot size whose buffers are allocated and mapped

    def call(self, mtype: str, **fields: Any) -> dict:
        """A request that needs a registered session; registers (again) if the daemon forgot us."""
        for attempt in (0, 1):
            if self.id is None:
                reply = self.conn.call("register", rank=self.rank, world=self.world_size, pid=os.getpid(),
                                       **local_world())
                self.id = reply["session"]
                self.ready_nbytes = -1
                self.chunk_size = int(reply["chunk_size"])
                self.keep_arenas(Path(reply["shm_dir"]))
            try:
                return self.conn.call(mtype, session=self.id, **fields)
            except Refused as e:
                if SESSION_LOST not in str(e) or attempt or mtype != "begin":
                    raise
                self.id = None
            except DaemonUnavailable:
                self.id = None
                raise
        raise AssertionError("unreachable")

    def begin(self, step: int, nbytes: int) -> tuple[str, Arena]:
        """The buffer to write ``step`` into, mapped; Busy if the daemon holds both of this rank's."""
        reply = self.call("begin", step=step, nbytes=nbytes)
        if "busy" in reply:
            raise Busy(reply["busy"])
        name = reply["buffer"]
        self.next_buffer = reply.get("next")
        for stale in [n for n in self.arenas if n not in (name, self.next_buffer)]:
            self.arenas.pop(stale).close()  # a buffer the daemon replaced (the layout grew)
        arena = self.arena(name)
        if arena.mapping.size < nbytes:
            raise FtdError(f"daemon buffer {name} holds {arena.mapping.size} bytes, snapshot needs {nbytes}")
        return name, arena

    def arena(self, name: str, shm_dir: Path | None = None, reserve: bool = True) -> Arena:
        """The mapping of buffer ``name``, made once (``shm_dir``: for a restore, before registering);
        ``reserve``: reserve its memory on a background thread right away."""
        if shm_dir is not None and self.shm_dir != shm_dir:
            self.keep_arenas(shm_dir)
        arena = self.arenas.get(name)
        if arena is None:
            arena = self.arenas[name] = Arena(self.shm_dir / Path(name).name)
            if reserve:
                arena.reserve_in_background()
        return arena

    def prepare(self, state: dict, capture_rng: bool) -> None:
        """At ``restore``: the first snapshot's size is known (``capture.expected_nbytes``), so have the
        daemon create this rank's two buffers now and map them (their memory is then reserved in the
        background while the first steps run): no snapshot of the first steps is skipped for set-up. A
        state whose size cannot be told beforehand, or a refusal (the memory budget), is left for the
        first snapshot to set up or report."""
        try:
            nbytes = expected_nbytes(state, capture_rng)
            if nbytes is None:
                return
            reply = self.call("prepare", nbytes=nbytes)
            for name in reply["buffers"]:
                self.arena(name)
        except Exception as e:  # only a head start: the first snapshot() sets up, or names what is wrong
            log.debug("ftd: no buffers prepared for the first snapshot: %s", e)

    def keep_arenas(self, shm_dir: Path) -> None:
        """After (re)registering: keep the mappings whose files are still the daemon's buffers (a restarted
        daemon may have replaced them), drop the others."""
        if self.shm_dir != shm_dir:
            self.drop_arenas()
            self.shm_dir = shm_dir
        for name in [n for n, a in self.arenas.items() if not a.same_file()]:
            self.arenas.pop(name).close()

    def prepare_next_arena(self, pin: bool) -> None:
        """Map (and page-lock) the buffer the next snapshot will get, off the trainer's critical path."""
        if self.next_buffer and self.next_buffer not in self.arenas:
            try:
                arena = self.arena(self.next_buffer)
                if pin:
                    arena.pin()
            except Exception as e:  # the next begin will simply map it itself
                log.debug("ftd: could not prepare buffer %s: %s", self.next_buffer, e)

    def abort(self, name: str, reason: str) -> None:
        try:
            self.call("abort", buffer=name, reason=reason[:200])
        except FtdError:
            pass

    def drop_arenas(self) -> None:
        for arena in self.arenas.values():
            arena.close()
        self.arenas.clear()
