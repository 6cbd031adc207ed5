"""Prometheus metrics of a daemon, served on an opt-in port (``metrics_port``; ``ftd daemon --metrics-port``).

Two kinds, so that a scrape never touches the daemon's state from another thread:
  * events the loop observes as they happen (``on_request``): snapshots committed and skipped, the
    trainer's blocked time, copy and commit times, as prometheus_client counters and histograms
    (thread-safe);
  * a view of the daemon's state (memory held against the budget, steps, protection lag, rounds,
    rebuilds, flushes, invalid messages), which the loop rebuilds at most every REFRESH_SECONDS
    (``tick``) from the catalog's, the cluster node's and the flusher's status and publishes by one
    assignment; the scrape thread only reads the published view.

prometheus_client (the optional extra ``ftd[metrics]``) runs the HTTP server on its own thread. The
daemon side never imports torch; this module is imported only when metrics_port is set.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable

from ftd.errors import ConfigError

if TYPE_CHECKING:
    from ftd.daemon.server import Daemon

log = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
TIME_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _prometheus():
    try:
        import prometheus_client
        from prometheus_client import core
    except ImportError:
        raise ConfigError("metrics_port is set, but the prometheus-client package is not installed: "
                          "pip install 'ftd[metrics]' (or unset metrics_port)") from None
    return prometheus_client, core


class DaemonMetrics:
    """Call order (the daemon's loop): ``start()``; ``on_request`` after each control request; ``tick``
    between requests; ``close()`` at shutdown."""

    def __init__(self, daemon: "Daemon"):
        prom, self._core = _prometheus()
        self.daemon = daemon
        self.registry = prom.CollectorRegistry()
        self.labels = {"ftd_job": daemon.config.job, "node": str(daemon.config.node_rank)}
        names = list(self.labels)
        self.committed = prom.Counter("ftd_snapshots_committed", "snapshots committed, per trainer rank",
                                      names + ["rank"], registry=self.registry)
        self.skipped = prom.Counter(
            "ftd_snapshots_skipped", "snapshots the daemon saw and that produced no version, by reason: busy (both "
            "buffers of the rank hold versions still needed), refused (memory budget or reserve, or another "
            "refusal at begin), aborted (the trainer gave it up after begin)", names + ["reason"], registry=self.registry)
        self.blocked = prom.Histogram("ftd_trainer_blocked_seconds", "time the trainer was blocked per snapshot "
                                      "(inside snapshot() and the optimizer pre-step wait)", names + ["rank"],
                                      buckets=TIME_BUCKETS, registry=self.registry)
        self.copy = prom.Histogram("ftd_snapshot_copy_seconds", "background copy and checksums of one snapshot",
                                   names + ["rank"], buckets=TIME_BUCKETS, registry=self.registry)
        self.commit = prom.Histogram("ftd_commit_seconds", "the daemon's handling of one commit (the version's "
                                     "sidecar written, a round or flush considered)", names,
                                     buckets=TIME_BUCKETS, registry=self.registry)
        self.registry.register(_StateCollector(self))
        self.view: dict[str, Any] = {}
        self._refreshed = 0.0
        self._rebuilds_seen: set[float] = set()
        self.rebuild_counts = {"ok": 0, "failed": 0}
        self.rebuild_fetched = 0
        self._server = None
        self._prom = prom

    def start(self) -> None:
        c = self.daemon.config
        try:
            self._server, _ = self._prom.start_http_server(c.metrics_port, addr=c.metrics_host, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {c.metrics_host}:{c.metrics_port}: {e}; choose another "
                              "metrics_port") from None
        self.tick(force=True)

    @property
    def url(self) -> str:
        return f"http://{self.daemon.config.metrics_host}:{self.daemon.config.metrics_port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ---- events (the loop) ----------------------------------------------------------------------
    def on_request(self, kind: str, fields: dict, result: dict | None, seconds: float) -> None:
        """A control request was answered: ``result`` is its reply, None if it was refused."""
        lab = self.labels
        if kind == "begin":
            if result is None:
                self.skipped.labels(**lab, reason="refused").inc()
            elif "busy" in result:
                self.skipped.labels(**lab, reason="busy").inc()
        elif kind == "abort" and result is not None:
            self.skipped.labels(**lab, reason="aborted").inc()
        elif kind == "commit" and result is not None:
            rank = self._rank_of(fields.get("session"))
            self.committed.labels(**lab, rank=rank).inc()
            self.commit.labels(**lab).observe(seconds)
            for histogram, key in ((self.blocked, "blocked_seconds"), (self.copy, "copy_seconds")):
                value = fields.get(key)
                if isinstance(value, (int, float)) and value >= 0:
                    histogram.labels(**lab, rank=rank).observe(value)

    def _rank_of(self, session: Any) -> str:
        for entry in self.daemon.catalog.ranks.values():
            if entry.session == session:
                return str(entry.rank)
        return "unknown"

    # ---- the state view (the loop) ----------------------------------------------------------------
    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed < REFRESH_SECONDS:
            return
        self._refreshed = now
        try:
            self.view = self._build_view()
        except Exception:  # metrics must never take the daemon down
            log.exception("could not refresh the metrics view")

    def _build_view(self) -> dict[str, Any]:
        d = self.daemon
        cat = d.catalog.status()
        ranks = cat["ranks"]
        view: dict[str, Any] = {
            "used": cat["used"], "budget": cat["budget"], "ranks": len(ranks),
            "newest": {r["rank"]: max((v["step"] for v in r["versions"]), default=-1) for r in ranks},
            "recoverable": d.catalog.newest_common(), "invalid_control": d.invalid_requests,
            "uptime": time.time() - d.started_at,
        }
        if d.node is not None:
            cl = d.node.status()
            view["used"] += cl["parity_bytes"]
            view.update(recoverable=cl["recoverable"], parity=cl["parity_bytes"], rebuilding=cl["rebuilding"] is not None,
                        rounds=(cl["stats"]["rounds_done"], cl["stats"]["rounds_aborted"]),
                        invalid_peers=cl["stats"]["invalid_messages"], lag=cl["stats"]["protection_lag"])
            for outcome in cl["rebuilds"]:
                if outcome["at"] not in self._rebuilds_seen:
                    self._rebuilds_seen.add(outcome["at"])
                    self.rebuild_counts["ok" if outcome["ok"] else "failed"] += 1
                    self.rebuild_fetched += outcome.get("fetched_bytes", 0) if outcome["ok"] else 0
        if d.flusher is not None:
            fl = d.flusher
            view["flushes"] = {"done": fl.flushed, "failed": fl.failures, "superseded": fl.queue.superseded}
        return view


class _StateCollector:
    """Metric families from the published view; runs on the scrape thread and reads only that view."""

    def __init__(self, metrics: DaemonMetrics):
        self.m = metrics

    def describe(self) -> list:
        return []  # families come and go with the daemon's kind (standalone, cluster, flush)

    def collect(self) -> Iterable:
        core, m, view = self.m._core, self.m, self.m.view
        names, values = list(m.labels), list(m.labels.values())

        def gauge(name: str, doc: str, value: float):
            g = core.GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, by: str, counts: dict):
            c = core.CounterMetricFamily(name, doc, labels=names + [by])
            for key, value in counts.items():
                c.add_metric(values + [key], value)
            return c

        if not view:
            return
        yield gauge("ftd_memory_used_bytes", "shared memory held: trainers' buffers and parity for the peers", view["used"])
        yield gauge("ftd_memory_budget_bytes", "the daemon's memory budget (memory_budget)", view["budget"])
        yield gauge("ftd_ranks", "trainer ranks registered with this daemon", view["ranks"])
        newest = core.GaugeMetricFamily("ftd_newest_step", "newest committed step, per rank (-1: none)",
                                        labels=names + ["rank"])
        for rank, step in sorted(view["newest"].items()):
            newest.add_metric(values + [str(rank)], step)
        yield newest
        yield gauge("ftd_recoverable_step", "newest step a restore would serve: the cluster's recoverable step, "
                    "or on a standalone node the newest step every rank holds (-1: none)", view["recoverable"])
        yield gauge("ftd_daemon_uptime_seconds", "seconds since the daemon started", view["uptime"])
        invalid = {"control": view["invalid_control"]}
        if "invalid_peers" in view:
            invalid["peers"] = view["invalid_peers"]
        yield counter("ftd_invalid_messages", "messages dropped or refused as malformed", "source", invalid)
        if "lag" in view:
            lag = view["lag"]
            s = core.SummaryMetricFamily("ftd_protection_lag_seconds", "commit of a step by the node's last rank -> "
                                         "that step recoverable on every node", labels=names)
            s.add_metric(values, count_value=lag["count"], sum_value=lag["total_seconds"])
            yield s
            yield gauge("ftd_protection_lag_max_seconds", "longest protection lag so far", lag["max_seconds"])
            yield gauge("ftd_parity_bytes", "parity held for the group's peers", view["parity"])
            yield counter("ftd_protection_rounds", "protection rounds, by outcome", "outcome",
                          {"done": view["rounds"][0], "aborted": view["rounds"][1]})
            yield counter("ftd_rebuilds", "rebuilds of this node's snapshots from its peers, by outcome",
                          "outcome", dict(m.rebuild_counts))
            fetched = core.CounterMetricFamily("ftd_rebuild_fetched_bytes", "bytes fetched from peers by rebuilds",
                                               labels=names)
            fetched.add_metric(values, m.rebuild_fetched)
            yield fetched
            yield gauge("ftd_rebuilding", "1 while a rebuild runs", 1 if view["rebuilding"] else 0)
        if "flushes" in view:
            yield counter("ftd_flushes", "flushes to disk, by outcome", "outcome", view["flushes"])
