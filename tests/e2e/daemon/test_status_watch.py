"""``ftd status --watch``: a live view that redraws until Ctrl-C, and shows a daemon that went away."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading

from ftd.util.procs import wait_for

from support.jobs import ROOT


def test_watch_redraws_until_ctrl_c_and_shows_the_daemon_going_away(job):
    d = job.daemon()
    p = subprocess.Popen([sys.executable, "-m", "ftd.cli", "status", "--endpoint", d.endpoint, "--watch", "0.2"],
                         cwd=ROOT, env=job.env(d), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job.procs.append(p)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stdout.read(1), "")), daemon=True)
    reader.start()
    wait_for(lambda: "".join(chunks).count("\x1b[H\x1b[2J") >= 3, 30, "the view to redraw while the daemon serves")
    d.stop()
    wait_for(lambda: "no ftd daemon answers at" in "".join(chunks), 30, "the view to say the daemon is gone")
    p.send_signal(signal.SIGINT)
    assert p.wait(15) == 0, "".join(chunks)
    reader.join(10)
    out = "".join(chunks)
    frames = out.split("\x1b[H\x1b[2J")[1:]
    assert len(frames) >= 4, out
    assert "every 0.2 s (Ctrl-C to stop)" in frames[0] and f"node 0 of job '{job.name}'" in frames[1]
    assert "no ftd daemon answers at" in frames[-1]  # the view goes on and says so
