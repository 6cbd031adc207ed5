"""Random number generator states: part of the training state, or a restored run is not the same run."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    version, internal, gauss = random.getstate()
    # the Mersenne Twister's 625 ints travel as an array (into the arena), not as 625 JSON numbers
    python = {"version": version, "state": np.array(internal, dtype=np.int64), "gauss": gauss}
    return {"python": python, "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def restore(states: dict) -> None:
    py = states["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"]), py["gauss"]))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
