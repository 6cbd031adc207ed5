"""``ftd kill-node``: do to one node of a local cluster what a real node loss does.

Its daemon and its trainers are SIGKILLed and its shared memory disappears, so a restarted daemon
finds nothing to adopt and must rebuild from its peers.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from ftd.config import Config, load_config
from ftd.control.connection import Connection
from ftd.errors import FtdError, UsageError
from ftd.local.configs import config_path, read_cluster, shm_files
from ftd.local.daemons import find_daemons, is_daemon_of
from ftd.util.procs import KILL_TIMEOUT, signal_all, wait_gone

PROG = "ftd"


def _say(*parts, file=None, **kw) -> None:
    """print, but a closed output pipe (`ftd kill-node ... | head`) must not cut the loss short: a node
    left half-killed (its daemon dead, its shared memory still there) is not what a real loss does."""
    stream = file or sys.stdout
    try:
        print(*parts, file=stream, **kw)
        stream.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # the rest goes nowhere, and the interpreter's exit flush too
        os.close(devnull)


def _trainer_pids(config: Config) -> list[int]:
    """Pids of the trainers registered with the node's daemon; [] if it does not answer."""
    conn = Connection(config.endpoint, timeout=2)
    try:
        reply = conn.call("status")
    except FtdError as e:
        _say(f"{PROG} kill-node: the daemon of node {config.node_rank} did not tell its trainers ({e}); "
              "killing the daemon only", file=sys.stderr)
        return []
    finally:
        conn.close()
    return [r["pid"] for r in reply.get("ranks", []) if isinstance(r.get("pid"), int) and r["pid"] > 0]


def _member(cluster: dict, node_rank: int, directory: Path) -> dict:
    for m in cluster["members"]:
        if isinstance(m, dict) and m.get("node_rank") == node_rank:
            return m
    ranks = sorted(m.get("node_rank") for m in cluster["members"] if isinstance(m, dict))
    raise UsageError(f"node rank {node_rank} is not in the cluster of {directory} "
                     f"(its node ranks are {ranks[0]}-{ranks[-1]})" if ranks else
                     f"the cluster of {directory} has no members")


def _kill(pids: list[int], what: str) -> list[int]:
    killed = signal_all(pids, signal.SIGKILL)
    for pid in killed:
        _say(f"  killed {what} pid {pid}")
    return killed


def kill_node(directory: Path, node_rank: int) -> int:
    """Lose node ``node_rank`` of the cluster in DIR: SIGKILL its daemon and trainers, delete its shared memory."""
    directory = Path(directory).expanduser().absolute()
    try:
        cluster = read_cluster(directory)
        member = _member(cluster, node_rank, directory)
        cfg_path = Path(member.get("config") or config_path(directory, node_rank))
        config = load_config(cfg_path)
    except (UsageError, ValueError) as e:
        _say(f"{PROG} kill-node: {e}", file=sys.stderr)
        return 2
    _say(f"{PROG} kill-node: losing node {node_rank} of job {config.job!r}")
    trainers = [pid for pid in _trainer_pids(config) if pid not in (os.getpid(), cluster.get("launcher_pid"))]
    daemons = set(find_daemons([cfg_path]))
    if is_daemon_of(member.get("pid"), cfg_path):
        daemons.add(member["pid"])
    killed = _kill(sorted(daemons), "daemon") + _kill(trainers, "trainer")
    if not killed:
        _say("  nothing of that node was running")
    left = wait_gone(killed, KILL_TIMEOUT)
    if left:
        _say(f"{PROG} kill-node: pid(s) {left} still alive {KILL_TIMEOUT:g} s after SIGKILL; "
              "not deleting the node's shared memory", file=sys.stderr)
        return 1
    lock = config.socket_path.with_suffix(".lock")
    for path in shm_files(config) + [p for p in (config.socket_path, lock) if p.exists()]:
        try:
            path.unlink()
            _say(f"  deleted {path}")
        except FileNotFoundError:
            pass
    return 0
