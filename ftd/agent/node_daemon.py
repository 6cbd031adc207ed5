"""The node's ftd daemon as the agent sees it: started if none answers, restarted if it dies, waited for.

A daemon someone else keeps (systemd) is used as it is, never restarted or stopped. Before any worker
starts, the agent waits until the daemon's start-up sync is over: on a replacement node that is the
rebuild of the node's snapshots from its peers, so the workers restore at once.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ftd.agent.plan import describe_exit, say
from ftd.config import Config
from ftd.control.connection import status_or_none
from ftd.errors import AgentFailed
from ftd.util.procs import stop_process_group

DAEMON_START_TIMEOUT = 60.0   # seconds for a started daemon to answer
READY_TIMEOUT = 900.0         # seconds for the daemon's start-up rebuild before the workers start
DAEMON_STOP_GRACE = 15.0      # seconds between SIGTERM and SIGKILL of the daemon the agent started


class NodeDaemon:
    """The node's ftd daemon: started by the agent if none answers, restarted if it dies."""

    def __init__(self, config_path: Path, config: Config, log_dir: Path, node_rank: int):
        self.config_path, self.config, self.log_dir, self.node_rank = config_path, config, log_dir, node_rank
        self.proc: subprocess.Popen | None = None
        self.external = False  # a daemon someone else runs (systemd): used, never restarted or stopped

    def status(self) -> dict | None:
        return status_or_none(self.config.endpoint, timeout=2.0)

    def committed_since(self, wall_time: float) -> bool:
        """Whether a rank of this node committed a snapshot at or after ``wall_time`` (time.time()):
        its generation trained. False when the daemon does not answer at once."""
        st = status_or_none(self.config.endpoint, timeout=0.5)
        return any((r.get("last_commit_at") or 0) >= wall_time for r in (st or {}).get("ranks", []))

    def ensure_running(self) -> None:
        if self.external or (self.proc is not None and self.proc.poll() is None):
            return
        if self.proc is not None:
            say(self.node_rank, f"the daemon (pid {self.proc.pid}) {describe_exit(self.proc.returncode)}; "
                                "restarting it (it adopts the snapshots in shared memory)")
            self.proc = None
        elif self.status() is not None:
            say(self.node_rank, f"using the daemon already serving at {self.config.endpoint} (its keeper restarts it)")
            self.external = True
            return
        log = open(self.log_dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", str(self.config_path)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while self.status() is None:
            if self.proc.poll() is not None:
                raise AgentFailed(f"the daemon {describe_exit(self.proc.returncode)} at start; "
                                  f"see {self.log_dir / 'daemon.log'}")
            if time.monotonic() > deadline:
                raise AgentFailed(f"the daemon did not answer within {DAEMON_START_TIMEOUT:g} s; "
                                  f"see {self.log_dir / 'daemon.log'}")
            time.sleep(0.1)
        say(self.node_rank, f"started the daemon (pid {self.proc.pid}) at {self.config.endpoint}")

    def wait_ready(self, check_stop: Callable[[], None]) -> dict:
        """Until the daemon's start-up sync/rebuild is over; returns its status and reports the rebuild.
        ``check_stop()`` raises when the agent is told to stop meanwhile."""
        deadline = time.monotonic() + READY_TIMEOUT
        told = False
        while True:
            check_stop()
            self.ensure_running()
            st = self.status()
            cluster = (st or {}).get("cluster")
            if st is not None and (cluster is None or (cluster["ready"] and not cluster["rebuilding"]
                                                       and not cluster.get("disk_wait"))):
                break
            if not told and cluster is not None:
                say(self.node_rank, "waiting for the daemon to sync with its peers (a replacement node rebuilds "
                                    "its snapshots now, or the cluster restores from disk)")
                told = True
            if time.monotonic() > deadline:
                raise AgentFailed(f"the daemon was not ready within {READY_TIMEOUT:g} s")
            time.sleep(0.1)
        rebuilt = (cluster or {}).get("last_rebuild")
        if told and rebuilt and rebuilt.get("ok") and rebuilt.get("fetched_bytes"):
            say(self.node_rank, f"rebuilt this node's snapshots of step {rebuilt.get('step')} from its peers' memory "
                                f"in {rebuilt.get('seconds', 0):.2f} s ({rebuilt.get('fetched_bytes', 0) / 2**20:.1f} MiB fetched)")
        if cluster and cluster.get("lost_error"):
            say(self.node_rank, f"the memory copies cannot restore this job: {cluster['lost_error']}")
        return st

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=DAEMON_STOP_GRACE)
            say(self.node_rank, "stopped the daemon")
            self.proc = None
