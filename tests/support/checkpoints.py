"""Comparing states gathered by a job (``fsdp_trainer --save-full``) with what a checkpoint load gave back."""
from __future__ import annotations

from pathlib import Path

import torch


def gathered(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same(got: dict, want: dict, where: str) -> None:
    """Every key of ``want`` in ``got``, and none more; every tensor equal bit for bit, dtype included."""
    assert sorted(got) == sorted(want), (where, sorted(set(got) ^ set(want))[:5])
    for key, value in want.items():
        if isinstance(value, dict):
            assert_same(got[key], value, f"{where}.{key}")
        elif isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{where}.{key} differs"
