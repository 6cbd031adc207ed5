"""The node daemon: owns the shared-memory buffers of its node's trainer ranks and outlives them.

Its loop only moves messages: receive a request on the ZeroMQ ROUTER control socket, validate it
(protocol), let the catalog decide, reply. On start it adopts the complete, checksum-verified
versions a killed predecessor left in shared memory and deletes everything else of its own; on
SIGTERM/SIGINT it unlinks every segment it owns. With a ``flush_dir`` it also flushes versions to
disk in the background (``flusher``) and, standalone, loads the newest flushed version back when it
starts with nothing in memory (a cluster decides that together: ``node``).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import psutil
import zmq

from . import protocol, shm
from .catalog import Catalog
from .checksum import bad_chunks
from .config import Config, ensure_private_dir
from .errors import FtdError, ProtocolError, Refused
from .flusher import DiskLoad, Flusher
from .flushpolicy import FlushPolicy
from .layout import Manifest

log = logging.getLogger("ftd.daemon")

PEER_SLICE = 0.005  # seconds of peer work between two looks at the control socket


def process_alive(pid: int) -> bool:
    """Whether the trainer process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class ShmStore:
    """The catalog's store: segments as files in ``shm_dir``."""

    def __init__(self, shm_dir: Path):
        self.dir = shm_dir

    def allocate(self, name: str, size: int) -> None:
        shm.create(self.dir / name, size)

    def release(self, name: str) -> None:
        shm.drop_meta(self.dir / name)
        shm.unlink(self.dir / name)

    def mark_writing(self, name: str) -> None:
        shm.drop_meta(self.dir / name)

    def mark_complete(self, name: str, meta: dict) -> None:
        shm.write_meta(self.dir / name, meta)


class Daemon:
    def __init__(self, config: Config):
        self.config = config
        self.started_at = time.time()
        self.store = ShmStore(config.shm_dir)
        self.catalog = Catalog(
            self.store, budget=config.memory_budget, reserve=config.memory_reserve,
            available=lambda: psutil.virtual_memory().available,
            segment_name=lambda rank: f"{config.shm_prefix}r{rank}.{secrets.token_hex(6)}",
            alive=process_alive)
        self._segment_re = re.compile(re.escape(config.shm_prefix) + r"r(\d+)\.([0-9a-f]{12})$")
        self.flusher = Flusher(config, self.catalog) if config.flush_dir is not None else None
        self.flush_policy = FlushPolicy(config.flush_every, config.flush_interval)  # standalone only
        self._flush_offered = -1
        self.disk_load: DiskLoad | None = None  # standalone: a flushed version being loaded at start-up
        self._disk_steps: list[int] = []        # ... and the older ones to try if it fails its checks
        self.node = None
        if config.clustered:
            from .node import ClusterNode
            self.node = ClusterNode(config, self.catalog, self.flusher)
        self._stop = False
        self.invalid_requests = 0  # control messages dropped or refused as malformed
        self._lock_fd: int | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None

    # ---- start-up -----------------------------------------------------------------------------
    def _take_lock(self) -> None:
        ensure_private_dir(self.config.runtime_dir)
        ensure_private_dir(self.config.socket_path.parent)
        lock = self.config.socket_path.with_suffix(".lock")
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FtdError(f"another ftd daemon already serves node {self.config.node_rank} of job "
                           f"{self.config.job!r} at {self.config.endpoint}; stop it first, or use another job name")
        self._lock_fd = fd

    def adopt_predecessor(self) -> tuple[int, int]:
        """Adopt verified complete versions left in shared memory; remove the rest. Returns (adopted, removed)."""
        found = []
        removed = 0
        for path in shm.list_prefix(self.config.shm_dir, self.config.shm_prefix):
            if self.node is not None and self.node.store.is_parity_file(path.name):
                continue  # parity: the cluster side adopts it
            if path.name.endswith((".meta", ".tmp")):
                if not (self.config.shm_dir / path.name.split(".meta")[0]).exists():
                    shm.unlink(path)
                continue
            m = self._segment_re.match(path.name)
            meta = shm.read_meta(path)
            version = self._verified(path, meta) if m and meta else None
            if version is None:
                self.store.release(path.name)
                removed += 1
                continue
            found.append((meta["seq"], int(m.group(1)), path, meta))
        for _, rank, path, meta in sorted(found, key=lambda f: f[0]):
            self.catalog.adopt(rank, meta["world"], path.name, path.stat().st_size, meta["step"],
                               meta["manifest"], meta.get("committed_at"))
            log.info("adopted rank %d step %d from %s", rank, meta["step"], path.name)
        return len(found), removed

    @staticmethod
    def _verified(path: Path, meta: dict) -> Manifest | None:
        try:
            if not all(isinstance(meta.get(k), int) for k in ("rank", "world", "step", "seq")):
                return None
            manifest = Manifest.from_json(meta.get("manifest"), max_nbytes=path.stat().st_size)
            mapping = shm.Mapping(path, populate=False, writable=False)
            try:
                bad = bad_chunks(mapping.view(), manifest.layout.nbytes, manifest.chunk_size, manifest.checksums)
            finally:
                mapping.close()
        except (OSError, ProtocolError, ValueError) as e:
            log.warning("discarding %s: %s", path.name, e)
            return None
        if bad:
            log.warning("discarding %s (step %s): %d chunk(s) fail their checksums", path.name, meta["step"], len(bad))
            return None
        return manifest

    # ---- requests -----------------------------------------------------------------------------
    def handle(self, payload: bytes) -> bytes:
        try:
            msg = protocol.decode_request(payload)
            mtype = msg["type"]
            fields = {k: v for k, v in msg.items() if k not in ("v", "type")}
            if mtype == "ping":
                return protocol.ok(node_rank=self.config.node_rank, job=self.config.job, pid=os.getpid())
            if mtype == "status":
                return protocol.ok(**self.status())
            if self.node is not None:
                if mtype == "begin":
                    self.node.latest_step = fields["step"]
                early = self._cluster_request(mtype, fields)
                if early is not None:
                    return early
            elif mtype == "recover":
                raise Refused("this daemon is a standalone node (no peers in its config): there is nothing "
                              "to rebuild from; `ftd recover` needs a cluster config (see `ftd launch`)")
            elif mtype == "restore" and self.disk_load is not None:
                return protocol.ok(wait=f"loading step {self.disk_load.step} from disk ({self.config.flush_dir})")
            result = getattr(self.catalog, mtype)(**fields)
            if mtype == "commit" and self.node is not None:
                self.node.maybe_candidate()
            elif mtype == "commit" and self.flusher is not None:
                self._maybe_flush()
            if mtype in ("begin", "commit", "abort") and self.flusher is not None:
                self.flusher.copies_changed()
            if mtype == "restore" and self.node is not None:
                self.node.on_restored(fields["rank"], result["versions"][0]["step"] if result["versions"] else -1)
            if mtype in ("register", "restore", "versions"):
                result.update(shm_dir=str(self.config.shm_dir), chunk_size=self.config.chunk_size,
                              node_rank=self.config.node_rank, job=self.config.job, nodes=max(1, self.config.nodes))
            return protocol.ok(**result)
        except (ProtocolError, Refused) as e:
            if isinstance(e, ProtocolError):
                self.invalid_requests += 1
            log.warning("request refused: %s", e)
            return protocol.error(str(e))
        except Exception as e:  # the daemon must stay up for the other ranks
            log.exception("internal error while handling a request")
            return protocol.error(f"internal error in the daemon: {type(e).__name__}: {e}")

    def _cluster_request(self, mtype: str, fields: dict) -> bytes | None:
        """Requests a cluster member answers differently; None to go on as a standalone node."""
        node = self.node
        if mtype == "recover":
            started = node.start_recover()
            return protocol.ok(started=started, rebuilding=node.rebuilding)
        if mtype == "restore":
            wait = node.restore_wait()
            if wait:
                return protocol.ok(wait=wait)
            if node.lost_error:
                raise Refused(f"node {self.config.node_rank} cannot restore: {node.lost_error}")
        if mtype == "corrupt":
            node.on_corrupt()
            return protocol.ok(repairing=True)
        return None

    def status(self) -> dict:
        st = self.catalog.status()
        for r in st["ranks"]:
            r["alive"] = bool(r["pid"]) and process_alive(r["pid"])
        st.update(job=self.config.job, node_rank=self.config.node_rank, endpoint=self.config.endpoint,
                  pid=os.getpid(), uptime=time.time() - self.started_at, shm_dir=str(self.config.shm_dir),
                  invalid_requests=self.invalid_requests)
        if self.node is not None:
            st["cluster"] = self.node.status()
            st["used"] += st["cluster"]["parity_bytes"]
        if self.flusher is not None:
            st["flush"] = self.flusher.status()
            if self.disk_load is not None:
                st["flush"]["loading"] = self.disk_load.step
        return st

    # ---- durable tier (standalone; a cluster member's node decides with its peers) ----------------
    def _maybe_flush(self) -> None:
        step = self.catalog.newest_common()
        if step > self._flush_offered:
            self._flush_offered = step
            if self.flush_policy.due(step):
                self.flusher.offer(step)

    def _start_disk_load(self) -> None:
        while self._disk_steps:
            step = self._disk_steps.pop(0)
            self.disk_load = DiskLoad(self.config, step, self.catalog.segment_name)
            log.info("no snapshot in memory: loading step %d from %s", step, self.config.flush_dir)
            return

    def _tick_disk_load(self) -> None:
        done = self.disk_load.result()
        if done is None:
            return
        ok, value, seconds = done
        load, self.disk_load = self.disk_load, None
        if ok:
            for r in value:
                self.catalog.adopt(r["rank"], r["world"], r["name"], r["capacity"], load.step, r["manifest"], None,
                                   origin=load.origin)
            log.warning("restored step %d of %d rank(s) from disk in %.2f s (%s): memory held no snapshot",
                        load.step, len(value), seconds, load.origin[5:])
            return
        log.warning("flushed step %d cannot be used: %s; trying the one before it", load.step, value)
        self._start_disk_load()
        if self.disk_load is None:
            log.error("no flushed version on disk passes its checks: the trainers start afresh")

    # ---- loop -----------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop = True

    def start(self) -> None:
        self._take_lock()
        adopted, removed = self.adopt_predecessor()
        if adopted or removed:
            log.info("adopted %d version(s) of a previous daemon, removed %d incomplete segment(s)", adopted, removed)
        if self.flusher is not None:
            problem = self.flusher.check_dir()
            if problem:
                log.error("%s", problem)
            self.flusher.start_worker()
        if self.flusher is not None and self.node is None and not adopted:
            self._disk_steps = self.flusher.on_disk()
            self._start_disk_load()
        sock_path = self.config.socket_path
        if sock_path.exists():
            sock_path.unlink()  # stale: we hold the lock, so no daemon serves it
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.config.endpoint)
        os.chmod(sock_path, 0o600)
        if self.node is not None:
            self.node.store.adopt_parity()
            self.node.start(self._ctx)

    def serve(self) -> None:
        assert self._sock is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        peer_sockets = self.node.sockets() if self.node is not None else []
        for s in peer_sockets:
            poller.register(s, zmq.POLLIN)
        while not self._stop:
            events = dict(poller.poll(20 if self.node is not None else 100))
            if self._sock in events:
                self._serve_control()
            if self.flusher is not None:
                self.flusher.tick()
            if self.disk_load is not None:
                self._tick_disk_load()
            if self.node is not None:
                try:
                    self._serve_peers(peer_sockets, events)
                except Exception:  # the daemon must stay up for its trainers and its peers
                    log.exception("internal error in the cluster side of the daemon")

    def _serve_peers(self, sockets: list, events: dict) -> None:
        # Drain the peers' messages, but for at most PEER_SLICE seconds: a trainer's begin or commit
        # waiting on the control socket must not sit behind a round's worth of frames to encode.
        deadline = time.monotonic() + PEER_SLICE
        for s in sockets:
            if s in events:
                while True:
                    self.node.on_socket(s)
                    if time.monotonic() > deadline or not s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
        self.node.tick()

    def _serve_control(self) -> None:
        frames = self._sock.recv_multipart()
        envelope, body = _split_envelope(frames)
        if envelope is None:
            self.invalid_requests += 1
            return  # not even a routable message
        if len(body) == 1:
            reply = self.handle(body[0])
        else:
            self.invalid_requests += 1
            log.warning("request refused: %d frames", len(body))
            reply = protocol.error(f"expected one frame per request, got {len(body)}")
        self._sock.send_multipart(envelope + [reply])

    def close(self) -> None:
        if self._lock_fd is None:
            return  # never started: another daemon owns the socket and the segments
        if self.flusher is not None:
            self.flusher.close()  # before the segments go: it may be reading them
        if self.disk_load is not None:  # its segments are not the catalog's yet
            self.disk_load.abandon()
        if self.node is not None:
            self.node.close()
        self.catalog.release_all()
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        shm.unlink(self.config.socket_path)
        shm.unlink(self.config.socket_path.with_suffix(".lock"))  # still held: no successor can own it yet
        os.close(self._lock_fd)
        self._lock_fd = None
        try:
            self.config.socket_path.parent.rmdir()  # the job's directory, if no other node uses it
        except OSError:
            pass


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes] | None, list[bytes]]:
    """ROUTER frames -> (routing envelope, body). REQ peers put an empty delimiter after their identity."""
    if len(frames) < 2:
        return None, []
    if frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def run(config: Config) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit status."""
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, daemon.request_stop)  # before adoption: a stop during start-up is clean too
    signal.signal(signal.SIGINT, daemon.request_stop)
    try:
        daemon.start()
    except FtdError as e:
        print(f"ftd daemon: {e}", file=sys.stderr)
        daemon.close()
        return 1
    print(f"ftd daemon: node {config.node_rank} of job {config.job!r} serving at {config.endpoint} "
          f"(memory budget {config.memory_budget >> 20} MiB, shared memory in {config.shm_dir})", flush=True)
    print(f"ftd daemon: trainers on this node find it with FTD_ENDPOINT={config.endpoint}", flush=True)
    if config.clustered:
        grouping = config.grouping()
        group = grouping.group_for(config.node_rank)
        print(f"ftd daemon: peer link {config.peer_endpoint} ({'CURVE' if config.peer_key_file else 'unauthenticated'}); "
              f"group {group.index} = nodes {list(group.nodes)}, k={grouping.k} data + m={grouping.m} parity "
              f"({config.parity_code})", flush=True)
        if config.insecure_peers and not config.peer_key_file:
            log.warning("peer links are NOT authenticated or encrypted (insecure_peers = true): anyone who can "
                        "reach %s can read snapshot data or inject some; use `ftd keygen` and peer_key_file "
                        "unless this network is private to the job", config.peer_endpoint)
    try:
        daemon.serve()
    finally:
        daemon.close()
        print("ftd daemon: stopped; all shared memory released", flush=True)
    return 0
