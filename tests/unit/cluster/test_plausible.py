"""Announcements no honest node makes (steps, epochs, terms far ahead) are refused; honest ones never."""
from __future__ import annotations

import itertools

import pytest

from ftd.cluster.coordinator import Coordinator
from ftd.cluster.plausible import EPOCH_AHEAD, STEP_AHEAD, implausible_claim, implausible_term, term_ahead
from ftd.cluster.stripes import Grouping
from ftd.cluster.takeover import Report
from ftd.cluster.terms import Terms
from ftd.errors import ProtocolError

from support.clocks import Clock

pytestmark = pytest.mark.timeout(10)


def coordinator(nodes=3, **kw) -> Coordinator:
    ids = itertools.count(100)
    c = Coordinator(Grouping(nodes, nodes - 1, 1), clock=Clock(), new_round_id=lambda: next(ids), **kw)
    c.start()
    return c


def msg(mtype, src, **fields):
    return {"type": mtype, "src": src, **fields}


def test_a_step_far_beyond_what_the_other_nodes_said_is_refused():
    c = coordinator()
    assert implausible_claim(msg("alive", 2, latest=10 ** 12), c) is None  # nothing known yet: nothing to judge by
    c.on_alive(0, 500)
    c.on_alive(1, 480)
    honest = 500 + STEP_AHEAD
    for m in (msg("alive", 2, latest=honest), msg("done", 2, round=1, step=490, latest=honest),
              msg("candidate", 2, step=501, latest=honest, recoverable=400, epoch=0),
              msg("restored", 2, step=400), msg("hello", 2, recoverable=-1, epoch=0)):
        assert implausible_claim(m, c) is None, m
    for m in (msg("alive", 2, latest=honest + 1), msg("candidate", 2, step=honest + 1, latest=0, recoverable=0),
              msg("done", 2, round=1, step=1, latest=1 << 61), msg("restored", 2, step=1 << 40),
              msg("report", 2, recoverable=0, done=honest + 5, latest=0, epoch=0),
              msg("disk_offer", 2, epoch=0, recoverable=3, steps=[1, honest + 1])):
        why = implausible_claim(m, c)
        assert why is not None and f"{m['type']}." in why and "2^20" not in why, m
    # a node cannot raise its own bar: its own claims are not the yardstick
    c.on_alive(2, 10 ** 9)  # (had it got through)
    assert implausible_claim(msg("alive", 2, latest=10 ** 9 + 1), c) is not None
    # ... but the others may come along: node 0 at 10^9 makes 10^9 plausible for node 2
    c.on_alive(0, 10 ** 9)
    assert implausible_claim(msg("alive", 2, latest=10 ** 9 + 1), c) is None


def test_the_recoverable_step_alone_is_a_yardstick():
    c = coordinator()
    c.recoverable = 7000
    assert implausible_claim(msg("alive", 1, latest=7000 + STEP_AHEAD), c) is None
    assert implausible_claim(msg("alive", 1, latest=7001 + STEP_AHEAD), c) is not None


def test_an_epoch_far_ahead_is_refused():
    c = coordinator()
    assert implausible_claim(msg("hello", 1, recoverable=-1, epoch=EPOCH_AHEAD), c) is None
    why = implausible_claim(msg("hello", 1, recoverable=-1, epoch=EPOCH_AHEAD + 1), c)
    assert why is not None and "epoch" in why


def test_a_new_coordinator_judges_a_report_by_the_others_reports():
    c = coordinator(term=4, gather=True)
    assert c.gathering
    c.on_report(1, Report(epoch=2, recoverable=900, latest=950))
    assert implausible_claim(msg("report", 2, recoverable=900, done=-1, latest=951 + STEP_AHEAD, epoch=2), c)
    assert implausible_claim(msg("report", 2, recoverable=900, done=-1, latest=950 + STEP_AHEAD, epoch=2), c) is None
    assert implausible_claim(msg("report", 2, recoverable=0, done=-1, latest=0, epoch=3 + EPOCH_AHEAD), c)


def test_a_term_far_ahead_is_refused_and_counted():
    assert term_ahead(4) == 1 << 20 and term_ahead(4096) == 1024 * 4096
    assert implausible_term(5 + (1 << 20), 5, 4) is None and implausible_term(6 + (1 << 20), 5, 4)
    t = Terms(0, 4, 10.0, Clock())
    with pytest.raises(ProtocolError, match="terms beyond"):
        t.from_coordinator(1, 1 + 4 * (1 << 20))  # node 1's term, but far too far ahead
    with pytest.raises(ProtocolError, match="terms beyond"):
        t.from_node(1 << 40)
    assert t.term == 0 and t.implausible == 2
    assert t.from_coordinator(1, 4001) == "newer" and t.term == 4001  # many takeovers unseen: still taken
