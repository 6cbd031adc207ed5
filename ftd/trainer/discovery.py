"""Where a trainer's node daemon is, and which rank of how many the trainer is.

A trainer started by torchrun, ``srun`` or ``ftd agent`` needs no arguments: the environment those
launchers set says which node it is on, and the node's config (or the default one) says where that
node's daemon listens.
"""
from __future__ import annotations

import os

import torch

from ftd.config import Config, load_config, node_rank_from_env


def find_daemon(endpoint: str | None = None) -> tuple[str, Config, str]:
    """(endpoint, config, how it was found) of this process's node daemon. In order: the argument,
    $FTD_ENDPOINT, the node config named by $FTD_CONFIG, else the default config for job $FTD_JOB on
    the node whose rank $FTD_NODE_RANK, $GROUP_RANK (torchrun) or $SLURM_NODEID gives."""
    if os.environ.get("FTD_CONFIG"):
        config = load_config(os.environ["FTD_CONFIG"])
        found = f"the config $FTD_CONFIG={os.environ['FTD_CONFIG']}"
    else:
        config = load_config(None)
        source = node_rank_from_env()
        found = (f"job '{config.job}', node rank {config.node_rank} from "
                 f"{'$' + source[1] if source else 'the default (no $FTD_NODE_RANK, $GROUP_RANK or $SLURM_NODEID)'}")
    if endpoint:
        return endpoint, config, "the endpoint argument"
    if os.environ.get("FTD_ENDPOINT"):
        return os.environ["FTD_ENDPOINT"], config, "$FTD_ENDPOINT"
    return config.endpoint, config, found


def detect_rank_world() -> tuple[int, int]:
    """torch.distributed's rank and world size when it is initialized, else $RANK/$WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_world() -> dict:
    """Ranks on this node ($LOCAL_WORLD_SIZE, set by torchrun), so the daemon knows when all of
    them committed a step; {} when unknown (the daemon counts the ranks that registered)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return {"local_world": int(value)} if value.isdigit() and int(value) > 0 else {}
