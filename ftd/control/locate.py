"""Where a process's node daemon is: from an argument, or from the environment its launcher set.

The trainer client and the ``ftd`` commands look in the same places, in this order: the endpoint
given, ``$FTD_ENDPOINT``, the node config named by ``$FTD_CONFIG``, else the default config for job
``$FTD_JOB`` on the node whose rank ``$FTD_NODE_RANK``, ``$GROUP_RANK`` (torchrun) or
``$SLURM_NODEID`` gives. The answer says how it was found, for error messages.
"""
from __future__ import annotations

import os

from ftd.config import Config, load_config, node_rank_from_env


def find_daemon(endpoint: str | None = None, *, config_path: str | None = None,
                node_rank: int | None = None) -> tuple[str, Config, str]:
    """(endpoint, config, how it was found) of this process's node daemon. ``config_path`` and
    ``node_rank`` (the commands' --config and --node-rank) come before the environment."""
    path = config_path or os.environ.get("FTD_CONFIG") or None
    if path:
        config = load_config(path, node_rank=node_rank)
        found = f"the config {path}" if config_path else f"the config $FTD_CONFIG={path}"
    else:
        config = load_config(None, node_rank=node_rank)
        source = node_rank_from_env()
        origin = ("--node-rank" if node_rank is not None else f"${source[1]}" if source else
                  "the default (no $FTD_NODE_RANK, $GROUP_RANK or $SLURM_NODEID)")
        found = f"job '{config.job}'{' (from $FTD_JOB)' if 'FTD_JOB' in os.environ else ''}, node rank " \
                f"{config.node_rank} from {origin}"
    if endpoint:
        return endpoint, config, "the endpoint given"
    if os.environ.get("FTD_ENDPOINT") and not config_path:
        return os.environ["FTD_ENDPOINT"], config, "$FTD_ENDPOINT"
    return config.endpoint, config, found
