#!/usr/bin/env python3
"""What ftd buys at 1,000-10,000 nodes, against F-way replication and disk-only checkpoints: a model.

    .venv/bin/python scripts/scale_model.py                    # table + scripts/figures/scale-model.png (~10 s)
    .venv/bin/python scripts/scale_model.py --measured bench-results/bench_scale-<stamp>.json \\
        --chaos bench-results/chaos.json bench-results/chaos-6.json

Failures: Llama 3 405B's published interruptions (``ftd/scale/failures.py``: which take a host's memory,
which only kill processes, which a whole rack). For each cluster size, each group shape k + m of ftd and
each replication factor F, consecutive and rack-strided placement (ftd's own ``Grouping``), and disk-only
checkpoints every T minutes: the probability that a failure is recoverable from memory, steps lost per
failure and per day, the effective training time ratio, memory and network per node and snapshot, the
coordination per node and at node 0 (``ftd/scale/costs.py``).

Checked against reality: the coordination inputs come from ``scripts/bench_scale.py`` (its committed
figures are the defaults; ``--measured FILE`` reads a fresh run and prints the model next to it), and a
Monte Carlo run of the model on the chaos suite's clusters (N = 4, m = 1 and N = 6, m = 2) is set against
what ``scripts/chaos.py`` saw (``--chaos FILE...``, its JSON reports), failure by failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from ftd.scale import failures  # noqa: E402
from ftd.scale.costs import DISK, FTD, REPLICAS, Coordination, GiB, Strategy, Workload, evaluate  # noqa: E402
from ftd.scale.measured import against_bench, coordination_from_bench  # noqa: E402
from ftd.scale.survival import Placement, closed_form, loss_recoverable, monte_carlo  # noqa: E402

NODES = [960, 1920, 3840, 7680, 9600]  # about 1k-10k, multiples of 240 so that every default shape tiles them
PLOT = REPO / "scripts" / "figures" / "scale-model.png"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--nodes", default=",".join(map(str, NODES)), help="cluster sizes (default %(default)s)")
    add("--shapes", default="4x1,8x2", help="ftd group shapes k x m (default %(default)s)")
    add("--replicas", default="2,3", help="replication factors F (default %(default)s)")
    add("--rack-nodes", type=int, default=2, help="nodes per rack, one top-of-rack switch (Llama 3: 2 hosts of 8 GPUs)")
    g = p.add_argument_group("failures (defaults: Llama 3 405B, 419 interruptions in 54 days on 16,384 GPUs)")
    g.add_argument("--interruptions", type=int, default=419)
    g.add_argument("--days", type=float, default=failures.LLAMA3_DAYS)
    g.add_argument("--gpus", type=int, default=failures.LLAMA3_GPUS)
    g.add_argument("--gpus-per-node", type=int, default=failures.LLAMA3_GPUS_PER_HOST)
    g.add_argument("--switch-share", type=float, default=0.5, help="network failures that take a whole rack")
    w = p.add_argument_group("the job and its machines")
    w.add_argument("--state-gib", type=float, default=50.0, help="snapshot per node (405B bf16 weights on a 16-node "
                   "model-parallel group: 810 GB / 16, plus sharded optimizer state)")
    w.add_argument("--step-s", type=float, default=6.0, help="training step (405B, 16M tokens, 16k H100s: ~6 s)")
    w.add_argument("--net-gbps", type=float, default=100.0, help="snapshot traffic per node, each way, Gb/s")
    w.add_argument("--rs-gbs", type=float, default=1.0, help="Reed-Solomon encode per core at m = 2, GB/s (measured)")
    w.add_argument("--xor-gbs", type=float, default=13.0, help="XOR parity per core, GB/s (measured)")
    w.add_argument("--encode-cores", type=int, default=4)
    w.add_argument("--copy-gbs", type=float, default=25.0, help="host memory -> GPUs of a node, GB/s")
    w.add_argument("--restart-min", type=float, default=5.0, help="failure -> training again, restore excluded")
    w.add_argument("--storage-tbs", type=float, default=2.0, help="shared file system, whole cluster, TB/s "
                   "(Llama 3's Tectonic: 2 sustained, 7 peak)")
    w.add_argument("--disk-every-min", type=float, default=30.0, help="checkpoints to disk (and ftd's flushes)")
    w.add_argument("--window-min", type=float, help="vulnerability window after a loss (default: restart + "
                   "rebuild + one round)")
    w.add_argument("--ftd-overhead", type=float, default=0.008, help="training slowdown of a snapshot every step")
    w.add_argument("--cpu-speedup", type=float, default=1.0, help="node 0's core against the measuring VM's")
    add("--coordinator", choices=("today", "linear"), default="today",
        help="node 0's coordinator as measured today (its CPU grows with N^2), or an O(N) one (what a fix "
             "would give); the other is shown beside it")
    add("--measured", help="a bench_scale.py JSON report: its figures replace the defaults, printed side by side")
    add("--chaos", nargs="*", default=[], help="chaos.py JSON reports to set the model against")
    add("--mc-samples", type=int, default=200_000, help="Monte Carlo samples per check (default %(default)s)")
    add("--plot", default=str(PLOT), help="the PNG (default %(default)s); 'none' for no plot")
    add("--json", help="write every outcome to this JSON file")
    a = p.parse_args(argv)
    try:
        a.nodes = [int(x) for x in a.nodes.split(",")]
        a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
        a.replicas = [int(x) for x in a.replicas.split(",") if x]
    except ValueError:
        p.error("--nodes, --shapes (KxM,...) and --replicas take comma-separated integers")
    if any(len(s) != 2 or min(s) < 1 for s in a.shapes) or any(f < 2 for f in a.replicas):
        p.error("every shape needs k, m >= 1 and every replication factor F >= 2")
    positive = ("step_s", "net_gbps", "rs_gbs", "xor_gbs", "encode_cores", "copy_gbs", "storage_tbs", "disk_every_min",
                "days", "gpus", "gpus_per_node", "cpu_speedup", "rack_nodes")
    bad = [f"--{k.replace('_', '-')}" for k in positive if getattr(a, k) <= 0]
    bad += [f"--{k.replace('_', '-')}" for k in ("state_gib", "restart_min", "interruptions", "ftd_overhead")
            if getattr(a, k) < 0]
    if bad or min(a.nodes) < 1:
        p.error(f"these must be positive (sizes, rates, times) or at least zero: {', '.join(bad) or '--nodes'}")
    return a


def strategies(a: argparse.Namespace) -> list[Strategy]:
    out = [Strategy(FTD, k, m, strided) for k, m in a.shapes for strided in (False, True)]
    out += [Strategy(REPLICAS, 1, f - 1, strided) for f in a.replicas for strided in (False, True)]
    return out + [Strategy(DISK)]


def workload(a: argparse.Namespace, co: Coordination) -> Workload:
    return Workload(state_bytes=a.state_gib * GiB, step_s=a.step_s, net_bytes_per_s=a.net_gbps * 1e9 / 8,
                    rs_bytes_per_s=a.rs_gbs * 1e9, xor_bytes_per_s=a.xor_gbs * 1e9, encode_cores=a.encode_cores,
                    copy_bytes_per_s=a.copy_gbs * 1e9, restart_s=a.restart_min * 60,
                    storage_bytes_per_s=a.storage_tbs * 1e12, disk_every_s=a.disk_every_min * 60,
                    ftd_overhead=a.ftd_overhead, window_s=None if a.window_min is None else a.window_min * 60,
                    coordination=co)


# ---- printing ----------------------------------------------------------------------------------------
def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def pct(p: float | None, digits: int = 3) -> str:
    if p is None:
        return "-"
    return f"{100 * p:.{digits}f}%" if p < 0.99999 else f"{100 * p:.4f}%"


def size(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 1e6:.2f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


def finite(x: float, fmt) -> str:
    return fmt(x) if math.isfinite(x) else "-"


def outcome_rows(outcomes: list) -> list[list[str]]:
    rows = []
    for o in outcomes:
        if o.error:
            rows.append([o.strategy, f"{o.nodes:,}", f"n/a: {o.error[:60]}"] + [""] * 6)
        elif o.saturated:
            rows.append([o.strategy, f"{o.nodes:,}", "-", "-", "saturated", "-", "-", "-",
                         "node 0 cannot keep up with its re-sends"])
        else:
            rows.append([o.strategy, f"{o.nodes:,}", pct(o.p_memory), f"{o.p_day_from_memory:.3f}",
                         f"{o.round_s:,.1f} s", f"{o.steps_lost_per_failure:,.1f}", f"{o.steps_lost_per_day:,.0f}",
                         pct(o.ettr, 1), f"{o.hours_lost_per_day:.2f}"])
    return rows


def cost_rows(outcomes: list) -> list[list[str]]:
    rows = []
    for o in outcomes:
        if o.error:
            continue
        rows.append([o.strategy, f"{o.nodes:,}", size(o.memory_per_node), size(o.memory_per_node_buffered),
                     size(o.net_per_node)]
                    + ([finite(o.coordination_messages_per_node, "{:.0f}".format),
                        finite(o.coordination_bytes_per_node, size), f"{o.coordinator_cpu_s:.2f} s",
                        finite(o.coordinator_bytes, size)] if o.strategy.startswith("ftd") else ["-"] * 4))
    return rows


# ---- checks against reality --------------------------------------------------------------------------
CHAOS_SHAPES = {4: (3, 1), 6: (4, 2)}   # chaos.py's clusters: one group of N nodes, m parity
NO_MEMORY_LOST = ("worker", "daemon", "freeze", "memory")  # chaos kinds after which every host keeps its memory


def chaos_lost_nodes(event: dict) -> list[int]:
    """The nodes whose memory a chaos.py event took (its ``target`` names them for kind ``node``)."""
    return [int(x) for x in re.findall(r"\d+", event["target"])] if event["kind"] == "node" else []


def chaos_check(a: argparse.Namespace) -> tuple[str, list[dict]]:
    """On chaos.py's clusters: the model's probability that c nodes lost at once (and the kinds that lose no
    memory) are recoverable, closed form and Monte Carlo, next to what the chaos reports recorded."""
    reports = [json.loads(Path(p).read_text()) for p in a.chaos]
    lines, checks = [], []
    for nodes, (k, m) in CHAOS_SHAPES.items():
        events = [(rep.get("seed"), e) for rep in reports if rep.get("nodes") == nodes and rep.get("parity") == m
                  for e in rep.get("events", [])]
        for rep_seed, e in events:
            lost = chaos_lost_nodes(e)
            model = loss_recoverable(Placement(nodes, k, m), lost)
            seen = e.get("resumed_after", e["recoverable_before"]) >= e["recoverable_before"]
            checks.append({"nodes": nodes, "seed": rep_seed, "kind": e["kind"], "target": e["target"],
                           "lost": len(lost), "model_recoverable": model, "chaos_recovered_from_memory": seen,
                           "steps_rerun": e.get("steps_lost"), "agree": model == seen})
        rows = []
        cases = [("no memory lost: " + ", ".join(NO_MEMORY_LOST), 0)] + [(f"{c} node(s) at once", c)
                                                                        for c in range(1, m + 2)]
        for what, c in cases:
            if c == 0:
                mix = failures.FailureMix(0.0, {failures.PROCESS: 1.0, failures.HOST: 0.0, failures.RACK: 0.0})
                place = Placement(nodes, k, m)
            else:  # c nodes at once: a "rack" of c in the model (one group: which c does not matter)
                mix = failures.FailureMix(0.0, {failures.PROCESS: 0.0, failures.HOST: 0.0, failures.RACK: 1.0})
                place = Placement(nodes, k, m, rack_nodes=c)
            cf = closed_form(place, mix, 0.0)["any"]
            mc = monte_carlo(place, mix, 0.0, min(a.mc_samples, 50_000), seed=c)["any"]
            seen = [x for x in checks if x["nodes"] == nodes and x["lost"] == c]
            seen_text = (f"{sum(x['chaos_recovered_from_memory'] for x in seen)} of {len(seen)} recovered from memory"
                         if seen else ("tests/e2e/cluster/test_cluster.py: UnrecoverableLoss, restore from disk"
                                       if c == m + 1 else "not in these reports"))
            rows.append([what, f"{cf:.3f}", f"{mc[0]:.3f} ({mc[2]:,})", seen_text])
        lines.append(f"N = {nodes}, one group of {k}+{m}:\n" + table(
            ["failure", "model, closed form", "model, Monte Carlo", "seen"], rows))
    if a.chaos:
        agree = sum(c["agree"] for c in checks)
        lines.append(f"chaos reports {', '.join(a.chaos)}: {len(checks)} failures, the model agrees on {agree}")
        lines += [f"   DISAGREE: N={c['nodes']} seed {c['seed']} {c['kind']} {c['target']}" for c in checks
                  if not c["agree"]]
    else:
        lines.append("(no --chaos reports given: the 'seen' column lists none)")
    return "\n".join(lines), checks


def large_mc(a: argparse.Namespace, mix, work: Workload) -> str:
    """The closed form against a Monte Carlo at the smallest size, for every strategy, window losses included."""
    n = min(a.nodes)
    rows = []
    for s in strategies(a):
        if s.kind == DISK:
            continue
        try:
            place = Placement(n, s.k, s.m, a.rack_nodes, s.strided)
        except ValueError:
            continue
        q = 0.05  # a window far longer than the model's, so that window losses show up in the samples too
        cf, mc = closed_form(place, mix, q), monte_carlo(place, mix, q, min(a.mc_samples, 20_000), seed=1)
        rows.append([s.name, f"{cf['any']:.4f}", f"{mc['any'][0]:.4f} +- {mc['any'][1]:.4f}",
                     f"{abs(cf['any'] - mc['any'][0]) / mc['any'][1]:.1f}"])
    return (f"closed form against Monte Carlo at N = {n}, with a 5% chance that each host is lost in the window:\n"
            + table(["strategy", "closed form", "Monte Carlo", "|diff| / s.e."], rows))


def plot(path: Path, outcomes: list, other: list, title: str, other_label: str) -> None:
    """Survival, days from memory, ETTR and ftd's round time against N; ``other``: ftd's outcomes with the
    other coordinator, drawn thin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(o.strategy for o in outcomes))
    colour = {name: "0.3" if name == "disk only" else f"C{i // 2}" for i, name in enumerate(names)}
    style = lambda name: "--" if "consecutive" in name else "-" if "strided" in name else ":"  # noqa: E731
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    panels = [("P(a failure is NOT recoverable from memory), log", lambda o: max(1 - o.p_memory, 1e-9)),
              ("P(a day of training needs no restore from disk)", lambda o: o.p_day_from_memory),
              ("effective training time ratio", lambda o: o.ettr),
              ("ftd's protection round, s (log)", lambda o: o.round_s if o.strategy.startswith("ftd") else None)]

    def draw(ax, rows, f, thin):
        for name in names:
            pts = [(o.nodes, math.nan if o.saturated or f(o) is None else f(o)) for o in rows
                   if o.strategy == name and not o.error]
            if pts and not all(math.isnan(y) for _, y in pts):
                ax.plot(*zip(*pts), style(name), marker="o", ms=2 if thin else 3, lw=0.8 if thin else 1.6,
                        alpha=0.6 if thin else 1, color=colour[name], label=None if thin else name)

    for ax, (label, f) in zip(axes, panels):
        draw(ax, outcomes, f, False)
        draw(ax, other, f, True)
        ax.set_xlabel("nodes (8 GPUs each)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[3].set_yscale("log")
    for ax in axes:
        ax.text(0.02, 0.02, f"thin: {other_label}; missing points: node 0 saturated", transform=ax.transAxes,
                fontsize=7)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    mix = failures.published(interruptions=a.interruptions, days=a.days, gpus=a.gpus, gpus_per_node=a.gpus_per_node,
                             switch_share=a.switch_share)
    report, co, path = None, Coordination(cpu_speedup=a.cpu_speedup), a.measured
    try:
        if a.measured:
            report = json.loads(Path(a.measured).read_text())
            co = coordination_from_bench(report, a.cpu_speedup)
        for path in a.chaos:
            json.loads(Path(path).read_text())["events"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"scale_model: cannot use {path}: {type(e).__name__}: {e} (--measured takes the JSON report of "
              f"scripts/bench_scale.py, --chaos those of scripts/chaos.py)", file=sys.stderr)
        return 2
    today, linear = co, co.as_linear()
    if a.coordinator == "linear":
        co, other_co, other_label = linear, today, "ftd with today's coordinator"
    else:
        other_co, other_label = linear, "ftd with an O(N) coordinator"
    work = workload(a, co)
    print(f"failures: {mix.per_node_hour:.3g} per node-hour ({mix.per_node_hour / a.gpus_per_node:.3g} per GPU-hour); "
          + ", ".join(f"{k} {v:.1%}" for k, v in mix.shares.items())
          + "; job MTBF " + ", ".join(f"{n:,} nodes {1 / mix.per_hour(n):.1f} h" for n in a.nodes))
    print(f"job: S = {a.state_gib:g} GiB per node, step {a.step_s:g} s, {a.net_gbps:g} Gb/s per node for snapshots, "
          f"restart {a.restart_min:g} min, storage {a.storage_tbs:g} TB/s, disk every {a.disk_every_min:g} min, "
          f"racks of {a.rack_nodes}; coordination inputs: {'--measured ' + a.measured if report else 'defaults'}")
    outcomes = [evaluate(s, n, mix, work, a.rack_nodes) for s in strategies(a) for n in a.nodes]
    other = [evaluate(s, n, mix, workload(a, other_co), a.rack_nodes)
             for s in strategies(a) if s.kind == FTD for n in a.nodes]
    headers = ["strategy", "nodes", "P(failure from memory)", "P(day from memory)", "round", "steps lost/failure",
               "steps lost/day", "ETTR", "h lost/day"]
    print(f"\ncoordinator: {'as measured today' if co is today else 'O(N)'}\n" + table(headers, outcome_rows(outcomes)))
    print(f"\n{other_label}\n" + table(headers, outcome_rows(other)))
    print("\nper node and protected version (memory: the newest version with its redundancy; buffered: with the "
          "double buffering ftd keeps)\n" + table(
              ["strategy", "nodes", "memory", "buffered", "sent (= received)", "coord. msgs", "coord. bytes",
               "node 0 CPU/round", "node 0 sends/round"], cost_rows(outcomes)))
    if report:
        rows = [[r["layout"], str(r["nodes"]), f"{r['k']}+{r['m']}",
                 f"{r['messages_model']:.1f} / {r['messages_measured']:.1f}",
                 f"{r['coordinator_messages_model']:.0f} / {r['coordinator_messages_measured']:.0f}",
                 f"{r['sent_per_S_model']:.3f} / {r['sent_per_S_measured']:.3f}",
                 f"{r['held_per_S_model']:.3f} / {r['held_per_S_measured']:.3f}",
                 f"{r['shm_per_S_model']:.2f} / {r['shm_per_S_measured']:.2f}",
                 f"{2 * r['nodes'] - 1} / {r['tcp_per_node']:.0f}"] for r in against_bench(report, co)]
        print(f"\nmodel / measured ({a.measured}), per protected version\n" + table(
            ["layout", "N", "k+m", "coord. msgs per node", "node 0 coord. msgs", "sent per S", "held per S",
             "/dev/shm per S", "TCP conns per node (2N-1)"], rows))
    text, checks = chaos_check(a)
    print("\nthe model on chaos.py's clusters\n" + text)
    print("\n" + large_mc(a, mix, work))
    if a.plot != "none":
        plot(Path(a.plot), outcomes, other, f"ftd at scale (model): Llama 3 failure rates, {a.state_gib:g} GiB per "
             f"node, {a.step_s:g} s steps, racks of {a.rack_nodes}, disk every {a.disk_every_min:g} min, coordinator: "
             f"{'today' if co is today else 'O(N)'}; dashed: consecutive groups, solid: rack-strided", other_label)
        print(f"\nplot: {a.plot}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items()},
                                            "outcomes": [dataclasses.asdict(o) for o in outcomes],
                                            "other_coordinator": [dataclasses.asdict(o) for o in other],
                                            "chaos_checks": checks}, indent=1, default=str))
    print(f"elapsed {time.monotonic() - t0:.1f} s")
    return 0 if all(c["agree"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
