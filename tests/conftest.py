"""Fixtures every test may use, and the marks that split the suite by cost.

Tests under ``tests/unit`` (fast, no processes) are marked ``unit``; those under ``tests/e2e`` (real
daemon, trainer, launcher and agent processes) ``e2e``. ``./scripts/test -m unit`` is the fast loop.
"""
from __future__ import annotations

import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from support.jobs import SHM, LocalJob, ThreadDaemon, leftovers

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = Path(item.fspath).resolve().relative_to(TESTS).parts[0]
        if kind in ("unit", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture
def job(tmp_path):
    j = LocalJob(tmp_path)
    yield j
    left = j.cleanup()
    assert not left, f"shared memory left behind by a cleanly stopped daemon: {left}"


@pytest.fixture
def thread_daemon(tmp_path):
    """Factory of in-process daemons of one private job; all stopped and cleaned at teardown."""
    from ftd.config import Config
    name = f"t{uuid.uuid4().hex[:10]}"
    runtime = Path(tempfile.mkdtemp(prefix="ftdt-", dir="/tmp"))
    started: list[ThreadDaemon] = []

    def make(**overrides) -> ThreadDaemon:
        kwargs = dict(job=name, runtime_dir=runtime, memory_budget=1 << 30, memory_reserve=64 << 20,
                      request_timeout=3.0)
        kwargs.update(overrides)
        d = ThreadDaemon(Config(**kwargs))
        started.append(d)
        return d

    make.job = name
    yield make
    for d in started:
        d.stop()
    left = leftovers(name)
    for n in left:
        (SHM / n).unlink(missing_ok=True)
    subprocess.run(["rm", "-rf", str(runtime)], check=False)
    assert not left, f"shared memory left behind: {left}"
