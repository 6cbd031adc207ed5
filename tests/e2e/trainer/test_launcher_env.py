"""What torchrun really gives its workers: the environment ``launcher_warning`` reads (checked
under torchrun's own agent, since the warning is only as good as that assumption)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ftd.util.procs import free_ports

from support.jobs import ROOT

pytestmark = pytest.mark.timeout(120)
PROBE = "from ftd.trainer.discovery import launcher_warning\nprint('WARNING:', launcher_warning())\n"


@pytest.mark.parametrize("disable_sharing", [False, True])
def test_torchrun_with_restarts_and_a_shared_store_is_warned_about(tmp_path, disable_sharing):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if disable_sharing:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    port = free_ports(1)[0]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--max-restarts", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", str(script)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(line for line in r.stdout.splitlines() if line.startswith("WARNING:"))
    if disable_sharing:
        assert line == "WARNING: None", line
    else:
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in line, line
