import json
import math
import pickle
import random
import re

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
    ({"model": {"fn": lambda x: x}}, re.escape("state['model']['fn']")),
    ({"x": [object()]}, re.escape("state['x'][0]")),
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


# ---- values a data pipeline holds, restored into the live objects ------------------------------------
import dataclasses  # noqa: E402
import enum  # noqa: E402
import pathlib  # noqa: E402


class Phase(enum.Enum):
    WARMUP = "warmup"
    MAIN = "main"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class LoaderState:
    epoch: int
    seen: set
    order: list


@dataclasses.dataclass(frozen=True)
class Frozen:
    name: str
    path: pathlib.Path


def encode_decode(obj, template=None):
    skeleton, tensors = statecodec.encode(obj)
    return statecodec.decode(json.loads(json.dumps(skeleton)), lambda i: tensors[i].clone(), template=template)


def test_generators_sets_dataclasses_paths_and_enums_are_stored_natively():
    gen = torch.Generator().manual_seed(11)
    torch.rand(3, generator=gen)
    obj = {"gen": gen, "ids": {3, 1, 2}, "done": frozenset({"a"}), "loader": LoaderState(4, {7}, [1, 2]),
           "cfg": Frozen("run", pathlib.Path("/data/x")), "phase": Phase.MAIN, "level": Level.HIGH,
           "where": pathlib.PurePosixPath("a/b")}
    expected_draw = torch.rand(2, generator=torch.Generator().set_state(gen.get_state()))
    live = {"gen": torch.Generator(), "ids": set(), "done": frozenset(), "loader": LoaderState(0, set(), []),
            "cfg": Frozen("", pathlib.Path(".")), "phase": Phase.WARMUP, "level": Level.LOW,
            "where": pathlib.PurePosixPath(".")}
    back = encode_decode(obj, template=live)
    assert back["gen"] is live["gen"] and torch.equal(torch.rand(2, generator=back["gen"]), expected_draw)
    assert back["ids"] is live["ids"] and back["ids"] == {1, 2, 3}
    assert back["done"] == frozenset({"a"}) and isinstance(back["done"], frozenset)
    assert back["loader"] is live["loader"] and back["loader"] == LoaderState(4, {7}, [1, 2])
    assert back["cfg"] is live["cfg"] and back["cfg"] == Frozen("run", pathlib.Path("/data/x"))
    assert back["phase"] is Phase.MAIN and back["level"] is Level.HIGH
    assert type(back["where"]) is pathlib.PurePosixPath and str(back["where"]) == "a/b"


def test_without_a_live_value_types_come_back_as_plain_data_never_by_name():
    back = encode_decode({"loader": LoaderState(4, {7}, [1]), "phase": Phase.MAIN, "gen": torch.Generator().manual_seed(3)})
    assert back["loader"] == {"epoch": 4, "seen": {7}, "order": [1]}     # no class looked up from the bytes
    assert back["phase"] == "main" and isinstance(back["gen"], torch.Generator)


def test_plain_containers_tensors_and_arrays_are_restored_in_place():
    live = {"meta": {"epoch": 0, "old": 1}, "hist": [0], "ema": torch.zeros(3), "arr": np.zeros(2),
            "grown": torch.zeros(2)}
    saved = {"meta": {"epoch": 5}, "hist": [1, 2], "ema": torch.arange(3.0), "arr": np.ones(2),
             "grown": torch.ones(4)}
    refs = dict(live)
    back = encode_decode(saved, template=live)
    assert back["meta"] is refs["meta"] and refs["meta"] == {"epoch": 5}      # stale keys gone, same object
    assert back["hist"] is refs["hist"] and refs["hist"] == [1, 2]
    assert back["ema"] is refs["ema"] and torch.equal(refs["ema"], torch.arange(3.0))
    assert back["arr"] is refs["arr"] and np.array_equal(refs["arr"], np.ones(2))
    assert back["grown"] is not refs["grown"] and back["grown"].shape == (4,)  # another shape: replaced
