#!/usr/bin/env python3
"""Chaos on a local ftd job: random failures of every kind while a DDP job trains, then a report.

One `ftd agent` per simulated node runs the node's daemon and one rank of the demo's GPT trainer
(DDP over gloo, a snapshot every step); the agents' restart store is served by this script, so any
node may be lost, node 0 included. At random steps it injects, by seeded chance:

  worker   SIGKILL one rank: every node's workers restart and restore the same step;
  daemon   SIGKILL one daemon alone: its agent restarts it, it adopts its memory, training goes on;
  node     lose 1..m nodes at once (agent, daemon, workers, shared memory); replacements rebuild;
  freeze   SIGSTOP one daemon for longer than the peer timeout, then SIGCONT: the others declare it
           lost, training goes on, and protection resumes when it is back;
  memory   memory pressure: a file in /dev/shm takes the host's available memory to just above
           the daemons' memory_reserve for a while: nothing may crash, and protection resumes.

At the end it checks every loss every rank ever wrote against an uninterrupted run (bit for bit),
that no restart lost a step older than what was recoverable when the failure hit, and that no
process or shared-memory segment is left; prints a table and writes a JSON report.

    .venv/bin/python scripts/chaos.py --quick --seed 7      # what CI runs: one failure of each kind
    .venv/bin/python scripts/chaos.py --failures 40         # the long mode (README: "Reliability")
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftd.demo import report as demoreport  # noqa: E402
from ftd.local.agentjob import AgentCluster, DaemonWatch, RankLog, common_resume, reached, start_reference  # noqa: E402
from ftd.util.procs import kill_everything_from  # noqa: E402

KINDS = ("worker", "daemon", "node", "freeze", "memory")
MODEL = ("--layers", "1", "--dim", "32", "--heads", "2", "--context", "16", "--batch", "4")
PEER_TIMEOUT = 1.5       # the daemons' peer_timeout in this run; a freeze lasts longer
FREEZE = 3.0             # seconds a daemon stays stopped
PRESSURE = 2.0           # seconds of memory pressure
EVENT_STEPS = 40         # steps an event may take at most (a freeze or pressure, then protection resuming)
HEADROOM = 4 << 30       # memory_reserve = available memory at start - HEADROOM (the job takes ~2 GiB)
RECOVERY_TIMEOUT = 120.0


class ChaosError(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.dir = args, workdir
        self.rng = random.Random(args.seed)
        kinds = list(KINDS) if args.quick else [self.rng.choice(KINDS) for _ in range(args.failures)]
        if args.quick:
            self.rng.shuffle(kinds)
        self.plan = kinds
        self.gap = args.gap
        self.steps = (args.gap + EVENT_STEPS) * len(kinds) + 2 * args.gap
        self.reserve = max(256 << 20, psutil.virtual_memory().available - HEADROOM)
        trainer = [sys.executable, "-m", "ftd.examples.gpt_trainer", "--steps", str(self.steps), *MODEL,
                   "--step-sleep", str(args.step_sleep)]
        self.trainer = trainer
        self.cluster: AgentCluster | None = None
        self.reference: list = []
        self.events: list[dict] = []
        self.hog: Path | None = None

    # ---- helpers ------------------------------------------------------------------------------------
    def poll(self) -> None:
        for log in self.logs:
            log.poll()

    def wait(self, what: str, predicate, timeout: float = RECOVERY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            failure = self.cluster.agent_failure(finished_ok=True)
            if failure:
                raise ChaosError(f"while waiting for {what}, {failure}")
            if time.monotonic() > deadline:
                raise ChaosError(f"timed out after {timeout:g} s waiting for {what}")
            self.poll()
            time.sleep(0.05)

    def recoverable(self) -> int:
        """The step every live node agrees is recoverable (-1 if none or they disagree)."""
        steps = {st["cluster"]["recoverable"] for st in list(self.watch.status.values())}
        return min(steps) if steps else -1

    def job_step(self) -> int:
        return min(log.last_step for log in self.logs)

    def wait_resumed(self, event: dict) -> None:
        gen = event["generation"]
        self.wait("every rank to resume", lambda: all(log.generation > gen and log.generation in log.resumed
                                                      for log in self.logs))
        try:
            event["resumed_after"] = common_resume(self.logs)
        except ValueError as e:
            raise ChaosError(str(e)) from None
        event["at_step"] = reached(self.logs, gen)
        event["steps_lost"] = event["at_step"] - event["resumed_after"]
        if event["resumed_after"] < event["recoverable_before"]:
            raise ChaosError(f"{event['kind']}: resumed after step {event['resumed_after']}, older than step "
                             f"{event['recoverable_before']} which was recoverable when the failure hit")

    def steps_during(self, seconds: float, each=lambda: None) -> int:
        """Follow the job for ``seconds`` (calling ``each`` as it goes); the steps every rank trained meanwhile."""
        before = self.job_step()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.poll()
            each()
            time.sleep(0.05)
        return self.job_step() - before

    def coordinator_calls_silent(self, node: int) -> bool:
        coord = (self.watch.status.get(0, {}).get("cluster") or {}).get("coordinator") or {}
        return node in coord.get("silent", [])

    def wait_protection_resumes(self, event: dict) -> None:
        after = self.job_step()
        self.wait(f"protection past step {after}", lambda: self.recoverable() >= after)
        event["protection_resumed_s"] = time.monotonic() - event["t_end"]

    # ---- the failures -------------------------------------------------------------------------------
    def inject(self, kind: str) -> dict:
        event = {"kind": kind, "recoverable_before": self.recoverable(), "generation": self.logs[0].generation,
                 "step": self.job_step()}
        t0 = time.monotonic()
        if kind == "worker":
            log = self.rng.choice(self.logs)
            os.kill(log.pid, signal.SIGKILL)
            event["target"] = f"rank {self.logs.index(log)}"
            self.wait_resumed(event)
        elif kind == "daemon":
            node = self.rng.randrange(self.args.nodes)
            old = self.watch.status[node]["pid"]
            os.kill(old, signal.SIGKILL)
            event["target"] = f"node {node}"
            self.wait(f"node {node}'s daemon to be restarted",
                      lambda: self.watch.status.get(node, {}).get("pid") not in (None, old)
                      and self.watch.status[node]["cluster"]["ready"])
            event["t_end"] = time.monotonic()
            self.wait_protection_resumes(event)
        elif kind == "node":
            count = self.args.parity if self.args.quick else self.rng.randint(1, self.args.parity)  # quick: m at once
            nodes = sorted(self.rng.sample(range(self.args.nodes), count))
            event["target"] = f"node(s) {nodes}"
            for node in nodes:
                daemon = self.watch.status.pop(node, {}).get("pid")
                workers = [log.pid for log in self.logs[node * self.args.nproc:(node + 1) * self.args.nproc]]
                self.cluster.lose(node, [*workers, daemon])
            time.sleep(0.5)
            for node in nodes:
                self.cluster.start_agent(node)
            self.wait_resumed(event)
        elif kind == "freeze":
            node = self.rng.randrange(self.args.nodes)
            pid = self.watch.status[node]["pid"]
            event["target"] = f"node {node} for {FREEZE:g} s"
            os.kill(pid, signal.SIGSTOP)
            seen = []
            try:
                event["steps_while_frozen"] = self.steps_during(
                    FREEZE, lambda: seen.append(True) if node and self.coordinator_calls_silent(node) else None)
                event["declared_lost"] = bool(seen) if node else None  # node 0 runs the coordinator itself
            finally:
                os.kill(pid, signal.SIGCONT)
            event["t_end"] = time.monotonic()
            self.wait_protection_resumes(event)
        elif kind == "memory":
            available = psutil.virtual_memory().available
            size = max(0, available - self.reserve - (8 << 20))  # leaves the daemons 8 MiB above the reserve
            self.hog = Path("/dev/shm") / f"chaos-hog-{os.getpid()}"
            event["target"] = f"{size >> 20} MiB held for {PRESSURE:g} s"
            with open(self.hog, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)
            try:
                event["steps_under_pressure"] = self.steps_during(PRESSURE)
            finally:
                self.hog.unlink(missing_ok=True)
                self.hog = None
            event["t_end"] = time.monotonic()
            self.wait_protection_resumes(event)
        event["seconds"] = time.monotonic() - t0
        event.pop("t_end", None)
        return event

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        say(f"chaos: seed {a.seed}, {a.nodes} nodes, m = {a.parity}, {len(self.plan)} failures "
            f"({', '.join(self.plan)}), {self.steps} steps; work dir {self.dir}")
        t0 = time.monotonic()
        reference = [*self.trainer[:-2], "--step-sleep", "0", "--no-ftd", "--out", str(self.dir / "reference")]
        self.reference = start_reference(a.nodes, a.nproc, reference, self.dir / "reference")
        for p in self.reference:
            if p.wait(600) != 0:
                raise ChaosError("the reference run failed; see " + str(self.dir / "reference"))
        say(f"  reference run: {time.monotonic() - t0:.1f} s")
        config = {"peer_timeout": PEER_TIMEOUT, "memory_reserve": self.reserve}
        agent_args = ("--max-restarts", str(3 * len(self.plan) + 5), "--backoff", "0.2", "--backoff-max", "2",
                      "--join-timeout", "120")
        self.cluster = AgentCluster(a.nodes, a.parity, a.nproc, self.dir, [*self.trainer, "--out", str(self.dir / "run")],
                                    job_prefix="chaos", config=config, agent_args=agent_args, external_store=True)
        self.logs = [RankLog(self.cluster.rank_log(r)) for r in range(a.nodes * a.nproc)]
        self.watch = DaemonWatch(self.cluster)
        self.watch.start()
        t_run = time.monotonic()
        for n in range(a.nodes):
            self.cluster.start_agent(n)
        self.wait("the workers to start", lambda: all(log.pid for log in self.logs))
        for i, kind in enumerate(self.plan):
            goal = self.job_step() + self.gap
            self.wait(f"step {goal}", lambda: self.job_step() >= goal and self.recoverable() >= 0)
            if goal > self.steps - self.gap:
                raise ChaosError(f"the job reached step {goal} of {self.steps} before failure {i + 1}; "
                                 "raise --gap or lower --step-sleep's speed")
            event = self.inject(kind)
            self.events.append(event)
            extra = "" if "steps_lost" not in event else (f": resumed after step {event['resumed_after']}, "
                                                          f"{event['steps_lost']} step(s) re-run")
            say(f"  {i + 1:2d}. step {event['step']:3d}  {kind:6s} {event['target']}{extra} ({event['seconds']:.1f} s)")
        self.wait("the end of training", lambda: all(p.poll() is not None for p in self.cluster.agents.values()),
                  timeout=600)
        run_seconds = time.monotonic() - t_run
        self.watch.halt.set()
        return self.report(run_seconds)

    def report(self, run_seconds: float) -> dict:
        a = self.args
        ok, ranks = True, {}
        for rank in range(a.nodes * a.nproc):
            ref = demoreport.read_losses(self.dir / "reference" / f"losses-rank{rank}.txt")
            run = demoreport.read_losses(self.dir / "run" / f"losses-rank{rank}.txt")
            good, verdict, twice = demoreport.verify(ref, run, self.steps)
            ok &= good
            ranks[rank] = {"bit_exact": good, "verdict": verdict, "steps_run_twice": twice}
        by_kind = {k: sum(1 for e in self.events if e["kind"] == k) for k in KINDS}
        return {"seed": a.seed, "nodes": a.nodes, "parity": a.parity, "steps": self.steps, "failures": by_kind,
                "recoveries": len(self.events), "events": self.events, "bit_exact": ok, "ranks": ranks,
                "steps_lost": sum(e.get("steps_lost", 0) for e in self.events), "run_seconds": run_seconds}

    def cleanup(self) -> dict:
        if self.hog is not None:
            self.hog.unlink(missing_ok=True)
        for p in self.reference:
            if p.poll() is None:
                p.kill()
                p.wait()
        job = self.cluster.job if self.cluster else None
        if self.cluster is not None:
            self.cluster.stop()
        kill_everything_from(self.dir)
        time.sleep(0.2)
        left_procs = [p.pid for p in psutil.process_iter(["cmdline"])
                      if str(self.dir) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()]
        left_shm = sorted(p.name for p in Path("/dev/shm").iterdir() if job and p.name.startswith(f"ftd.{job}."))
        return {"processes": len(left_procs), "segments": len(left_shm)}


def print_table(report: dict) -> None:
    say("")
    say("| failure | injected | recovered | steps re-run |")
    say("|---|---|---|---|")
    for kind in KINDS:
        events = [e for e in report["events"] if e["kind"] == kind]
        lost = sum(e.get("steps_lost", 0) for e in events)
        say(f"| {kind} | {len(events)} | {len(events)} | {lost if kind in ('worker', 'node') else '-'} |")
    say(f"bit-exact: {'yes' if report['bit_exact'] else 'NO'} ({len(report['ranks'])} ranks, {report['steps']} steps); "
        f"leaked processes {report['leaked']['processes']}, shared-memory segments {report['leaked']['segments']}; "
        f"ftd run {report['run_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one failure of each kind, in seeded order (CI)")
    p.add_argument("--failures", type=int, default=20, help="failures in the long mode (default 20)")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--nproc", type=int, default=1, help="ranks per node")
    p.add_argument("--gap", type=int, default=10, help="training steps between failures (default 10)")
    p.add_argument("--step-sleep", type=float, default=0.1, help="extra seconds per step (default 0.1)")
    p.add_argument("--out", default="bench-results/chaos.json", help="the JSON report")
    a = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ftd-chaos-", dir="/tmp"))
    chaos = Chaos(a, workdir)
    report, code = None, 1
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        report = chaos.run()
        code = 0 if report["bit_exact"] else 1
    except ChaosError as e:
        say(f"chaos: FAILED (seed {a.seed}): {e}")
    except KeyboardInterrupt:
        say("chaos: interrupted")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        leaked = chaos.cleanup()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    report = report or {"seed": a.seed, "events": chaos.events, "bit_exact": False, "error": True}
    report["leaked"] = leaked
    if leaked["processes"] or leaked["segments"]:
        code = code or 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if "ranks" in report:
        print_table(report)
    if code == 0:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        say(f"chaos: work dir kept for inspection: {workdir}")
    say(f"chaos: report in {out}; seed {a.seed}; {'PASS' if code == 0 else 'FAIL'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
