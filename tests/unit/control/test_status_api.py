"""``ftd.status()``: the daemon's status as typed dataclasses, in process (no subprocess, no torch
needed to call it); the same facts ``ftd status --json`` prints."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ftd
from ftd.control.status import ClusterStatus, ClusterVersion, DaemonStatus

from support.jobs import ROOT


def test_status_gives_ranks_versions_memory_and_the_recoverable_step(thread_daemon):
    d = thread_daemon()
    assert ftd.status(d.endpoint).ranks == () and ftd.status(d.endpoint).recoverable_step is None
    state = {"w": torch.nn.Linear(8, 8)}
    with ftd.Client(d.endpoint) as client:
        for step in range(3):
            client.snapshot(step, state)
            assert client.wait(10)
        st = ftd.status(d.endpoint)
    assert isinstance(st, DaemonStatus) and st.job == d.config.job and st.node_rank == 0
    assert st.budget == d.config.memory_budget and 0 < st.used <= st.budget
    (rank,) = st.ranks
    assert rank.rank == 0 and rank.world == 1 and rank.alive and rank.commits == 3
    assert [v.step for v in rank.versions] == [2, 1] and rank.versions[0].bytes > 0
    assert rank.last_copy_seconds is not None and rank.last_blocked_seconds is not None
    assert st.recoverable_step == 2 and st.cluster is None and st.flush is None
    assert st.raw["ranks"][0]["commits"] == 3  # the reply as `ftd status --json` prints it


def test_a_cluster_reply_and_keys_a_newer_daemon_adds():
    reply = {"job": "j", "node_rank": 1, "endpoint": "ipc://x", "pid": 7, "uptime": 1.0, "shm_dir": "/dev/shm",
             "budget": 10, "used": 4, "invalid_requests": 0, "ranks": [], "added_later": {"x": 1},
             "cluster": {"node_rank": 1, "nodes": 4, "k": 3, "m": 1, "recoverable": 12, "group_nodes": [0, 1, 2, 3],
                         "versions": [{"step": 12, "local": True, "protected": True, "recoverable": True,
                                       "data_bytes": 3, "parity_bytes": 1, "new_field": 0}]}}
    st = DaemonStatus.from_dict(reply)
    assert st.recoverable_step == 12 and isinstance(st.cluster, ClusterStatus) and st.cluster.group_nodes == (0, 1, 2, 3)
    assert st.cluster.versions == (ClusterVersion(12, True, True, True, 3, 1),)
    assert st.cluster.versions[0].state == "recoverable" and st.raw["added_later"] == {"x": 1}


def test_no_daemon_is_a_clear_error(tmp_path):
    with pytest.raises(ftd.DaemonUnavailable, match="no ftd daemon at"):
        ftd.status(f"ipc://{tmp_path}/none.sock")


def test_ftd_status_imports_no_torch():
    code = "import sys, ftd; ftd.status; ftd.control.status.DaemonStatus; assert 'torch' not in sys.modules, 'torch'"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
