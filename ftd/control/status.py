"""``ftd.status()``: what ``ftd status --json`` prints, as typed dataclasses, for scripts and notebooks.

    st = ftd.status()                      # the node daemon found as `ftd status` finds it
    st.recoverable_step, st.used, st.budget, [r.last_blocked_seconds for r in st.ranks]
    st.cluster.versions if st.cluster else None

One ``status`` request over the control socket; no torch, no subprocess. Each dataclass takes the
keys it knows from the daemon's reply and ignores the others (``raw`` keeps the whole reply, so a
field a newer daemon adds is still there).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from ftd.control.connection import Connection
from ftd.control.locate import find_daemon


def _pick(cls, data: dict, **converted: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names}, **converted)


@dataclasses.dataclass(frozen=True)
class Version:
    step: int
    bytes: int
    committed_at: float | None = None


@dataclasses.dataclass(frozen=True)
class RankStatus:
    rank: int
    world: int
    pid: int | None = None
    alive: bool = False
    commits: int = 0
    versions: tuple[Version, ...] = ()      # complete versions, newest first
    writing: tuple[int, ...] = ()           # steps being copied now
    buffer_bytes: int = 0
    last_commit_at: float | None = None
    last_copy_seconds: float | None = None
    last_blocked_seconds: float | None = None
    pinned: int | None = None               # cluster: the step held for the next protection round

    @classmethod
    def from_dict(cls, d: dict) -> "RankStatus":
        return _pick(cls, {k: v for k, v in d.items() if k not in ("versions", "writing")},
                     versions=tuple(_pick(Version, v) for v in d.get("versions", [])),
                     writing=tuple(d.get("writing", [])))


@dataclasses.dataclass(frozen=True)
class ClusterVersion:
    step: int
    local: bool = False
    protected: bool = False
    recoverable: bool = False
    data_bytes: int = 0
    parity_bytes: int = 0

    @property
    def state(self) -> str:
        return ("recoverable" if self.recoverable else "protected" if self.protected
                else "local-complete" if self.local else "parity only")


@dataclasses.dataclass(frozen=True)
class ClusterStatus:
    node_rank: int
    nodes: int
    group: int = 0
    group_nodes: tuple[int, ...] = ()
    k: int = 0
    m: int = 0
    code: str = ""
    peer_endpoint: str = ""
    secure: bool = False
    ready: bool = False
    recoverable: int = -1                   # -1: none yet
    versions: tuple[ClusterVersion, ...] = ()
    data_bytes: int = 0
    parity_bytes: int = 0
    rebuilding: str | None = None           # why a rebuild runs, None if none does
    last_rebuild: dict | None = None
    lost_error: str | None = None
    round: dict | None = None
    coordinator: dict | None = None
    membership: dict | None = None          # the record: members (node, endpoint, generation, identity), claims
    stats: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterStatus":
        return _pick(cls, {k: v for k, v in d.items() if k not in ("versions", "group_nodes")},
                     versions=tuple(_pick(ClusterVersion, v) for v in d.get("versions", [])),
                     group_nodes=tuple(d.get("group_nodes", [])))


@dataclasses.dataclass(frozen=True)
class FlushStatus:
    dir: str
    every: int = 0
    interval: float = 0.0
    keep: int = 0
    flushed: int = 0
    failures: int = 0
    superseded: int = 0
    running: int | None = None
    pending: int | None = None
    loading: int | None = None
    last: dict | None = None
    on_disk: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "FlushStatus":
        return _pick(cls, {k: v for k, v in d.items() if k != "on_disk"}, on_disk=tuple(d.get("on_disk", [])))


@dataclasses.dataclass(frozen=True)
class DaemonStatus:
    job: str
    node_rank: int
    endpoint: str
    pid: int
    uptime: float
    shm_dir: str
    budget: int
    used: int
    invalid_requests: int = 0
    ranks: tuple[RankStatus, ...] = ()
    cluster: ClusterStatus | None = None
    flush: FlushStatus | None = None
    raw: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> "DaemonStatus":
        rest = {k: v for k, v in d.items() if k not in ("ranks", "cluster", "flush", "raw")}
        return _pick(cls, rest, ranks=tuple(RankStatus.from_dict(r) for r in d.get("ranks", [])),
                     cluster=ClusterStatus.from_dict(d["cluster"]) if d.get("cluster") else None,
                     flush=FlushStatus.from_dict(d["flush"]) if d.get("flush") else None, raw=d)

    @property
    def recoverable_step(self) -> int | None:
        """The step a restore would serve now: the cluster's recoverable step, or on a standalone node the
        newest step every rank holds; None if there is none."""
        if self.cluster is not None:
            return self.cluster.recoverable if self.cluster.recoverable >= 0 else None
        held = [{v.step for v in r.versions} for r in self.ranks]
        common = set.intersection(*held) if held else set()
        return max(common) if common else None


def status(endpoint: str | None = None, *, config: str | os.PathLike | None = None, node_rank: int | None = None,
           timeout: float = 5.0) -> DaemonStatus:
    """What the node daemon holds, as ``DaemonStatus``. The daemon is found as ``ftd status`` and the
    trainer client find it (``control.locate``: ``endpoint``, else ``config``'s, else $FTD_ENDPOINT,
    $FTD_CONFIG, this node's default). Raises ``ftd.DaemonUnavailable`` when none answers."""
    where, _config, _found = find_daemon(endpoint, config_path=None if config is None else str(config),
                                         node_rank=node_rank)
    conn = Connection(where, timeout)
    try:
        return DaemonStatus.from_dict(conn.call("status"))
    finally:
        conn.close()
