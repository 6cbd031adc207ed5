"""The cost model: its arithmetic on cases worked by hand, the coordinator's saturation, the inputs read
from a bench_scale report, and the published failure mix."""
from __future__ import annotations

import math

import pytest

from ftd.scale import failures
from ftd.scale.costs import DISK, FTD, REPLICAS, Coordination, GiB, Strategy, Workload, _steps_behind, evaluate
from ftd.scale.measured import against_bench, coordination_from_bench

pytestmark = pytest.mark.timeout(30)


def test_the_published_mix():
    mix = failures.published()
    assert sum(n for _, n, _ in failures.LLAMA3_INTERRUPTIONS) == 419
    assert mix.per_node_hour / 8 == pytest.approx(419 / (54 * 24 * 16384))   # ~2e-5 per GPU-hour
    assert 1 / mix.per_hour(2048) == pytest.approx(3.09, abs=0.01)          # one interruption every ~3 h
    assert mix.shares[failures.PROCESS] == pytest.approx(69 / 419)
    assert mix.shares[failures.RACK] == pytest.approx(17.5 / 419)
    with pytest.raises(ValueError, match="sum"):
        failures.FailureMix(1e-4, {"process": 0.5, "host": 0.6, "rack": 0.0})


def test_steps_behind_the_recoverable_version():
    assert _steps_behind(0.5, 1.0) == pytest.approx(0.5)   # a round shorter than a step: every step protected
    assert _steps_behind(1.0, 1.0) == pytest.approx(1.0)
    assert _steps_behind(3.0, 1.0) == pytest.approx(1 + 3)  # every 3rd step: (3 - 1)/2 + 3


def test_disk_only_by_hand():
    mix = failures.FailureMix(1e-3, {"process": 0.0, "host": 1.0, "rack": 0.0})
    work = Workload(state_bytes=10 * GiB, step_s=10.0, storage_bytes_per_s=100 * GiB, disk_every_s=600.0,
                    restart_s=60.0, stage_bytes_per_s=10 * GiB)
    o = evaluate(Strategy(DISK), 100, mix, work)
    io = 100 * 10 / 100  # 10 s to write (and to read) every node's 10 GiB
    lost = 60 + io + (600 / 2 + io)
    assert o.p_memory == 0.0 and o.round_s == pytest.approx(io)
    assert o.steps_lost_per_failure == pytest.approx((300 + io) / 10)
    assert o.ettr == pytest.approx((1 - 1 / 600) / (1 + 0.1 * lost / 3600))
    assert o.failures_per_day == pytest.approx(2.4)


def test_ftd_by_hand_and_replication_alike():
    mix = failures.FailureMix(1e-3, {"process": 0.5, "host": 0.5, "rack": 0.0})
    co = Coordination(latency_s=0.0, data_overhead=1.0, cycle_cpu=(0, 0, 0, 0, 0), resend_cpu=(0, 0))
    work = Workload(state_bytes=10 * GiB, step_s=10.0, net_bytes_per_s=GiB, xor_bytes_per_s=100 * GiB,
                    encode_cores=1, copy_bytes_per_s=10 * GiB, restart_s=60.0, ftd_overhead=0.01,
                    window_s=0.0, coordination=co)
    o = evaluate(Strategy(FTD, 4, 1), 100, mix, work)
    assert o.round_s == pytest.approx(10)          # 10 GiB through 1 GiB/s; re-sends cost nothing here
    assert o.memory_per_node == pytest.approx(12.5 * GiB) and o.net_per_node == pytest.approx(10 * GiB)
    assert o.p_memory == 1.0
    behind = _steps_behind(o.round_s, 10.0) * 10.0
    lost = 0.5 * (60 + 1 + behind) + 0.5 * (60 + (5 * 10 + 10 / 10) + behind)  # local copy / fetch g S + copy
    assert o.ettr == pytest.approx(0.99 / (1 + 0.1 * lost / 3600))
    r = evaluate(Strategy(REPLICAS, 1, 2), 99, mix, work)   # F = 3: 3 S held, 2 S sent, no coordinator
    assert r.memory_per_node == pytest.approx(30 * GiB) and r.net_per_node == pytest.approx(20 * GiB)
    assert r.coordinator_cpu_s == 0.0 and r.round_s == pytest.approx(20)
    assert evaluate(Strategy(FTD, 4, 1), 101, mix, work).error  # 101 nodes do not split into groups of 5


def test_the_coordinator_saturates_when_a_resend_outlasts_its_interval():
    mix = failures.published()
    work = Workload(coordination=Coordination(resend_cpu=(1e-7, 0.0)))
    small = evaluate(Strategy(FTD, 4, 1, True), 960, mix, work)     # a re-send: 0.09 s of every second
    large = evaluate(Strategy(FTD, 4, 1, True), 9600, mix, work)    # 9.2 s of every second
    assert not small.saturated and math.isfinite(small.round_s) and small.ettr
    assert large.saturated and large.ettr is None
    fixed = evaluate(Strategy(FTD, 4, 1, True), 9600, mix, Workload(coordination=work.coordination.as_linear()))
    assert not fixed.saturated and fixed.coordination_bytes_per_node == pytest.approx(work.coordination.node_bytes[0])


def _report():
    def cluster(layout, nodes, msgs, lag, hold=0.0):
        others = {"coord_sent": msgs - 3, "coord_received": 3, "bytes_sent": 1.0 * (32 << 20), "lag_s": lag}
        return {"layout": layout, "nodes": nodes, "k": 1, "m": 1, "S": 32 << 20, "hold_round_s": hold,
                "summary": {"others": others, "coordinator": {"coord_sent": 3 * (nodes - 1),
                                                              "coord_received": 4 * (nodes - 1)},
                            "memory": {"data_bytes": 32 << 20, "parity_bytes": 32 << 20, "shm_bytes": 128 << 20,
                                       "tcp": 2 * nodes - 1}}}
    return {"clusters": [cluster("groups of 2", 2, 7, 0.05), cluster("groups of 2", 8, 7, 0.2),
                         cluster("held", 4, 13, 3.0, hold=3.0)],
            "coordinator": [{"nodes": n, "node_bytes": 500 + 12 * n, "sent": {"protect": [n - 1, (n - 1) * 12 * n]}}
                            for n in (960, 1920)],
            "coordinator_fit": {"state_n2_over_g": 1e-6, "state_n": 0, "codec_n2": 2e-7, "codec_n": 0,
                                "resend_n2": 2e-7, "resend_n": 0, "small_message_s": 2e-5}}


def test_coordination_read_from_a_bench_report():
    co = coordination_from_bench(_report())
    assert co.messages_per_node == 7 and co.resend_messages_per_node_s == pytest.approx(2.0)
    assert co.latency_s == 0.05 and co.data_overhead == 1.0
    assert co.node_bytes == pytest.approx((500, 12)) and co.protect_bytes_per_node == pytest.approx(12)
    assert co.resend_cpu == (2e-7, 0) and co.small_message_s == 2e-5
    rows = against_bench(_report(), co)
    assert [r["messages_model"] for r in rows] == [7, 7, pytest.approx(13)]
    assert rows[1]["coordinator_messages_model"] == 49 and rows[1]["coordinator_messages_measured"] == 49
    assert rows[0]["held_per_S_measured"] == 2.0 and rows[0]["shm_per_S_model"] == 4.0
    with pytest.raises(ValueError, match="no measured cluster"):
        coordination_from_bench({"clusters": []})
