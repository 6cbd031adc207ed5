"""The ``ftd`` command: arguments in, library calls out."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .config import load_config
from .connection import Connection
from .errors import FtdError
from .units import format_size


def _daemon(args: argparse.Namespace) -> int:
    from . import daemon
    try:
        config = load_config(args.config, node_rank=args.node_rank)
    except ValueError as e:
        print(f"ftd daemon: {e}", file=sys.stderr)
        return 2
    return daemon.run(config)


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    if args.config:
        return load_config(args.config, node_rank=args.node_rank).endpoint
    return os.environ.get("FTD_ENDPOINT") or load_config(None, node_rank=args.node_rank).endpoint


def _age(t: float | None) -> str:
    return "-" if t is None else f"{time.time() - t:.1f}s ago"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def _status(args: argparse.Namespace) -> int:
    conn = Connection(_endpoint(args), timeout=5.0)
    try:
        st = conn.call("status")
    except FtdError as e:
        print(f"ftd status: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"node {st['node_rank']} of job {st['job']!r}  daemon pid {st['pid']}  up {st['uptime']:.0f}s  "
          f"{st['endpoint']}")
    print(f"memory: {format_size(st['used'])} of {format_size(st['budget'])} budget in use  (shm: {st['shm_dir']})")
    if not st["ranks"]:
        print("no trainer rank has registered yet")
    for r in st["ranks"]:
        versions = ", ".join(f"step {v['step']} ({format_size(v['bytes'])}, {_age(v['committed_at'])})"
                             for v in r["versions"]) or "none"
        writing = f"  writing step {r['writing'][0]}" if r["writing"] else ""
        alive = "alive" if r["alive"] else "not running"
        print(f"rank {r['rank']}/{r['world']}  pid {r['pid']} ({alive})  commits {r['commits']}  "
              f"buffers {format_size(r['buffer_bytes'])}")
        print(f"   versions: {versions}{writing}")
        print(f"   last snapshot: copy {_ms(r['last_copy_seconds'])}, trainer blocked {_ms(r['last_blocked_seconds'])}, "
              f"committed {_age(r['last_commit_at'])}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo
    return demo.main(steps=args.steps, workdir=args.dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftd", description="In-memory fault tolerance for PyTorch training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("daemon", help="run the node daemon (snapshot management process)")
    p.add_argument("--config", help="TOML config (see configs/local.toml); default: single-node defaults")
    p.add_argument("--node-rank", type=int, help="this node's rank (overrides the config)")
    p.set_defaults(func=_daemon)

    p = sub.add_parser("status", help="show what the node daemon holds")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--config", help="the daemon's config file")
    p.add_argument("--node-rank", type=int)
    p.add_argument("--endpoint", help="the daemon's endpoint (default $FTD_ENDPOINT or the local default)")
    p.set_defaults(func=_status)

    p = sub.add_parser("demo", help="single-node demo: crash a trainer, resume bit-exact from memory")
    p.add_argument("--steps", type=int, default=60,
                   help="training steps (default 60); the trainer is killed at two thirds of them")
    p.add_argument("--dir", help="work directory, kept afterwards (default: a temporary one, removed at the end)")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
