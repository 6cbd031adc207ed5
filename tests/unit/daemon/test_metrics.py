"""The daemon's Prometheus endpoint (``metrics_port``): what a scrape of /metrics says after a trainer
snapshotted, a snapshot was refused for the budget and a malformed request arrived. A daemon served
from a thread of the test; the scrape is a real HTTP request.
"""
from __future__ import annotations

import dataclasses
import re
import types

import pytest
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

import ftd
from ftd.config import Config
from ftd.daemon.server import Daemon
from ftd.util.procs import free_ports, wait_for

from support.jobs import ROOT
from support.metrics import scrape


def test_the_endpoint_reports_commits_skips_times_memory_steps_and_invalid_messages(thread_daemon):
    port = free_ports(1)[0]
    d = thread_daemon(metrics_port=port, memory_budget=16 << 20)
    state = {"w": torch.nn.Linear(64, 64)}
    with ftd.Client(d.endpoint, capture_rng=False) as client:
        for step in range(4):
            client.snapshot(step, state)
            assert client.wait(10)
        client.snapshot(4, {"big": torch.zeros(4 << 20)})  # 16 MiB, two buffers: over the 16 MiB budget
        client.wait(10)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(d.endpoint)
    sock.send(b"not json")
    sock.recv()
    sock.close(0)

    m = {}
    wait_for(lambda: m.update(scrape(port)) or m.get(("ftd_invalid_messages_total", (("source", "control"),))) == 1,
             10, "the metrics view to catch up")
    assert m[("ftd_snapshots_committed_total", (("rank", "0"),))] == 4
    assert m[("ftd_snapshots_skipped_total", (("reason", "refused"),))] == 1
    assert m[("ftd_trainer_blocked_seconds_count", (("rank", "0"),))] == 4
    assert m[("ftd_snapshot_copy_seconds_count", (("rank", "0"),))] == 4
    assert m[("ftd_commit_seconds_count", ())] == 4 and m[("ftd_commit_seconds_sum", ())] > 0
    assert m[("ftd_memory_budget_bytes", ())] == 16 << 20
    assert 0 < m[("ftd_memory_used_bytes", ())] <= 16 << 20
    assert m[("ftd_newest_step", (("rank", "0"),))] == 3
    assert m[("ftd_recoverable_step", ())] == 3
    assert m[("ftd_ranks", ())] == 1
    assert not any(name.startswith(("ftd_protection", "ftd_rebuild", "ftd_flushes")) for name, _ in m)  # standalone


def test_a_port_in_use_is_a_clear_error(thread_daemon):
    port = free_ports(1)[0]
    first = thread_daemon(metrics_port=port)
    second = Daemon(dataclasses.replace(first.config, job=first.config.job + "b"))
    try:
        with pytest.raises(ftd.FtdError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
            second.start()
    finally:
        second.close()


def test_metrics_port_is_validated():
    with pytest.raises(ValueError, match="metrics_port must be a TCP port"):
        Config(metrics_port=70000)


def test_every_family_of_a_cluster_node_and_the_example_dashboard_uses_only_those():
    from prometheus_client import generate_latest

    from ftd.daemon.metrics import DaemonMetrics
    fake = types.SimpleNamespace(config=types.SimpleNamespace(job="j", node_rank=2),
                                 catalog=types.SimpleNamespace(ranks={}))
    m = DaemonMetrics(fake)
    m.on_request("begin", {}, {"busy": "both buffers held"}, 0.0)
    m.on_request("commit", {"session": "s", "copy_seconds": 0.01, "blocked_seconds": 0.001}, {}, 0.0002)
    m.view = {"used": 30, "budget": 100, "ranks": 1, "newest": {0: 9}, "recoverable": 8, "invalid_control": 0,
              "uptime": 5.0, "parity": 10, "rebuilding": False, "rounds": (4, 1), "invalid_peers": 2,
              "lag": {"count": 4, "total_seconds": 0.4, "max_seconds": 0.2, "last_seconds": 0.1},
              "flushes": {"done": 1, "failed": 0, "superseded": 2}}
    m.rebuild_counts["ok"], m.rebuild_fetched = 1, 1 << 20
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    assert {"ftd_protection_lag_seconds", "ftd_protection_rounds", "ftd_rebuilds", "ftd_rebuild_fetched_bytes",
            "ftd_flushes", "ftd_parity_bytes", "ftd_rebuilding", "ftd_memory_used_bytes"} <= set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("ftd_protection_lag_seconds_count", (("ftd_job", "j"), ("node", "2")))] == 4
    assert samples[("ftd_invalid_messages_total", (("ftd_job", "j"), ("node", "2"), ("source", "peers")))] == 2
    used = set(re.findall(r"\bftd_[a-z_]+", (ROOT / "configs" / "grafana-ftd.json").read_text())) - {"ftd_job"}
    known = {n for f in families.values() for s in f.samples for n in (s.name, f.name)}
    assert used and used <= known, f"the dashboard asks for metrics the daemon does not serve: {used - known}"
