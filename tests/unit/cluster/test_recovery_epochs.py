"""A rebuild that began before a restore from disk (or a new run) and ends after it is the older
timeline's: its failure must not send the cluster to the disk a second time, and its success must not
bring the older timeline's versions back (``Recovery._finish`` drops both, and rebuilds again where
needed). Found by tests/e2e/durable/test_durable_cluster.py: two nodes' rebuilds, begun while their
group could not be rebuilt, failed after the restore from disk and made the coordinator restore again."""
from __future__ import annotations

import types

import pytest

from ftd.cluster.rebuilder import Result
from ftd.cluster.recovery import Recovery

pytestmark = pytest.mark.timeout(30)


class FakeCatalog:
    def __init__(self, recoverable: int, held: dict[int, list[str]]):
        self.recoverable = recoverable
        self.held = held
        self.ranks = {0: types.SimpleNamespace(buffers=[types.SimpleNamespace(name=n) for ns in held.values()
                                                          for n in ns])}
        self.released: list[str] = []
        self.adopted: list[str] = []
        self.store = types.SimpleNamespace(release=self.released.append)

    def buffers_of(self, step: int) -> list:
        return [(None, types.SimpleNamespace(name=n)) for n in self.held.get(step, [])]

    def adopt(self, rank, world, name, *args, **kwargs) -> None:
        self.adopted.append(name)


class FakeNode:
    def __init__(self, catalog: FakeCatalog, epoch: int, ready: bool = True):
        self.catalog, self.epoch, self.ready = catalog, epoch, ready
        self.me, self.coordinator, self.lost_error = 1, None, None
        self.config = types.SimpleNamespace(nodes=3)
        self.sent: list[tuple] = []
        self.offers: list[bool] = []
        self.dropped_parity: list[str] = []
        self.links = types.SimpleNamespace(send=lambda n, mtype, **kw: self.sent.append((n, mtype)))
        self.disk = types.SimpleNamespace(offer_disk=lambda need: self.offers.append(need))
        self.store = types.SimpleNamespace(parity={}, forget_verification=lambda: None,
                                           drop_segment=self.dropped_parity.append,
                                           keep=lambda *a: None)

    def to_coordinator(self, mtype: str, **kw) -> None:
        self.sent.append(("coordinator", mtype))


def running(node: FakeNode, began_in: int) -> tuple[Recovery, list[str]]:
    """A Recovery whose rebuild began in epoch ``began_in``; ``start`` records instead of running one."""
    r = Recovery(node)
    r.rebuilding, r._epoch = "the cluster's recoverable step is 0, which this node lacks", began_in
    restarts: list[str] = []
    r.start = restarts.append
    return r, restarts


LOST = "step 0: group 0 lost 2 nodes [1, 2], but its parity (m=1) rebuilds at most 1; cannot be rebuilt"


def test_a_failure_of_an_older_epoch_is_not_a_loss_of_the_new_one():
    node = FakeNode(FakeCatalog(0, {0: ["from-disk"]}), epoch=1)
    r, restarts = running(node, began_in=0)
    r._finish("error", RuntimeError(LOST))
    assert node.lost_error is None and node.offers == [] and node.sent == [], "the stale failure was acted on"
    assert r.rebuilding is None and restarts == []  # it holds the step the disk gave: nothing to rebuild
    assert r.last_rebuild is None


def test_the_same_failure_in_its_own_epoch_still_is_one():
    node = FakeNode(FakeCatalog(0, {}), epoch=1)
    r, _ = running(node, began_in=1)
    r._finish("error", RuntimeError(LOST))
    assert node.lost_error and node.offers == [True] and ("coordinator", "hello") not in node.sent
    assert {(n, t) for n, t in node.sent} == {(0, "lost"), (2, "lost")}


def test_a_success_of_an_older_epoch_brings_nothing_back_and_rebuilds_again():
    node = FakeNode(FakeCatalog(3, {}), epoch=2)
    node.store.parity = {7: ("parity-held", {})}
    r, restarts = running(node, began_in=1)
    res = Result(step=7, ranks=[{"rank": 0, "world": 1, "name": "rebuilt-7", "capacity": 1, "manifest": {}}],
                 parity=("parity-rebuilt", {}), rebuilt_data=True)
    r._finish("ok", res)
    assert node.catalog.adopted == [] and node.catalog.recoverable == 3
    assert node.catalog.released == ["rebuilt-7"] and node.dropped_parity == ["parity-rebuilt"]
    assert len(restarts) == 1 and "epoch 2" in restarts[0]  # it lacks step 3, the new timeline's


def test_a_starting_daemon_whose_epoch_changed_keeps_starting():
    node = FakeNode(FakeCatalog(-1, {}), epoch=1, ready=False)
    r, restarts = running(node, began_in=0)
    r._finish("ok", Result())
    assert not node.ready and len(restarts) == 1 and node.sent == []  # its hello comes after the rerun
