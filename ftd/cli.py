"""The ``ftd`` command: arguments in, library calls out."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import agent, demo, launch, peerauth
from .config import load_config
from .connection import Connection, status_or_none
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


def _export(args: argparse.Namespace) -> int:
    """Write a version from the daemon's memory as a torch.distributed.checkpoint directory."""
    from .durable import verify_export
    from .export import export
    conn = Connection(_endpoint(args), timeout=30.0)
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


def _age(t: float | None) -> str:
    return "-" if t is None else f"{time.time() - t:.1f}s ago"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def _status(args: argparse.Namespace) -> int:
    if args.dir:
        return _cluster_status(args)
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
    if st.get("cluster"):
        print("\n".join(_cluster_lines(st["cluster"])))
    if st.get("flush"):
        print("\n".join(_flush_lines(st["flush"])))
    return 0


def _flush_lines(fl: dict) -> list[str]:
    rule = " or ".join(([f"every {fl['every']} steps"] if fl["every"] else [])
                       + ([f"every {fl['interval']:g} s"] if fl["interval"] else []))
    lines = [f"flush to {fl['dir']} ({rule}, keep {fl['keep']}): {fl['flushed']} done, {fl['failures']} failed, "
             f"{fl['superseded']} superseded; on disk: steps {fl['on_disk'][:5] or 'none'}"]
    if fl.get("loading") is not None:
        lines.append(f"   loading step {fl['loading']} from disk")
    if fl["running"] is not None:
        lines.append(f"   flushing step {fl['running']}" + (f", step {fl['pending']} waits" if fl["pending"] else ""))
    last = fl.get("last")
    if last and last["ok"]:
        lines.append(f"   last: step {last['step']}, {format_size(last['bytes'])} in {last['seconds']:.2f} s "
                     f"(buffers held {_ms(last.get('copy_seconds'))}), {_age(last['at'])}")
    elif last:
        lines.append(f"   last: step {last['step']} FAILED: {last['error']}")
    return lines


def _recover(args: argparse.Namespace) -> int:
    """Ask a node's daemon to rebuild what it lacks of the recoverable step, and wait for the outcome."""
    endpoint = _endpoint(args)
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


def _cluster_lines(cl: dict) -> list[str]:
    lines = [f"cluster: node {cl['node_rank']} of {cl['nodes']}, group {cl['group']} = nodes {cl['group_nodes']} "
             f"(k={cl['k']}, m={cl['m']}, {cl['code']}), peer link {cl['peer_endpoint']}"
             + (" CURVE" if cl["secure"] else ""),
             f"   recoverable step: {cl['recoverable'] if cl['recoverable'] >= 0 else 'none yet'}   "
             f"memory: data {format_size(cl['data_bytes'])}, parity {format_size(cl['parity_bytes'])}"]
    for v in cl["versions"]:
        state = "recoverable" if v["recoverable"] else "protected" if v["protected"] else \
            "local-complete" if v["local"] else "parity only"
        lines.append(f"   step {v['step']}: {state}  (data {format_size(v['data_bytes'])}, "
                     f"parity {format_size(v['parity_bytes'])})")
    if cl["round"]:
        lines.append(f"   protecting step {cl['round']['step']}: "
                     + ("done, waiting for the coordinator" if cl["round"]["complete"] else
                        f"{cl['round']['frames_left']} parity frame(s) to go"))
    if cl["rebuilding"]:
        lines.append(f"   rebuilding: {cl['rebuilding']}")
    if cl.get("disk_wait"):
        lines.append(f"   restores wait: {cl['disk_wait']}")
    if cl["lost_error"]:
        lines.append(f"   cannot restore: {cl['lost_error']}")
    co = cl.get("coordinator")
    if co:
        lines.append(f"   coordinator: {co['phase']}, target step {co['target']}, rounds done {co['rounds_done']}, "
                     f"abandoned {co['rounds_abandoned']}; {co['last_event']}")
    return lines


def _cluster_status(args: argparse.Namespace) -> int:
    """One table for a whole `ftd launch` cluster: per version and node, its state."""
    from .launch import read_cluster
    try:
        cluster = read_cluster(Path(args.dir))
    except Exception as e:
        print(f"ftd status: {e}", file=sys.stderr)
        return 2
    rows: dict[int, dict[int, str]] = {}
    nodes = []
    for member in cluster["members"]:
        n = member["node_rank"]
        nodes.append(n)
        st = status_or_none(member["endpoint"])
        cl = None if st is None else st.get("cluster") or {}
        if cl is None:
            rows.setdefault(-1, {})[n] = "DOWN"
            continue
        for v in cl.get("versions", []):
            rows.setdefault(v["step"], {})[n] = ("recoverable" if v["recoverable"] else "protected" if v["protected"]
                                                 else "local" if v["local"] else "parity-only")
    if args.json:
        print(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
        return 0
    print("step     " + "".join(f"node {n:<10}" for n in nodes))
    for step in sorted(rows, reverse=True):
        label = "daemon" if step < 0 else str(step)
        print(f"{label:<9}" + "".join(f"{rows[step].get(n, '-'):<15}" for n in nodes))
    return 0


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
    p.add_argument("--dir", help="a cluster started by `ftd launch`: one table of every node's versions")
    p.set_defaults(func=_status)

    p = sub.add_parser("recover", help="rebuild a node's snapshots and parity from its peers, and report")
    p.add_argument("--config", help="the node's daemon config file")
    p.add_argument("--node-rank", type=int, help="the node to rebuild (overrides the config's node_rank)")
    p.add_argument("--endpoint", help="the daemon's control endpoint, instead of --config")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the rebuild (default 600)")
    p.set_defaults(func=_recover)

    p = sub.add_parser("export", help="write a version held in memory as a torch.distributed.checkpoint directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--step", type=int, help="the step to export (every rank of the node must hold it)")
    which.add_argument("--latest", action="store_true",
                       help="the recoverable step (cluster), else the newest step every rank holds")
    p.add_argument("--to", required=True, help="the directory to write (on a shared file system: every node adds its ranks)")
    p.add_argument("--config", help="the daemon's config file")
    p.add_argument("--node-rank", type=int)
    p.add_argument("--endpoint", help="the daemon's endpoint (default $FTD_ENDPOINT or the local default)")
    p.set_defaults(func=_export)

    launch.add_commands(sub)
    peerauth.add_commands(sub)
    agent.add_command(sub)

    demo.add_command(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
