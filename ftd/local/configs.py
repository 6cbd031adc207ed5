"""The files of a local cluster: one ordinary config per node (``DIR/node-N.toml``) and ``DIR/cluster.json``.

``ftd daemon --config DIR/node-N.toml`` restarts a node by hand; every config is checked with
``load_config`` as it is written, so a bad setting is refused before any daemon starts.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

from ftd.config import Config, load_config
from ftd.errors import UsageError
from ftd.util.files import write_atomic

MEMORY_RESERVE = "256MiB"
CLUSTER_FILE = "cluster.json"
MAX_SOCKET_PATH = 107    # bytes in sockaddr_un.sun_path, less the terminating NUL
_RESERVED_KEYS = {"job", "node_rank", "peers"}


def config_path(directory: Path, node_rank: int) -> Path:
    return directory / f"node-{node_rank}.toml"


def log_path(directory: Path, node_rank: int) -> Path:
    return directory / f"node-{node_rank}.log"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise UsageError(f"cannot write {value!r} ({type(value).__name__}) into a TOML config; "
                     "use a string, number, boolean or list")


def _node_toml(settings: dict, path: Path) -> str:
    lines = [f"# Written by `ftd launch`. Restart this node by hand with: ftd daemon --config {path}"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def read_cluster(directory: Path) -> dict:
    """DIR/cluster.json, or UsageError saying what to do."""
    path = directory / CLUSTER_FILE
    try:
        cluster = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: no cluster was launched in {directory} (or it was stopped); "
                         f"run `ftd launch --nodes G --parity M --dir {directory}` first") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path} ({e}); is {directory} a directory made by `ftd launch`?") from None
    if not isinstance(cluster, dict) or not isinstance(cluster.get("members"), list):
        raise UsageError(f"{path} is not a cluster file written by `ftd launch`")
    return cluster


def check_ports(base_port: int, count: int) -> list[int]:
    ports = list(range(base_port, base_port + count))
    if base_port < 1 or ports[-1] > 65535:
        raise UsageError(f"--base-port {base_port} with {count} nodes needs ports {ports[0]}-{ports[-1]}, "
                         "outside 1-65535; choose another base port")
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                raise UsageError(f"port {port} (from --base-port {base_port}) is not free on 127.0.0.1 ({e}); "
                                 "choose another --base-port or leave it out to use free ports") from None
    return ports


def _node_settings(job: str, rank: int, directory: Path, peers: list[str], parity: int, group_size: int,
                   memory_budget: str, extra: dict) -> dict:
    settings = {"job": job, "node_rank": rank, "runtime_dir": str(directory / "run"),
                "memory_budget": memory_budget, "memory_reserve": MEMORY_RESERVE,
                "peers": peers, "parity": parity, "group_size": group_size}
    settings.update(extra)
    return settings


def write_configs(nodes: int, parity: int, directory: Path, *, job: str, group_size: int, memory_budget: str,
                  ports: list[int], extra: dict) -> list[Config]:
    """Write DIR/node-N.toml for every node and check each with load_config (UsageError if one is wrong;
    the files written are removed again then)."""
    bad = _RESERVED_KEYS & set(extra)
    if bad:
        raise UsageError(f"extra settings may not set {sorted(bad)}: the launcher chooses them")
    peers = [f"tcp://127.0.0.1:{port}" for port in ports]
    written: list[Path] = []
    try:
        for rank in range(nodes):
            path = config_path(directory, rank)
            settings = _node_settings(job, rank, directory, peers, parity, group_size, memory_budget, extra)
            write_atomic(path, _node_toml(settings, path))
            written.append(path)
        configs = [load_config(path) for path in written]
        for config in configs:
            _check_socket_path(config)
        return configs
    except (ValueError, UsageError) as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise UsageError(str(e)) from None


def _check_socket_path(config: Config) -> None:
    n = len(str(config.socket_path).encode())
    if n > MAX_SOCKET_PATH:
        raise UsageError(f"the control socket {config.socket_path} would be {n} bytes long, more than the "
                         f"{MAX_SOCKET_PATH} a Unix socket path may have; choose a shorter --dir")


def shm_files(config: Config) -> list[Path]:
    """Every shared-memory file of the node ``config`` describes."""
    try:
        return sorted(p for p in config.shm_dir.iterdir() if p.name.startswith(config.shm_prefix))
    except OSError:
        return []
