"""What the daemon answers to each control request: one handler per message type.

``RequestHandler.handle`` validates the frame (``control.protocol``), looks its type up in a table and
returns the reply frame. The catalog decides about buffers and versions; a cluster member's node
and the disk tier get their say where they change the answer (a restore that must wait, a commit
that may start a protection round or a flush). Malformed requests are counted and refused; an
internal error is refused with its reason, and the daemon stays up for the other ranks.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from ftd.control import protocol
from ftd.errors import ProtocolError, Refused

if TYPE_CHECKING:
    from ftd.daemon.server import Daemon

log = logging.getLogger(__name__)


class RequestHandler:
    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.invalid_requests = 0  # control messages dropped or refused as malformed
        self.table: dict[str, Callable[..., dict]] = {
            "ping": self.ping, "status": self.status, "register": self.register, "begin": self.begin,
            "commit": self.commit, "abort": self.abort, "restore": self.restore, "corrupt": self.corrupt,
            "recover": self.recover, "versions": self.versions,
        }

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
            log.warning("request refused: %s", e)
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
        log.warning("request refused: %s", why)
        return protocol.error(why)

    # ---- the handlers -------------------------------------------------------------------------
    def _where(self) -> dict:
        """What a client needs to map buffers: sent with register, restore and versions."""
        c = self.daemon.config
        return dict(shm_dir=str(c.shm_dir), chunk_size=c.chunk_size, node_rank=c.node_rank, job=c.job,
                    nodes=max(1, c.nodes))

    def ping(self) -> dict:
        return dict(node_rank=self.daemon.config.node_rank, job=self.daemon.config.job, pid=os.getpid())

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

    def restore(self, rank: int, local_world: int | None = None) -> dict:
        d = self.daemon
        if d.node is not None:
            wait = d.node.restore_wait()
            if wait:
                return {"wait": wait}
            if d.node.lost_error:
                raise Refused(f"node {d.config.node_rank} cannot restore: {d.node.lost_error}")
        elif d.standalone_disk is not None:
            wait = d.standalone_disk.restore_wait()
            if wait:
                return {"wait": wait}
        result = d.catalog.restore(rank, local_world)
        if d.node is not None:
            d.node.on_restored(rank, result["versions"][0]["step"] if result["versions"] else -1)
        return {**result, **self._where()}

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
