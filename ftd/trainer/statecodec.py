"""Safe encoding of a training state: a JSON skeleton plus a flat list of tensors. No pickle.

``encode`` walks dicts, lists, tuples, numbers, strings, None, tensors and numpy arrays; tensors
(and arrays) are replaced by ``{"__ftd__": "tensor", "index": i}`` and collected in order, so the
arena holds their bytes and the skeleton holds everything else. JSON keeps bools, ints, floats
(NaN and infinities included) and strings exact; tags keep tuples, non-string dict keys, dtypes
and numpy scalars exact, so ``decode(encode(x)) == x`` type for type. Anything else raises a
SerializationError that names where in the state it sits.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

from ftd.errors import SerializationError
from ftd.shm.layout import DTYPE_SIZES

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


def encode(obj: Any) -> tuple[Any, list[torch.Tensor]]:
    """Return (JSON-able skeleton, tensors in skeleton order). Arrays become CPU tensors sharing memory."""
    tensors: list[torch.Tensor] = []

    def walk(x: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError(f"state nested deeper than {MAX_DEPTH} levels at {path}")
        if x is None or isinstance(x, (bool, int, float, str)):
            if type(x) not in (type(None), bool, int, float, str):  # subclasses such as IntEnum, np.float64
                return walk_scalar_subclass(x, path)
            return x
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
                raise SerializationError(f"{path}: only dense tensors can be snapshotted, got layout {x.layout}"
                                         f" on {x.device}; convert it with .to_dense() in state_dict()")
            dtype_name(x.dtype)
            tensors.append(x.detach())
            node = {TAG: "tensor", "index": len(tensors) - 1}
            if isinstance(x, torch.nn.Parameter):
                node["parameter"] = True
                node["requires_grad"] = x.requires_grad
            return node
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise SerializationError(f"{path}: numpy array of dtype {x.dtype} cannot be stored safely")
            t = torch.from_numpy(np.ascontiguousarray(x))
            tensors.append(t)
            return {TAG: "ndarray", "index": len(tensors) - 1}
        if isinstance(x, np.generic):
            if x.dtype.kind not in "biufc":
                raise SerializationError(f"{path}: numpy scalar of dtype {x.dtype} cannot be stored safely")
            return {TAG: "npscalar", "dtype": x.dtype.str, "value": x.item()}
        if isinstance(x, torch.dtype):
            return {TAG: "dtype", "name": dtype_name(x)}
        if isinstance(x, torch.Size):
            return {TAG: "size", "items": list(x)}
        if isinstance(x, (bytes, bytearray)):
            return {TAG: "bytes", "hex": bytes(x).hex()}
        if isinstance(x, tuple):
            return {TAG: "tuple", "items": [walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(x)]
        if isinstance(x, OrderedDict):  # module state_dicts: keep the type and the version _metadata
            node = {TAG: "odict", "items": [[walk_key(k, path), walk(v, f"{path}.{k}", depth + 1)]
                                             for k, v in x.items()]}
            if getattr(x, "_metadata", None) is not None:
                node["metadata"] = walk(dict(x._metadata), f"{path}._metadata", depth + 1)
            return node
        if isinstance(x, dict):
            if all(type(k) is str and k != TAG for k in x):
                return {k: walk(v, f"{path}.{k}", depth + 1) for k, v in x.items()}
            return {TAG: "dict", "items": [[walk_key(k, path), walk(v, f"{path}[{k!r}]", depth + 1)]
                                           for k, v in x.items()]}
        raise SerializationError(
            f"{path}: values of type {type(x).__module__}.{type(x).__qualname__} cannot be snapshotted safely. "
            "Give the object state_dict()/load_state_dict() methods, or convert it to tensors, numbers, "
            "strings, lists and dicts")

    def walk_key(k: Any, path: str) -> Any:
        if not (k is None or type(k) in (str, int, float, bool)):
            raise SerializationError(f"{path}: dict key {k!r} of type {type(k).__name__} is not supported;"
                                     " use str, int, float or bool keys")
        return k

    def walk_scalar_subclass(x: Any, path: str) -> Any:
        if isinstance(x, np.generic):
            return {TAG: "npscalar", "dtype": x.dtype.str, "value": x.item()}
        for base in (bool, int, float, str):
            if isinstance(x, base):
                return base(x)
        raise SerializationError(f"{path}: cannot store {type(x).__qualname__}")  # pragma: no cover

    return walk(obj, "state", 0), tensors


def decode(skeleton: Any, tensor_at: Callable[[int], torch.Tensor]) -> Any:
    """Rebuild the object; ``tensor_at(i)`` supplies tensor i (already cloned out of shared memory)."""

    def walk(x: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SerializationError("snapshot skeleton nested too deep")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [walk(v, depth + 1) for v in x]
        if not isinstance(x, dict):
            raise SerializationError(f"unexpected {type(x).__name__} in snapshot skeleton")
        tag = x.get(TAG)
        if tag is None:
            return {k: walk(v, depth + 1) for k, v in x.items()}
        if tag == "tensor":
            t = tensor_at(_index(x))
            if x.get("parameter"):
                t = torch.nn.Parameter(t, requires_grad=bool(x.get("requires_grad", True)))
            return t
        if tag == "ndarray":
            return tensor_at(_index(x)).numpy()
        if tag == "npscalar":
            return np.dtype(str(x["dtype"])).type(x["value"])
        if tag == "dtype":
            return dtype_from_name(x["name"])
        if tag == "size":
            return torch.Size(_ints(x["items"]))
        if tag == "bytes":
            return bytes.fromhex(x["hex"])
        if tag == "tuple":
            return tuple(walk(v, depth + 1) for v in _list(x["items"]))
        if tag in ("dict", "odict"):
            out = {} if tag == "dict" else OrderedDict()
            for pair in _list(x["items"]):
                if not (isinstance(pair, list) and len(pair) == 2) or isinstance(pair[0], (list, dict)):
                    raise SerializationError("malformed dict entry in snapshot skeleton")
                out[pair[0]] = walk(pair[1], depth + 1)
            if tag == "odict" and isinstance(x.get("metadata"), dict):
                out._metadata = walk(x["metadata"], depth + 1)
            return out
        raise SerializationError(f"unknown tag {tag!r} in snapshot skeleton")

    return walk(skeleton, 0)


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


def tensor_indices(skeleton: Any) -> set[int]:
    """Indices of the tensors (and arrays) a skeleton refers to."""
    found: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            if x.get(TAG) in ("tensor", "ndarray") and isinstance(x.get("index"), int):
                found.add(x["index"])
            for v in x.values():
                walk(v)

    walk(skeleton)
    return found
