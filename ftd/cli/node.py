"""Commands about one node's daemon: ``ftd daemon``, ``ftd recover``, ``ftd export``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ftd.cli.registry import Command
from ftd.config import load_config
from ftd.control.connection import Connection
from ftd.control.status import resolve_endpoint
from ftd.errors import FtdError
from ftd.units import format_size


def endpoint_of(args: argparse.Namespace) -> str:
    """The daemon a command talks to: --endpoint, else --config's, else $FTD_ENDPOINT, else the default."""
    return resolve_endpoint(args.endpoint, args.config, args.node_rank)


def _daemon(args: argparse.Namespace) -> int:
    from ftd.daemon import server  # here, not at the top: the other commands need no daemon code
    try:
        config = load_config(args.config, node_rank=args.node_rank)
        if args.metrics_port is not None:
            config = dataclasses.replace(config, metrics_port=args.metrics_port)
    except ValueError as e:
        print(f"ftd daemon: {e}", file=sys.stderr)
        return 2
    return server.run(config)


def _export(args: argparse.Namespace) -> int:
    """Write a version from the daemon's memory as a torch.distributed.checkpoint directory."""
    from ftd.durable.export import export
    from ftd.durable.ondisk import verify_export
    conn = Connection(endpoint_of(args), timeout=30.0)
    try:
        manifest = export(conn, Path(args.to), None if args.latest else args.step)
    except FtdError as e:
        print(f"ftd export: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    bad = verify_export(Path(args.to))
    if bad:
        print(f"ftd export: files that do not match their checksums after writing: {bad}", file=sys.stderr)
        return 1
    top = " (the directory itself: rank 0's state)" if 0 in manifest["ranks"] else ""
    print(f"ftd export: step {manifest['step']} of job {manifest['job']!r}, ranks {manifest['ranks']} of "
          f"{manifest['world']}, written to {args.to}{top}; {len(manifest['files'])} files, checksums in "
          f"ftd-export-node{manifest['node_rank']}.json")
    return 0


def _recover(args: argparse.Namespace) -> int:
    """Ask a node's daemon to rebuild what it lacks of the recoverable step, and wait for the outcome."""
    endpoint = endpoint_of(args)
    conn = Connection(endpoint, timeout=5.0)
    try:
        before = conn.call("status").get("cluster")
        if before is None:
            print(f"ftd recover: the daemon at {endpoint} has no peers in its config; nothing to rebuild from",
                  file=sys.stderr)
            return 2
        last_at = (before.get("last_rebuild") or {}).get("at")
        reply = conn.call("recover")
        print(f"ftd recover: node {before['node_rank']}: rebuilding from its peers"
              + ("" if reply["started"] else f" (already running: {reply['rebuilding']})"), flush=True)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            cl = conn.call("status")["cluster"]
            done = cl.get("last_rebuild")
            if cl["rebuilding"] is None and done and done.get("at") != last_at:
                if not done["ok"]:
                    print(f"ftd recover: node {cl['node_rank']} could not be rebuilt: {done['error']}", file=sys.stderr)
                    return 1
                earlier = [r for r in cl.get("rebuilds", [])[:-1] if r.get("ok") and r.get("step") == done["step"]
                           and (r["rebuilt_data"] or r["rebuilt_parity"])]
                if earlier and not (done["rebuilt_data"] or done["rebuilt_parity"]):
                    done = earlier[-1]  # the daemon already rebuilt it by itself at start-up: report that one
                what = [w for w, f in (("data", done["rebuilt_data"]), ("parity", done["rebuilt_parity"])) if f]
                if done["step"] < 0:
                    print("ftd recover: the cluster has no recoverable step yet; nothing to rebuild")
                else:
                    print(f"ftd recover: node {cl['node_rank']} holds step {done['step']} "
                          f"({' and '.join(what) + ' rebuilt' if what else 'already whole'}; "
                          f"{format_size(done['fetched_bytes'])} fetched in {done['seconds']:.2f} s"
                          + (f"; unavailable blocks: {done['bad_blocks']}" if done["bad_blocks"] else "") + ")")
                return 0
            time.sleep(0.2)
        print(f"ftd recover: no result within {args.timeout:.0f} s; see `ftd status`", file=sys.stderr)
        return 1
    except FtdError as e:
        print(f"ftd recover: {e}\n(start the node's daemon with `ftd daemon --config FILE`: it rebuilds by itself "
              "at start; `ftd recover` waits for it and reports)", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _daemon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config (see configs/local.toml); default: single-node defaults")
    p.add_argument("--node-rank", type=int, help="this node's rank (overrides the config)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (overrides the config's "
                   "metrics_port; needs ftd[metrics])")


def _recover_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the node's daemon config file")
    p.add_argument("--node-rank", type=int, help="the node to rebuild (overrides the config's node_rank)")
    p.add_argument("--endpoint", help="the daemon's control endpoint, instead of --config")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rebuild (default 600)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=int, help="the step to export (every rank of the node must hold it)")
    which.add_argument("--latest", action="store_true",
                       help="the recoverable step (cluster), else the newest step every rank holds")
    p.add_argument("--to", required=True, help="the directory to write (on a shared file system: every node adds its ranks)")
    p.add_argument("--config", help="the daemon's config file")
    p.add_argument("--node-rank", type=int)
    p.add_argument("--endpoint", help="the daemon's endpoint (default $FTD_ENDPOINT or the local default)")


COMMANDS = [
    Command("daemon", "run the node daemon (snapshot management process)", _daemon_arguments, _daemon),
    Command("recover", "rebuild a node's snapshots and parity from its peers, and report", _recover_arguments, _recover),
    Command("export", "write a version held in memory as a torch.distributed.checkpoint directory",
            _export_arguments, _export),
]
