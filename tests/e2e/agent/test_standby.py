"""Warm standby workers as real processes: they hold no rank while they wait, they become the worker
(environment, argv, exit status) when their generation comes, and they are gone when it never does,
whether the agent stops them or dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from ftd.agent.standby import Standby
from ftd.util import timeline
from ftd.util.procs import wait_for

from support.jobs import ROOT

pytestmark = pytest.mark.timeout(90)


def _env(tmp_path, **extra) -> dict:
    return dict(os.environ, PYTHONPATH=f"{ROOT}:{tmp_path}", **{timeline.ENV: str(tmp_path / "timeline.jsonl")}, **extra)


def _ready(tmp_path, pid: int) -> bool:
    return any(e["event"] == "standby_ready" and e["pid"] == pid for e in timeline.read(tmp_path / "timeline.jsonl"))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_standby_holds_no_rank_then_becomes_the_worker_with_its_exit_status(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import os, sys, torch\nprint('main', __name__, os.environ['RANK'], sys.argv[1:], sys.path[0] == "
                      f"{str(tmp_path)!r}, flush=True)\nsys.exit(3)\n")
    standby = Standby(sys.executable, ["--path", str(script), "--", "a", "b"], _env(tmp_path), tmp_path / "rank5.log")
    try:
        wait_for(lambda: _ready(tmp_path, standby.proc.pid), 60, "the standby to import torch")
        waiting_env = psutil.Process(standby.proc.pid).environ()
        assert not {"RANK", "MASTER_PORT", "FTD_ENDPOINT", "FTD_CONFIG"} & set(waiting_env), "a waiting standby has a rank"
        assert "main" not in (tmp_path / "rank5.log").read_text(), "the trainer ran before its generation"
        proc = standby.activate(dict(_env(tmp_path), RANK="5"))
        assert proc is standby.proc and proc.wait(60) == 3
        assert "main __main__ 5 ['a', 'b'] True" in (tmp_path / "rank5.log").read_text()
    finally:
        standby.discard()


def test_a_module_standby_runs_it_as_python_m_would(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "train.py").write_text("import sys, os\nif __name__ == '__main__':\n"
                                               "    print('module', sys.argv[0].endswith('train.py'), sys.argv[1:], "
                                               "os.environ['RANK'], flush=True)\n")
    standby = Standby(sys.executable, ["--module", "pkg.train", "--", "--lr", "1"], _env(tmp_path), tmp_path / "r.log")
    try:
        assert standby.activate(dict(_env(tmp_path), RANK="0")).wait(60) == 0
        assert "module True ['--lr', '1'] 0" in (tmp_path / "r.log").read_text()
    finally:
        standby.discard()


def test_a_standby_whose_generation_never_comes_is_cleaned_up(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('ran', flush=True)\n")
    standby = Standby(sys.executable, ["--path", str(script), "--"], _env(tmp_path), tmp_path / "r.log")
    wait_for(lambda: _ready(tmp_path, standby.proc.pid), 60, "the standby to import torch")
    standby.discard()  # the agent stops
    assert standby.proc.poll() is not None and standby.activate({"RANK": "0"}) is None
    # the agent dies (SIGKILL): the kernel closes the pipe and the standby exits by itself
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom ftd.agent.standby import Standby\n"
        f"s = Standby(sys.executable, ['--path', {str(script)!r}, '--'], {_env(tmp_path)!r}, Path({str(tmp_path / 'r.log')!r}))\n"
        "print(s.proc.pid, flush=True)\ntime.sleep(120)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env=_env(tmp_path))
    pid = None
    try:
        pid = int(holder.stdout.readline())
        wait_for(lambda: _ready(tmp_path, pid), 60, "the second standby to import torch")
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        wait_for(lambda: _gone(pid), 20, "the orphaned standby to exit")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if pid is not None and not _gone(pid):
            os.kill(pid, signal.SIGKILL)
    assert "ran" not in (tmp_path / "r.log").read_text()


def test_a_failing_trainer_in_a_standby_exits_1_at_once_with_its_traceback_and_atexit_handlers(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import atexit\natexit.register(lambda: print('atexit ran', flush=True))\n"
                      "try:\n    raise RuntimeError('peer gone')\nfinally:\n    print('finally ran', flush=True)\n")
    standby = Standby(sys.executable, ["--path", str(script), "--"], _env(tmp_path), tmp_path / "r.log")
    try:
        assert standby.activate(dict(_env(tmp_path), RANK="0")).wait(60) == 1
        log = (tmp_path / "r.log").read_text()
        assert "RuntimeError: peer gone" in log and "finally ran" in log and "atexit ran" in log, log
    finally:
        standby.discard()
