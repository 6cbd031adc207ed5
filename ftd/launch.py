"""A whole ftd cluster on one machine: `ftd launch` starts G node daemons, `ftd kill-node` loses one.

Erasure coding across nodes is only believable if one can watch a node die and the others carry
on, so this module makes that cheap to try on a laptop or a single CI machine:

* ``ftd launch --nodes G --parity M --dir DIR`` writes one ordinary config per node
  (``DIR/node-N.toml``, so ``ftd daemon --config DIR/node-N.toml`` restarts a node by hand),
  starts the G daemons, records them in ``DIR/cluster.json`` and stops them all on Ctrl-C/SIGTERM.
  Each launch gets its own job name, so several clusters can share a machine.
* ``ftd kill-node --dir DIR --node-rank N`` does to node N what a real node loss does: its daemon
  and its trainers are SIGKILLed and its shared memory disappears.

The launcher never restarts a daemon by itself: a dead node stays dead until a user restarts it,
as on a real cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from .config import Config, ensure_private_dir, load_config

PROG = "ftd"
READY_MARK = "serving at"
READY_TIMEOUT = 30.0     # seconds for every daemon to print READY_MARK
STOP_TIMEOUT = 15.0      # seconds a daemon gets after SIGTERM before SIGKILL
KILL_TIMEOUT = 10.0      # seconds a SIGKILLed process may take to disappear
MEMORY_RESERVE = "256MiB"
CLUSTER_FILE = "cluster.json"
MAX_SOCKET_PATH = 107    # bytes in sockaddr_un.sun_path, less the terminating NUL
_RESERVED_KEYS = {"job", "node_rank", "peers"}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


# ---- paths and files -----------------------------------------------------------------------------
def config_path(directory: Path, node_rank: int) -> Path:
    return directory / f"node-{node_rank}.toml"


def log_path(directory: Path, node_rank: int) -> Path:
    return directory / f"node-{node_rank}.log"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# ---- processes -----------------------------------------------------------------------------------
def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a killed child stays a zombie until its parent reaps it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _own_process(pid) -> psutil.Process | None:
    """The live process ``pid`` if it belongs to this user, else None."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.uids().real != os.getuid():
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return proc if _alive(proc) else None


def _config_arg(cmdline: list[str]) -> str | None:
    """The value of --config in an `ftd daemon` command line, else None."""
    if "daemon" not in cmdline:
        return None
    for i, arg in enumerate(cmdline):
        if arg == "--config" and i + 1 < len(cmdline):
            return cmdline[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def find_daemons(configs: list[Path]) -> dict[int, Path]:
    """pid -> config of every live `ftd daemon --config X` of this user, for X in ``configs``.

    This finds daemons that a user restarted by hand, which the launcher did not start itself.
    """
    wanted = {Path(c).resolve() for c in configs}
    found: dict[int, Path] = {}
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            if proc.pid == os.getpid() or not proc.info["uids"] or proc.info["uids"].real != os.getuid():
                continue
            arg = _config_arg(proc.info["cmdline"] or [])
            if arg is None:
                continue
            path = Path(arg) if os.path.isabs(arg) else Path(proc.cwd()) / arg
            if path.resolve() in wanted and _alive(proc):
                found[proc.pid] = path.resolve()
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue
    return found


def _is_daemon_of(pid, config: Path) -> bool:
    """True if ``pid`` is still the `ftd daemon --config <config>` (and not a recycled pid)."""
    proc = _own_process(pid)
    if proc is None:
        return False
    try:
        arg = _config_arg(proc.cmdline())
        if arg is None:
            return False
        path = Path(arg) if os.path.isabs(arg) else Path(proc.cwd()) / arg
        return path.resolve() == Path(config).resolve()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return False


def _signal_all(pids, sig: int) -> list[int]:
    """Send ``sig`` to every pid still alive; returns those signalled."""
    sent = []
    for pid in pids:
        proc = _own_process(pid)
        if proc is None:
            continue
        try:
            proc.send_signal(sig)
            sent.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sent


def _wait_gone(pids, timeout: float, children: list[subprocess.Popen] = (), hurry=lambda: False) -> list[int]:
    """Wait until no pid is alive (reaping our own children); returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            child.poll()
        left = [pid for pid in pids if _own_process(pid) is not None]
        if not left or time.monotonic() >= deadline or hurry():
            return left
        time.sleep(0.05)


def stop_processes(pids, *, children: list[subprocess.Popen] = (), timeout: float = STOP_TIMEOUT,
                   hurry=lambda: False) -> tuple[list[int], list[int]]:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns (terminated, killed)."""
    terminated = _signal_all(pids, signal.SIGTERM)
    stubborn = _wait_gone(terminated, timeout, children, hurry)
    killed = _signal_all(stubborn, signal.SIGKILL)
    _wait_gone(killed, KILL_TIMEOUT, children)
    return terminated, killed


def kill_everything_from(directory: Path) -> list[str]:
    """SIGKILL every process of this user whose command line names ``directory`` (a cluster's
    launcher, daemons, trainers started with its configs), except the caller; wait until they are
    gone. For tests and benchmarks cleaning up after themselves, even after a failure. Returns what
    was killed, one line each."""
    victims, killed = [], []
    for proc in psutil.process_iter(["cmdline", "uids"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and proc.info["uids"].real == os.getuid() and str(directory) in cmdline:
                proc.kill()
                victims.append(proc)
                killed.append(f"pid {proc.pid} ({cmdline[:80]})")
        except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
            pass
    psutil.wait_procs(victims, timeout=10)
    return killed


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


# ---- launch: plan ------------------------------------------------------------------------------------
def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_ports(base_port: int, count: int) -> list[int]:
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


def _refuse_running_cluster(directory: Path) -> None:
    try:
        old = json.loads((directory / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return
    pid = old.get("launcher_pid") if isinstance(old, dict) else None
    proc = _own_process(pid)
    try:
        launcher = proc is not None and pid != os.getpid() and "launch" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        launcher = False
    if launcher:
        raise UsageError(f"{directory} already holds a running cluster (job {old.get('job')!r}, launcher pid {pid}); "
                         f"stop it with Ctrl-C or `kill {pid}`, or choose another --dir")


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
            _write_atomic(path, _node_toml(settings, path))
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


# ---- launch: run ----------------------------------------------------------------------------------------
class _StopSignals:
    """SIGINT/SIGTERM set a flag instead of killing the launcher; a second one means "hurry".

    The handler only counts: taking a lock in a signal handler could deadlock the main thread.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        if self.count == 2:
            print(f"{PROG} launch: second signal, killing the daemons now", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def stopping(self) -> bool:
        return self.count >= 1

    def hurry(self) -> bool:
        return self.count >= 2


def _daemon_env() -> dict:
    """The daemons run `python -m ftd.cli`: make sure this ftd is the one they import."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def start_daemon(directory: Path, rank: int) -> subprocess.Popen:
    """One `ftd daemon` subprocess, in the launcher's process group so that Ctrl-C reaches both."""
    with open(log_path(directory, rank), "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config",
                                 str(config_path(directory, rank))],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_daemon_env(), cwd=directory)


def _is_ready(directory: Path, rank: int) -> bool:
    try:
        return READY_MARK in log_path(directory, rank).read_text(errors="replace")
    except OSError:
        return False


def wait_ready(directory: Path, procs: list[subprocess.Popen], signals: _StopSignals,
               timeout: float = READY_TIMEOUT) -> str | None:
    """Wait until every daemon serves; returns None, or why not (after printing the culprit's log)."""
    deadline = time.monotonic() + timeout
    pending = set(range(len(procs)))
    while pending:
        if signals.stopping:
            return "interrupted while the daemons were starting"
        for rank in sorted(pending):
            if _is_ready(directory, rank):
                pending.discard(rank)
            elif procs[rank].poll() is not None:
                log = log_path(directory, rank)
                print(f"{PROG} launch: the daemon of node {rank} exited with status {procs[rank].returncode} "
                      f"before serving; the end of {log}:\n{_log_tail(log)}", file=sys.stderr)
                return f"node {rank} failed to start"
        if pending and time.monotonic() >= deadline:
            rank = min(pending)
            log = log_path(directory, rank)
            print(f"{PROG} launch: the daemon of node {rank} did not print {READY_MARK!r} within {timeout:g} s; "
                  f"the end of {log}:\n{_log_tail(log)}", file=sys.stderr)
            return f"node {rank} did not start in time"
        time.sleep(0.05)
    return None


def cluster_record(job: str, nodes: int, parity: int, directory: Path,
                   configs: list[Config], procs: list[subprocess.Popen]) -> dict:
    """What cluster.json holds; group_size is the effective one (never 0)."""
    return {
        "job": job, "nodes": nodes, "parity": parity, "group_size": configs[0].group_size, "dir": str(directory),
        "launcher_pid": os.getpid(),
        "members": [{"node_rank": c.node_rank, "endpoint": c.endpoint, "peer_endpoint": c.peer_endpoint,
                     "pid": p.pid, "config": str(config_path(directory, c.node_rank)),
                     "log": str(log_path(directory, c.node_rank))} for c, p in zip(configs, procs)],
    }


def _print_usage(cluster: dict, directory: Path) -> None:
    print(f"{PROG} launch: job {cluster['job']!r}: {cluster['nodes']} nodes, parity {cluster['parity']}, "
          f"group size {cluster['group_size']}, in {directory}")
    for m in cluster["members"]:
        print(f"  node {m['node_rank']}: pid {m['pid']:<8} {m['endpoint']}  (peers: {m['peer_endpoint']})")
    first = cluster["members"][0]
    print(f"trainers of node N: FTD_ENDPOINT=<endpoint of node N> python train.py   "
          f"(e.g. FTD_ENDPOINT={first['endpoint']})")
    print(f"lose a node:        {PROG} kill-node --dir {directory} --node-rank N")
    print(f"restart one:        {PROG} daemon --config {directory}/node-N.toml   (logs: {directory}/node-N.log)")
    print("stop the cluster:   Ctrl-C (or SIGTERM to this launcher)", flush=True)


def _watch(procs: list[subprocess.Popen], signals: _StopSignals) -> None:
    """Until a stop signal: report daemons that die (and do not restart them)."""
    reported: set[int] = set()
    while not signals.stopping:
        time.sleep(0.1)
        for rank, proc in enumerate(procs):
            if rank not in reported and proc.poll() is not None:
                reported.add(rank)
                print(f"{PROG} launch: node {rank} (pid {proc.pid}) exited with status {proc.returncode}; "
                      "not restarting it (restart it by hand with its config if you want it back)", flush=True)


def shutdown(directory: Path, configs: list[Config], procs: list[subprocess.Popen],
             hurry=lambda: False) -> None:
    """Stop our daemons and those restarted by hand with a config of DIR; remove what the cluster left."""
    pids = {p.pid for p in procs if p.poll() is None}
    pids |= set(find_daemons([config_path(directory, c.node_rank) for c in configs]))
    if pids:
        print(f"{PROG} launch: stopping {len(pids)} daemon(s): {' '.join(map(str, sorted(pids)))}", flush=True)
    terminated, killed = stop_processes(sorted(pids), children=procs, hurry=hurry)
    if killed:
        print(f"{PROG} launch: daemon(s) {' '.join(map(str, killed))} ignored SIGTERM and were killed", flush=True)
    (directory / CLUSTER_FILE).unlink(missing_ok=True)
    shutil.rmtree(directory / "run", ignore_errors=True)
    left = [path for c in configs for path in _shm_files(c)]
    for path in left:  # of nodes that died without releasing them; no daemon can adopt them any more
        path.unlink(missing_ok=True)
    if left:
        print(f"{PROG} launch: removed {len(left)} shared-memory file(s) left by dead nodes", flush=True)
    print(f"{PROG} launch: cluster stopped; configs and logs kept in {directory}", flush=True)


def launch(nodes: int, parity: int, directory: Path, *, job: str | None = None, group_size: int = 0,
           memory_budget: str = "2GiB", base_port: int | None = None, extra: dict | None = None) -> int:
    """Run a local cluster of ``nodes`` daemons until SIGINT/SIGTERM; returns the exit status."""
    directory = Path(directory).expanduser().absolute()
    job = job or f"local-{secrets.token_hex(4)}"
    try:
        if nodes < 1:
            raise UsageError(f"--nodes must be at least 1, got {nodes}")
        ensure_private_dir(directory)
        _refuse_running_cluster(directory)
        ports = _check_ports(base_port, nodes) if base_port is not None else _free_ports(nodes)
        configs = write_configs(nodes, parity, directory, job=job, group_size=group_size,
                                memory_budget=memory_budget, ports=ports, extra=dict(extra or {}))
    except (UsageError, PermissionError) as e:
        print(f"{PROG} launch: {e}", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen] = []
    with _StopSignals() as signals:
        try:
            for config in configs:
                procs.append(start_daemon(directory, config.node_rank))
            failure = wait_ready(directory, procs, signals)
            if failure is not None:
                print(f"{PROG} launch: {failure}; stopping the cluster", file=sys.stderr)
                return 1
            cluster = cluster_record(job, nodes, parity, directory, configs, procs)
            _write_atomic(directory / CLUSTER_FILE, json.dumps(cluster, indent=2) + "\n")
            _print_usage(cluster, directory)
            _watch(procs, signals)
            return 0
        finally:
            shutdown(directory, configs, procs, hurry=signals.hurry)


# ---- kill-node ------------------------------------------------------------------------------------------
def _shm_files(config: Config) -> list[Path]:
    try:
        return sorted(p for p in config.shm_dir.iterdir() if p.name.startswith(config.shm_prefix))
    except OSError:
        return []


def _trainer_pids(config: Config) -> list[int]:
    """Pids of the trainers registered with the node's daemon; [] if it does not answer."""
    from .connection import Connection
    from .errors import FtdError
    conn = Connection(config.endpoint, timeout=2)
    try:
        reply = conn.call("status")
    except FtdError as e:
        print(f"{PROG} kill-node: the daemon of node {config.node_rank} did not tell its trainers ({e}); "
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
    killed = _signal_all(pids, signal.SIGKILL)
    for pid in killed:
        print(f"  killed {what} pid {pid}")
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
        print(f"{PROG} kill-node: {e}", file=sys.stderr)
        return 2
    print(f"{PROG} kill-node: losing node {node_rank} of job {config.job!r}")
    trainers = [pid for pid in _trainer_pids(config) if pid not in (os.getpid(), cluster.get("launcher_pid"))]
    daemons = set(find_daemons([cfg_path]))
    if _is_daemon_of(member.get("pid"), cfg_path):
        daemons.add(member["pid"])
    killed = _kill(sorted(daemons), "daemon") + _kill(trainers, "trainer")
    if not killed:
        print("  nothing of that node was running")
    left = _wait_gone(killed, KILL_TIMEOUT)
    if left:
        print(f"{PROG} kill-node: pid(s) {left} still alive {KILL_TIMEOUT:g} s after SIGKILL; "
              "not deleting the node's shared memory", file=sys.stderr)
        return 1
    lock = config.socket_path.with_suffix(".lock")
    for path in _shm_files(config) + [p for p in (config.socket_path, lock) if p.exists()]:
        try:
            path.unlink()
            print(f"  deleted {path}")
        except FileNotFoundError:
            pass
    return 0


# ---- command line ---------------------------------------------------------------------------------------
def _launch_cmd(args: argparse.Namespace) -> int:
    key_file = args.key_file
    if args.secure and not key_file:
        from .peerauth import generate_key_file
        directory = Path(args.dir)
        ensure_private_dir(directory)
        key_file = directory / "cluster.key"
        if not key_file.exists():
            generate_key_file(key_file)
    extra = {"peer_key_file": str(Path(key_file).expanduser().absolute())} if key_file else {}
    if args.flush_dir:
        extra.update(flush_dir=str(Path(args.flush_dir).expanduser().absolute()), flush_every=args.flush_every,
                     flush_interval=args.flush_interval, flush_keep=args.flush_keep)
    return launch(args.nodes, args.parity, Path(args.dir), job=args.job, group_size=args.group_size,
                  memory_budget=args.memory_budget, base_port=args.base_port, extra=extra or None)


def _kill_node_cmd(args: argparse.Namespace) -> int:
    return kill_node(Path(args.dir), args.node_rank)


def add_commands(subparsers) -> None:
    """Register `launch` and `kill-node` on the subparsers of the ftd command line."""
    p = subparsers.add_parser("launch", help="run a local cluster of node daemons until Ctrl-C")
    p.add_argument("--nodes", type=int, required=True, metavar="G", help="number of node daemons")
    p.add_argument("--parity", type=int, required=True, metavar="M", help="parity blocks per group (m)")
    p.add_argument("--dir", required=True, help="directory of the configs, logs and cluster.json (created, 0700)")
    p.add_argument("--job", help="job name (default: local-<8 hex digits>, unique per launch)")
    p.add_argument("--group-size", type=int, default=0, metavar="N", help="nodes per group (default 0: all nodes)")
    p.add_argument("--memory-budget", default="2GiB", metavar="SIZE", help="shared memory per node (default 2GiB)")
    p.add_argument("--base-port", type=int, metavar="P",
                   help="peer ports P..P+G-1 on 127.0.0.1 (default: free ports chosen by the OS)")
    p.add_argument("--key-file", help="CURVE key file of the cluster (`ftd keygen`); default: no peer authentication")
    p.add_argument("--secure", action="store_true",
                   help="authenticate and encrypt the peer links with CURVE, with a new key DIR/cluster.key")
    p.add_argument("--flush-dir", metavar="DIR", help="flush recoverable versions to DIR/<job>/ in the background, and "
                   "restore from there when memory cannot (default: no flush)")
    p.add_argument("--flush-every", type=int, default=0, metavar="N", help="flush once a step is N past the last "
                   "flushed one (default 0: by time only)")
    p.add_argument("--flush-interval", type=float, default=300.0, metavar="S",
                   help="... or S seconds after the last flush began (default 300; 0: by steps only)")
    p.add_argument("--flush-keep", type=int, default=2, metavar="K", help="flushed versions kept per node (default 2)")
    p.add_argument("--foreground", action="store_true", default=True,
                   help="stay in the foreground until Ctrl-C (the default and only mode)")
    p.set_defaults(func=_launch_cmd)

    p = subparsers.add_parser("kill-node", help="lose one node of a launched cluster: its daemon, trainers and memory")
    p.add_argument("--dir", required=True, help="the --dir of `ftd launch`")
    p.add_argument("--node-rank", type=int, required=True, metavar="N", help="the node to lose")
    p.set_defaults(func=_kill_node_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftd.launch", description="Local ftd clusters.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
