"""The demo's two runs: the uninterrupted reference, and the job under ftd with the failures injected.

``Run`` follows every rank's log and every daemon's status, SIGKILLs a worker and then loses a
whole node at the planned steps, starts the replacement node, and records what each failure cost.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ftd.control.connection import status_or_none
from ftd.demo import breakdown, report
from ftd.demo.plan import INDENT, REFERENCE_TIMEOUT, REPLACEMENT_DELAY, RUN_TIMEOUT, Plan, say
from ftd.errors import DemoError
from ftd.local.agentjob import AgentCluster, DaemonWatch, RankLog, common_resume, reached, start_reference
from ftd.util import timeline
from ftd.util.procs import log_tail


@dataclasses.dataclass
class Demo:
    plan: Plan
    workdir: Path
    out: Path
    keep: bool
    reference: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    cluster: AgentCluster | None = None

    def trainer(self, out_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ftd.examples.gpt_trainer", "--steps", str(self.plan.steps),
                "--out", str(out_dir), *self.plan.model, "--step-sleep", str(self.plan.step_sleep),
                "--allreduce", self.plan.allreduce, *extra]


def run_reference(demo: Demo) -> float:
    """The job without ftd, never interrupted: ranks started directly with torchrun's environment."""
    plan, ref = demo.plan, demo.workdir / "reference"
    t0 = time.monotonic()
    demo.reference = start_reference(plan.nodes, plan.nproc, demo.trainer(ref, "--no-ftd"), ref)
    watch = RankLog(ref / "rank0.log")
    shown = -1
    while any(p.poll() is None for p in demo.reference):
        watch.poll()
        if watch.last_step >= shown + 20:
            shown = watch.last_step
            say(f"{INDENT}reference step {shown:3d}  loss {watch.last_loss}")
        if time.monotonic() - t0 > REFERENCE_TIMEOUT:
            raise DemoError(f"the reference run did not finish within {REFERENCE_TIMEOUT:g} s")
        time.sleep(0.1)
    bad = [(r, p.returncode) for r, p in enumerate(demo.reference) if p.returncode != 0]
    if bad:
        rank = bad[0][0]
        raise DemoError(f"reference rank {rank} exited with status {bad[0][1]}:\n"
                        + log_tail(ref / f"rank{rank}.log", 15, indent=INDENT))
    seconds = time.monotonic() - t0
    say(f"{INDENT}done: {plan.steps} steps in {seconds:.1f} s")
    return seconds


class Run:
    """The ftd run: follows logs and daemons, injects the failures, records what happened."""

    def __init__(self, demo: Demo):
        self.demo, self.plan = demo, demo.plan
        self.cluster = demo.cluster
        self.logs = [RankLog(self.cluster.rank_log(r)) for r in range(self.plan.world)]
        self.daemons = DaemonWatch(self.cluster)
        self.failures: list[dict] = []
        self._shown = -1

    def poll(self) -> None:
        for log in self.logs:
            log.poll()
        lead = self.logs[0]
        if lead.last_step >= self._shown + 10:
            self._shown = lead.last_step
            say(f"{INDENT}step {lead.last_step:3d}  loss {lead.last_loss}   {self.daemons.recoverable()}")

    def wait(self, what: str, predicate, deadline: float, agents_may_finish: bool = False) -> None:
        while not predicate():
            failure = self.cluster.agent_failure(finished_ok=agents_may_finish)
            if failure:
                raise DemoError(f"while waiting for {what}, {failure}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            self.poll()
            time.sleep(0.05)

    def wait_resumed(self, after_generation: int, failure: dict, deadline: float) -> None:
        """Until every rank finished a step in a generation newer than ``after_generation``."""
        def training():
            return all(log.generation > after_generation and log.generation in log.resumed
                       and log.generation in log.reached for log in self.logs)
        self.wait("the workers to train again", training, deadline)
        observed = time.monotonic() - failure["t"]
        try:
            failure["resumed_after"] = common_resume(self.logs)
        except ValueError as e:
            raise DemoError(str(e)) from None
        # the furthest any rank got before the failure: everything after the restored step is re-run
        failure["at_step"] = reached(self.logs, failure["failed_generation"])
        failure["steps_lost"] = failure["at_step"] - failure["resumed_after"]
        failure["generation"] = self.logs[0].generation
        events = [e for n in range(self.plan.nodes) for e in timeline.read(self.cluster.log_dir(n) / "timeline.jsonl")]
        failure["breakdown"] = breakdown.breakdown(events, failure["t_wall"], failure["failed_generation"],
                                                   failure["generation"])
        # from the failure to the moment the last rank finished its first step after it (the workers'
        # own marks, if every rank left one); else the demo's view of the logs, a poll later
        marked = {e.get("rank") for e in events if e["event"] == "first_step" and e.get("generation") == failure["generation"]}
        again = breakdown.training_again(failure["breakdown"])
        failure["seconds_to_resume"] = again if again is not None and len(marked) == self.plan.world else observed
        say(f"{INDENT}<<< every rank restored step {failure['resumed_after']} from memory and goes on "
            f"({report.plural(failure['steps_lost'], 'step')} re-run, {failure['seconds_to_resume']:.1f} s "
            "after the failure to training again)")
        for line in breakdown.lines(failure["breakdown"], INDENT + "    "):
            say(line)

    def crash_worker(self) -> dict:
        node = self.plan.crash_node
        log = self.logs[node * self.plan.nproc]
        t, t_wall = time.monotonic(), time.time()  # the failure's moment: just before the kill
        try:
            os.kill(log.pid, signal.SIGKILL)
        except ProcessLookupError:
            raise DemoError(f"the worker of node {node} (pid {log.pid}) had already exited; give the job more --steps")
        failure = {"what": f"worker crash (rank {node * self.plan.nproc}, SIGKILL)", "node": node, "t": t, "t_wall": t_wall, "pid": log.pid,
                   "failed_generation": log.generation}
        say(f"{INDENT}>>> SIGKILL the worker of node {node} (pid {log.pid}) after step {log.last_step}")
        return failure

    def node_logs(self, node: int) -> list[RankLog]:
        return self.logs[node * self.plan.nproc:(node + 1) * self.plan.nproc]

    def lose_node(self) -> dict:
        node = self.plan.lose_node
        if self.cluster.agents[node].poll() is not None:
            raise DemoError(f"the job finished before node {node} could be lost; give it more --steps")
        daemon = self.daemons.status.pop(node, {}).get("pid")
        workers = [log.pid for log in self.node_logs(node)]
        failure = {"what": f"loss of node {node} (agent, daemon, workers, shared memory)", "node": node,
                   "t": time.monotonic(), "t_wall": time.time(), "failed_generation": self.node_logs(node)[0].generation}
        say(f"{INDENT}>>> losing node {node} after step {self.node_logs(node)[0].last_step}: SIGKILL its agent, "
            "daemon and workers, delete its shared memory")
        deleted = self.cluster.lose(node, [*workers, daemon])
        say(f"{INDENT}    killed agent, daemon (pid {daemon}) and worker(s) (pid {' '.join(map(str, workers))}); "
            f"deleted {deleted} shared-memory files of the node")
        return failure

    def replace_node(self, failure: dict, deadline: float) -> None:
        node = self.plan.lose_node
        time.sleep(REPLACEMENT_DELAY)
        self.cluster.start_agent(node)
        say(f"{INDENT}    a replacement node {node} starts: its agent starts an empty daemon, which rebuilds "
            "the node's snapshots from its peers before the worker starts")

        def rebuilt():
            st = status_or_none(self.cluster.endpoint(node), timeout=1.0)
            last = (st or {}).get("cluster", {}).get("last_rebuild") if st else None
            return last if last and last.get("ok") and st["cluster"]["rebuilding"] is None else None
        self.wait("the replacement node's rebuild", rebuilt, deadline)
        r = rebuilt()
        failure["rebuild"] = {"step": r["step"], "seconds": r["seconds"], "fetched_bytes": r["fetched_bytes"]}
        say(f"{INDENT}    node {node} rebuilt step {r['step']} in {1000 * r['seconds']:.0f} ms "
            f"({r['fetched_bytes'] / 2**20:.2f} MiB fetched from its peers)")

    def run(self) -> None:
        plan, cluster = self.plan, self.cluster
        deadline = time.monotonic() + RUN_TIMEOUT
        self.daemons.start()
        for n in range(plan.nodes):
            cluster.start_agent(n)
        say(f"{INDENT}agents started: {' '.join(f'node{n}=pid {p.pid}' for n, p in cluster.agents.items())}")
        self.wait("the workers to start", lambda: all(log.pid for log in self.logs), deadline)
        say(f"{INDENT}training: DDP over gloo, {plan.world} ranks, a snapshot every step")

        crashing = self.logs[plan.crash_node * plan.nproc]
        self.wait(f"step {plan.crash_at}", lambda: crashing.last_step >= plan.crash_at, deadline)
        crash = self.crash_worker()
        self.wait_resumed(crash["failed_generation"], crash, deadline)
        self.failures.append(crash)

        self.wait(f"step {plan.lose_at}",
                  lambda: self.node_logs(plan.lose_node)[0].last_step >= plan.lose_at, deadline)
        loss = self.lose_node()
        self.replace_node(loss, deadline)
        self.wait_resumed(loss["failed_generation"], loss, deadline)
        self.failures.append(loss)

        self.wait("the end of training", lambda: all(p.poll() is not None for p in cluster.agents.values()),
                  deadline, agents_may_finish=True)
        failure = cluster.agent_failure(finished_ok=True)
        if failure:
            raise DemoError(f"at the end of training, {failure}")
        for log in self.logs:
            log.poll()
        say(f"{INDENT}every node finished step {plan.steps - 1}; the agents stopped their daemons")
