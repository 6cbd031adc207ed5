"""Who coordinates: terms (two claimants, stale terms refused, a returning coordinator follows) and the
new coordinator's gathering (what it declares from the nodes' reports), with a fake clock."""
from __future__ import annotations

import itertools

import pytest

from ftd.cluster.coordinator import COLLECT, PROTECT, Coordinator
from ftd.cluster.stripes import Grouping
from ftd.cluster.takeover import Gather, Report
from ftd.cluster.terms import CURRENT, NEWER, STALE, Terms
from ftd.errors import ProtocolError

from support.clocks import Clock

pytestmark = pytest.mark.timeout(10)


def views(nodes=4, peer_timeout=10.0):
    clock = Clock()
    return [Terms(n, nodes, peer_timeout, clock) for n in range(nodes)], clock


# ---- terms ------------------------------------------------------------------------------------
def test_a_term_names_its_coordinator_and_each_node_picks_its_own_next_one():
    (t0, t1, t2, t3), _ = views()
    assert [t.leader for t in (t0, t1, t2, t3)] == [0] * 4
    assert [t.next_term() for t in (t0, t1, t2, t3)] == [4, 1, 2, 3]  # never the same for two nodes
    t2.term = 6
    assert t2.next_term() == 10 and t2.leader_of(10) == 2


def test_the_lowest_rank_takes_over_first_after_peer_timeout_and_the_others_follow_it():
    (t0, t1, t2, t3), clock = views(peer_timeout=10.0)
    clock.t = 9.9
    assert not any(t.due() for t in (t0, t1, t2, t3))
    clock.t = 10.1
    assert t1.due() and not t2.due() and not t3.due() and not t0.due()  # node 0 coordinates: never due
    term = t1.take_over("node 0 silent", 0.0)
    assert term == 1 and t1.leader == 1 and not t1.due()
    # node 1's first message (a report query) reaches the others: they follow before their own wait ends
    clock.t = 14.0
    assert t2.from_coordinator(1, term) == NEWER and t3.from_coordinator(1, term) == NEWER
    assert t2.leader == t3.leader == 1
    clock.t = 23.9
    assert not t2.due()
    clock.t = 24.1  # node 1 silent for peer_timeout: node 0 (a lower rank) would go now; 2 and 3 wait longer
    assert (t2.order(), t3.order()) == (1, 2) and not t2.due() and not t3.due()
    clock.t = 29.1
    assert t2.due() and not t3.due()


def test_two_claimants_the_higher_term_wins_and_the_other_steps_down():
    (t0, t1, t2, t3), clock = views()
    clock.t = 100.0
    a, b = t1.take_over("silent", 0.0), t2.take_over("silent", 0.0)  # both at once (each saw node 0 silent)
    assert (a, b) == (1, 2)
    assert t3.from_coordinator(1, a) == NEWER and t3.from_coordinator(2, b) == NEWER and t3.leader == 2
    assert t3.from_coordinator(1, a) == STALE and t3.stale == 1  # node 1's next sync: refused, counted
    assert t1.from_node(b) == NEWER and t1.leader == 2  # node 1 hears node 3's answer (term 2): follows
    assert t1.from_coordinator(2, b) == CURRENT


def test_a_coordinator_message_of_a_term_from_another_node_is_forged():
    (t0, t1, t2, t3), _ = views()
    with pytest.raises(ProtocolError, match="term 0 comes from node 0"):
        t1.from_coordinator(2, 0)
    with pytest.raises(ProtocolError, match="term 5 comes from node 1"):
        t1.from_coordinator(3, 5)
    assert t1.term == 0  # a refused message teaches no term


def test_a_returning_old_coordinator_learns_the_term_and_follows():
    (t0, t1, t2, t3), clock = views()
    clock.t = 11.0
    term = t1.take_over("node 0 silent", 0.0)
    for t in (t2, t3):
        t.from_coordinator(1, term)
    fresh0 = Terms(0, 4, 10.0, clock)          # node 0's daemon restarted: it knows term 0 only
    assert fresh0.leader == 0                   # it starts a coordinator of term 0, which gathers first:
    assert t2.from_coordinator(0, 0) == STALE  # its report query is refused by every node of term 1
    assert fresh0.from_node(t2.term) == NEWER and fresh0.leader == 1 and not fresh0.due()


# ---- the gathering ------------------------------------------------------------------------------
def coordinator(nodes=4, **kw):
    clock = Clock()
    ids = itertools.count(500)
    c = Coordinator(Grouping(nodes, nodes - 1, 1), clock=clock, new_round_id=lambda: next(ids), term=5,
                    gather=True, peer_timeout=10.0, resend=1.0, **kw)
    c.start()
    return c, clock


def test_a_new_coordinator_asks_first_and_acts_on_nothing_until_it_knows():
    c, clock = coordinator()
    out = c.take()
    assert [(o.mtype, o.dests) for o in out] == [("report_query", (0, 1, 2, 3))]
    assert c.gathering and c.status()["term"] == 5
    c.on_report(1, Report(0, 7, latest=9))
    c.on_report(2, None)                        # not ready yet: it rebuilds, then says hello
    assert not [o for o in c.take() if o.mtype == "sync"]
    clock.t = 1.0
    c.tick()
    assert [o.dests for o in c.take() if o.mtype == "report_query"] == [(0, 2, 3)]  # asks again
    for n in (0, 2, 3):
        c.on_report(n, Report(0, 7 if n != 3 else 6, latest=9))
    assert not c.gathering and c.recoverable == 7 and c.target == 10
    (sync,) = [o for o in c.take() if o.mtype == "sync"]
    assert sync.fields["recoverable"] == 7 and sync.dests == (0, 1, 2, 3)


def test_a_round_every_node_finished_is_declared_one_some_did_not_is_dropped():
    c, _ = coordinator()
    for n in range(4):
        c.on_report(n, Report(0, 7, done=8, round=42))
    assert c.recoverable == 8 and c.rounds_done == 1  # the old coordinator's sync never came: now it does
    c, _ = coordinator()
    for n in range(3):
        c.on_report(n, Report(0, 7, done=8, round=42))
    c.on_report(3, Report(0, 7))                # node 3 had not finished it: step 8 never was recoverable
    assert c.recoverable == 7 and c.phase == COLLECT


def test_while_a_step_is_in_doubt_the_coordinator_waits_for_the_silent_node():
    c, clock = coordinator()
    for n in (1, 2, 3):
        c.on_report(n, Report(0, 7, done=8, round=42))
    clock.t = 60.0
    c.tick()
    assert c.gathering, "node 0 may have been told step 8 is recoverable: no sync may say otherwise"
    c.on_hello(0, 7)                            # node 0's replacement, rebuilt at step 7: 8 was never declared
    assert not c.gathering and c.recoverable == 7


def test_without_doubt_the_silent_nodes_are_not_waited_for():
    c, clock = coordinator()
    c.on_report(1, Report(0, 7, done=8, round=42))
    c.on_report(2, Report(0, 7))
    clock.t = 1.5
    c.tick()
    assert c.gathering                          # a little time for late answers
    clock.t = 2.5
    c.tick()
    assert not c.gathering and c.recoverable == 7
    assert [o.fields["recoverable"] for o in c.take() if o.mtype == "sync"] == [7]


def test_the_newest_epoch_wins_and_its_lost_nodes_are_kept():
    c, _ = coordinator()
    c.on_report(0, Report(1, 3, lost=True))    # in epoch 1 (restored from disk), cannot give step 5
    c.on_report(1, Report(1, 5))
    c.on_report(2, Report(0, 9))                # missed the restore from disk: its step 9 is of the old timeline
    c.on_report(3, Report(1, 5, finished=True))
    assert (c.epoch, c.recoverable) == (1, 5) and c.lost_nodes == {0} and c.finished == {3}


def test_after_the_gathering_a_late_fresh_report_counts_as_a_hello():
    c, _ = coordinator()
    for n in range(4):
        c.on_report(n, Report(0, 7, latest=7))
    c.take()
    for n in range(4):
        c.on_candidate(n, c.target, 8, 100, False, 7, 8)
    assert c.phase == PROTECT
    c.on_report(2, Report(0, 7), fresh=False)   # a node that just heard of the term: no change
    assert c.phase == PROTECT
    c.on_report(2, Report(0, 7), fresh=True)    # its daemon restarted: its half of the round is gone
    assert c.phase == COLLECT and c.rounds_abandoned == 1


def test_the_coordinator_beats_to_the_nodes_it_told_nothing_lately():
    c, clock = coordinator()
    for n in range(4):
        c.on_report(n, Report(0, 7, latest=7))
    c.take()
    c.on_candidate(1, c.target, 8, 100, False, 7, 8)
    clock.t = 1.0
    c.tick()
    out = c.take()
    (sync,) = [o for o in out if o.mtype == "sync"]
    assert sync.dests == (0, 2, 3)
    assert [o.dests for o in out if o.mtype == "beat"] == [(1,)]  # node 1 answered: it hears a beat instead


def test_gather_alone():
    g = Gather(3, started=0.0, wait=2.0)
    assert g.decide(100.0) is None             # nobody answered: nothing is known
    g.on_report(0, Report(2, 4, done=5, round=9))
    assert g.unsure() == 5 and g.decide(100.0) is None
    g.on_report(1, Report(2, 4))
    assert g.unsure() is None and g.decide(1.0) is None and g.decide(2.0).recoverable == 4


def test_a_restore_from_disk_under_way_is_decided_again_by_the_new_coordinator():
    c, _ = coordinator()
    c.on_report(0, Report(0, 7, lost=True, disk=True))   # node 0 could not be rebuilt: the cluster goes to disk
    c.on_report(1, Report(0, 4, lost=True, disk=True))   # (its peers heard so: they hold 4 only)
    c.on_report(2, Report(0, 4, lost=True, disk=True))
    c.on_report(3, Report(0, 4, lost=True, disk=True))
    assert not c.gathering and c.disk is not None
    (query,) = [o for o in c.take() if o.mtype == "disk_query"]
    assert query.dests == (0, 1, 2, 3)                    # every node, including those that loaded already
    for n in range(4):
        c.on_disk_offer(n, 0, 4, [6, 4], need=n == 0)
    (load,) = [o for o in c.take() if o.mtype == "disk_load"]
    assert load.fields == {"epoch": 1, "step": 6}
    for n in range(4):
        c.on_disk_loaded(n, 1, 6, True, "")
    assert (c.epoch, c.recoverable) == (1, 6) and c.disk is None


def test_a_node_that_only_wondered_about_the_disk_is_not_sent_to_it_when_memory_has_the_step():
    c, _ = coordinator()
    for n in range(4):
        c.on_report(n, Report(0, 7, disk=n == 2))
    assert not c.gathering and c.disk is None and c.recoverable == 7
    c.take()
    c.on_disk_offer(2, 0, -1, [3], need=False)            # it offers again (every 2 s): memory has step 7
    assert [o.mtype for o in c.take()] == ["disk_none", "sync"]


def test_disk_offers_that_come_while_gathering_are_decided_once_it_acts():
    c, _ = coordinator()
    for n in range(4):                                    # every node started empty (a power cut, say)
        c.on_disk_offer(n, 0, -1, [6, 4], need=False)
        assert c.gathering and not [o for o in c.take() if o.mtype in ("disk_load", "disk_none")]
        c.on_hello(n, -1)
    (load,) = [o for o in c.take() if o.mtype == "disk_load"]
    assert load.fields == {"epoch": 1, "step": 6}
