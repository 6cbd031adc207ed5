"""A one-node config for an agent under test, with everything it started removed afterwards."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from support.jobs import SHM


@pytest.fixture
def node_config():
    directory = Path(tempfile.mkdtemp(prefix="ftda-", dir="/tmp"))  # short: unix socket paths
    job = f"agent{os.getpid()}{time.monotonic_ns() % 100000}"
    path = directory / "node.toml"
    path.write_text(f'job = "{job}"\nnode_rank = 0\nruntime_dir = "{directory}/run"\n'
                    'memory_budget = "256MiB"\nmemory_reserve = "64MiB"\n')
    yield path, job
    subprocess.run(["pkill", "-KILL", "-f", str(directory)], check=False)
    for p in SHM.glob(f"ftd.{job}.*"):
        p.unlink()
    subprocess.run(["rm", "-rf", str(directory)], check=False)
