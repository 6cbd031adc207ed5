"""Daemon configuration: a TOML file, with defaults that make one machine work with no file at all.

`configs/local.toml` documents every key. Paths derived from the config (control socket,
shared-memory names) live here too, so the daemon and the client derive them the same way.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import psutil

from ftd.errors import ConfigError
from ftd.units import format_size, parse_rate, parse_size

_JOB_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_runtime_dir() -> Path:
    return Path(f"/tmp/ftd-{os.getuid()}")


#: "auto" replica snapshots slice a replicated state of at least this many bytes per rank. Below it the
#: slicing saves little memory and costs the trainer a little more per snapshot (README "Replica-aware
#: snapshots": the demo's 4.75 MiB GPT is blocked 1.4x longer per snapshot sliced; 256 MiB gains 2-5x
#: in copy time).
AUTO_REPLICA_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Config:
    job: str = "default"
    node_rank: int = 0
    runtime_dir: Path = dataclasses.field(default_factory=default_runtime_dir)
    shm_dir: Path = Path("/dev/shm")
    memory_budget: int = 0          # bytes of shared memory the daemon may hold; 0 means "half of RAM"
    memory_reserve: int = 1 << 30   # never allocate below this much memory available to the system
    chunk_size: int = 4 << 20       # checksum (and later transfer) unit
    request_timeout: float = 10.0   # seconds a client waits for a reply
    replica_snapshots: bool | str = "auto"  # DDP's / HSDP's replicated state: each rank snapshots 1/R
                                    # (trainer/replicas.py); "auto": on in a cluster (peers) for a replicated state
                                    # of at least AUTO_REPLICA_BYTES, off on a standalone node
    replica_min_bytes: int = 0      # (set by "auto"): a smaller replicated state is snapshotted whole per rank
    replica_prefetch: bool = True   # cluster: once a sliced rank's trainer is gone, fetch its replicas' slices of
                                    # the recoverable step from their nodes while the new worker starts
                                    # (daemon/replica_versions.py; held until its restore, within the budget)
    # ---- peers (erasure coding across nodes); no peers: a standalone node, as in issue 2 ----
    peers: tuple[str, ...] = ()     # peer endpoint ("tcp://host:port") of every node rank, index = node rank
    advertise: str = ""             # this node's own peer endpoint when it is not peers[node_rank]: a replacement
                                    # host under its own address ($FTD_PEER_ENDPOINT, `ftd daemon --peer-endpoint`);
                                    # it claims the rank from its peers (cluster/membership.py)
    parity: int = 1                 # m: parity blocks per stripe; groups have g = k + m nodes
    group_size: int = 0             # g; 0 means all nodes form one group
    group_stride: int = 1           # 1: consecutive ranks form a group; R: ranks r, r+R, ... (racks of R nodes)
    parity_code: str = "auto"       # "xor" (m = 1 only), "rs" (zfec Reed-Solomon) or "auto" (xor for m = 1)
    frame_size: int = 4 << 20       # bytes per peer message of chunk data
    inflight_bytes: int = 32 << 20  # unacknowledged chunk bytes per peer link
    protect_bandwidth: int = 0      # bytes/s this node's peer links send ("200MB/s"): protection chunks and the
                                    # blocks peers fetch wait for it (cluster/bandwidth.py); 0: unlimited
    peer_key_file: Path | None = None  # this node's CURVE key file (`ftd keygen --dir DIR --nodes N`: DIR/node-R.key,
                                    # recommended; "{node_rank}" in it is replaced) or the job's shared key
                                    # (`ftd keygen --out FILE`); None: peer links unauthenticated
    peer_roster: Path | None = None # the job's public keys (DIR/roster.json) for a node key file; default: the
                                    # roster.json next to it
    insecure_peers: bool = False    # allow unauthenticated peer links to other hosts (never on a shared network)
    round_timeout: float = 120.0    # seconds a protection round may take before it is abandoned
    peer_timeout: float = 10.0      # seconds of silence after which a peer is declared lost (a round in
                                    # flight with it is abandoned; a rebuild asks another peer)
    rebuild_decoders: bool = True   # a rebuilding node has the survivors decode its blocks (S*(1+m/k) bytes
                                    # into it); false: it fetches k blocks per stripe and decodes (g*S)
    # ---- durable tier: background flush to disk, and the fallback restore from it ----
    flush_dir: Path | None = None   # directory of flushed versions (local disk or a shared file system);
                                    # None: no flush, and no restore from disk
    flush_every: int = 0            # flush a recoverable version once it is this many steps past the last
    flush_interval: float = 300.0   # ... or once this many seconds passed since the last flush began
    flush_keep: int = 2             # newest flushed versions kept on disk (per node)
    # ---- Prometheus metrics (the optional extra ftd[metrics]) ----
    metrics_port: int = 0           # serve /metrics on this TCP port; 0: no metrics
    metrics_host: str = "127.0.0.1" # the address it binds ("0.0.0.0": every interface, for a remote Prometheus)

    def __post_init__(self) -> None:
        if not _JOB_NAME.match(self.job):
            raise ConfigError(f"job name {self.job!r} must be 1-64 letters, digits, '_' or '-'")
        if self.node_rank < 0:
            raise ConfigError(f"node_rank must be >= 0, got {self.node_rank}")
        if not (4096 <= self.chunk_size <= 64 << 20) or self.chunk_size % 4096:
            raise ConfigError(f"chunk_size must be a multiple of 4 KiB between 4 KiB and 64 MiB, got {self.chunk_size}")
        for name in ("request_timeout", "round_timeout", "peer_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")
        if self.flush_every < 0 or self.flush_interval < 0 or (self.flush_every == 0 and self.flush_interval == 0):
            raise ConfigError(f"flush_every ({self.flush_every}) and flush_interval ({self.flush_interval}) must be >= 0, "
                             f"and one of them > 0")
        if self.flush_keep < 1:
            raise ConfigError(f"flush_keep must keep at least 1 flushed version, got {self.flush_keep}")
        if not isinstance(self.metrics_port, int) or not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a TCP port (1-65535), or 0 for no metrics; got {self.metrics_port!r}")
        if self.memory_budget == 0:
            object.__setattr__(self, "memory_budget", psutil.virtual_memory().total // 2)
        if self.peer_key_file is not None and "{node_rank}" in str(self.peer_key_file):
            # one config for every node of a job (SLURM, torchrun): each reads its own key file
            object.__setattr__(self, "peer_key_file", Path(str(self.peer_key_file).replace("{node_rank}",
                                                                                         str(self.node_rank))))
        self._check_peers()
        if self.replica_snapshots == "auto":
            object.__setattr__(self, "replica_snapshots", bool(self.peers))
            object.__setattr__(self, "replica_min_bytes", AUTO_REPLICA_BYTES)
        elif not isinstance(self.replica_snapshots, bool):
            raise ConfigError(f"replica_snapshots must be true, false or \"auto\"; got {self.replica_snapshots!r}")

    def _check_peers(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))
        if not self.peers:
            if self.advertise:
                raise ConfigError(f"advertise (FTD_PEER_ENDPOINT) = {self.advertise!r} needs peers (a cluster)")
            return
        for i, ep in enumerate(self.peers):
            if not isinstance(ep, str) or not re.match(r"^tcp://[^\s:/]+:\d{1,5}$", ep):
                raise ConfigError(f"peers[{i}] = {ep!r} must be a tcp://host:port endpoint")
        if self.advertise:
            if not isinstance(self.advertise, str) or not re.match(r"^tcp://[^\s:/]+:\d{1,5}$", self.advertise):
                raise ConfigError(f"advertise (FTD_PEER_ENDPOINT) = {self.advertise!r} is not tcp://host:port")
            other = [i for i, ep in enumerate(self.peers) if ep == self.advertise and i != self.node_rank]
            if other:
                raise ConfigError(f"advertise (FTD_PEER_ENDPOINT) = {self.advertise} is node {other[0]}'s endpoint in "
                                  f"peers; a replacement needs an address of its own")
        remote = [ep for ep in (*self.peers, self.advertise) if ep and not _is_loopback(ep)]
        if remote and self.peer_key_file is None and not self.insecure_peers:
            raise ConfigError(
                f"peer links leave this host ({remote[0]}), but no peer_key_file is configured: anyone on the "
                f"network could read or inject snapshot data. Create per-node keys with `ftd keygen --dir DIR "
                f"--nodes {len(self.peers)}`, give node R DIR/node-R.key (mode 0600) and DIR/roster.json, and set "
                f"peer_key_file = \"DIR/node-{{node_rank}}.key\"; or set insecure_peers = true on a private network")
        if len(set(self.peers)) != len(self.peers):
            raise ConfigError("peers lists an endpoint twice; every node rank needs its own host:port")
        if self.node_rank >= len(self.peers):
            raise ConfigError(f"node_rank {self.node_rank} has no entry in peers (it lists {len(self.peers)} nodes)")
        if self.group_size == 0:
            object.__setattr__(self, "group_size", len(self.peers))
        if self.parity_code == "auto":
            object.__setattr__(self, "parity_code", "xor" if self.parity == 1 else "rs")
        if self.parity_code not in ("xor", "rs"):
            raise ConfigError(f"parity_code must be 'auto', 'xor' or 'rs', got {self.parity_code!r}")
        if self.parity_code == "xor" and self.parity != 1:
            raise ConfigError(f"parity_code 'xor' gives one parity block; parity = {self.parity} needs 'rs'")
        if not (4096 <= self.frame_size <= 16 << 20):
            raise ConfigError(f"frame_size must be between 4 KiB and 16 MiB, got {self.frame_size}")
        if self.inflight_bytes < self.frame_size:
            raise ConfigError("inflight_bytes must hold at least one frame (frame_size)")
        if not isinstance(self.protect_bandwidth, int) or self.protect_bandwidth < 0:
            raise ConfigError(f"protect_bandwidth must be a rate >= 0 (e.g. \"200MB/s\"; 0: unlimited), "
                              f"got {self.protect_bandwidth!r}")
        if 0 < self.protect_bandwidth * self.peer_timeout < 2 * self.frame_size:
            # a peer fetching blocks from this node waits peer_timeout for each before it asks another node
            raise ConfigError(f"protect_bandwidth = {format_size(self.protect_bandwidth)}/s sends a frame of "
                              f"{format_size(self.frame_size)} in more than half of peer_timeout "
                              f"({self.peer_timeout:g} s), and rebuilds that fetch from this node would give up on it: raise it to at least "
                              f"{format_size(2 * self.frame_size / self.peer_timeout)}/s, or lower frame_size")
        self.grouping()  # raises a clear ValueError for a node count that does not split into groups

    @property
    def clustered(self) -> bool:
        return bool(self.peers)

    @property
    def nodes(self) -> int:
        return len(self.peers)

    def grouping(self):
        """The groups of the cluster (stripes.Grouping); needs peers."""
        from ftd.cluster.stripes import Grouping
        g, m = self.group_size, self.parity
        if not isinstance(m, int) or not 1 <= m < g:
            raise ConfigError(f"parity = {m} must satisfy 1 <= parity < group size ({g} nodes per group)")
        return Grouping(self.nodes, g - m, m, self.group_stride)

    @property
    def peer_endpoint(self) -> str:
        """Where this node's peers reach it: ``advertise`` if set, else its entry in ``peers``."""
        return self.advertise or self.peers[self.node_rank]

    @property
    def peer_bind(self) -> str:
        """Where the peer socket binds: every interface, on this node's port."""
        return "tcp://*:" + self.peer_endpoint.rsplit(":", 1)[1]

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / self.job / f"node{self.node_rank}.sock"

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"

    @property
    def shm_prefix(self) -> str:
        """Every shared-memory file of this daemon starts with this; a restarted daemon adopts by it."""
        return f"ftd.{self.job}.n{self.node_rank}."


_KEYS = {f.name for f in dataclasses.fields(Config)}


def _is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


# Where a process learns its node's rank, in order: ftd's own variable, torchrun's, SLURM's.
NODE_RANK_VARIABLES = ("FTD_NODE_RANK", "GROUP_RANK", "SLURM_NODEID")


def node_rank_from_env() -> tuple[int, str] | None:
    """(node rank, the variable it came from), from the first of NODE_RANK_VARIABLES that is set."""
    for name in NODE_RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit():
                raise ConfigError(f"${name}={value!r} is not a node rank (a number >= 0); unset it or fix it")
            return int(value), name
    return None


def load_config(path: str | os.PathLike | None = None, *, node_rank: int | None = None) -> Config:
    """Read a TOML config; ``None`` gives the defaults, with $FTD_JOB applied. The node rank comes from
    the argument, else the file, else the environment (NODE_RANK_VARIABLES), else 0."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        unknown = set(raw) - _KEYS
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        if "node_rank" not in raw and node_rank is None:
            found = node_rank_from_env()  # one config shared by all nodes of a job (SLURM, torchrun)
            if found is not None:
                raw["node_rank"] = found[0]
    else:
        if "FTD_JOB" in os.environ:
            raw["job"] = os.environ["FTD_JOB"]
        found = node_rank_from_env()
        if found is not None:
            raw["node_rank"] = found[0]
    if os.environ.get("FTD_PEER_ENDPOINT", "").strip() and "advertise" not in raw:
        raw["advertise"] = os.environ["FTD_PEER_ENDPOINT"].strip()  # a replacement host under its own address
    total = psutil.virtual_memory().total
    kwargs: dict = {}
    where = f"config file {path}" if path is not None else "the configuration"
    for key, value in raw.items():
        try:
            kwargs[key] = _value(key, value, total, where)
        except (ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: {key} = {value!r}: {e}") from None
    if node_rank is not None:
        kwargs["node_rank"] = node_rank
    try:
        return Config(**kwargs)
    except ValueError as e:  # ConfigError, and the grouping's ValueError
        raise ConfigError(f"{where}: {e}") from None


def _value(key: str, value, total: int, where: str):
    """One config value, converted to its type (ValueError or ConfigError if it does not fit)."""
    if key == "runtime_dir":
        return Path(value).expanduser() if value else default_runtime_dir()
    if key == "shm_dir":
        return Path(value).expanduser() if value else Path("/dev/shm")
    if key in ("memory_budget", "memory_reserve", "chunk_size", "frame_size", "inflight_bytes"):
        return parse_size(value, total=total)
    if key == "protect_bandwidth":
        return parse_rate(value)
    if key in ("request_timeout", "round_timeout", "peer_timeout", "flush_interval"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number of seconds, got {value!r}")
        return float(value)
    if key in ("node_rank", "parity", "group_size", "group_stride", "flush_every", "flush_keep", "metrics_port"):
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}: {key} must be a whole number, got {value!r}")
        return int(value)
    if key == "peers":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: peers must be a list of tcp://host:port strings")
        return tuple(value)
    if key == "replica_snapshots" and value == "auto":
        return value
    if key in ("insecure_peers", "rebuild_decoders", "replica_snapshots", "replica_prefetch"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false" + (' or "auto"' if key == "replica_snapshots"
                                                                          else ""))
        return value
    if key in ("peer_key_file", "peer_roster", "flush_dir"):
        return Path(value).expanduser() if value else None
    return value


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700; refuse one that others can enter."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to you; choose another runtime_dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
