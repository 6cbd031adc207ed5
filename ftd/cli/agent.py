"""``ftd agent`` (the per-node supervisor) and ``ftd job-store`` (its store, served apart from node 0)."""
from __future__ import annotations

import argparse
import sys

from ftd.agent.jobstore import serve_job_store
from ftd.agent.plan import PROG
from ftd.agent.supervisor import Agent
from ftd.cli.registry import Command
from ftd.errors import JobStoreLost


def _agent_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="this node's ftd config (peers, parity, ...)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: the config's, else $FTD_NODE_RANK, "
                                                 "$GROUP_RANK or $SLURM_NODEID)")
    p.add_argument("--nnodes", type=int, default=0, help="nodes in the job (default: the config's peers, else 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="P", help="workers on this node (default 1)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="where node 0's agent serves the job's store (needed with several nodes)")
    p.add_argument("--rdzv-external", action="store_true",
                   help="the store at --rdzv-endpoint is served elsewhere (`ftd job-store`), not by node 0's agent, "
                        "so that node 0 may be lost too")
    p.add_argument("--launcher", action="store_true",
                   help="COMMAND starts the workers itself (e.g. torchrun ...): run it once per node, restart it if it fails")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of the job's workers before giving up (default 3)")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="in a crash loop (generations that neither commit a snapshot nor run --backoff-window "
                        "seconds), seconds before the second restart in a row, doubled each time after (default 1); "
                        "a restart after a generation that trained is immediate")
    p.add_argument("--backoff-window", type=float, default=30.0,
                   help="seconds a generation must run, if it commits no snapshot, to count as healthy (default 30)")
    p.add_argument("--no-standby", action="store_true",
                   help="start every worker afresh instead of from a warm standby process per local rank that "
                        "imported torch beforehand (standbys run only `python -m MODULE` or `python SCRIPT.py`)")
    p.add_argument("--backoff-max", type=float, default=30.0, help="longest wait before a restart (default 30 s)")
    p.add_argument("--join-timeout", type=float, default=600.0,
                   help="seconds to wait for every node to (re)join, e.g. for a replacement node (default 600)")
    p.add_argument("--log-dir", help="worker and daemon logs (default ./ftd-agent-logs/node<N>)")
    p.add_argument("--keep-daemon", action="store_true", help="leave the daemon running when the agent exits")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")


def _store_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, required=True, help="TCP port to serve on (0: any free port, printed)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (default all)")


def _job_store_cmd(args: argparse.Namespace) -> int:
    try:
        return serve_job_store(args.port, args.host)
    except JobStoreLost as e:
        print(f"ftd job-store: {e}", file=sys.stderr)
        return 1


def _agent_cmd(args: argparse.Namespace) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        print(f"{PROG}: give the training command after --, e.g. ftd agent --config node.toml -- python train.py",
              file=sys.stderr)
        return 2
    try:
        agent = Agent(args)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return agent.run()


COMMANDS = [
    Command("agent", "per-node supervisor: runs the node's daemon and the training workers, restarts them",
            _agent_arguments, _agent_cmd,
            description="Run this node's ftd daemon and training workers; restart the workers of every node "
                        "together after a failure. Example (node N of 4, 2 GPUs each): ftd agent --config "
                        "node.toml --nproc-per-node 2 --rdzv-endpoint node0:29400 -- python train.py"),
    Command("job-store", "serve the agents' restart store apart from node 0 (with --rdzv-external)",
            _store_arguments, _job_store_cmd),
]
