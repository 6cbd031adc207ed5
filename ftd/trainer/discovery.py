"""Which rank of how many the trainer is, and where its node's daemon is (``control.locate``).

A trainer started by torchrun, ``srun`` or ``ftd agent`` needs no arguments: the environment those
launchers set says which node it is on, and the node's config (or the default one) says where that
node's daemon listens.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
_warned: set[str] = set()


def detect_rank_world() -> tuple[int, int]:
    """torch.distributed's rank and world size when it is initialized, else $RANK/$WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launcher_warning(env: dict | None = None) -> str | None:
    """What in the launcher's set-up would keep a restarted job from coming back, or None.

    torchrun (c10d rendezvous) shares its rendezvous store with the workers by default; torch 2.13's
    restarted workers then time out joining gloo on keys the previous attempt left there (pytorch
    issue 135712). The variable that avoids it must be set for torchrun itself, before it starts the
    workers, so ftd can only say so from inside a worker."""
    env = os.environ if env is None else env
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not restarts.isdigit() or int(restarts) == 0:
        return None
    return (f"torchrun shares its rendezvous store with the workers and may restart them ({restarts} "
            "restart(s)): restarted workers can then fail or hang joining their process group on the keys a "
            "previous attempt left (pytorch issue 135712; seen here with torch 2.13 and several torchrun agents), "
            "and the restore never runs. Start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment.")


def warn_about_launcher() -> None:
    """Log ``launcher_warning`` once per process (at the first Client), where the user's logs show it."""
    text = launcher_warning()
    if text and text not in _warned:
        _warned.add(text)
        log.warning(text)


def local_world() -> dict:
    """Ranks on this node ($LOCAL_WORLD_SIZE, set by torchrun), so the daemon knows when all of
    them committed a step; {} when unknown (the daemon counts the ranks that registered)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return {"local_world": int(value)} if value.isdigit() and int(value) > 0 else {}
