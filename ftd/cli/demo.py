"""``ftd demo``: a cluster on this machine loses a worker and a node, and trains on bit-exact."""
from __future__ import annotations

import argparse
import sys

from ftd.cli.registry import Command
from ftd.demo.main import run_demo
from ftd.demo.plan import Plan
from ftd.errors import DemoError


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short mode: a tiny model and 24 steps (what the tests run)")
    p.add_argument("--steps", type=int, help="training steps (default 80)")
    p.add_argument("--crash-at", type=int, help="step after which a worker is SIGKILLed (default 25)")
    p.add_argument("--lose-at", type=int, help="step after which a whole node is lost (default 55)")
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (default 4)")
    p.add_argument("--parity", type=int, default=1, help="parity blocks per group, m (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node, as torchrun's (default 1)")
    p.add_argument("--allreduce", choices=("ordered", "ring"), default="ordered",
                   help="DDP gradient averaging: 'ring' (DDP's default) is not bit-exact across a restart "
                        "with 3+ ranks; see README")
    p.add_argument("--replica-snapshots", action=argparse.BooleanOptionalAction, default=None,
                   help="replica_snapshots in the node configs (default: \"auto\", on in this cluster): each DDP rank "
                        "snapshots 1/R of the replicated state; --no-replica-snapshots to compare")
    p.add_argument("--no-standby", action="store_true",
                   help="the agents start every worker afresh (no warm standby): to compare the time to training again")
    p.add_argument("--step-sleep", type=float, help="extra seconds per step, to watch it slowly (default 0; 0.05 with --quick)")
    p.add_argument("--out", default="ftd-demo-out", help="where report.json and losses.png go (default ./ftd-demo-out)")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, losses)")


def _demo(args: argparse.Namespace) -> int:
    plan = Plan.quick() if args.quick else Plan()
    for name in ("steps", "crash_at", "lose_at"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    if args.step_sleep is not None:
        plan.step_sleep = args.step_sleep
    plan.nodes, plan.parity, plan.nproc, plan.allreduce = args.nodes, args.parity, args.nproc_per_node, args.allreduce
    plan.standby = not args.no_standby
    plan.replica_snapshots = args.replica_snapshots
    try:
        plan.check()
    except DemoError as e:
        print(f"ftd demo: {e}", file=sys.stderr)
        return 2
    return run_demo(plan, args.out, args.keep)


COMMANDS = [
    Command("demo", "a 4-node cluster on this machine loses a worker and a node, and trains on bit-exact",
            _arguments, _demo),
]
