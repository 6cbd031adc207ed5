#!/usr/bin/env python3
"""Does ftd's cost per node stay flat as the cluster grows? Peer messages, bytes, time to protection and
memory per node and protected version on local clusters of N = 2, 4, 8 nodes at fixed m, and node 0's
coordinator driven through one round at N = 960 ... 9600.

    .venv/bin/python scripts/bench_scale.py            # both parts (about 8 min on 2 cores)
    .venv/bin/python scripts/bench_scale.py --quick    # N = 2, 4; the coordinator up to 1920 nodes (~1 min)

Part 1, measured. For each layout and N a cluster is launched with ``ftd launch`` (``bench_protect.Cluster``:
one trainer per node in a helper process, ``{"w": S bytes}`` of random float32, S = 32 MiB by default):
  - "groups of 2" (``--group-size 2``, k = 1, m = 1): the cluster grows by adding groups, the way a job of
    1k-10k nodes does (groups of fixed size); per-node work must not change with N;
  - "one group" (k = N - m, bench_protect's layout): the group grows with N.
After steps 0 and 1 (buffers reserved), ``--rounds`` steps are protected back to back; for each, every
daemon's ``cluster.traffic`` (``ftd status --json``: peer messages sent and received by type, kind, peer and
bytes, counted by the daemons) is read before the snapshot and again once the step is recoverable on every
node, no round runs, and 50 ms passed (the coordinator has the nodes' answers to its sync): the difference
is one full protection cycle per node. Time to protection is the daemons' own ``protection_lag`` (commit
of the step by the node's trainer -> the step recoverable on every node), per version. Memory: the
recoverable version's data and parity bytes, every file of the node in /dev/shm, the daemon's private
memory (USS), its open file descriptors and TCP connections. Then ``--idle`` seconds without snapshots:
what the daemons send per second meanwhile (node 0 re-sends its ``sync`` every second to nodes without a
candidate, and every ``sync`` and ``protect`` is answered with an ``alive``: the coordinator's heartbeat;
a round longer than a second re-sends ``protect`` the same way).

Part 2, the coordinator at scale. The real ``Coordinator`` (pure, node 0's state machine) is driven in this
process through one cycle for N nodes in groups of k + m: sync, alive, candidate, protect, alive, done,
protected; every message it sends is encoded with ``PeerMessages`` once per destination (as
``PeerLinks.send`` does) and every message it receives is encoded by its sender and decoded, so messages,
bytes and CPU seconds are what node 0's loop thread would spend (on this machine's cores). The
``protect`` message carries every node's size, so its bytes grow with N; a fit of CPU per round against
N^2/g, N^2 and N goes to the JSON, for ``scripts/scale_model.py``.

Results: ``bench-results/bench_scale-<stamp>.json`` (``scripts/scale_model.py --measured FILE`` reads it).
Every process and shared-memory file is removed at the end of each cluster, also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from bench_protect import ROUND_TIMEOUT, Cluster, shm_usage, status_of, wait_until  # scripts/bench_protect.py
from benchutil import REPO, ftd_revision, ms, sigterm_to_exit, table

sys.path.insert(0, str(REPO))
from ftd.cluster.coordinator import Coordinator  # noqa: E402
from ftd.cluster.messages import PeerMessages  # noqa: E402
from ftd.cluster.stripes import Grouping  # noqa: E402
from ftd.cluster.traffic import COORDINATION, DATA, KIND_OF, difference  # noqa: E402

MiB = 1 << 20
SETTLE = 0.05
LAYOUTS = {"groups of 2": 2, "one group": 0}
COORD_NODES = [960, 1920, 3840, 9600]
COORD_SHAPES = [(4, 1), (8, 2)]
STATE_BYTES = 50 << 30            # the size each node reports in part 2 (11 digits, as a 50 GiB state)


# ---- part 1: local clusters ----------------------------------------------------------------------
def settled(cluster: Cluster, step: int) -> list[dict]:
    """Every node's status once all know ``step`` recoverable, none runs a round, and SETTLE passed."""
    ok = wait_until(lambda: all((st := status_of(ep)) and st["cluster"]["recoverable"] == step
                                and st["cluster"]["round"] is None for ep in cluster.endpoints), ROUND_TIMEOUT, 0.005)
    if not ok:
        raise RuntimeError(f"step {step} did not become recoverable on every node within {ROUND_TIMEOUT:.0f} s")
    time.sleep(SETTLE)
    return [status_of(ep) for ep in cluster.endpoints]


def process_figures(cluster: Cluster) -> list[dict]:
    """Per daemon: private memory, open file descriptors, TCP connections."""
    out = []
    for n in range(cluster.nodes):
        p = cluster.daemons[n]
        try:
            out.append({"uss": p.memory_full_info().uss, "rss": p.memory_info().rss, "fds": p.num_fds(),
                        "tcp": len(p.net_connections(kind="tcp"))})
        except psutil.Error:
            out.append({})
    return out


def measure_cluster(nodes: int, m: int, group_size: int, nbytes: int, rounds: int, idle: float,
                    hold_round: float = 0.0) -> dict:
    """One cluster's cycles; ``hold_round`` > 0 makes every daemon hold each round open that long before
    sending (FTD_DEBUG_PROTECT_DELAY): rounds as long as a large state's, to count the re-sends."""
    g = group_size or nodes
    r = {"nodes": nodes, "m": m, "group_size": g, "k": g - m, "S": nbytes, "hold_round_s": hold_round}
    cluster = Cluster(nodes, m, nbytes, f"s{nodes}g{g}", group_size=group_size)
    if hold_round:
        cluster.env["FTD_DEBUG_PROTECT_DELAY"] = str(hold_round)
    r["job"] = cluster.job
    try:
        r["launch_s"] = cluster.launch()
        cluster.start_trainers(ROUND_TIMEOUT)
        for step in (0, 1):  # the first snapshots reserve every buffer and segment
            cluster.snapshot_all(step)
            before = settled(cluster, step)
        cycles = []
        for step in range(2, 2 + rounds):
            t0, cpu0 = time.monotonic(), cluster.daemon_cpu()
            snap = cluster.snapshot_all(step)
            if not all(snap["ok"]):
                raise RuntimeError(f"a snapshot of step {step} was not committed: {snap['ok']}")
            after = settled(cluster, step)
            cpu1 = cluster.daemon_cpu()
            cycles.append({"step": step, "window_s": time.monotonic() - t0, "nodes": [
                {"traffic": difference(a["cluster"]["traffic"], b["cluster"]["traffic"]), "lag_s": lag_of(a, b),
                 "cpu_s": sum(cpu1[n]) - sum(cpu0[n]) if n in cpu0 and n in cpu1 else None}
                for n, (a, b) in enumerate(zip(after, before))]})
            before = after
        r["cycles"] = cycles
        r["memory"] = []
        for n, (st, proc) in enumerate(zip(before, process_figures(cluster))):
            cl = st["cluster"]
            v = next(v for v in cl["versions"] if v["recoverable"])
            r["memory"].append({"node": n, "data_bytes": v["data_bytes"], "parity_bytes": v["parity_bytes"],
                                "shm_bytes": shm_usage(cluster.job, n)[0], **proc})
        t0 = time.monotonic()
        time.sleep(idle)
        quiet = [status_of(ep) for ep in cluster.endpoints]
        span = time.monotonic() - t0
        r["idle"] = {"seconds": span, "nodes": [difference(q["cluster"]["traffic"], b["cluster"]["traffic"])
                                                for q, b in zip(quiet, before)]}
    except Exception as e:  # reported with the others; the cluster is still cleaned up
        r["error"] = f"{type(e).__name__}: {e}"
    finally:
        cluster.stop_worker()
        r["forced_cleanup"] = cluster.close()
    return r


def lag_of(after: dict, before: dict) -> float | None:
    """Mean commit -> recoverable-everywhere seconds of the versions protected between two readings."""
    a, b = after["cluster"]["stats"]["protection_lag"], before["cluster"]["stats"]["protection_lag"]
    count = a["count"] - b["count"]
    return (a["total_seconds"] - b["total_seconds"]) / count if count else None


def per_node_summary(r: dict) -> dict:
    """Means over the cycles: node 0 (the coordinator) and the other nodes apart."""
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    def of(nodes, f):
        return mean([f(c["nodes"][n]) for c in r["cycles"] for n in nodes])

    def kind(t, direction, k, what="messages"):
        return t["traffic"][direction]["by_kind"].get(k, {}).get(what, 0)

    others = list(range(1, r["nodes"]))
    s = {}
    for who, nodes in (("coordinator", [0]), ("others", others)):
        s[who] = {
            "coord_sent": of(nodes, lambda t: kind(t, "sent", COORDINATION)),
            "coord_received": of(nodes, lambda t: kind(t, "received", COORDINATION)),
            "coord_bytes": of(nodes, lambda t: kind(t, "sent", COORDINATION, "bytes")
                              + kind(t, "received", COORDINATION, "bytes")),
            "data_sent": of(nodes, lambda t: kind(t, "sent", DATA)),
            "bytes_sent": of(nodes, lambda t: t["traffic"]["sent"]["bytes"]),
            "bytes_received": of(nodes, lambda t: t["traffic"]["received"]["bytes"]),
            "in_process": of(nodes, lambda t: t["traffic"]["in_process"]["messages"]),
            "lag_s": of(nodes, lambda t: t["lag_s"]),
            "cpu_s": of(nodes, lambda t: t["cpu_s"]),
        }
        s[who]["by_type"] = {}
        for c in r["cycles"]:
            for n in nodes:
                for direction in ("sent", "received"):
                    for t, v in c["nodes"][n]["traffic"][direction]["by_type"].items():
                        key = f"{direction} {t}"
                        share = v["messages"] / len(r["cycles"]) / len(nodes)
                        s[who]["by_type"][key] = s[who]["by_type"].get(key, 0) + share
    idle = r["idle"]
    s["idle_per_s"] = {"coordinator": idle["nodes"][0]["sent"]["messages"] / idle["seconds"],
                       "others": mean([idle["nodes"][n]["sent"]["messages"] / idle["seconds"] for n in others])}
    mem = r["memory"]
    s["memory"] = {key: mean([x.get(key) for x in mem]) for key in ("data_bytes", "parity_bytes", "shm_bytes",
                                                                    "uss", "fds", "tcp")}
    s["tcp_per_node"] = [x.get("tcp") for x in mem]
    return s


# ---- part 2: the coordinator alone, at scale -----------------------------------------------------
class Wire:
    """Node 0's side of the cycle: what it sends and receives, encoded and decoded as its links would."""

    def __init__(self, nodes: int, g: int):
        self.nodes, self.g = nodes, g
        self.pm0 = PeerMessages("scale", 0, nodes, g)
        self.sent = {}
        self.received = {}
        self.in_process = 0
        self.cpu_codec = 0.0
        self.codec_by_type: dict[str, float] = {}
        self.bytes_to = [0] * nodes      # coordination bytes node n receives from node 0
        self.bytes_from = [0] * nodes    # ... and sends to it

    def _count(self, table_, mtype: str, nbytes: int) -> None:
        c = table_.setdefault(mtype, [0, 0])
        c[0] += 1
        c[1] += nbytes

    def _cpu(self, mtype: str, seconds: float) -> None:
        self.cpu_codec += seconds
        self.codec_by_type[mtype] = self.codec_by_type.get(mtype, 0.0) + seconds

    def send(self, outgoing) -> None:
        for o in outgoing:
            for d in o.dests:
                if d == 0:
                    self.in_process += 1
                    continue
                t0 = time.process_time()
                header = self.pm0.encode(o.mtype, **o.fields)[0]
                self._cpu(o.mtype, time.process_time() - t0)
                self._count(self.sent, o.mtype, len(header))
                self.bytes_to[d] += len(header)

    def receive(self, src: int, mtype: str, **fields) -> None:
        if src == 0:
            self.in_process += 1
            return
        header = PeerMessages("scale", src, self.nodes, self.g).encode(mtype, **fields)[0]
        t0 = time.process_time()
        self.pm0.decode([header])
        self._cpu(mtype, time.process_time() - t0)
        self._count(self.received, mtype, len(header))
        self.bytes_from[src] += len(header)


def drive_coordinator(nodes: int, k: int, m: int) -> dict:
    """One protection cycle of the real Coordinator with ``nodes`` nodes in groups of k + m, and one
    re-send of ``protect`` (what a round longer than ``resend`` = 1 s costs node 0 every second)."""
    g = k + m
    now = [0.0]
    coord = Coordinator(Grouping(nodes, k, m), resend=1.0, peer_timeout=1e9, clock=lambda: now[0])
    wire = Wire(nodes, g)
    cpu: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.process_time()
        fn()
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - t0

    def answer_all(mtype, handler, **fields):
        for n in range(nodes):
            wire.receive(n, mtype, **fields)
            timed(mtype, lambda: (coord.heard_from(n), handler(n)))
            wire.send(coord.take())

    timed("sync", coord.start)
    wire.send(coord.take())
    answer_all("alive", lambda n: coord.on_alive(n, 0), latest=0)
    target = coord.target
    answer_all("candidate", lambda n: coord.on_candidate(n, target, target, STATE_BYTES, False, -1, target),
               target=target, step=target, nbytes=STATE_BYTES, mismatch=False, recoverable=-1, latest=target)
    r = coord.round
    if r is None:
        raise RuntimeError("the coordinator did not start a round")
    answer_all("alive", lambda n: coord.on_alive(n, target), latest=target)
    # a re-send: one second passes with nobody done (a long round); node 0 re-sends protect, nodes answer
    # alive; counted on a wire of its own, so the cycle's figures leave it out
    now[0] += 1.0
    rewire = Wire(nodes, g)
    t0 = time.process_time()
    coord.tick()
    rewire.send(coord.take())
    for n in range(nodes):
        rewire.receive(n, "alive", latest=target)
        coord.heard_from(n)
        coord.on_alive(n, target)
    resend = {"cpu_s": time.process_time() - t0, "codec_s": rewire.cpu_codec,
              "messages": sum(c[0] for c in rewire.sent.values()) + sum(c[0] for c in rewire.received.values()),
              "bytes_sent": sum(c[1] for c in rewire.sent.values())}
    for n in range(nodes):
        wire.receive(n, "done", round=r.id, step=r.step, latest=target)
        timed("done", lambda: (coord.heard_from(n), coord.on_done(n, r.id, r.step, target)))
        wire.send([o for o in coord.take() if o.mtype != "sync"])  # the next cycle's sync is the next cycle's
    if coord.recoverable != target:
        raise RuntimeError(f"the round did not complete: recoverable {coord.recoverable}")
    others = range(1, nodes)
    small = wire.received["alive"][0] + wire.received["candidate"][0]
    per_message = (cpu["alive"] + cpu["candidate"] + wire.codec_by_type["alive"]
                   + wire.codec_by_type["candidate"]) / small
    return {"nodes": nodes, "k": k, "m": m, "g": g, "groups": nodes // g,
            "sent": wire.sent, "received": wire.received, "in_process": wire.in_process,
            "messages_sent": sum(c[0] for c in wire.sent.values()),
            "messages_received": sum(c[0] for c in wire.received.values()),
            "bytes_sent": sum(c[1] for c in wire.sent.values()),
            "bytes_received": sum(c[1] for c in wire.received.values()),
            "node_bytes": statistics.mean(wire.bytes_to[n] + wire.bytes_from[n] for n in others),
            "node_messages": (sum(c[0] for c in wire.sent.values()) + sum(c[0] for c in wire.received.values()))
            / (nodes - 1),
            "cpu_state_s": sum(cpu.values()), "cpu_by_handler_s": cpu, "cpu_codec_s": wire.cpu_codec,
            "codec_by_type_s": wire.codec_by_type, "small_message_cpu_s": per_message, "resend": resend}


def fit_coordinator(points: list[dict]) -> dict:
    """Least squares of node 0's CPU seconds: per cycle, state ~ a N^2/g + b N^2 + c N, codec ~ d N^2 + e N;
    per re-send of protect, ~ f N^2 + h N."""
    n = np.array([p["nodes"] for p in points], float)
    g = np.array([p["g"] for p in points], float)

    def fit(columns, key):
        """Least squares with every coefficient >= 0 (a negative one, noise, is dropped and the rest refit)."""
        y, keep = np.array([key(p) for p in points]), list(range(len(columns)))
        while True:
            c = np.linalg.lstsq(np.stack([columns[i] for i in keep], 1), y, rcond=None)[0]
            if (c >= 0).all() or len(keep) == 1:
                out = np.zeros(len(columns))
                out[keep] = np.maximum(c, 0)
                return out
            keep.pop(int(np.argmin(c)))

    state = fit([n * n / g, n * n, n], lambda p: p["cpu_state_s"])
    codec = fit([n * n, n], lambda p: p["cpu_codec_s"])
    resend = fit([n * n, n], lambda p: p["resend"]["cpu_s"])
    return {"state_n2_over_g": float(state[0]), "state_n2": float(state[1]), "state_n": float(state[2]),
            "codec_n2": float(codec[0]), "codec_n": float(codec[1]),
            "resend_n2": float(resend[0]), "resend_n": float(resend[1]),
            "small_message_s": statistics.median(p["small_message_cpu_s"] for p in points),
            "formula": "cycle_cpu_s = state_n2_over_g N^2/g + state_n2 N^2 + state_n N + codec_n2 N^2 "
                       "+ codec_n N; resend_cpu_s = resend_n2 N^2 + resend_n N; small_message_s: node 0's CPU for one "
                       "alive or candidate (handler, decode)"}


# ---- report ----------------------------------------------------------------------------------------
def report_part1(results: list[dict]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["layout"], str(r["nodes"]), f"FAILED: {r['error'][:80]}"] + [""] * 10)
            continue
        s, S = r["summary"], r["S"]
        c, o = s["coordinator"], s["others"]
        def other(key):
            return "-" if o[key] is None else f"{o[key]:.1f}"
        rows.append([r["layout"], str(r["nodes"]), f"{r['k']}+{r['m']}",
                     f"{other('coord_sent')} / {other('coord_received')}",
                     f"{c['coord_sent']:.0f} / {c['coord_received']:.0f} (+{c['in_process']:.0f})",
                     f"{other('data_sent')}",
                     f"{o['bytes_sent'] / S:.3f} / {o['bytes_received'] / S:.3f}" if o["bytes_sent"] is not None
                     else "-",
                     f"{o['coord_bytes']:,.0f}" if o["coord_bytes"] is not None else "-",
                     ms(statistics.mean(x for x in (c["lag_s"], o["lag_s"]) if x is not None)),
                     f"{o['cpu_s'] * 1e3:.0f}" if o["cpu_s"] is not None else "-",
                     f"{(s['memory']['data_bytes'] + s['memory']['parity_bytes']) / S:.3f} / "
                     f"{s['memory']['shm_bytes'] / S:.2f}",
                     f"{s['memory']['tcp']:.0f}", f"{s['memory']['uss'] / MiB:.0f}"])
    return ("Part 1: per protected version (mean of the cycles); 'others' = every node but node 0\n" + table(
        ["layout", "N", "k+m", "coord. msgs other node sent/recv", "node 0 sent/recv (+itself)",
         "data msgs other node", "bytes other node sent/recv per S", "coord. bytes other node",
         "commit->recoverable ms", "daemon CPU ms other node", "(d+p)/S, /dev/shm/S", "TCP conns/node",
         "daemon USS MiB"], rows))


def report_idle(results: list[dict]) -> str:
    rows = [[r["layout"], str(r["nodes"]), f"{r['summary']['idle_per_s']['coordinator']:.1f}",
             f"{r['summary']['idle_per_s']['others']:.1f}" if r["nodes"] > 1 else "-"]
            for r in results if "error" not in r]
    return ("Between rounds (no snapshot), messages sent per second\n"
            + table(["layout", "N", "node 0", "other node"], rows))


def report_part2(points: list[dict], fit: dict) -> str:
    rows = [[str(p["nodes"]), f"{p['k']}+{p['m']}", f"{p['messages_sent']:,} / {p['messages_received']:,}",
             f"{p['bytes_sent'] / 1e6:,.1f} / {p['bytes_received'] / 1e6:,.2f}",
             f"{p['sent']['protect'][1] / p['sent']['protect'][0]:,.0f}",
             f"{p['node_messages']:.1f}", f"{p['node_bytes']:,.0f}",
             f"{p['cpu_state_s']:.2f} (done {p['cpu_by_handler_s'].get('done', 0):.2f})", f"{p['cpu_codec_s']:.2f}",
             f"{p['resend']['cpu_s']:.2f}"]
            for p in points]
    return ("Part 2: node 0's coordinator, one protection cycle (the real state machine and message codec, "
            "in this process)\n" + table(
                ["N", "k+m", "node 0 msgs sent / recv", "node 0 MB sent / recv", "protect bytes",
                 "msgs per other node", "coord. bytes per other node", "CPU s: state machine", "CPU s: JSON",
                 "CPU s per protect re-send"], rows)
            + f"\nfit: {fit['formula']}; " + ", ".join(f"{k} = {v:.3g}" for k, v in fit.items() if k != "formula"))


def flatness(results: list[dict]) -> str:
    """The claim: per-node messages and bytes flat in N, the coordinator's total O(N)."""
    lines = []
    for layout in LAYOUTS:
        rs = [r for r in results if r["layout"] == layout and "error" not in r and r["nodes"] > 1]
        if len(rs) < 2:
            continue
        a, b = rs[0], rs[-1]
        sa, sb = a["summary"], b["summary"]
        coord = lambda s: s["coordinator"]["coord_sent"] + s["coordinator"]["coord_received"]  # noqa: E731
        node = lambda s: s["others"]["coord_sent"] + s["others"]["coord_received"]  # noqa: E731
        lines.append(f"{layout}: N {a['nodes']} -> {b['nodes']} ({b['nodes'] / a['nodes']:.0f}x): coordination "
                     f"messages per other node {node(sa):.1f} -> {node(sb):.1f} ({node(sb) / node(sa):.2f}x), bytes "
                     f"per other node {sa['others']['bytes_sent'] / a['S']:.3f} S -> "
                     f"{sb['others']['bytes_sent'] / b['S']:.3f} S, node 0's coordination messages "
                     f"{coord(sa):.0f} -> {coord(sb):.0f} ({coord(sb) / coord(sa):.2f}x); TCP connections per node "
                     f"{sa['memory']['tcp']:.0f} -> {sb['memory']['tcp']:.0f}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 2, 4 only; the coordinator at 960 and 1920 nodes")
    p.add_argument("--nodes", default="2,4,8", help="local cluster sizes (default 2,4,8)")
    p.add_argument("--parity", type=int, default=1, help="m, the same for every size (default 1)")
    p.add_argument("--mib", type=int, default=32, help="S, MiB per node (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="measured protection cycles per cluster (default 5)")
    p.add_argument("--idle", type=float, default=3.0, help="seconds without snapshots measured (default 3)")
    p.add_argument("--hold-round", type=float, default=3.0,
                   help="one more run, groups of 2 at the second size, with every round held open this many "
                        "seconds (counts the coordinator's re-sends during long rounds; 0: skip; default 3)")
    p.add_argument("--coordinator-nodes", help="part 2 sizes (default 960,1920,3840,9600)")
    p.add_argument("--skip-clusters", action="store_true", help="part 2 only")
    p.add_argument("--out", default=str(REPO / "bench-results"), help="directory of the JSON results")
    a = p.parse_args(argv)
    a.nodes = [2, 4] if a.quick else [int(x) for x in a.nodes.split(",")]
    a.coordinator_nodes = ([960, 1920] if a.quick else COORD_NODES) if not a.coordinator_nodes else \
        [int(x) for x in a.coordinator_nodes.split(",")]
    if any(n < 2 or n % 2 for n in a.nodes) or not 1 <= a.parity:
        p.error("--nodes must be even sizes >= 2 (groups of 2), --parity >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, sigterm_to_exit)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    revision = ftd_revision()
    print(f"bench_scale: ftd {revision}; {os.cpu_count()} cores; S = {args.mib} MiB per node; m = {args.parity}",
          flush=True)
    t_start = time.monotonic()
    results: list[dict] = []
    if not args.skip_clusters:
        for layout, group_size in LAYOUTS.items():
            for nodes in args.nodes:
                if (group_size or nodes) <= args.parity or (not group_size and nodes == 2):
                    continue  # no room for m parity; one group of 2 is the "groups of 2" cluster
                print(f"== {layout}, N = {nodes}", flush=True)
                r = measure_cluster(nodes, args.parity, group_size, args.mib * MiB, args.rounds, args.idle)
                r["layout"] = layout
                if "error" not in r:
                    r["summary"] = per_node_summary(r)
                else:
                    print(f"   FAILED: {r['error']}", flush=True)
                results.append(r)
        if args.hold_round > 0 and len(args.nodes) > 1:
            nodes = args.nodes[1]
            print(f"== groups of 2, N = {nodes}, every round held open {args.hold_round:g} s", flush=True)
            r = measure_cluster(nodes, args.parity, 2, args.mib * MiB, min(args.rounds, 3), args.idle,
                                hold_round=args.hold_round)
            r["layout"] = f"groups of 2, rounds held {args.hold_round:g} s"
            if "error" not in r:
                r["summary"] = per_node_summary(r)
            results.append(r)
    points = []
    for k, m in COORD_SHAPES:
        for nodes in args.coordinator_nodes:
            if nodes % (k + m):
                continue
            t0 = time.monotonic()
            points.append(drive_coordinator(nodes, k, m))
            print(f"== coordinator, N = {nodes}, k+m = {k}+{m}: {time.monotonic() - t0:.1f} s", flush=True)
    fit = fit_coordinator(points) if len(points) >= 2 else None
    elapsed = time.monotonic() - t_start

    print()
    if results:
        print(report_part1(results) + "\n")
        print(report_idle(results) + "\n")
        print(flatness(results) + "\n")
    if fit:
        print(report_part2(points, fit) + "\n")
    print(f"command: {command}\nelapsed: {elapsed:.0f} s")
    out = Path(args.out) / f"bench_scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "ftd_revision": revision, "cpus": os.cpu_count(),
                               "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kinds": KIND_OF,
                               "clusters": results, "coordinator": points, "coordinator_fit": fit,
                               "elapsed_s": elapsed}, indent=1, default=str))
    print(f"results: {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
