"""Which rank of how many the trainer is, and where its node's daemon is (``control.locate``).

A trainer started by torchrun, ``srun`` or ``ftd agent`` needs no arguments: the environment those
launchers set says which node it is on, and the node's config (or the default one) says where that
node's daemon listens.
"""
from __future__ import annotations

import os

import torch


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
