"""Commands about one node's daemon: ``ftd daemon``, ``ftd recover``, ``ftd export``, ``ftd clear``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from ftd.cli import daemon_link
from ftd.cli.daemon_link import connect
from ftd.cli.registry import Command
from ftd.config import load_config
from ftd.errors import ConfigError, FtdError
from ftd.units import format_size


def _daemon(args: argparse.Namespace) -> int:
    from ftd.daemon import server  # here, not at the top: the other commands need no daemon code
    try:
        config = load_config(args.config, node_rank=args.node_rank)
        if args.metrics_port is not None:
            config = dataclasses.replace(config, metrics_port=args.metrics_port)
        if args.peer_endpoint:
            config = dataclasses.replace(config, advertise=args.peer_endpoint)
        if args.key_file:
            config = dataclasses.replace(config, peer_key_file=Path(args.key_file))
    except ValueError as e:
        print(f"ftd daemon: {e}", file=sys.stderr)
        return 2
    return server.run(config, clear_on_stop=args.clear)


def _spare(args: argparse.Namespace) -> int:
    """Wait as a spare host until the coordinator admits this host to a lost node's rank, then become its daemon."""
    from ftd.cluster.spare import Spare
    try:
        config = load_config(args.config)
        if not config.clustered:
            raise ConfigError("a spare needs a cluster config (peers)")
        config = dataclasses.replace(config, advertise=args.peer_endpoint)  # checks the endpoint
        if args.key_file:
            config = dataclasses.replace(config, peer_key_file=Path(args.key_file))
        spare = Spare(config, args.peer_endpoint, args.name)
    except (ValueError, FtdError) as e:
        print(f"ftd spare: {e}", file=sys.stderr)
        return 2
    print(f"ftd spare: {args.name} at {args.peer_endpoint} waits to take the place of a node of job {config.job!r} "
          f"lost for peer_timeout ({config.peer_timeout:g} s)", flush=True)
    try:
        rank = spare.wait(args.timeout)
    except FtdError as e:
        print(f"ftd spare: {e}", file=sys.stderr)
        return 1
    finally:
        spare.close()
    print(f"ftd spare: admitted as node {rank}; this process becomes its daemon", flush=True)
    own_key = ["--key-file", str(config.peer_key_file)] if config.peer_key_file else []
    os.execv(sys.executable, [sys.executable, "-m", "ftd.cli", "daemon", "--config", args.config, "--node-rank",
                              str(rank), "--peer-endpoint", args.peer_endpoint, *own_key])
    return 1  # not reached


def _export(args: argparse.Namespace) -> int:
    """Write a version from the daemon's memory as a torch.distributed.checkpoint directory."""
    from ftd.durable.export import export
    from ftd.durable.ondisk import verify_export
    conn = connect(args, 30.0, "ftd export")
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
    conn = None
    try:
        conn = connect(args, 5.0, "ftd recover")
        endpoint = conn.endpoint
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
    except ConfigError:
        raise  # the main command line says it in one line
    except FtdError as e:
        print(f"ftd recover: {e}\n(start the node's daemon with `ftd daemon --config FILE`: it rebuilds by itself "
              "at start; `ftd recover` waits for it and reports)", file=sys.stderr)
        return 1
    finally:
        if conn is not None:
            conn.close()


def _daemon_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config (see configs/local.toml); default: single-node defaults")
    p.add_argument("--node-rank", type=int, help="this node's rank (overrides the config)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (overrides the config's "
                   "metrics_port; needs ftd[metrics])")
    p.add_argument("--peer-endpoint", metavar="tcp://HOST:PORT",
                   help="this node's peer endpoint, when it is not the config's peers[node_rank]: a replacement "
                        "host under its own address claims the node rank from its peers (also $FTD_PEER_ENDPOINT)")
    p.add_argument("--key-file", help="this node's CURVE key file (overrides the config's peer_key_file: a spare "
                                       "admitted to a rank keeps its own key)")
    p.add_argument("--clear", action="store_true",
                   help="at stop, drop every snapshot, even those of trainers that still run (by default a stop "
                        "keeps them for the next daemon, as after a crash)")


def _spare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the cluster's config (its peers); the node rank comes when admitted")
    p.add_argument("--peer-endpoint", required=True, metavar="tcp://HOST:PORT", help="where this host's daemon will answer")
    p.add_argument("--name", default="spare-0", help="the spare's identity (default spare-0; one per spare host)")
    p.add_argument("--key-file", help="with per-node keys: the spare's own key file (DIR/spare-S.key from "
                                      "`ftd keygen --dir DIR --nodes N --spares S`), kept when it becomes a node")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait for ever)")


def _recover_arguments(p: argparse.ArgumentParser) -> None:
    daemon_link.add_arguments(p, "the node to rebuild (overrides the config's node_rank)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rebuild (default 600)")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=int, help="the step to export (every rank of the node must hold it)")
    which.add_argument("--latest", action="store_true",
                       help="the recoverable step (cluster), else the newest step every rank holds")
    p.add_argument("--to", required=True, help="the directory to write (on a shared file system: every node adds its ranks)")
    daemon_link.add_arguments(p)


def _clear(args: argparse.Namespace) -> int:
    """Drop every version of the job: memory and flush_dir (in a cluster: on every node)."""
    conn = connect(args, 10.0, "ftd clear")
    try:
        before = conn.call("status")
        job, node = before["job"], before["node_rank"]
        reply = conn.call("clear", force=args.force)
        newest = f" (the newest up to step {reply['newest']})" if reply["newest"] >= 0 else ""
        if not reply["cluster"]:
            flushed = f"; removed flushed steps {reply['flushed']} from {before['flush']['dir']}" if reply["flushed"] else ""
            print(f"ftd clear: job {job!r}, node {node}: dropped every version{newest}{flushed}")
            return 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            cluster = conn.call("status")["cluster"]
            if cluster["epoch"] > reply["epoch"]:
                print(f"ftd clear: job {job!r}: every node of the cluster dropped its versions{newest} and its "
                      f"flushed ones (a new run, epoch {cluster['epoch']})")
                return 0
            time.sleep(0.2)
        print(f"ftd clear: job {job!r}: the cluster did not start a new run within {args.timeout:g} s (is node 0, "
              "the coordinator, up?); see `ftd status`", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _clear_arguments(p: argparse.ArgumentParser) -> None:
    daemon_link.add_arguments(p)
    p.add_argument("--force", action="store_true", help="drop them even while trainers of the job still run")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every node of a cluster (default 60)")


COMMANDS = [
    Command("daemon", "run the node daemon (snapshot management process)", _daemon_arguments, _daemon),
    Command("spare", "wait as a spare host until a lost node's rank is given to it, then run its daemon",
            _spare_arguments, _spare),
    Command("recover", "rebuild a node's snapshots and parity from its peers, and report", _recover_arguments, _recover),
    Command("export", "write a version held in memory as a torch.distributed.checkpoint directory",
            _export_arguments, _export),
    Command("clear", "drop every version of a job, in memory and on disk (a cluster: on every node), to start afresh",
            _clear_arguments, _clear),
]
