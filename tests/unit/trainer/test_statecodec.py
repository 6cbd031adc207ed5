import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from ftd.errors import SerializationError
from ftd.trainer import rng, statecodec


def round_trip(obj):
    skeleton, tensors = statecodec.encode(obj)
    text = json.dumps(skeleton)                 # the skeleton is plain JSON: no pickle anywhere
    assert "pickle" not in text
    return statecodec.decode(json.loads(text), lambda i: tensors[i].clone())


def same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_plain_values_keep_their_types():
    obj = {"i": 3, "f": 1.0, "b": True, "n": None, "s": "x", "t": (1, (2.5, "y")), "l": [1, [2]],
           "nan": float("nan"), "inf": -float("inf"), "big": 2**80, 7: "int key", (1, 2): "no",
           "np": np.float32(1.5), "np64": np.int64(7), "bytes": b"\x00\x01", "dtype": torch.bfloat16,
           "size": torch.Size([2, 3]), "__ftd__": "a user key that looks like our tag"}
    del obj[(1, 2)]
    same(round_trip(obj), obj)


def test_tensors_and_arrays():
    obj = {"a": torch.arange(10, dtype=torch.float64).view(2, 5), "b": torch.tensor(3, dtype=torch.int64),
           "c": torch.zeros(0, 4, dtype=torch.bfloat16), "d": np.arange(6, dtype=np.uint32),
           "e": torch.ones(3, dtype=torch.bool), "p": torch.nn.Parameter(torch.randn(2))}
    back = round_trip(obj)
    same({k: v for k, v in back.items() if k != "p"}, {k: v for k, v in obj.items() if k != "p"})
    assert isinstance(back["p"], torch.nn.Parameter) and torch.equal(back["p"], obj["p"])


def test_optimizer_and_scheduler_state_dicts_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    for sd in (opt.state_dict(), sched.state_dict(), model.state_dict()):
        same(round_trip(sd), sd)
    assert round_trip(model.state_dict())._metadata == model.state_dict()._metadata


def test_rng_states_round_trip_and_reproduce():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = round_trip(rng.capture())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    rng.restore(states)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("value,where", [
    ({"model": {"fn": lambda x: x}}, "state.model.fn"),
    ({"x": [object()]}, r"state.x\[0\]"),
    ({"k": {frozenset(): 1}}, "dict key"),
    ({"s": torch.zeros(2).to_sparse()}, "dense"),
    ({"o": np.array(["a"], dtype=object)}, "numpy"),
])
def test_unsupported_values_name_their_place(value, where):
    with pytest.raises(SerializationError, match=where):
        statecodec.encode(value)


@pytest.mark.parametrize("skeleton", [
    {"__ftd__": "pickle", "data": "..."},
    {"__ftd__": "tensor", "index": -1},
    {"__ftd__": "tensor", "index": "0"},
    {"__ftd__": "dict", "items": [[[1], 2]]},
    {"__ftd__": "tuple", "items": 5},
])
def test_malformed_skeletons_are_refused(skeleton):
    with pytest.raises(SerializationError):
        statecodec.decode(skeleton, lambda i: torch.zeros(1))


def test_pickle_is_never_used(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "dumps", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    same(round_trip({"a": (1, 2), "t": torch.ones(2)}), {"a": (1, 2), "t": torch.ones(2)})
