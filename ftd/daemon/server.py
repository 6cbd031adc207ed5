"""The node daemon: owns the shared-memory buffers of its node's trainer ranks and outlives them.

Its loop only moves messages: receive a request on the ZeroMQ ROUTER control socket, let the
``RequestHandler`` answer it, reply; between requests, give the peer side (``cluster.node``) and the
disk tier (``durable``) their turn. On start it adopts the complete, checksum-verified versions a
killed predecessor left in shared memory (``adoption``) and deletes everything else of its own; on
SIGTERM/SIGINT it unlinks every segment it owns, unless trainers still run: a stop is not a loss, and
the next daemon adopts their versions (``--clear`` drops them anyway).

Call order: ``Daemon(config)``, ``start()`` (lock, adoption, flush worker, socket, peers), ``serve()``
until ``request_stop()``, then ``close()``; ``run(config)`` does all of it for ``ftd daemon``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import sys
import time

import psutil
import zmq

from ftd.config import Config, ensure_private_dir
from ftd.control import protocol
from ftd.daemon.adoption import adopt_predecessor
from ftd.daemon.catalog import Catalog
from ftd.daemon.requests import RequestHandler
from ftd.daemon.shm_store import ShmStore
from ftd.durable.flusher import Flusher
from ftd.durable.standalone import StandaloneDisk
from ftd.errors import FtdError
from ftd.shm import segments
from ftd.util.procs import process_alive

log = logging.getLogger(__name__)

PEER_SLICE = 0.005  # seconds of peer work between two looks at the control socket


class Daemon:
    def __init__(self, config: Config, *, clear_on_stop: bool = False):
        self.config = config
        self.clear_on_stop = clear_on_stop  # drop every snapshot at stop, even of trainers that still run
        self.kept_at_stop: list[tuple[int, int]] = []  # (rank, pid) of the live trainers whose versions were kept
        self.started_at = time.time()
        self.store = ShmStore(config.shm_dir)
        self.catalog = Catalog(
            self.store, budget=config.memory_budget, reserve=config.memory_reserve,
            available=lambda: psutil.virtual_memory().available,
            segment_name=lambda rank: f"{config.shm_prefix}r{rank}.{secrets.token_hex(6)}",
            alive=process_alive)
        self.flusher = Flusher(config, self.catalog) if config.flush_dir is not None else None
        self.node = None            # the peer side, in a cluster
        self.standalone_disk = None  # the disk tier's decisions, when there is no cluster to make them
        if config.clustered:
            from ftd.cluster.node import ClusterNode
            self.node = ClusterNode(config, self.catalog, self.flusher)
        elif self.flusher is not None:
            self.standalone_disk = StandaloneDisk(config, self.catalog, self.flusher)
        self.requests = RequestHandler(self)
        self.metrics = None          # Prometheus metrics (daemon.metrics), when metrics_port is set
        self._stop = False
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
        is_parity = self.node.store.is_parity_file if self.node is not None else (lambda name: False)
        return adopt_predecessor(self.config, self.catalog, self.store, is_parity)

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
        if self.standalone_disk is not None:
            self.standalone_disk.start(adopted)
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
        if self.config.metrics_port:
            from ftd.daemon.metrics import DaemonMetrics
            self.metrics = DaemonMetrics(self)
            self.metrics.start()

    # ---- status -------------------------------------------------------------------------------
    @property
    def invalid_requests(self) -> int:
        return self.requests.invalid_requests

    def status(self) -> dict:
        st = self.catalog.status()
        for r in st["ranks"]:
            r["alive"] = bool(r["pid"]) and process_alive(r["pid"])
        st.update(job=self.config.job, node_rank=self.config.node_rank, endpoint=self.config.endpoint,
                  pid=os.getpid(), uptime=time.time() - self.started_at, shm_dir=str(self.config.shm_dir),
                  invalid_requests=self.invalid_requests, replica_versions=self.requests.replicas.status())
        if self.node is not None:
            st["cluster"] = self.node.status()
            st["used"] += st["cluster"]["parity_bytes"]
        if self.flusher is not None:
            st["flush"] = self.flusher.status()
            load = self.standalone_disk.disk_load if self.standalone_disk is not None else None
            if load is not None:
                st["flush"]["loading"] = load.step
        return st

    # ---- loop -----------------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        self._stop = True

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
            if self.standalone_disk is not None:
                self.standalone_disk.tick()
            if self.metrics is not None:
                self.metrics.tick()
            self.requests.replicas.tick()
            if self.node is not None:
                try:
                    self._serve_peers(peer_sockets, events)
                except Exception:  # the daemon must stay up for its trainers and its peers
                    log.exception("internal error in the cluster side of the daemon")
                if self.node.fatal:
                    log.error("%s", self.node.fatal)
                    print(f"ftd daemon: {self.node.fatal}", file=sys.stderr, flush=True)
                    self._stop = True

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
            self.requests.invalid_requests += 1
            return  # not even a routable message
        if len(body) == 1:
            reply = self.requests.handle(body[0])
        else:
            reply = self.requests.refuse_malformed(f"expected one frame per request, got {len(body)}")
        self._sock.send_multipart(envelope + [reply])

    def close(self) -> None:
        if self._lock_fd is None:
            return  # never started: another daemon owns the socket and the segments
        if self.metrics is not None:
            self.metrics.close()
        if self.flusher is not None:
            self.flusher.close()  # before the segments go: it may be reading them
        if self.standalone_disk is not None:
            self.standalone_disk.close()
        # A stop (an upgrade, a systemd restart) is not a loss: the versions of trainers that still run
        # stay in shared memory, and the next daemon adopts them as after a crash.
        self.kept_at_stop = [] if self.clear_on_stop else self.catalog.live_trainers()
        keep = bool(self.kept_at_stop)
        if self.node is not None:
            self.node.close(keep=keep)
        self.requests.replicas.close()  # versions fetched for a replica's restore: never adopted, always dropped
        if keep:
            held = sum(len(r.complete()) for r in self.catalog.ranks.values())
            log.warning("stopping while trainers run (%s): kept %d version(s) in shared memory, which the next "
                        "daemon of node %d adopts; `ftd daemon --clear` drops them at stop instead",
                        ", ".join(f"rank {r}, pid {pid}" for r, pid in self.kept_at_stop), held, self.config.node_rank)
        else:
            self.catalog.release_all()
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()
        segments.unlink(self.config.socket_path)
        segments.unlink(self.config.socket_path.with_suffix(".lock"))  # still held: no successor can own it yet
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


def run(config: Config, clear_on_stop: bool = False) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit status."""
    daemon = Daemon(config, clear_on_stop=clear_on_stop)
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
    if daemon.metrics is not None:
        print(f"ftd daemon: Prometheus metrics at {daemon.metrics.url}", flush=True)
    if config.clustered:
        grouping = config.grouping()
        group = grouping.group_for(config.node_rank)
        print(f"ftd daemon: peer link {config.peer_endpoint} ({f'CURVE, key {config.peer_key_file}' if config.peer_key_file else 'unauthenticated'}); "
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
        if daemon.kept_at_stop:
            print(f"ftd daemon: stopped; the snapshots of {len(daemon.kept_at_stop)} live trainer(s) stay in shared "
                  f"memory for the next daemon", flush=True)
        else:
            print("ftd daemon: stopped; all shared memory released", flush=True)
    return 1 if daemon.node is not None and daemon.node.fatal else 0
