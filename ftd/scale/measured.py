"""The model's inputs from a measurement, and the model set against it. Pure: takes the JSON report of
``scripts/bench_scale.py`` as a dict.

``coordination_from_bench`` turns the report into ``costs.Coordination`` (messages per node and cycle, the
re-sends of a long round, bytes, node 0's CPU); ``against_bench`` lists, per measured cluster, what the
model says a node costs next to what the daemons counted.
"""
from __future__ import annotations

import statistics

from ftd.scale.costs import Coordination


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or len(set(xs)) < 2:
        return (statistics.mean(ys), 0.0)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def measured_clusters(report: dict, held: bool = False) -> list[dict]:
    """The clusters of part 1 that ran, with more than one node; ``held``: the ones whose rounds were held open."""
    return [r for r in report.get("clusters", []) if "summary" in r and r["nodes"] > 1
            and bool(r.get("hold_round_s")) == held]


def node_messages(r: dict) -> float:
    o = r["summary"]["others"]
    return o["coord_sent"] + o["coord_received"]


def coordination_from_bench(report: dict, cpu_speedup: float = 1.0) -> Coordination:
    normal = measured_clusters(report)
    if not normal:
        raise ValueError("the bench_scale report has no measured cluster (run it without --skip-clusters)")
    base = statistics.mean(node_messages(r) for r in normal)
    held = measured_clusters(report, held=True)
    resend = Coordination.resend_messages_per_node_s
    if held:
        resend = statistics.mean((node_messages(r) - base) / r["summary"]["others"]["lag_s"] for r in held)
    points = report.get("coordinator") or []
    fit = report.get("coordinator_fit")
    kwargs = {}
    if points:
        kwargs["node_bytes"] = _line([(p["nodes"], p["node_bytes"]) for p in points])
        kwargs["protect_bytes_per_node"] = statistics.mean(p["sent"]["protect"][1] / p["sent"]["protect"][0]
                                                           / p["nodes"] for p in points)
    if fit:
        kwargs["cycle_cpu"] = (fit["state_n2_over_g"], fit.get("state_n2", 0.0), fit["state_n"], fit["codec_n2"],
                               fit["codec_n"])
        kwargs["resend_cpu"] = (fit["resend_n2"], fit["resend_n"])
        if "small_message_s" in fit:
            kwargs["small_message_s"] = fit["small_message_s"]
    return Coordination(
        messages_per_node=base, resend_messages_per_node_s=resend,
        latency_s=min(r["summary"]["others"]["lag_s"] for r in normal),
        data_overhead=statistics.mean(r["summary"]["others"]["bytes_sent"] / (r["m"] * r["S"]) for r in normal),
        cpu_speedup=cpu_speedup, **kwargs)


def against_bench(report: dict, co: Coordination) -> list[dict]:
    """Per measured cluster: model and measurement of a node's cost per protected version."""
    rows = []
    for r in measured_clusters(report) + measured_clusters(report, held=True):
        s, k, m, S = r["summary"], r["k"], r["m"], r["S"]
        lag = s["others"]["lag_s"]
        held = bool(r.get("hold_round_s"))
        rows.append({
            "layout": r["layout"], "nodes": r["nodes"], "k": k, "m": m,
            "messages_model": co.messages_per_node + (co.resend_messages_per_node_s * lag if held else 0.0),
            "messages_measured": node_messages(r),
            "coordinator_messages_model": (co.messages_per_node + (co.resend_messages_per_node_s * lag if held else 0))
            * (r["nodes"] - 1),
            "coordinator_messages_measured": s["coordinator"]["coord_sent"] + s["coordinator"]["coord_received"],
            "sent_per_S_model": m * co.data_overhead, "sent_per_S_measured": s["others"]["bytes_sent"] / S,
            "held_per_S_model": 1 + m / k,
            "held_per_S_measured": (s["memory"]["data_bytes"] + s["memory"]["parity_bytes"]) / S,
            "shm_per_S_model": 2 * (1 + m / k), "shm_per_S_measured": s["memory"]["shm_bytes"] / S,
            "tcp_per_node": s["memory"]["tcp"],
        })
    return rows
