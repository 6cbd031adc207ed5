"""The demo's verdict and summary (``ftd.demo.report``), without processes."""
from __future__ import annotations

import math

import pytest


def _losses(values: dict[int, float]) -> list[tuple[int, str]]:
    return [(step, value.hex()) for step, value in values.items()]


def test_verify_accepts_reruns_that_match():
    from ftd.demo.report import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    ok, verdict, twice = verify(ref, ref[:2] + ref[1:], steps=3)
    assert ok and verdict == "bit-exact: all 3 steps" and twice == 1


def test_verify_rejects_a_rerun_off_by_one_ulp():
    from ftd.demo.report import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    rerun = (1, math.nextafter(0.5, 1.0).hex())
    ok, verdict, _ = verify(ref, ref[:2] + [rerun] + ref[2:], steps=3)
    assert not ok and verdict.startswith("MISMATCH at step 1")


def test_verify_rejects_missing_steps_and_malformed_lines():
    from ftd.demo.report import verify
    ref = _losses({0: 1.0, 1: 0.5, 2: 0.25})
    ok, verdict, _ = verify(ref, [ref[0], ref[2]], steps=3)
    assert not ok and "no loss for step(s) 1" in verdict
    ok, verdict, _ = verify(ref, ref + [(-1, "garbage")], steps=3)
    assert not ok and "unexpected line" in verdict


def test_summary_figures_come_from_the_counters():
    from ftd.demo.report import blocked_per_snapshot, protection_lag, summary_lines
    blocked = blocked_per_snapshot([{"snapshot_seconds": 0.01, "hook_wait_seconds": 0.01, "snapshots": 10,
                                     "committed": 9, "skipped_protecting": 1},
                                    {"snapshot_seconds": 0.04, "hook_wait_seconds": 0.0, "snapshots": 10,
                                     "committed": 10, "skipped_protecting": 0}])
    assert blocked == {"mean_ms": pytest.approx(3.0), "snapshots": 20, "committed": 19, "skipped_protecting": 1}
    lag = protection_lag([{"count": 2, "total_seconds": 0.1, "max_seconds": 0.07, "last_seconds": 0.03},
                          {"count": 2, "total_seconds": 0.3, "max_seconds": 0.2, "last_seconds": 0.1}])
    assert lag == {"versions": 4, "mean_ms": pytest.approx(100.0), "max_ms": pytest.approx(200.0)}
    lines = summary_lines({"failures": [{"what": "worker crash", "at_step": 9, "resumed_after": 8, "steps_lost": 1,
                                         "seconds_to_resume": 5.0}],
                           "blocked_per_snapshot": blocked, "protection_lag": lag, "state_bytes": 2**20,
                           "torch_save_load": {"save_seconds": 0.01, "load_seconds": 0.02}})
    text = "\n".join(lines)
    assert "resumed after step 8: 1 step lost" in text and "3.00 ms on average" in text
    assert "100 ms on average, 200 ms at most" in text and "10.0 ms + 20.0 ms" in text
