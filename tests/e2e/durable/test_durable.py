"""The durable tier on one node: background flush to disk, and the restore from disk when memory
holds nothing (a daemon started afresh, e.g. after a reboot), bit-exact; a flushed version that
fails its checksums is skipped for the one before it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ftd.durable import ondisk
from ftd.util.procs import wait_for

from support.disk import flip_tensor_byte
from support.jobs import ROOT
from support.losses import assert_bit_exact, read_losses

pytestmark = pytest.mark.timeout(240)


def flush_config(flush_dir: Path, every: int = 3, keep: int = 2) -> str:
    return f'flush_dir = "{flush_dir}"\nflush_every = {every}\nflush_interval = 0\nflush_keep = {keep}\n'


def status(daemon) -> dict:
    r = subprocess.run([sys.executable, "-m", "ftd.cli", "status", "--json", "--endpoint",
                        daemon.endpoint], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_flush_then_cold_restart_restores_from_disk_bit_exact(job, tmp_path):
    flush_dir = tmp_path / "flush"
    ref = tmp_path / "ref.txt"
    assert job.trainer(None, ref, 14).wait(120) == 0

    d = job.daemon(extra=flush_config(flush_dir))
    run = tmp_path / "run.txt"
    assert job.trainer(d, run, 10, "--step-sleep", "0.05").wait(120) == 0
    st = wait_for(lambda: (s := status(d))["flush"]["running"] is None and s["flush"]["flushed"] and s, 60,
                  "the last flush to finish")
    assert st["flush"]["failures"] == 0, st["flush"]
    on_disk = ondisk.flushed_steps(flush_dir, job.name, 0)
    assert 1 <= len(on_disk) <= 2, on_disk  # flush_keep = 2
    newest = on_disk[0]
    assert ondisk.verify_export(ondisk.step_dir(flush_dir, job.name, newest)) == []
    workers = psutil.Process(d.proc.pid).children()
    assert [w.cmdline()[2] for w in workers] == ["ftd.durable.flush_worker"]
    assert d.stop() == 0  # all shared memory released: only the disk holds the state now
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() for w in workers), "the flush worker outlived its daemon"
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"ftd.{job.name}.")]

    d2 = job.daemon(extra=flush_config(flush_dir))
    resumed = tmp_path / "resumed.txt"
    assert job.trainer(d2, resumed, 14).wait(120) == 0
    log = Path(f"{resumed}.log").read_text()
    assert f"restored step {newest} from the version flushed to disk" in log, log
    assert read_losses(resumed)[0][0] == newest + 1
    # the first run's steps up to the restore, then the resumed run: one uninterrupted run's losses
    combined = tmp_path / "combined.txt"
    combined.write_text("".join(f"{s} {v}\n" for s, v in read_losses(run) if s <= newest)
                        + resumed.read_text())
    assert_bit_exact(combined, ref, 14)
    assert f"restored step {newest}" in d2.log()


def test_corrupt_flushed_version_is_skipped_for_the_previous(job, tmp_path):
    flush_dir = tmp_path / "flush"
    d = job.daemon(extra=flush_config(flush_dir, every=2, keep=3))
    run = tmp_path / "run.txt"
    assert job.trainer(d, run, 9, "--step-sleep", "0.05").wait(120) == 0
    wait_for(lambda: (s := status(d))["flush"]["running"] is None and s["flush"]["flushed"] >= 2, 60, "two flushes")
    d.stop()
    steps = ondisk.flushed_steps(flush_dir, job.name, 0)
    assert len(steps) >= 2, steps
    newest, previous = steps[0], steps[1]
    flip_tensor_byte(ondisk.step_dir(flush_dir, job.name, newest))
    assert ondisk.verify_export(ondisk.step_dir(flush_dir, job.name, newest))  # the file checksum sees it too

    d2 = job.daemon(extra=flush_config(flush_dir, every=2, keep=3))
    ref = tmp_path / "ref.txt"
    assert job.trainer(None, ref, 12).wait(120) == 0
    resumed = tmp_path / "resumed.txt"
    assert job.trainer(d2, resumed, 12).wait(120) == 0
    assert f"flushed step {newest} cannot be used" in d2.log(), d2.log()
    assert read_losses(resumed)[0][0] == previous + 1
    combined = tmp_path / "combined.txt"
    combined.write_text("".join(f"{s} {v}\n" for s, v in read_losses(run) if s <= previous) + resumed.read_text())
    assert_bit_exact(combined, ref, 12)
