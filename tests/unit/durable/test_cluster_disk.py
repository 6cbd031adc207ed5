"""A node's side of the restore from disk (``durable.cluster_restore.ClusterDisk``) when the coordinator
counts on it for a restore it has no open offer for (its offer was taken by an older restore, which the
sync of its epoch ended here): it offers again instead of refusing every resend of the disk_load, which
left a cluster waiting for ever (seen in test_durable_cluster, before the coordinator ignored stale needs)."""
from __future__ import annotations

import types

import pytest

from ftd.durable.cluster_restore import ClusterDisk

pytestmark = pytest.mark.timeout(30)


def node_with_disk(steps: list[int]):
    sent = []
    node = types.SimpleNamespace(epoch=1, lost_error=None, catalog=types.SimpleNamespace(recoverable=8),
                                 to_coordinator=lambda mtype, **kw: sent.append((mtype, kw)),
                                 flush_coordinator=lambda: None)
    flusher = types.SimpleNamespace(on_disk=lambda: list(steps))
    return ClusterDisk(node, flusher), sent


def test_a_disk_load_without_an_open_offer_is_answered_with_an_offer():
    disk, sent = node_with_disk([8, 4])
    disk.on_disk_load(epoch=2, step=8)
    assert sent == [("disk_offer", {"epoch": 1, "recoverable": 8, "steps": [8, 4], "need": False})]
    assert disk.disk_wait and disk.disk_load is None  # restores wait; the coordinator's resend loads it


def test_a_late_disk_load_of_an_epoch_this_node_has_is_ignored():
    disk, sent = node_with_disk([8])
    disk.on_disk_load(epoch=1, step=8)
    assert sent == [] and disk.disk_wait is None
