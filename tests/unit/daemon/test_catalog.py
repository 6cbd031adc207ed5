"""The daemon's state machine, driven by scripted requests against an in-memory store."""

import pytest

from ftd.daemon.buffers import CAPACITY_QUANTUM
from ftd.errors import ProtocolError, Refused

from support.catalogs import manifest, snap


def test_double_buffering_never_overwrites_the_newest_version(cat):
    s = cat.register(0, 1, 42)["session"]
    b0, b1 = snap(cat, s, 0), snap(cat, s, 1)
    assert b0 != b1 and len(cat.fake.segments) == 2
    assert snap(cat, s, 2) == b0 and snap(cat, s, 3) == b1   # buffers alternate, allocated once
    # a write that never commits (trainer killed mid-copy) leaves the newest version served
    assert cat.begin(s, 4, 1000)["buffer"] == b0
    assert [v["step"] for v in cat.restore(0)["versions"]] == [3]
    assert b0 not in cat.fake.metas and b1 in cat.fake.metas  # the sidecar marks only complete versions


def test_restarted_trainer_reuses_an_abandoned_buffer(cat):
    s = cat.register(0, 1, 1)["session"]
    snap(cat, s, 0)
    snap(cat, s, 1)
    stale = cat.begin(s, 2, 1000)["buffer"]
    cat.alive = lambda pid: pid != 1                # the trainer died (a live one would keep its rank)
    s2 = cat.register(0, 1, 2)["session"]           # and restarted
    with pytest.raises(Refused, match="session"):
        cat.commit(s, stale, 2, manifest())            # the dead trainer's commit is refused
    assert cat.begin(s2, 2, 1000)["buffer"] == stale   # and its buffer is reused, the newest kept
    assert [v["step"] for v in cat.restore(0)["versions"]] == [1]


def test_layout_growth_reallocates_only_the_spare_buffer(cat):
    s = cat.register(0, 1, 1)["session"]
    snap(cat, s, 0, 1000)
    snap(cat, s, 1, 1000)
    big = 3 * CAPACITY_QUANTUM
    b = snap(cat, s, 2, big)
    assert cat.fake.segments[b] == big
    assert [v["step"] for v in cat.restore(0)["versions"]] == [2, 1]
    assert sorted(cat.fake.segments.values()) == [CAPACITY_QUANTUM, big]


def test_budget_refusal_names_the_numbers(cat):
    s = cat.register(0, 1, 1)["session"]
    snap(cat, s, 0, 4 * CAPACITY_QUANTUM)
    with pytest.raises(Refused, match=r"needs 7\.0 MiB.*budget is 10\.0 MiB with 4\.0 MiB in use"):
        cat.begin(s, 1, 7 * CAPACITY_QUANTUM)
    assert [v["step"] for v in cat.restore(0)["versions"]] == [0]   # nothing lost


def test_available_memory_refusal(cat):
    cat.available = lambda: 2 * CAPACITY_QUANTUM
    cat.reserve = CAPACITY_QUANTUM
    s = cat.register(0, 1, 1)["session"]
    with pytest.raises(Refused, match="available"):
        cat.begin(s, 0, 2 * CAPACITY_QUANTUM)


def test_restore_picks_a_step_every_rank_holds(cat):
    s0 = cat.register(0, 2, 1)["session"]
    s1 = cat.register(1, 2, 2)["session"]
    for step in range(3):
        snap(cat, s0, step)
        snap(cat, s1, step)
    snap(cat, s0, 3)                                  # rank 1 crashed before committing step 3
    assert [v["step"] for v in cat.restore(0)["versions"]] == [2]
    assert [v["step"] for v in cat.restore(1)["versions"]] == [2]
    assert cat.restore(7) == {"versions": []}


def test_corrupt_version_is_never_served_again(cat):
    s = cat.register(0, 1, 1)["session"]
    snap(cat, s, 0)
    b1 = snap(cat, s, 1)
    cat.corrupt(0, b1, 1)
    assert [v["step"] for v in cat.restore(0)["versions"]] == [0]
    assert b1 not in cat.fake.metas


def test_commit_checks(cat):
    s = cat.register(0, 1, 1)["session"]
    b = cat.begin(s, 5, 1000)["buffer"]
    with pytest.raises(Refused, match="not being written for step 6"):
        cat.commit(s, b, 6, manifest())
    with pytest.raises(ProtocolError, match="nbytes"):
        cat.commit(s, b, 5, manifest(5 * CAPACITY_QUANTUM))  # larger than the buffer
    with pytest.raises(Refused, match="no buffer"):
        cat.commit(s, "other", 5, manifest())
    with pytest.raises(Refused, match="world size"):
        cat.register(4, 4, 1)


def test_adopted_versions_are_served_and_status_reports(cat):
    cat.adopt(0, 1, "old-a", CAPACITY_QUANTUM, 7, manifest(), 100.0)
    cat.adopt(0, 1, "old-b", CAPACITY_QUANTUM, 8, manifest(), 101.0)
    assert [v["step"] for v in cat.restore(0)["versions"]] == [8, 7]
    s = cat.register(0, 1, 9)["session"]
    assert cat.begin(s, 9, 1000)["buffer"] == "old-a"         # the older one is the spare
    st = cat.status()
    assert st["used"] == 2 * CAPACITY_QUANTUM and st["ranks"][0]["writing"] == [9]
    assert [v["step"] for v in st["ranks"][0]["versions"]] == [8]
    cat.release_all()
    assert cat.fake.segments == {} and cat.used == 0


# ---- cluster mode ------------------------------------------------------------------------------
def test_cluster_pins_the_first_commit_at_the_target_and_keeps_the_recoverable(cat):
    cat.clustered = True
    s0 = cat.register(0, 2, 1)["session"]
    s1 = cat.register(1, 2, 2)["session"]
    cat.sync(target=3, recoverable=-1)
    snap(cat, s0, 2)
    assert cat.candidate() is None                      # step 2 is below the target
    snap(cat, s0, 3)
    snap(cat, s1, 3)
    assert cat.candidate() == (3, 2048, False)
    assert cat.ranks[0].pinned == 3
    # the pinned step is never overwritten; rank 0's other buffer (step 2) is
    buf = cat.begin(s0, 4, 1000)["buffer"]
    assert cat._buffer(cat.ranks[0], buf).step == 4
    cat.commit(s0, buf, 4, manifest())
    cat.sync(target=5, recoverable=3)                   # step 3 protected everywhere
    assert cat.recoverable == 3 and cat.ranks[0].pinned is None
    # both buffers of rank 1 needed? it holds only step 3 and a free one: begin works
    assert "buffer" in cat.begin(s1, 5, 1000)
    # restore serves the recoverable step only, even though rank 0 holds a newer one
    (v,) = cat.restore(0)["versions"]
    assert v["step"] == 3


def test_cluster_begin_is_busy_while_both_buffers_hold_needed_versions(cat):
    cat.clustered = True
    s0 = cat.register(0, 1, 1)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s0, 0)
    assert cat.candidate() == (0, 1024, False)
    cat.sync(target=1, recoverable=0)
    snap(cat, s0, 1)                                    # pinned for the next round
    reply = cat.begin(s0, 2, 1000)
    assert "busy" in reply and "recoverable step 0" in reply["busy"]
    assert cat.restore(0)["versions"][0]["step"] == 0


def test_cluster_ranks_pinning_different_steps_is_a_mismatch(cat):
    cat.clustered = True
    s0 = cat.register(0, 2, 1)["session"]
    s1 = cat.register(1, 2, 2)["session"]
    cat.sync(target=1, recoverable=-1)
    snap(cat, s0, 1)
    snap(cat, s1, 2)
    assert cat.candidate() == (2, 2048, True)
    assert cat.held_steps() == []
    assert cat.buffers_of(1) == []


def test_cluster_restore_forgets_the_restoring_ranks_newer_versions_only(cat):
    cat.clustered = True
    s0 = cat.register(0, 2, 1)["session"]
    s1 = cat.register(1, 2, 2)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s0, 0)
    snap(cat, s1, 0)
    cat.sync(target=1, recoverable=0)
    snap(cat, s0, 5)
    snap(cat, s1, 5)
    assert cat.candidate()[0] == 5
    cat.forget_newer(1, 0)                      # rank 1 restarted from step 0
    assert cat.held_steps() == [0] and cat.ranks[1].pinned is None
    assert [b.step for b in cat.ranks[0].complete()] == [5, 0]  # rank 0's own versions stay
    assert cat.candidate() is None
    cat.forget_newer(0, -1)                     # never drops the recoverable step
    assert cat.held_steps() == [0]


def test_cluster_restore_of_a_rank_without_the_recoverable_step_is_refused(cat):
    cat.clustered = True
    s0 = cat.register(0, 2, 1)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s0, 0)
    cat.sync(target=1, recoverable=0)
    assert cat.restore(0)["versions"][0]["step"] == 0
    with pytest.raises(Refused, match="rank 1 has no snapshot of the cluster's recoverable step 0"):
        cat.restore(1)


def test_cluster_waits_for_every_local_rank_before_a_candidate(cat):
    cat.clustered = True
    s0 = cat.register(0, 4, 1, local_world=2)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s0, 0)
    assert cat.candidate() is None              # rank 1 of this node has not registered yet
    s1 = cat.register(1, 4, 2, local_world=2)["session"]
    snap(cat, s1, 0)
    assert cat.candidate()[0] == 0


def test_cluster_never_pins_what_a_dead_trainer_committed(cat):
    dead = set()
    cat.alive = lambda pid: pid not in dead
    cat.clustered = True
    s0 = cat.register(0, 1, 100)["session"]
    cat.sync(target=0, recoverable=-1)
    snap(cat, s0, 0)
    cat.sync(target=1, recoverable=0)
    snap(cat, s0, 7)
    assert cat.candidate() == (7, 1024, False)
    dead.add(100)                               # the trainer exits or dies: its step 7 is from a run that is over
    assert cat.candidate() is None
    cat.sync(target=1, recoverable=0)
    assert cat.ranks[0].pinned is None
    s1 = cat.register(0, 1, 101)["session"]     # its restart, before it restores: still not pinned
    cat.sync(target=1, recoverable=0)
    assert cat.ranks[0].pinned is None and cat.candidate() is None
    snap(cat, s1, 1)                            # what the new trainer commits is
    assert cat.candidate() == (1, 1024, False)


def test_versions_lists_everything_and_changes_nothing(cat):
    s0, s1 = cat.register(0, 2, 42)["session"], cat.register(1, 2, 43)["session"]
    for step in range(3):
        snap(cat, s0, step)
    snap(cat, s1, 1)
    snap(cat, s1, 2)
    before = cat.restore(0)
    v = cat.versions()
    assert [[x["step"] for x in r["versions"]] for r in v["ranks"]] == [[2, 1], [2, 1]]
    assert v["latest"] == 2 and not v["clustered"]
    assert cat.restore(0) == before                 # read-only: an export never disturbs a restore
    cat.clustered, cat.recoverable = True, 1
    assert cat.versions()["latest"] == 1            # in a cluster: the recoverable step


def test_a_step_held_twice_leaves_a_spare_buffer_in_a_cluster(cat):
    """After a restore from disk of a step the node also held in memory, both buffers hold it: one
    of them must be handed out, or the trainer's snapshots would all be skipped."""
    cat.clustered = True
    cat.adopt(0, 1, "mem", CAPACITY_QUANTUM, 12, manifest(), None)
    cat.adopt(0, 1, "disk", CAPACITY_QUANTUM, 12, manifest(), None, origin="disk:/flush/step-12")
    cat.reset_to(12)
    session = cat.register(0, 1, 111)["session"]
    version = cat.restore(0)["versions"][0]
    assert version["buffer"] == "disk" and version["origin"] == "disk:/flush/step-12"  # the newest holder serves
    reply = cat.begin(session, 13, 100)
    assert "busy" not in reply and reply["buffer"] == "mem"


# ---- one rank, one live process; steps that go back; runs that end ------------------------------------
def test_a_second_live_process_cannot_claim_a_rank_a_dead_one_is_replaced(cat):
    s = cat.register(0, 1, 100)["session"]
    snap(cat, s, 0)
    with pytest.raises(Refused, match=r"held by another live trainer process \(pid 100\)"):
        cat.register(0, 1, 200)
    with pytest.raises(Refused, match="pid 100"):
        cat.restore(0, pid=200)                        # it would restore the other's step unawares
    assert cat.restore(0, pid=100)["versions"]         # the holder itself may
    cat.alive = lambda pid: pid != 100                 # the holder died
    assert cat.register(0, 1, 200)["session"]


def test_a_closed_client_no_longer_holds_its_rank(cat):
    s = cat.register(0, 1, 100)["session"]
    snap(cat, s, 0)
    assert cat.live_trainers() == [(0, 100)]
    cat.detach(0, 100)
    assert cat.live_trainers() == [] and cat.register(0, 1, 200)["session"]
    assert [v["step"] for v in cat.restore(0)["versions"]] == [0]   # its versions stay


def test_a_step_that_goes_back_in_one_process_is_refused(cat):
    s = cat.register(0, 1, 100)["session"]
    snap(cat, s, 6)
    with pytest.raises(Refused, match="step 3 comes after step 6"):
        cat.begin(s, 3, 1000)
    snap(cat, s, 6)                                    # the same step again is fine
    cat.alive = lambda pid: pid != 100
    s2 = cat.register(0, 1, 200)["session"]            # a restarted trainer may go back (it restored first)
    assert cat.begin(s2, 3, 1000)["buffer"]


def test_a_run_is_finished_once_every_rank_finished_and_reset_to_starts_a_new_one(cat):
    s0, s1 = cat.register(0, 2, 100)["session"], cat.register(1, 2, 101)["session"]
    snap(cat, s0, 4)
    snap(cat, s1, 4)
    assert cat.finish(s0) == {"step": 4, "run_finished": False}
    assert cat.finish(s1) == {"step": 4, "run_finished": True} and cat.run_finished()
    assert not cat.has_previous_run()                  # its trainers still hold their ranks
    cat.detach(0, 100)
    assert cat.has_previous_run()
    cat.reset_to(-1)
    assert cat.newest_step() == -1 and not cat.run_finished() and cat.restore(0)["versions"] == []


def test_prepare_creates_both_buffers_that_the_first_snapshots_then_use(cat):
    s = cat.register(0, 1, 42)["session"]
    names = set(cat.prepare(s, 3 * CAPACITY_QUANTUM // 2)["buffers"])
    assert len(names) == 2 and cat.fake.segments == {n: 2 * CAPACITY_QUANTUM for n in names}
    assert {snap(cat, s, 0, 1000), snap(cat, s, 1, 1000)} == names       # no buffer created at the first steps
    assert set(cat.prepare(s, 1000)["buffers"]) == names                 # big enough already: nothing changes


def test_prepare_grows_only_the_spare_buffer_and_is_refused_over_the_budget(cat):
    s = cat.register(0, 1, 42)["session"]
    snap(cat, s, 0)
    snap(cat, s, 1)
    newest = snap(cat, s, 2)
    grown = set(cat.prepare(s, 2 * CAPACITY_QUANTUM)["buffers"])
    assert newest in grown and cat.fake.segments[newest] == CAPACITY_QUANTUM  # the newest version is kept
    assert [v["step"] for v in cat.restore(0)["versions"]] == [2]
    with pytest.raises(Refused, match="memory budget"):
        cat.prepare(s, 20 * CAPACITY_QUANTUM)
