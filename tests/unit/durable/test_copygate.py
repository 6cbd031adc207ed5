"""The daemon tells its flush worker when trainers copy (copygate): the worker waits until then."""
from __future__ import annotations

import time

import pytest

from ftd.durable.copygate import CopyGate, GateWatcher

pytestmark = pytest.mark.timeout(10)


def test_the_worker_waits_while_a_copy_runs_and_never_past_its_deadline(tmp_path):
    gate = CopyGate(tmp_path / "node0.copying")
    watcher = GateWatcher(gate.path)
    t0 = time.monotonic()
    watcher.wait()
    assert time.monotonic() - t0 < 0.01  # no copy announced
    gate.copying_until(time.time() + 0.2)  # a copy that should be over in 0.2 s (or its trainer died)
    watcher.wait()
    assert 0.15 <= time.monotonic() - t0 < 1.0 and watcher.paused > 0.1
    gate.copying_until(0.0)
    t1 = time.monotonic()
    watcher.wait()
    assert time.monotonic() - t1 < 0.01
    gate.close()
    assert not gate.path.exists()


def test_no_gate_file_means_no_waiting(tmp_path):
    watcher = GateWatcher(tmp_path / "missing")
    watcher.wait()
    assert watcher.paused == 0.0
