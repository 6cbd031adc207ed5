"""How a command reaches a node's daemon: the options that say which one, and a bounded wait for it.

``ftd recover`` right after ``ftd daemon &`` must not fail because the daemon is still starting, so
every command that needs a daemon waits up to ``--wait`` seconds for it to answer (a daemon that
adopts or rebuilds gigabytes at start can take a while). It looks where the trainer client looks:
``--endpoint``, ``--config`` (with ``--node-rank``), ``$FTD_ENDPOINT``, ``$FTD_CONFIG``, ``$FTD_JOB``
and the node rank of torchrun or SLURM.
"""
from __future__ import annotations

import argparse
import sys
import time

from ftd.control.connection import HOW_TO_START, Connection, status_or_none
from ftd.control.locate import find_daemon
from ftd.errors import DaemonUnavailable

WAIT_DEFAULT = 10.0


def add_arguments(p: argparse.ArgumentParser, node_rank_help: str = "the node's rank (overrides the config)") -> None:
    p.add_argument("--config", help="the daemon's config file (default $FTD_CONFIG, else the defaults of job $FTD_JOB)")
    p.add_argument("--node-rank", type=int, help=node_rank_help)
    p.add_argument("--endpoint", help="the daemon's control endpoint (default $FTD_ENDPOINT, else from the config)")
    p.add_argument("--wait", type=float, default=WAIT_DEFAULT, metavar="S",
                   help=f"seconds to wait for a daemon that is starting (default {WAIT_DEFAULT:g})")


def connect(args: argparse.Namespace, timeout: float, prog: str) -> Connection:
    """A connection to the daemon the options name, once it answers; DaemonUnavailable saying where
    it looked, and why there, if it does not within ``--wait`` seconds."""
    endpoint, _config, found_by = find_daemon(args.endpoint, config_path=args.config, node_rank=args.node_rank)
    deadline = time.monotonic() + max(0.0, args.wait)
    told = False
    while status_or_none(endpoint, timeout=min(2.0, max(0.5, args.wait))) is None:
        if time.monotonic() >= deadline:
            raise DaemonUnavailable(f"no ftd daemon answers at {endpoint} (looked there because of {found_by}) "
                                    f"after {args.wait:g} s; {HOW_TO_START}")
        if not told:
            print(f"{prog}: waiting up to {args.wait:g} s for the daemon at {endpoint}", file=sys.stderr, flush=True)
            told = True
        time.sleep(0.2)
    return Connection(endpoint, timeout)
