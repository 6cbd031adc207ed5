"""``ftd status``: what a node's daemon holds, or one table for a whole local cluster."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

from ftd.cli import daemon_link
from ftd.cli.daemon_link import connect
from ftd.cli.registry import Command
from ftd.control.connection import status_or_none
from ftd.errors import FtdError
from ftd.local.configs import read_cluster
from ftd.units import format_size


def _age(t: float | None) -> str:
    return "-" if t is None else f"{time.time() - t:.1f}s ago"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def _status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        return _watch(args)
    if args.dir:
        return _cluster_status(args)
    conn = connect(args, 5.0, "ftd status")
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
        moved = (f"  left this node after step {r['departed_after']} (kept for the parity)" if "departed_after" in r
                 else f"  arrived at step {r['arrived_at']}" if "arrived_at" in r else "")
        print(f"rank {r['rank']}/{r['world']}  pid {r['pid']} ({alive})  commits {r['commits']}  "
              f"buffers {format_size(r['buffer_bytes'])}{moved}")
        print(f"   versions: {versions}{writing}")
        print(f"   last snapshot: copy {_ms(r['last_copy_seconds'])}, trainer blocked {_ms(r['last_blocked_seconds'])}, "
              f"committed {_age(r['last_commit_at'])}")
        if "replica" in r:  # replica-aware snapshots: what ftd decided (README "Replica-aware snapshots")
            rep = r["replica"]
            print(f"   replica {rep['pos']} of ranks {rep['ranks']} ({rep['source']}): holds "
                  f"{format_size(rep['slice_bytes'])} of {format_size(rep['replicated_bytes'])} replicated")
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


def _cluster_lines(cl: dict) -> list[str]:
    lines = [f"cluster: node {cl['node_rank']} of {cl['nodes']}, group {cl['group']} = nodes {cl['group_nodes']} "
             f"(k={cl['k']}, m={cl['m']}, {cl['code']}), peer link {cl['peer_endpoint']}"
             + (f" CURVE ({cl.get('security', 'shared key')})" if cl["secure"] else ""),
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
    lines.extend(_moves_lines(cl))
    if cl.get("disk_wait"):
        lines.append(f"   restores wait: {cl['disk_wait']}")
    if cl["lost_error"]:
        lines.append(f"   cannot restore: {cl['lost_error']}")
    tr = cl.get("traffic")
    if tr:
        kinds = lambda d: ", ".join(f"{k} {v['messages']}" for k, v in d["by_kind"].items()) or "none"  # noqa: E731
        lines.append(f"   peer messages: sent {tr['sent']['messages']} ({format_size(tr['sent']['bytes'])}: "
                     f"{kinds(tr['sent'])}), received {tr['received']['messages']} "
                     f"({format_size(tr['received']['bytes'])}: {kinds(tr['received'])})")
    bw = cl.get("bandwidth")
    if bw:
        budget = f"{format_size(bw['budget_bytes_per_second'])}/s" if bw["budget_bytes_per_second"] else "unlimited"
        lines.append(f"   peer send rate: {format_size(bw['send_rate_bytes_per_second'])}/s (peak "
                     f"{format_size(bw['peak_send_rate_bytes_per_second'])}/s), budget {budget}, "
                     f"{bw['waits']} wait(s) for it")
    refused = {what: cl.get("stats", {}).get(key, 0) for what, key in (
        ("sent as another node than its key's", "impostors_refused"), ("implausible", "implausible_refused"))}
    if any(refused.values()):
        lines.append("   refused peer messages: " + ", ".join(f"{n} {what}" for what, n in refused.items() if n))
    lines.extend(_membership_lines(cl.get("membership")))
    who = cl.get("coordination")
    if who:
        heard = "" if who["here"] else f", heard {who['heard_seconds_ago']:.1f} s ago"
        lines.append(f"   coordinator: node {who['node']}, term {who['term']}{' (this node)' if who['here'] else heard}"
                     + (f"; {who['stale_refused']} message(s) of an older term refused" if who["stale_refused"] else ""))
    co = cl.get("coordinator")
    if co:
        phase = (f"gathering the nodes' reports (waiting for {co['gathering']['waiting_for']})" if co.get("gathering")
                 else co["phase"])
        lines.append(f"   coordinating: {phase}, target step {co['target']}, rounds done {co['rounds_done']}, "
                     f"abandoned {co['rounds_abandoned']}; {co['last_event']}")
    return lines


def _membership_lines(ms: dict | None) -> list[str]:
    """The membership record (node rank -> endpoint, generation), and a claim waiting or decided."""
    if not ms:
        return []
    lines = ["   members: " + ", ".join(_member(m) for m in ms["members"])]
    if ms.get("waiting"):
        lines.append(f"   joining: {ms['waiting']}")
    lines += [f"   claim of node {r} by {ep}: waiting for its member's silence" for r, ep in ms.get("claims", {}).items()]
    lines += [f"   claim of node {x['node']} by {x['endpoint']} refused {_age(x['at'])}: {x['reason']}"
              for x in ms.get("refused", [])[-2:]]
    return lines


def _member(m: dict) -> str:
    who = "" if m["identity"] == f"node-{m['node']}" else f", as {m['identity']}"
    return f"node {m['node']} at {m['endpoint']} (generation {m['generation']}{who})"


def _moves_lines(cl: dict) -> list[str]:
    """Which ranks train on this node now, and the ranks whose versions it fetched from other nodes."""
    mv = cl.get("moves") or {}
    lines = [f"   ranks trained here: {cl['hosted_ranks']}"] if cl.get("hosted_ranks") is not None else []
    lines += [f"   fetching rank {r}: {why}" for r, why in {**mv.get("waiting", {}), **mv.get("fetching", {})}.items()]
    lines += [f"   fetched rank {f['rank']}'s step {f['step']} from node {f['from']}: {format_size(f['bytes'])} in "
              f"{f['seconds']:.2f} s, {_age(f['at'])}" for f in mv.get("fetched", [])]
    return lines


def _cluster_status(args: argparse.Namespace) -> int:
    """One table for a whole `ftd launch` cluster: per version and node, its state."""
    try:
        cluster = read_cluster(Path(args.dir))
    except Exception as e:
        print(f"ftd status: {e}", file=sys.stderr)
        return 2
    rows: dict[int, dict[int, str]] = {}
    nodes, views, record = [], {}, None
    for member in cluster["members"]:
        n = member["node_rank"]
        nodes.append(n)
        st = status_or_none(member["endpoint"])
        cl = None if st is None else st.get("cluster") or {}
        if cl is None:
            rows.setdefault(-1, {})[n] = "DOWN"
            continue
        if cl.get("coordination"):
            views[n] = (cl["coordination"]["node"], cl["coordination"]["term"])
        ms = cl.get("membership")
        if ms and (record is None or ms["version"] > record["version"]):
            record = ms  # the newest record any node holds
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
    if record:
        print("members: " + ", ".join(_member(m) for m in record["members"]))
    if len(set(views.values())) == 1:
        ((node, term),) = set(views.values())
        print(f"coordinator: node {node}, term {term} (every node up follows it)")
    elif views:  # a takeover under way: who follows whom
        print("coordinator: " + "; ".join(f"node {n} follows node {c} (term {t})" for n, (c, t) in sorted(views.items())))
    return 0


def _watch(args: argparse.Namespace) -> int:
    """Redraw the status every ``--watch`` seconds until Ctrl-C; a daemon that is down shows as such."""
    once = argparse.Namespace(**{**vars(args), "watch": None, "wait": 0.0})  # a daemon down shows at once
    try:
        while True:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    _status(once)
                except FtdError as e:  # the daemon is down or restarting: say so, and look again
                    print(f"ftd status: {e}", file=sys.stderr)
            sys.stdout.write("\x1b[H\x1b[2J" + f"ftd status, every {args.watch:g} s (Ctrl-C to stop)  "
                             f"{time.strftime('%H:%M:%S')}\n\n" + out.getvalue() + err.getvalue())
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    daemon_link.add_arguments(p)
    p.add_argument("--dir", help="a cluster started by `ftd launch`: one table of every node's versions")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="redraw the view every SECONDS (default 2) until Ctrl-C")


COMMANDS = [Command("status", "show what the node daemon holds", _arguments, _status)]
