"""The daemon fetches a gone trainer's replica slices ahead of its restore (``replica_versions``).

``prefetch_wanted`` (pure): which slices, from the catalog alone. ``ReplicaVersions.tick``: started
within the memory budget, claimed by the restore that asks, dropped when no restore takes them."""
from __future__ import annotations

import types

import pytest

from ftd.cluster.rank_fetch import Fetched, NotYet
from ftd.daemon import replica_versions
from ftd.daemon.buffers import Buffer, RankEntry
from ftd.daemon.replica_versions import ReplicaVersions, prefetch_wanted

pytestmark = pytest.mark.timeout(30)

MIB = 1 << 20
DEAD, LIVE = 111, 222


def sliced(ranks: list[int], pos: int) -> dict:
    return {"tree": {"replica": {"format": 1, "ranks": ranks, "pos": pos, "bounds": [], "tensors": []}}}


def entry(rank: int, step: int, manifest: dict | None, pid: int | None = DEAD, **kw) -> RankEntry:
    buf = Buffer(f"seg-r{rank}", 64 * MIB, state="complete", step=step, manifest=manifest or {"tree": {}})
    return RankEntry(rank=rank, world=4, pid=pid, buffers=[buf], **kw)


class FakeCatalog:
    def __init__(self, entries: list[RankEntry], recoverable: int = 5, budget: int = 1 << 40):
        self.ranks = {e.rank: e for e in entries}
        self.recoverable, self.budget, self.used = recoverable, budget, sum(e.buffers[0].capacity for e in entries)
        self.released: list[str] = []
        self.store = types.SimpleNamespace(release=self.released.append)

    def rank_buffer(self, rank: int, step: int):
        e = self.ranks.get(rank)
        b = next((b for b in e.complete() if b.step == step), None) if e else None
        return None if b is None else (e, b)

    def extra_used(self) -> int:
        return 0

    @staticmethod
    def alive(pid: int) -> bool:
        return pid == LIVE


def nothing_held(rank: int, step: int) -> bool:
    return False


def test_the_slices_of_a_gone_trainers_replicas_on_other_nodes_are_wanted():
    cat = FakeCatalog([entry(0, 5, sliced([0, 1, 2, 3], 0)), entry(1, 5, sliced([0, 1, 2, 3], 1), pid=LIVE)])
    assert prefetch_wanted(cat, cat.alive, nothing_held) == [(2, 5, 4, 64 * MIB), (3, 5, 4, 64 * MIB)]
    assert prefetch_wanted(cat, cat.alive, lambda r, s: r == 2) == [(3, 5, 4, 64 * MIB)]  # being fetched


@pytest.mark.parametrize("why", ["alive", "finished", "whole", "other step", "nothing recoverable"])
def test_nothing_is_fetched_ahead_for_a_trainer_that_needs_none(why):
    manifest = {"tree": {}} if why == "whole" else sliced([0, 1], 0)
    e = entry(0, 4 if why == "other step" else 5, manifest, pid=LIVE if why == "alive" else DEAD,
              finished=why == "finished")
    cat = FakeCatalog([e], recoverable=-1 if why == "nothing recoverable" else 5)
    assert prefetch_wanted(cat, cat.alive, nothing_held) == []


def test_a_trainer_that_closed_its_client_before_the_run_finished_is_gone_too():
    cat = FakeCatalog([entry(0, 5, sliced([0, 1], 0), pid=LIVE, detached=True)])
    assert prefetch_wanted(cat, cat.alive, nothing_held) == [(1, 5, 4, 64 * MIB)]


def versions(cat: FakeCatalog, tmp_path, prefetch: bool = True) -> tuple[ReplicaVersions, list]:
    daemon = types.SimpleNamespace(catalog=cat, node=object(),
                                   config=types.SimpleNamespace(replica_prefetch=prefetch, shm_dir=tmp_path))
    v = ReplicaVersions(daemon)
    started: list[tuple] = []
    v._start = lambda rank, step, world: (started.append((rank, step, world)), v._running.add((rank, step)))
    return v, started


def arrive(v: ReplicaVersions, rank: int, step: int, value=None) -> None:
    v._results.put(((rank, step), "ok" if value is None else "error",
                    value or Fetched(rank, 4, step, f"fetched-r{rank}", 64 * MIB, {"tree": {}}, 1, 60 * MIB, 0.3)))
    v._next_look = 0.0


def test_a_prefetch_is_claimed_by_the_restore_that_asks(tmp_path):
    cat = FakeCatalog([entry(0, 5, sliced([0, 1], 0))])
    v, started = versions(cat, tmp_path)
    v.tick()
    assert started == [(1, 5, 4)] and v.status()["prefetched_unclaimed"] == [(1, 5)]
    v._next_look = 0.0
    v.tick()
    assert started == [(1, 5, 4)]  # running: not started twice
    arrive(v, 1, 5)
    v.tick()
    assert v.answer(1, 5, 4)["buffer"] == "fetched-r1"  # the restore finds it here
    assert v.status()["prefetches_taken"] == 1 and v.status()["prefetched_unclaimed"] == []
    cat.recoverable = 9
    v._next_look = 0.0
    v.tick()
    assert cat.released == []  # claimed: the restore releases it, not the prefetch
    v.release(1, 5)
    assert cat.released == ["fetched-r1"]


def test_an_unclaimed_prefetch_goes_when_the_recoverable_step_moves_on_or_it_waited_too_long(tmp_path, monkeypatch):
    cat = FakeCatalog([entry(0, 5, sliced([0, 1], 0))])
    v, started = versions(cat, tmp_path)
    v.tick()
    arrive(v, 1, 5)
    v.tick()
    cat.recoverable, cat.ranks[0].pid = 6, LIVE  # the job went on (the rank restored elsewhere)
    v._next_look = 0.0
    v.tick()
    assert cat.released == ["fetched-r1"] and v.status()["held"] == []
    cat.recoverable, cat.ranks[0].pid = 5, DEAD
    v._next_look = 0.0
    v.tick()
    arrive(v, 1, 5)
    v.tick()
    monkeypatch.setattr(replica_versions, "PREFETCH_HOLD", -1.0)
    v._next_look = 0.0
    v.tick()
    assert cat.released == ["fetched-r1", "fetched-r1"] and len(started) >= 2


def test_no_prefetch_past_the_memory_budget_and_none_when_switched_off(tmp_path, caplog):
    cat = FakeCatalog([entry(0, 5, sliced([0, 1], 0))], budget=100 * MIB)  # 64 MiB used, 64 more wanted
    v, started = versions(cat, tmp_path)
    v.tick()
    assert started == [] and "would exceed the memory budget" in caplog.text
    cat.budget = 1 << 40
    v, started = versions(cat, tmp_path, prefetch=False)
    v.tick()
    assert started == []


def test_a_failed_prefetch_is_tried_again_later_and_leaves_the_restore_its_own_fetch(tmp_path):
    cat = FakeCatalog([entry(0, 5, sliced([0, 1], 0))])
    v, started = versions(cat, tmp_path)
    v.tick()
    arrive(v, 1, 5, NotYet("node 1 is rebuilding"))
    v.tick()
    assert started == [(1, 5, 4)] and v.status()["prefetched_unclaimed"] == []  # not again at once
    v._retry_at[(1, 5)] = 0.0
    v._next_look = 0.0
    v.tick()
    assert started == [(1, 5, 4), (1, 5, 4)]
