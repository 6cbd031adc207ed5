"""``ftd keygen``: the cluster key that authenticates and encrypts the links between a job's daemons."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftd.cli.registry import Command
from ftd.cluster.auth import generate_key_file
from ftd.errors import FtdError


def _arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="file to create (mode 0600); an existing file is never overwritten")
    where.add_argument("--dir", help="directory of the job's keys (created 0700): writes DIR/cluster.key")


def _keygen(args: argparse.Namespace) -> int:
    if args.dir:
        directory = Path(args.dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        args.out = str(directory / "cluster.key")
    try:
        generate_key_file(Path(args.out))
    except FtdError as e:
        print(f"ftd keygen: {e}", file=sys.stderr)
        return 1
    print(f"wrote a new cluster key to {args.out} (mode 0600). Copy it to every node of the job, "
          f"keeping it private (mode 0600, owned by the user running ftd).")
    return 0


COMMANDS = [
    Command("keygen", "create a cluster key file that authenticates and encrypts the links between the daemons "
                      "of a job", _arguments, _keygen),
]
