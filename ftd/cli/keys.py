"""``ftd keygen``: the keys that authenticate and encrypt the links between a job's daemons.

``--dir DIR --nodes N [--spares S]`` (recommended): one keypair per node and spare host, and the
public roster, so that a node can speak only for itself. ``--out FILE`` (or ``--dir DIR`` alone:
``DIR/cluster.key``): one key shared by every node, as before.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftd.cli.registry import Command
from ftd.cluster.keyfiles import ROSTER_NAME, generate_key_file, generate_node_keys
from ftd.errors import FtdError, UsageError


def _arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a key shared by every node: the file to create (mode 0600); "
                                     "an existing file is never overwritten")
    where.add_argument("--dir", help="directory of the job's keys (created 0700): with --nodes, DIR/node-R.key per "
                                     "node, DIR/spare-S.key per spare and DIR/roster.json; without, DIR/cluster.key")
    p.add_argument("--nodes", type=int, metavar="N", help="per-node keys (recommended) for node ranks 0..N-1")
    p.add_argument("--spares", type=int, default=0, metavar="S", help="keys for S spare hosts (with --nodes)")


def _keygen(args: argparse.Namespace) -> int:
    if (args.nodes is not None or args.spares) and not args.dir:
        raise UsageError("--nodes and --spares go with --dir DIR (the keys' directory)")
    if args.spares and args.nodes is None:
        raise UsageError("--spares needs --nodes")
    try:
        if args.nodes is not None:
            paths = generate_node_keys(Path(args.dir), args.nodes, args.spares)
            print(f"wrote {len(paths) - 1} key files and {Path(args.dir) / ROSTER_NAME} in {args.dir}. Give node R "
                  f"its own node-R.key (mode 0600, owned by the user running ftd; a spare host a spare-S.key) and "
                  f"every node roster.json (public; set peer_key_file = \"{args.dir}/node-{{node_rank}}.key\").")
            return 0
        if args.dir:
            directory = Path(args.dir)
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            args.out = str(directory / "cluster.key")
        generate_key_file(Path(args.out))
    except FtdError as e:
        print(f"ftd keygen: {e}", file=sys.stderr)
        return 1
    print(f"wrote a new cluster key to {args.out} (mode 0600). Copy it to every node of the job, "
          f"keeping it private (mode 0600, owned by the user running ftd). Per-node keys "
          f"(`ftd keygen --dir DIR --nodes N`) are recommended: with a shared key any node can pose as another.")
    return 0


COMMANDS = [
    Command("keygen", "create the key files that authenticate and encrypt the links between the daemons of a job "
                      "(--dir DIR --nodes N: one per node, recommended)", _arguments, _keygen),
]
