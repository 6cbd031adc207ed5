"""When to flush and what waits (flushpolicy): pure logic with a fake clock."""
from __future__ import annotations

import pytest

from ftd.durable.policy import FlushPolicy, FlushQueue, common_step

pytestmark = pytest.mark.timeout(10)


def test_every_n_steps_starting_with_the_first_recoverable_step():
    p = FlushPolicy(every=10, interval=0, clock=lambda: 0.0)
    assert [s for s in (3, 5, 12, 13, 14, 22, 23, 40) if p.due(s)] == [3, 13, 23, 40]
    assert not p.due(40) and not p.due(30)  # each step once, never backwards


def test_every_t_seconds_or_n_steps_whichever_first():
    t = [0.0]
    p = FlushPolicy(every=100, interval=60, clock=lambda: t[0])
    assert p.due(1)
    t[0] = 59.0
    assert not p.due(2)
    t[0] = 61.0
    assert p.due(3)
    assert p.due(103)  # 100 steps on, though only 0 s passed


def test_a_newer_due_step_supersedes_the_waiting_one():
    q = FlushQueue()
    assert q.offer(5) == 5
    assert q.offer(9) is None and q.offer(12) is None and q.offer(11) is None
    assert (q.pending, q.superseded) == (12, 1)
    assert q.finished() == 12 and q.running == 12
    assert q.finished() is None and q.running is None
    assert q.offer(20) == 20


def test_common_step_is_the_newest_every_node_has():
    assert common_step({0: [9, 6, 3], 1: [9, 3], 2: [6, 3, 9]}, range(3)) == 9
    assert common_step({0: [9, 6], 1: [6, 3]}, range(2)) == 6
    assert common_step({0: [9], 1: [6]}, range(2)) is None
    assert common_step({0: [9]}, range(2)) is None  # node 1 offered nothing (yet)
