"""Prometheus metrics of a cluster member, from a real ``ftd daemon`` process: a 2-node cluster (m = 1)
trains, node 0 is lost and its replacement daemon starts with ``metrics_port`` set; it rebuilds from
node 1, the trainers resume, and /metrics reports the rebuild and the bytes it fetched, the
recoverable step the nodes agree on, the protection rounds and their lag, the parity held.
"""
from __future__ import annotations

import pytest

import ftd
from ftd.util.procs import free_ports, wait_for

from support.clusters import LocalCluster
from support.metrics import scrape


@pytest.mark.timeout(120)
def test_a_rebuilt_cluster_node_reports_rebuild_protection_and_recoverable_step():
    c = LocalCluster(2, 1)
    try:
        c.run_trainers(8, step_sleep=0.05)
        c.settled()
        port = free_ports(1)[0]
        with open(c.config(0), "a") as f:
            f.write(f"\nmetrics_port = {port}\n")
        c.kill_node(0)
        c.restart_daemon(0)  # rebuilds node 0 from node 1's data and parity
        resumed = c.run_trainers(16, step_sleep=0.05)
        assert resumed[0] is not None and resumed[0] == resumed[1]
        recoverable = c.settled()
        m = {}
        wait_for(lambda: m.update(scrape(port)) or m.get(("ftd_recoverable_step", ())) == recoverable, 10,
                 "the metrics view to show the settled step")
        assert m[("ftd_rebuilds_total", (("outcome", "ok"),))] == 1
        assert m[("ftd_rebuild_fetched_bytes_total", ())] > 0
        assert m[("ftd_protection_rounds_total", (("outcome", "done"),))] >= 1
        assert m[("ftd_protection_lag_seconds_count", ())] >= 1 and m[("ftd_protection_lag_seconds_sum", ())] > 0
        assert m[("ftd_parity_bytes", ())] > 0
        assert m[("ftd_snapshots_committed_total", (("rank", "0"),))] >= 1
        assert m[("ftd_rebuilding", ())] == 0
        assert m[("ftd_invalid_messages_total", (("source", "peers"),))] == 0
        st = ftd.status(c.endpoints[0])  # the Python status API says the same
        assert st.cluster.recoverable == recoverable and st.cluster.last_rebuild["ok"]
        with open(f"/proc/{st.pid}/maps") as f:  # prometheus_client in, torch still out
            assert not [line for line in f if "libtorch" in line], "the daemon with metrics on loaded torch"
    finally:
        assert not c.close(), "shared memory left behind"
