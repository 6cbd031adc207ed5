"""The coordinator's state machine, driven with scripted messages and a fake clock."""
from __future__ import annotations

import itertools

import pytest

from ftd.cluster.coordinator import COLLECT, PROTECT, Coordinator
from ftd.cluster.stripes import Grouping

from support.clocks import Clock

pytestmark = pytest.mark.timeout(10)


def make(nodes=4, m=1, g=None, **kw):
    g = g or nodes
    clock = Clock()
    ids = itertools.count(100)
    c = Coordinator(Grouping(nodes, g - m, m), clock=clock, new_round_id=lambda: next(ids), **kw)
    c.start()
    return c, clock


def sent(c, mtype):
    return [o for o in c.take() if o.mtype == mtype]


def all_candidates(c, step, nodes=4, target=None, latest=None):
    for n in range(nodes):
        c.on_candidate(n, c.target if target is None else target, step, 1000 + n, False, c.recoverable,
                       step if latest is None else latest)


def test_start_syncs_every_node_with_target_zero():
    c, _ = make()
    (sync,) = sent(c, "sync")
    assert sync.dests == (0, 1, 2, 3) and sync.fields == {"target": 0, "recoverable": -1, "epoch": 0, "flush": False}


def test_agreeing_candidates_start_a_round_and_done_makes_it_recoverable():
    c, _ = make()
    c.take()
    all_candidates(c, 0)
    (protect,) = sent(c, "protect")
    assert protect.fields["step"] == 0 and protect.fields["sizes"] == [1000, 1001, 1002, 1003]
    assert c.phase == PROTECT
    rid = protect.fields["round"]
    for n in range(3):
        c.on_done(n, rid, 0, latest=5)
    assert c.recoverable == -1 and not sent(c, "sync")
    c.on_done(3, rid, 0, latest=7)
    out = c.take()
    assert [o.mtype for o in out] == ["protected", "sync"]
    assert c.recoverable == 0 and c.phase == COLLECT
    assert out[1].fields == {"target": 8, "recoverable": 0, "epoch": 0, "flush": False}  # newest step seen + lead 1


def test_groups_are_protected_one_by_one():
    c, _ = make(nodes=8, m=1, g=4)
    c.take()
    all_candidates(c, 3, nodes=8)
    rid = sent(c, "protect")[0].fields["round"]
    for n in (4, 5, 6, 7):
        c.on_done(n, rid, 3)
    (p,) = sent(c, "protected")
    assert p.dests == (4, 5, 6, 7) and p.fields["group"] == 1
    assert c.recoverable == -1  # group 0 is not done: not recoverable


def test_disagreeing_candidates_retarget_further_ahead_with_a_growing_lead():
    c, _ = make()
    c.take()
    for n, step in enumerate([4, 4, 5, 4]):
        c.on_candidate(n, 0, step, 10, False, -1, step)
    (sync,) = sent(c, "sync")
    assert sync.fields["target"] == 5 + 2  # newest seen + lead, lead doubled to 2
    assert c.retargets == 1 and c.phase == COLLECT
    for n in range(4):
        c.on_candidate(n, 7, 9 if n else 8, 10, False, -1, 9)
    assert sent(c, "sync")[0].fields["target"] == 9 + 4


def test_a_node_whose_ranks_disagree_is_a_mismatch():
    c, _ = make()
    c.take()
    for n in range(4):
        c.on_candidate(n, 0, 3, 10, n == 2, -1, 3)
    assert not sent(c, "protect") and c.retargets == 1


def test_late_candidates_for_an_old_target_are_ignored():
    c, _ = make()
    c.take()
    for n, step in enumerate([1, 2, 2, 2]):
        c.on_candidate(n, 0, step, 10, False, -1, step)
    new_target = c.target
    c.take()
    c.on_candidate(0, 0, 2, 10, False, -1, 2)  # answers the old target 0
    assert c.candidates == {}
    for n in range(4):
        c.on_candidate(n, new_target, new_target, 10, False, -1, new_target)
    assert sent(c, "protect")


def test_hello_during_a_round_abandons_it():
    c, _ = make()
    c.take()
    all_candidates(c, 2)
    rid = sent(c, "protect")[0].fields["round"]
    c.on_done(0, rid, 2)
    c.on_hello(3, -1)
    out = c.take()
    assert [o.mtype for o in out] == ["abort", "sync"]
    assert out[0].fields["round"] == rid and "node 3 restarted" in out[0].fields["reason"]
    assert c.phase == COLLECT and c.rounds_abandoned == 1 and out[1].fields["target"] >= 3
    c.on_done(1, rid, 2)  # a late done of the abandoned round changes nothing
    assert c.recoverable == -1


def test_round_timeout_abandons_and_resends_are_periodic():
    c, clock = make(timeout=30, resend=1)
    c.take()
    all_candidates(c, 1)
    rid = sent(c, "protect")[0].fields["round"]
    c.on_done(0, rid, 1)
    clock.t = 1.5
    c.tick()
    (again,) = sent(c, "protect")
    assert again.dests == (1, 2, 3)  # re-sent only to nodes that did not answer
    clock.t = 31
    c.tick()
    assert [o.mtype for o in c.take()] == ["abort", "sync"]


def test_collect_resends_sync_to_silent_nodes_only():
    c, clock = make(resend=1)
    c.take()
    c.on_candidate(1, 0, 0, 10, False, -1, 0)
    clock.t = 2
    c.tick()
    (sync,) = sent(c, "sync")
    assert sync.dests == (0, 2, 3)


def test_a_restarted_coordinator_learns_the_recoverable_step_from_candidates():
    c, _ = make()
    c.take()
    c.on_candidate(1, 0, 12, 10, False, 11, 12)
    assert c.recoverable == 11 and c.target == 12 and c.candidates == {}


def test_restored_trainers_pull_the_target_back():
    c, _ = make()
    c.take()
    for n, step in enumerate([40, 41, 41, 41]):
        c.on_candidate(n, 0, step, 10, False, -1, step)
    assert c.target > 41
    c.take()
    c.on_restored(2, 30)
    (sync,) = sent(c, "sync")
    assert sync.fields["target"] == 31 and c.lead == 1
    c.on_restored(0, 30)
    assert not sent(c, "sync")  # already aiming there


def test_a_node_refusing_its_part_abandons_the_round_with_its_reason():
    c, _ = make()
    c.take()
    all_candidates(c, 4)
    rid = sent(c, "protect")[0].fields["round"]
    c.on_refuse(2, rid, "its parity needs 3.0 MiB but the memory budget is 2.0 MiB")
    abort, sync = c.take()
    assert abort.mtype == "abort" and "node 2 refused" in abort.fields["reason"] and "budget" in abort.fields["reason"]
    assert sync.mtype == "sync" and c.phase == COLLECT and c.recoverable == -1


def test_a_restore_abandons_a_round_of_a_later_step():
    c, _ = make()
    c.take()
    all_candidates(c, 9)
    rid = sent(c, "protect")[0].fields["round"]
    for n in range(3):
        c.on_done(n, rid, 9)
    c.on_restored(3, 4)          # node 3's trainers went back to step 4: step 9 must not complete
    abort, sync = c.take()
    assert abort.mtype == "abort" and "restored step 4" in abort.fields["reason"]
    assert sync.fields["target"] == 5 and c.phase == COLLECT
    c.on_done(3, rid, 9)
    assert c.recoverable == -1


def test_a_silent_node_is_declared_lost_after_peer_timeout_and_its_round_abandoned():
    c, clock = make(timeout=120.0, peer_timeout=2.0)
    c.take()
    all_candidates(c, 0)
    rid = sent(c, "protect")[0].fields["round"]
    for n in (0, 1, 3):
        c.on_done(n, rid, 0, latest=3)
    for t in (0.9, 1.8, 2.7):          # node 2 answers every re-sent protect with `alive`: still working
        clock.t = t
        c.heard_from(2)
        c.on_alive(2, 4)
        c.tick()
    assert c.phase == PROTECT and c.silent() == []
    clock.t = 4.8                       # then it stops answering (frozen, or its host is gone)
    c.tick()
    assert c.phase == COLLECT and c.recoverable == -1
    (abort,) = sent(c, "abort")
    assert "node(s) [2] silent for more than 2 s (peer_timeout): declared lost" in abort.fields["reason"]
    for n in (0, 1, 3):                 # the others answer the new target's sync
        c.heard_from(n)
    assert c.status()["silent"] == [2] and c.target > 4  # the next round targets a newer step
    c.heard_from(2)                     # back (SIGCONT): not silent any more, a new round can start
    assert c.status()["silent"] == []


def test_nodes_done_or_with_a_candidate_are_never_called_silent():
    c, clock = make(peer_timeout=1.0)
    c.take()
    c.on_candidate(0, c.target, 0, 10, False, -1, 0)
    clock.t = 5.0
    assert c.silent() == [1, 2, 3]      # only the nodes it still waits for


# ---- the restore from disk ------------------------------------------------------------------------
def test_cold_start_restores_the_newest_step_flushed_by_all_and_skips_one_that_fails():
    c, clock = make(4)
    c.take()
    for n, steps in enumerate([[30, 20, 10], [30, 20, 10], [30, 20, 10], [20, 10]]):
        assert not sent(c, "disk_load")
        c.on_disk_offer(n, 0, -1, steps, need=False)
    load = sent(c, "disk_load")
    assert len(load) == 1 and load[0].fields == {"epoch": 1, "step": 20} and load[0].dests == (0, 1, 2, 3)
    c.on_disk_loaded(0, 1, 20, True, "")
    c.on_disk_loaded(2, 1, 20, False, "rank-2 fails its checksums")  # corrupt on node 2: the one before
    load = sent(c, "disk_load")
    assert len(load) == 1 and load[0].fields == {"epoch": 1, "step": 10}
    for n in range(4):
        c.on_disk_loaded(n, 1, 10, True, "")
    sync = sent(c, "sync")
    assert sync[0].fields == {"target": 11, "recoverable": 10, "epoch": 1, "flush": True}
    assert c.recoverable == 10 and c.epoch == 1 and c.disk is None


def test_cold_start_with_nothing_common_on_disk_starts_afresh():
    c, _ = make(2)
    c.take()
    c.on_disk_offer(0, 0, -1, [8], need=False)
    c.on_disk_offer(1, 0, -1, [], need=False)
    none = sent(c, "disk_none")
    assert none and none[0].dests == (0, 1)
    c.on_disk_offer(1, 0, -1, [], need=False)  # a daemon restarted later: told at once
    assert sent(c, "disk_none")[0].dests == (1,)


def test_more_than_m_lost_goes_back_to_the_disk_in_a_new_epoch():
    c, _ = make(4)
    all_candidates(c, 12)
    rid = sent(c, "protect")[0].fields["round"]
    for n in range(4):
        c.on_done(n, rid, 12)
    assert c.recoverable == 12
    c.take()
    c.on_disk_offer(2, 0, -1, [8, 4], need=True)  # node 2 cannot be rebuilt
    query = sent(c, "disk_query")
    assert query and query[0].dests == (0, 1, 3)
    for n in (0, 1, 3):
        c.on_disk_offer(n, 0, 12, [8, 4], need=False)
    assert sent(c, "disk_load")[0].fields == {"epoch": 1, "step": 8}
    c.on_candidate(0, c.target, 13, 1000, False, 12, 13)  # the old timeline goes on meanwhile: ignored
    assert not sent(c, "protect")
    for n in range(4):
        c.on_disk_loaded(n, 1, 8, True, "")
    assert (c.recoverable, c.epoch, c.target) == (8, 1, 9)  # back in time, in a new epoch
    c.take()
    c.on_hello(3, 12, 0)  # a report from the old epoch does not bring step 12 back
    assert c.recoverable == 8
    c.take()
    c.on_candidate(1, 9, 13, 1000, False, 12, 13, epoch=0)
    assert sent(c, "sync")[0].dests == (1,) and c.recoverable == 8 and not c.candidates


def test_a_need_sent_before_the_restore_from_disk_ended_does_not_start_a_second_one():
    # seen in test_durable_cluster: node 2's rebuild failed in epoch 0 just as the last disk_loaded
    # arrived; its offer (need, epoch 0) then reached a coordinator already in epoch 1
    c, _ = make(3)
    c.take()
    c.on_disk_offer(2, 0, -1, [8, 4], need=True)
    for n in (0, 1):
        c.on_disk_offer(n, 0, 12, [8, 4], need=False)
    assert sent(c, "disk_load")[0].fields == {"epoch": 1, "step": 8}
    for n in range(3):
        c.on_disk_loaded(n, 1, 8, True, "")
    assert (c.recoverable, c.epoch) == (8, 1)
    c.take()
    c.on_disk_offer(1, 0, -1, [8, 4], need=True)  # stale: the older timeline's need
    out = c.take()
    assert not [o for o in out if o.mtype == "disk_query"] and c.disk is None and len(c.disk_decision.restores) == 1
    (sync,) = [o for o in out if o.mtype == "sync"]
    assert sync.dests == (1,) and sync.fields["epoch"] == 1  # told the epoch instead
    c.take()
    c.on_disk_offer(1, 1, -1, [8, 4], need=True)  # the same need of this epoch: back to the disk
    assert sent(c, "disk_query")[0].dests == (0, 2)


def test_a_restarted_coordinator_learns_the_epoch_from_the_nodes():
    c, _ = make(2)
    c.on_hello(1, 8, 1)
    assert (c.epoch, c.recoverable, c.target) == (1, 8, 9)


def test_flush_is_marked_on_the_syncs_of_the_steps_the_policy_picks():
    from ftd.durable.policy import FlushPolicy
    c, clock = make(2, flush_policy=FlushPolicy(every=5, interval=0, clock=lambda: 0.0))
    flushed = []
    for step in (0, 3, 5, 8, 11):
        c.take()
        for n in range(2):
            c.on_candidate(n, c.target, step, 100, False, c.recoverable, step)
        rid = sent(c, "protect")[0].fields["round"]
        for n in range(2):
            c.on_done(n, rid, step)
        if sent(c, "sync")[0].fields["flush"]:
            flushed.append(step)
    assert flushed == [0, 5, 11]


def test_no_flush_is_marked_while_a_node_still_flushes():
    from ftd.durable.policy import FlushPolicy
    c, clock = make(2, flush_policy=FlushPolicy(every=1, interval=0, clock=lambda: 0.0))
    flushed = []
    for step, busy_node in ((0, None), (1, 1), (2, None)):
        c.take()
        for n in range(2):
            c.on_candidate(n, c.target, step, 100, False, c.recoverable, step)
        rid = sent(c, "protect")[0].fields["round"]
        for n in range(2):
            c.on_done(n, rid, step, step, flushing=n == busy_node)
        if sent(c, "sync")[0].fields["flush"]:
            flushed.append(step)
    assert flushed == [0, 2]


# ---- new runs, finished runs, nodes that could not be rebuilt -----------------------------------------
def fresh():
    return make()[0]


def recoverable_after_round(c, step):
    c.take()
    all_candidates(c, step)
    rid = sent(c, "protect")[0].fields["round"]
    for n in range(4):
        c.on_done(n, rid, step, latest=step)
    assert c.recoverable == step
    c.take()


def test_a_new_run_drops_the_timeline_in_a_new_epoch_and_stale_requests_are_ignored():
    c = fresh()
    recoverable_after_round(c, step=7)
    c.on_reset(2, epoch=0, reason="resume='never'")
    syncs = sent(c, "sync")
    assert syncs and syncs[-1].fields["epoch"] == 1 and syncs[-1].fields["recoverable"] == -1
    assert (c.epoch, c.recoverable, c.target) == (1, -1, 0) and c.resets[-1]["node"] == 2
    c.on_reset(3, epoch=0, reason="late")              # asked about the run that is gone: answered, not redone
    late = sent(c, "sync")
    assert c.epoch == 1 and late[-1].dests == (3,)


def test_syncs_say_when_every_node_finished_the_run():
    c = fresh()
    recoverable_after_round(c, step=3)
    for n in (0, 1, 2):
        c.on_alive(n, 3, finished=True)
    assert not c.run_finished and not any(o.fields.get("finished") for o in sent(c, "sync"))
    c.on_alive(3, 3, finished=True)
    assert c.run_finished and sent(c, "sync")[-1].fields["finished"] is True
    c.on_reset(1, c.epoch, "rerun of a finished run")
    assert not c.run_finished and "finished" not in sent(c, "sync")[-1].fields


def test_a_lost_node_is_listed_in_the_syncs_until_it_says_hello_rebuilt():
    c = fresh()
    recoverable_after_round(c, step=5)
    c.on_lost(2)
    assert sent(c, "sync")[-1].fields["lost"] == [2]
    c.on_hello(2, recoverable=-1)                      # restarted, not rebuilt yet
    assert c.lost_nodes == {2}
    c.on_hello(2, recoverable=5)                       # rebuilt
    assert c.lost_nodes == set() and "lost" not in sent(c, "sync")[-1].fields
