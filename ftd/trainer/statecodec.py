"""Safe encoding of a training state: a JSON skeleton plus a flat list of tensors. No pickle.

``encode`` walks dicts, lists, tuples, sets, numbers, strings, None, tensors, numpy arrays, torch
Generators, dataclasses, enums and paths; tensors (and arrays, and a Generator's state) are replaced
by ``{"__ftd__": "tensor", "index": i}`` and collected in order, so the arena holds their bytes and
the skeleton holds everything else. JSON keeps bools, ints, floats (NaN and infinities included) and
strings exact; tags keep tuples, sets, non-string dict keys, dtypes and numpy scalars exact, so
``decode(encode(x)) == x`` type for type. Anything else raises a SerializationError that names where
in the state it sits, written as the user wrote it (``state['meta']['loader']``).

Types are never looked up by name from the skeleton (that would run code chosen by the bytes): a
dataclass or an enum comes back as its class only when ``decode`` is given the live value to restore
into (``template``), whose class it then reuses; without one it comes back as plain data (a dict of
its fields, the enum's value). With a template, containers, tensors, arrays, Generators and dataclass
instances are restored *in place* (the same objects, their contents replaced), so a trainer that
keeps its own reference to them sees the restored values.
"""
from __future__ import annotations

import dataclasses
import enum
import pathlib
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from ftd.errors import SerializationError
from ftd.shm.layout import DTYPE_SIZES
from ftd.trainer.dtensors import cached_layout, is_dtensor, local_shard, restore_shard, this_rank

TAG = "__ftd__"
MAX_DEPTH = 64


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_SIZES:
        raise SerializationError(f"tensor dtype {dtype} is not supported by ftd")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPE_SIZES:
        raise SerializationError(f"unknown dtype {name!r} in snapshot")
    return getattr(torch, name)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class Encoder:
    """Encodes values into skeletons that share one list of tensors (``tensors``)."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.dtensors: dict[int, torch.Tensor] = {}  # tensor index -> the DTensor whose local shard it is
        self._rank: int | None = None  # this process's rank, looked up at the first DTensor

    def encode(self, obj: Any, path: str = "state") -> Any:
        return self._walk(obj, path, 0)

    def _tensor(self, t: torch.Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def _walk(self, x: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError(f"{path}: the state is nested deeper than {MAX_DEPTH} levels")
        if isinstance(x, torch.Tensor):  # first: state_dicts are mostly tensors (and no tensor is an Enum)
            return self._dtensor(x, path) if is_dtensor(x) else self._plain_tensor(x, path)
        if isinstance(x, enum.Enum):  # before the scalars: an IntEnum is an int too
            return {TAG: "enum", "type": _qualname(type(x)), "value": self._walk(x.value, f"{path}.value", depth + 1)}
        if x is None or isinstance(x, (bool, int, float, str)):
            if type(x) not in (type(None), bool, int, float, str):  # subclasses such as np.float64
                return self._scalar_subclass(x, path)
            return x
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise SerializationError(f"{path}: numpy array of dtype {x.dtype} cannot be stored safely")
            return {TAG: "ndarray", "index": self._tensor(torch.from_numpy(np.ascontiguousarray(x)))}
        if isinstance(x, np.generic):
            return self._scalar_subclass(x, path)
        if isinstance(x, torch.Generator):  # a data pipeline's RNG: its state is a uint8 tensor
            return {TAG: "generator", "device": str(x.device), "index": self._tensor(x.get_state())}
        if isinstance(x, torch.dtype):
            return {TAG: "dtype", "name": dtype_name(x)}
        if isinstance(x, torch.Size):
            return {TAG: "size", "items": list(x)}
        if isinstance(x, (bytes, bytearray)):
            return {TAG: "bytes", "hex": bytes(x).hex()}
        if isinstance(x, pathlib.PurePath):
            return {TAG: "path", "value": str(x)}
        if isinstance(x, tuple):
            return {TAG: "tuple", "items": [self._walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [self._walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
        if isinstance(x, (set, frozenset)):
            items = [self._walk(v, f"{path}{{{v!r}}}", depth + 1) for v in x]
            return {TAG: "set", "frozen": isinstance(x, frozenset), "items": items}
        if isinstance(x, OrderedDict):  # module state_dicts: keep the type and the version _metadata
            node = {TAG: "odict", "items": [[self._key(k, path), self._walk(v, f"{path}[{k!r}]", depth + 1)]
                                             for k, v in x.items()]}
            if getattr(x, "_metadata", None) is not None:
                node["metadata"] = self._walk(dict(x._metadata), f"{path}._metadata", depth + 1)
            return node
        if isinstance(x, dict):
            if all(type(k) is str and k != TAG for k in x):
                return {k: self._walk(v, f"{path}[{k!r}]", depth + 1) for k, v in x.items()}
            return {TAG: "dict", "items": [[self._key(k, path), self._walk(v, f"{path}[{k!r}]", depth + 1)]
                                           for k, v in x.items()]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {TAG: "dataclass", "type": _qualname(type(x)),
                    "fields": {f.name: self._walk(getattr(x, f.name), f"{path}.{f.name}", depth + 1)
                               for f in dataclasses.fields(x)}}
        raise SerializationError(
            f"{path}: values of type {_qualname(type(x))} cannot be snapshotted safely. Give the object "
            "state_dict()/load_state_dict() methods, make it a dataclass of plain data, or convert it to "
            "tensors, numbers, strings, lists, dicts and sets")

    def _dtensor(self, x: torch.Tensor, path: str) -> dict:
        """A DTensor: this rank's shard goes to the arena, and what it is a shard of to the skeleton
        (placements, mesh, global shape, where the shard sits), so that a restore can check it lands on
        the same layout and the disk tier can write one global checkpoint."""
        local = local_shard(x)
        if local.layout != torch.strided or local.device.type == "meta":
            raise SerializationError(f"{path}: a DTensor whose local shard is {local.layout} on {local.device} "
                                     "cannot be snapshotted")
        dtype_name(local.dtype)
        if self._rank is None:
            self._rank = this_rank()
        # the cached layout's lists are shared by every node of this kind of shard: skeletons are only
        # serialized, never changed in place
        node = {TAG: "dtensor", "index": self._tensor(local.detach()), **cached_layout(x, self._rank)}
        self.dtensors[node["index"]] = x
        if isinstance(x, torch.nn.Parameter):
            node["parameter"] = True
        return node

    def _plain_tensor(self, x: torch.Tensor, path: str) -> dict:
        if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
            raise SerializationError(f"{path}: only dense tensors can be snapshotted, got layout {x.layout}"
                                     f" on {x.device}; convert it with .to_dense() in state_dict()")
        dtype_name(x.dtype)
        node = {TAG: "tensor", "index": self._tensor(x.detach())}
        if isinstance(x, torch.nn.Parameter):
            node["parameter"] = True
            node["requires_grad"] = x.requires_grad
        return node

    @staticmethod
    def _key(k: Any, path: str) -> Any:
        if not (k is None or type(k) in (str, int, float, bool)):
            raise SerializationError(f"{path}: dict key {k!r} of type {type(k).__name__} is not supported;"
                                     " use str, int, float or bool keys")
        return k

    @staticmethod
    def _scalar_subclass(x: Any, path: str) -> Any:
        if isinstance(x, np.generic):
            if x.dtype.kind not in "biufc":
                raise SerializationError(f"{path}: numpy scalar of dtype {x.dtype} cannot be stored safely")
            return {TAG: "npscalar", "dtype": x.dtype.str, "value": x.item()}
        for base in (bool, int, float, str):
            if isinstance(x, base):
                return base(x)
        raise SerializationError(f"{path}: cannot store {type(x).__qualname__}")  # pragma: no cover


def encode(obj: Any, path: str = "state") -> tuple[Any, list[torch.Tensor]]:
    """(JSON-able skeleton, tensors in skeleton order) of one value. Arrays become CPU tensors sharing memory."""
    enc = Encoder()
    return enc.encode(obj, path), enc.tensors


def decode(skeleton: Any, tensor_at: Callable[[int], torch.Tensor], template: Any = None, *,
           into_live: bool = True, path: str = "state", on_dtensor: Callable | None = None,
           generator_states: bool = False) -> Any:
    """Rebuild the value; ``tensor_at(i)`` supplies tensor i (already copied out of shared memory).
    With ``template`` (the live value), restore into it where its type allows (see the module doc);
    with ``into_live`` False, only DTensors go into the live ones (the shard cannot become a DTensor
    otherwise) and everything else comes back new, for a ``load_state_dict`` that copies it anyway.
    ``path`` names the value in errors (a DTensor that does not fit its live one). ``on_dtensor(node,
    shard, live, path)``, if given, decides what a DTensor becomes instead (the disk writer's shards);
    with ``generator_states`` a Generator comes back as its state tensor (what the disk writer stores)."""
    def walk(x: Any, live: Any, depth: int, where: str = path) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError("snapshot skeleton nested too deep")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            items = [walk(v, _at(live, i), depth + 1, f"{where}[{i}]") for i, v in enumerate(x)]
            if into_live and type(live) is list:
                live[:] = items
                return live
            return items
        if not isinstance(x, dict):
            raise SerializationError(f"unexpected {type(x).__name__} in snapshot skeleton")
        tag = x.get(TAG)
        if tag is None:
            new = {k: walk(v, _get(live, k), depth + 1, f"{where}[{k!r}]") for k, v in x.items()}
            return _into_dict(live, new) if into_live else new
        if tag == "dtensor":
            return (on_dtensor or restore_shard)(x, tensor_at(_index(x)), live, where)
        if tag == "tensor":
            t = tensor_at(_index(x))
            if x.get("parameter"):
                return torch.nn.Parameter(t, requires_grad=bool(x.get("requires_grad", True)))
            return _into_tensor(live, t) if into_live else t
        if tag == "ndarray":
            a = tensor_at(_index(x)).numpy()
            if (into_live and isinstance(live, np.ndarray) and live.shape == a.shape and live.dtype == a.dtype
                    and live.flags.writeable):
                np.copyto(live, a)
                return live
            return a
        if tag == "generator":
            if generator_states:
                return tensor_at(_index(x))
            g = live if isinstance(live, torch.Generator) else torch.Generator(str(x.get("device", "cpu")))
            g.set_state(tensor_at(_index(x)).clone())
            return g
        if tag == "npscalar":
            return np.dtype(str(x["dtype"])).type(x["value"])
        if tag == "dtype":
            return dtype_from_name(x["name"])
        if tag == "size":
            return torch.Size(_ints(x["items"]))
        if tag == "bytes":
            return bytes.fromhex(x["hex"])
        if tag == "path":
            return (type(live) if isinstance(live, pathlib.PurePath) else pathlib.Path)(str(x["value"]))
        if tag == "tuple":
            return tuple(walk(v, _at(live, i), depth + 1, f"{where}[{i}]") for i, v in enumerate(_list(x["items"])))
        if tag == "set":
            items = [walk(v, None, depth + 1) for v in _list(x["items"])]
            try:
                if x.get("frozen"):
                    return frozenset(items)
                if into_live and type(live) is set:
                    live.clear()
                    live.update(items)
                    return live
                return set(items)
            except TypeError:
                raise SerializationError("malformed set in snapshot skeleton: an item is not hashable") from None
        if tag == "enum":
            value = walk(x.get("value"), None, depth + 1)
            if isinstance(live, enum.Enum) and _qualname(type(live)) == x.get("type"):
                return type(live)(value)
            return value
        if tag == "dataclass":
            fields = x.get("fields")
            if not isinstance(fields, dict):
                raise SerializationError("malformed dataclass in snapshot skeleton")
            same_class = (dataclasses.is_dataclass(live) and not isinstance(live, type)
                          and _qualname(type(live)) == x.get("type"))
            values = {k: walk(v, getattr(live, k, None) if same_class else None, depth + 1, f"{where}.{k}")
                      for k, v in fields.items()}
            if not same_class:
                return values
            for k, v in values.items():
                object.__setattr__(live, k, v)  # in place, frozen or not: this is a restore
            return live
        if tag in ("dict", "odict"):
            out = {} if tag == "dict" else OrderedDict()
            for pair in _list(x["items"]):
                if not (isinstance(pair, list) and len(pair) == 2) or isinstance(pair[0], (list, dict)):
                    raise SerializationError("malformed dict entry in snapshot skeleton")
                out[pair[0]] = walk(pair[1], _get(live, pair[0]), depth + 1, f"{where}[{pair[0]!r}]")
            if tag == "odict" and isinstance(x.get("metadata"), dict):
                out._metadata = walk(x["metadata"], None, depth + 1)
            return _into_dict(live, out) if into_live else out
        raise SerializationError(f"unknown tag {tag!r} in snapshot skeleton")

    return walk(skeleton, template, 0)


def _get(live: Any, key: Any) -> Any:
    return live.get(key) if isinstance(live, dict) else None


def _at(live: Any, i: int) -> Any:
    return live[i] if isinstance(live, (list, tuple)) and i < len(live) else None


def _into_dict(live: Any, new: dict) -> dict:
    """The live dict with the restored contents (same object), or ``new`` if there is none of its type."""
    if isinstance(live, dict) and type(live) is type(new):
        live.clear()
        live.update(new)
        if hasattr(new, "_metadata"):
            live._metadata = new._metadata
        return live
    return new


def _into_tensor(live: Any, t: torch.Tensor) -> torch.Tensor:
    if (isinstance(live, torch.Tensor) and not isinstance(live, torch.nn.Parameter) and live.shape == t.shape
            and live.dtype == t.dtype and live.layout == torch.strided):
        with torch.no_grad():
            live.copy_(t)
        return live
    return t


def _index(x: dict) -> int:
    i = x.get("index")
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise SerializationError(f"bad tensor index {i!r} in snapshot skeleton")
    return i


def _list(x: Any) -> list:
    if not isinstance(x, list):
        raise SerializationError("malformed snapshot skeleton: expected a list")
    return x


def _ints(x: Any) -> list[int]:
    if not isinstance(x, list) or not all(isinstance(v, int) for v in x):
        raise SerializationError("malformed snapshot skeleton: expected a list of ints")
    return x


def tensor_indices(skeleton: Any, tags: tuple[str, ...] = ("tensor", "ndarray", "generator", "dtensor")) -> set[int]:
    """Indices of the tensors (and arrays, and Generator states) a skeleton refers to; only those
    with one of ``tags`` if given (``("dtensor",)``: the DTensor shards)."""
    found: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            if x.get(TAG) in tags and isinstance(x.get("index"), int):
                found.add(x["index"])
            for v in x.values():
                walk(v)

    walk(skeleton)
    return found
