"""A run restarting at another world size: which flushed version every rank reshards from, and when
memory serves again. Scripted against the catalog with an in-memory store."""
from pathlib import Path

import pytest

from ftd.daemon.world_change import WorldChange
from ftd.errors import Refused

from support.catalogs import snap

pytestmark = pytest.mark.timeout(30)
FLUSHED = (7, Path("/flush/job/step-0000000007"))


def old_run(cat, world=4, steps=(6, 7)):
    """A run of ``world`` ranks whose trainers are gone, its versions left on this node."""
    for rank in range(world):
        s = cat.register(rank, world, 100 + rank)["session"]
        for step in steps:
            snap(cat, s, step)
    cat.alive = lambda pid: pid >= 200  # the old run's pids (100...) are dead


def test_the_same_world_size_restores_from_memory(cat):
    old_run(cat)
    assert WorldChange(cat, "j", lambda: FLUSHED).answer(4, clustered=False) is None


def test_every_rank_of_the_new_world_reshards_until_each_committed_a_newer_step(cat):
    old_run(cat)
    change = WorldChange(cat, "j", lambda: FLUSHED)
    first = change.answer(2, clustered=False)
    assert first == {"world": 2, "step": 7, "dir": str(FLUSHED[1]), "from_world": 4}
    assert cat.ranks == {} and cat.fake.segments == {}   # the old world's versions are gone from memory
    s0 = cat.register(0, 2, 200)["session"]
    snap(cat, s0, 8)
    assert change.answer(2, clustered=False) == first  # rank 1 has not committed: both would reshard again
    s1 = cat.register(1, 2, 201)["session"]
    snap(cat, s1, 8)
    assert change.answer(2, clustered=False) is None   # now memory serves step 8 to both
    assert change.pending is None


def test_without_a_flushed_version_the_restore_is_refused_saying_what_to_do(cat):
    old_run(cat)
    with pytest.raises(Refused, match=r"run of 4 rank\(s\), this one has 2.*no flush_dir is configured.*Restart with 4"):
        WorldChange(cat, "j", None).answer(2, clustered=False)
    with pytest.raises(Refused, match="no complete version is flushed to disk yet"):
        WorldChange(cat, "j", lambda: None).answer(2, clustered=False)
    assert len(cat.ranks) == 4  # nothing dropped


def test_old_trainers_still_alive_or_a_cluster_refuse(cat):
    old_run(cat)
    cat.alive = lambda pid: pid == 102
    with pytest.raises(Refused, match=r"still holds this node \(rank 2 \(pid 102\)\)"):
        WorldChange(cat, "j", lambda: FLUSHED).answer(2, clustered=False)
    cat.alive = lambda pid: False
    with pytest.raises(Refused, match="a cluster restores at the world size of its snapshots"):
        WorldChange(cat, "j", lambda: FLUSHED).answer(2, clustered=True)


def test_a_new_run_forgets_the_pending_reshard(cat):
    old_run(cat)
    change = WorldChange(cat, "j", lambda: FLUSHED)
    assert change.answer(2, clustered=False) is not None
    change.forget()
    assert change.answer(2, clustered=False) is None  # nothing in memory, nothing pending: a fresh start
