"""``ftd launch`` (a cluster of daemons on this machine) and ``ftd kill-node`` (lose one of them)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ftd.cli.registry import Command
from ftd.cluster.keyfiles import generate_node_keys
from ftd.config import ensure_private_dir
from ftd.local.killnode import kill_node
from ftd.local.launcher import launch


def _launch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, metavar="G", help="number of node daemons")
    p.add_argument("--parity", type=int, required=True, metavar="M", help="parity blocks per group (m)")
    p.add_argument("--dir", required=True, help="directory of the configs, logs and cluster.json (created, 0700)")
    p.add_argument("--job", help="job name (default: local-<8 hex digits>, unique per launch)")
    p.add_argument("--group-size", type=int, default=0, metavar="N", help="nodes per group (default 0: all nodes)")
    p.add_argument("--memory-budget", default="2GiB", metavar="SIZE", help="shared memory per node (default 2GiB)")
    p.add_argument("--base-port", type=int, metavar="P",
                   help="peer ports P..P+G-1 on 127.0.0.1 (default: free ports chosen by the OS)")
    p.add_argument("--key-file", help="CURVE key file shared by every node (`ftd keygen --out`), or a node key file "
                   "with {node_rank} in its name (`ftd keygen --dir DIR --nodes N`); default: no peer authentication")
    p.add_argument("--secure", action="store_true",
                   help="authenticate and encrypt the peer links with CURVE, with new per-node keys in DIR/keys")
    p.add_argument("--flush-dir", metavar="DIR", help="flush recoverable versions to DIR/<job>/ in the background, and "
                   "restore from there when memory cannot (default: no flush)")
    p.add_argument("--flush-every", type=int, default=0, metavar="N", help="flush once a step is N past the last "
                   "flushed one (default 0: by time only)")
    p.add_argument("--flush-interval", type=float, default=300.0, metavar="S",
                   help="... or S seconds after the last flush began (default 300; 0: by steps only)")
    p.add_argument("--flush-keep", type=int, default=2, metavar="K", help="flushed versions kept per node (default 2)")
    p.add_argument("--protect-bandwidth", default="0", metavar="RATE",
                   help="bytes per second each node's peer links may send, e.g. 200MB/s (default 0: unlimited)")
    p.add_argument("--frame-size", metavar="SIZE", help="bytes per peer message of chunk data (default 4MiB)")
    p.add_argument("--peer-timeout", type=float, metavar="S", help="seconds of silence after which a peer, or the "
                   "coordinator, is declared lost (default: the config's, 10)")
    p.add_argument("--replica-snapshots", action=argparse.BooleanOptionalAction, default=None,
                   help="replica_snapshots = true or false (default: \"auto\", on in a cluster): DDP and HSDP ranks "
                        "snapshot 1/R of their replicated state each (README \"Replica-aware snapshots\")")
    p.add_argument("--replica-prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="replica_prefetch = true or false (default true): once a sliced rank's worker is gone, its "
                        "node fetches the replicas' slices ahead of the restore")
    p.add_argument("--foreground", action="store_true", default=True,
                   help="stay in the foreground until Ctrl-C (the default and only mode)")


def _kill_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", required=True, help="the --dir of `ftd launch`")
    p.add_argument("--node-rank", type=int, required=True, metavar="N", help="the node to lose")


def _launch_cmd(args: argparse.Namespace) -> int:
    key_file = args.key_file
    if args.secure and not key_file:
        directory = Path(args.dir)
        ensure_private_dir(directory)
        keys = directory / "keys"
        if not (keys / "roster.json").exists():
            generate_node_keys(keys, args.nodes)
        key_file = keys / "node-{node_rank}.key"
    extra = {"peer_key_file": str(Path(key_file).expanduser().absolute())} if key_file else {}
    if args.flush_dir:
        extra.update(flush_dir=str(Path(args.flush_dir).expanduser().absolute()), flush_every=args.flush_every,
                     flush_interval=args.flush_interval, flush_keep=args.flush_keep)
    if args.protect_bandwidth.strip() != "0":
        extra["protect_bandwidth"] = args.protect_bandwidth
    if args.frame_size:
        extra["frame_size"] = args.frame_size
    if args.peer_timeout is not None:
        extra["peer_timeout"] = args.peer_timeout
    if args.replica_snapshots is not None:
        extra["replica_snapshots"] = args.replica_snapshots
    if args.replica_prefetch is not None:
        extra["replica_prefetch"] = args.replica_prefetch
    return launch(args.nodes, args.parity, Path(args.dir), job=args.job, group_size=args.group_size,
                  memory_budget=args.memory_budget, base_port=args.base_port, extra=extra or None)

def _kill_node_cmd(args: argparse.Namespace) -> int:
    return kill_node(Path(args.dir), args.node_rank)


COMMANDS = [
    Command("launch", "run a local cluster of node daemons until Ctrl-C", _launch_arguments, _launch_cmd),
    Command("kill-node", "lose one node of a launched cluster: its daemon, trainers and memory",
            _kill_node_arguments, _kill_node_cmd),
]
