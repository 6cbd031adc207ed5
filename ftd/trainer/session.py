"""A trainer rank's session with its daemon: registration, the buffers it is handed, and their mappings.

Every request that needs a session goes through ``call``, which registers first (and again, once,
if the daemon restarted and forgot the session), so a daemon restart costs the trainer nothing but
the snapshot in flight. The buffers the daemon hands out are mapped once and kept while the daemon
keeps them; the buffer the *next* snapshot will get is mapped (and page-locked) right after a
commit, off the trainer's critical path.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ftd.control.connection import Connection
from ftd.errors import DaemonUnavailable, FtdError, Refused
from ftd.trainer.arena import Arena
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
                self.id, self.shm_dir = reply["session"], Path(reply["shm_dir"])
                self.ready_nbytes = -1
                self.chunk_size = int(reply["chunk_size"])
                self.drop_arenas()
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

    def arena(self, name: str) -> Arena:
        arena = self.arenas.get(name)
        if arena is None:
            arena = self.arenas[name] = Arena(self.shm_dir / Path(name).name)
        return arena

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
