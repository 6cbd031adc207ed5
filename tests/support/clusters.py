"""A local ftd cluster for tests: `ftd launch` as a subprocess, one tiny_trainer per node.

Teardown stops the launcher, SIGKILLs whatever still runs from the cluster's directory (daemons
restarted by hand, trainers), and deletes the job's /dev/shm files, even when the test failed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ftd.control.connection import status_or_none
from ftd.util.procs import kill_everything_from, wait_for

from support.jobs import ROOT, SHM, leftovers
from support.losses import read_losses

ENV = dict(os.environ, PYTHONPATH=str(ROOT))
for _key in ("RANK", "WORLD_SIZE", "FTD_ENDPOINT"):
    ENV.pop(_key, None)


class LocalCluster:
    def __init__(self, nodes: int, parity: int, extra_args: tuple[str, ...] = (), distinct_ranks: bool = False):
        self.nodes, self.parity = nodes, parity
        self.distinct_ranks = distinct_ranks  # node n's trainer is rank n of world G (else rank 0 of 1)
        self.dir = Path(tempfile.mkdtemp(prefix="ftdc-", dir="/tmp"))
        self.job = f"c{uuid.uuid4().hex[:10]}"
        self.procs: list[subprocess.Popen] = []
        self.trainers: dict[int, subprocess.Popen] = {}
        self.launcher = self._popen([sys.executable, "-m", "ftd.cli", "launch", "--nodes", str(nodes), "--parity",
                                     str(parity), "--dir", str(self.dir), "--job", self.job,
                                     "--memory-budget", "1GiB", *extra_args],
                                    stdout=open(self.dir / "launch.out", "wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: (self.dir / "cluster.json").exists() or self.launcher.poll() is not None, 60,
                 "ftd launch to write cluster.json")
        assert self.launcher.poll() is None, (self.dir / "launch.out").read_text()
        self.info = json.loads((self.dir / "cluster.json").read_text())
        self.endpoints = [m["endpoint"] for m in self.info["members"]]

    def _popen(self, cmd, **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, env=kw.pop("env", ENV), cwd=ROOT, **kw)
        self.procs.append(p)
        return p

    # ---- ftd commands -------------------------------------------------------------------------
    def ftd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftd.cli", *args], env=ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def config(self, node: int) -> str:
        return str(self.dir / f"node-{node}.toml")

    def kill_node(self, node: int) -> None:
        r = self.ftd("kill-node", "--dir", str(self.dir), "--node-rank", str(node))
        assert r.returncode == 0, r.stdout + r.stderr
        self.trainers.pop(node, None)

    def lose_and_restart(self, nodes: list[int]) -> None:
        """Lose ``nodes`` at once (daemons, trainers, shared memory), then start their daemons again,
        empty: each rebuilds from its peers (or the cluster goes to disk) by itself."""
        for n in nodes:
            self.kill_node(n)
        for n in nodes:
            assert not [p for p in SHM.iterdir() if p.name.startswith(f"ftd.{self.job}.n{n}.")], "kill-node left memory"
        for n in nodes:
            self.restart_daemon(n)

    def restart_daemon(self, node: int, endpoint: str | None = None, timeout: float = 30) -> None:
        """Start node ``node``'s daemon again (``endpoint``: under that peer address, FTD_PEER_ENDPOINT, as a
        replacement host would) and wait until its start-up sync is over."""
        log = open(self.dir / f"node-{node}.restart.log", "ab")
        env = dict(ENV, FTD_PEER_ENDPOINT=endpoint) if endpoint else ENV
        self._popen([sys.executable, "-m", "ftd.cli", "daemon", "--config", self.config(node)],
                    stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.ping(node), timeout, f"node {node}'s restarted daemon")

    def recover(self, node: int) -> subprocess.CompletedProcess:
        return self.ftd("recover", "--config", self.config(node), "--timeout", "90")

    def status(self, node: int) -> dict | None:
        return status_or_none(self.endpoints[node])

    def ping(self, node: int) -> bool:
        st = self.status(node)
        return bool(st and st["cluster"]["ready"])

    def recoverable(self) -> list[int]:
        return [(self.status(n) or {"cluster": {"recoverable": None}})["cluster"]["recoverable"]
                for n in range(self.nodes)]

    def settled(self, timeout: float = 60, quiet: float = 1.0) -> int:
        """The recoverable step once every node agrees on it, no round is in flight, and that stayed
        so for ``quiet`` seconds (a round may still start just after the trainers stopped)."""
        def agreed():
            sts = [self.status(n) for n in range(self.nodes)]
            if any(s is None for s in sts):
                return None
            rs = {s["cluster"]["recoverable"] for s in sts}
            idle = all(s["cluster"]["round"] is None for s in sts)
            return rs.pop() if len(rs) == 1 and idle else None

        deadline = time.monotonic() + timeout
        since, value = None, None
        while time.monotonic() < deadline:
            now = agreed()
            if now is None or now != value:
                since, value = time.monotonic(), now
            elif time.monotonic() - since >= quiet:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the nodes did not settle on a recoverable step within {timeout}s")

    def round_in_flight(self, newer_than: int, coordinator: int = 0, timeout: float = 60) -> int:
        """Wait until the coordinator (on node ``coordinator``) protects a step newer than ``newer_than``;
        returns that step."""
        def in_flight():
            co = self.status(coordinator)["cluster"]["coordinator"]
            return (co["round"]["step"],) if co["phase"] == "protect" and co["round"]["step"] > newer_than else None
        (step,) = wait_for(in_flight, timeout, f"a protection round of a step newer than {newer_than}")
        return step

    # ---- trainers -----------------------------------------------------------------------------
    def losses(self, node: int) -> Path:
        return self.dir / f"loss{node}"

    def start_trainer(self, node: int, steps: int, step_sleep: float = 0.0, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        env = dict(ENV, FTD_ENDPOINT=self.endpoints[node])
        if self.distinct_ranks:
            env.update(RANK=str(node), WORLD_SIZE=str(self.nodes))
        out = open(self.dir / f"trainer{node}.out", "ab")
        p = self._popen([sys.executable, "-m", "ftd.examples.tiny_trainer", "--steps", str(steps), "--losses",
                         str(self.losses(node)), "--seed", str(1000 + node), "--width", "64", "--depth", "2",
                         "--step-sleep", str(step_sleep), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
        self.trainers[node] = p
        return p

    def run_trainers(self, steps: int, step_sleep: float = 0.0, timeout: float = 120,
                     extra: tuple[str, ...] = ()) -> list[int | None]:
        """Run one trainer per node to ``steps``; returns the step each resumed after (None: fresh)."""
        return self.wait_trainers(self.start_trainers(steps, step_sleep, extra), timeout)

    def start_trainers(self, steps: int, step_sleep: float = 0.0, extra: tuple[str, ...] = ()) -> dict:
        """Start one trainer per node (``wait_trainers`` waits for them)."""
        marks = {n: len(self._trainer_out(n)) for n in range(self.nodes)}
        return {n: (self.start_trainer(n, steps, step_sleep, extra), marks[n]) for n in range(self.nodes)}

    def wait_trainers(self, started: dict, timeout: float = 120) -> list[int | None]:
        """Wait for the trainers ``start_trainers`` started; the step each resumed after (None: fresh)."""
        for n, (p, mark) in started.items():
            assert p.wait(timeout) == 0, f"trainer of node {n} failed:\n{self._trainer_out(n)[mark:]}"
        return [self.resumed(n, since=mark) for n, (_, mark) in started.items()]

    def _trainer_out(self, node: int) -> str:
        path = self.dir / f"trainer{node}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def resumed(self, node: int, since: int = 0) -> int | None:
        m = re.search(r"resuming after step (\d+)|starting fresh", self._trainer_out(node)[since:])
        assert m, f"trainer of node {node} printed no start line"
        return int(m.group(1)) if m.group(1) else None

    def kill_trainers(self) -> None:
        for p in self.trainers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.trainers.clear()

    # ---- teardown -----------------------------------------------------------------------------
    def close(self) -> list[str]:
        self.kill_trainers()
        if self.launcher.poll() is None:
            self.launcher.send_signal(signal.SIGINT)
            try:
                self.launcher.wait(30)
            except subprocess.TimeoutExpired:
                pass
        kill_everything_from(self.dir)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        left = leftovers(self.job)
        for name in left:
            (SHM / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


#: seed -> the losses of the longest uninterrupted run of that seed's trainer so far, in this pytest
#: process: a run's first S steps do not depend on how many it takes, and each reference run is a
#: torch process start (about 1 s of the 2 cores), so the cluster tests share them
_REFERENCES: dict[int, list[tuple[int, str]]] = {}
REFERENCE_STEPS = 200  # the least a reference run takes, so that most tests' requests are prefixes


def reference_losses_for_seed(directory: Path, seed: int, steps: int) -> dict[int, str]:
    """Losses of an uninterrupted run (no ftd) of the tiny_trainer of ``seed`` at the size the cluster
    tests train, steps 0 .. steps - 1."""
    known = _REFERENCES.get(seed, [])
    if len(known) < steps:
        path = directory / f"ref-seed{seed}"
        path.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "ftd.examples.tiny_trainer", "--steps", str(max(steps, REFERENCE_STEPS)),
                        "--losses", str(path), "--seed", str(seed), "--width", "64", "--depth", "2", "--no-ftd"],
                       env=ENV, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, timeout=120)
        known = _REFERENCES[seed] = read_losses(path)
        assert [s for s, _ in known] == list(range(len(known))), f"reference run of seed {seed}: steps missing"
    return dict(known[:steps])


def reference_losses(directory: Path, node: int, steps: int) -> dict[int, str]:
    """Losses of an uninterrupted run of node ``node``'s trainer (same seed and size, no ftd)."""
    return reference_losses_for_seed(directory, 1000 + node, steps)


def assert_matches_reference(cluster: LocalCluster, ref: dict[int, dict[int, str]], upto: int) -> None:
    """Every loss every node ever wrote (re-runs included) equals the uninterrupted run's."""
    for node in range(cluster.nodes):
        got = read_losses(cluster.losses(node))
        assert {s for s, _ in got} == set(range(upto)), f"node {node} did not run every step below {upto}"
        for step, value in got:
            assert value == ref[node][step], f"node {node} step {step}: {value} != reference {ref[node][step]}"
